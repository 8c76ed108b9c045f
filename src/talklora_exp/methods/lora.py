"""LoRA and DoRA through peft (`LoraConfig`, DoRA as `use_dora=True`). The yaml's `alpha` and `dropout` are
`lora_alpha` and `lora_dropout`; alpha null = 2 x rank (the LLM-Adapters / DoRA convention: r=32 -> alpha 64),
resolved once the budget picks the rank."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from .base import Method, TargetLayer
from .config import option_error


def lora_params(layers: list[TargetLayer], rank: int) -> int:
    """LoRA's adapter parameters at `rank` (also what the `budget=lora_r*` presets target)."""
    return sum(rank * (t.d_in + t.d_out) for t in layers)


class LoRAMethod(Method):
    name = "lora"
    label, color = "LoRA", "#4C72B0"
    config_cls = LoraConfig
    renames = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    fixed: dict[str, Any] = {"use_dora": False}
    defaults: dict[str, Any] = {"alpha": None}  # null = 2 x the final rank (peft's own default is a fixed 8)

    @classmethod
    def yaml_fields(cls) -> dict[str, str]:
        return {"alpha": "float | None", "dropout": "float"}  # peft's other LoraConfig fields are not exposed

    @classmethod
    def resolve(cls, options: dict[str, Any], rank: int) -> dict[str, Any]:
        alpha, dropout = options.get("alpha"), options.get("dropout", 0.0)
        if alpha is not None and alpha <= 0:
            raise option_error("alpha", alpha, "a positive number, or null for 2 x rank")
        if not 0.0 <= dropout < 1.0:
            raise option_error("dropout", dropout, "a probability in [0, 1)")
        return {**options, "alpha": float(alpha) if alpha is not None else 2.0 * rank}

    def resolved(self) -> dict[str, Any]:
        return {"alpha": self.resolve(self.cfg.options, self.cfg.rank)["alpha"]}

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return lora_params(layers, rank)


class DoRAMethod(LoRAMethod):
    """DoRA: LoRA's direction update plus a learned magnitude per output feature."""

    name = "dora"
    label, color = "DoRA", "#8172B3"
    fixed = {"use_dora": True}

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return lora_params(layers, rank) + sum(t.d_out for t in layers)
