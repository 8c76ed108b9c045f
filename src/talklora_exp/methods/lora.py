"""LoRA and DoRA through peft (`LoraConfig`, DoRA as `use_dora=True`)."""

from __future__ import annotations

from typing import Any

from .base import Method, TargetLayer


class LoRAMethod(Method):
    name = "lora"
    use_dora = False

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) for t in layers)

    def peft_config(self, targets: list[str], head_modules: list[str], task_kind: str) -> Any:
        from peft import LoraConfig

        c = self.cfg
        return LoraConfig(r=c.rank, lora_alpha=c.resolved_alpha(), lora_dropout=c.dropout, use_dora=self.use_dora,
                          **self.common(targets, head_modules, task_kind))  # fmt: skip


class DoRAMethod(LoRAMethod):
    """DoRA: LoRA's direction update plus a learned magnitude per output feature."""

    name = "dora"
    use_dora = True

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) + t.d_out for t in layers)
