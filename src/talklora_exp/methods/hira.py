"""HiRA (Huang et al., ICLR 2025; the code base TalkLoRA forked) is peft's own `HiraConfig`: a Hadamard high-rank
update of the frozen weight, out = (W0 o (1 + B A)) x + b, A kaiming, B zero. Where is the HiRA forward? peft's
`peft/tuners/hira/layer.py`, `Linear.forward`. Same parameter count as LoRA at the same rank; no scaling (peft's layer
has none, and neither has the reference code). The yaml's `dropout` is `hira_dropout`."""

from __future__ import annotations

from typing import Any

from peft import HiraConfig

from .base import Method, TargetLayer
from .config import option_error
from .lora import lora_params


class HiRAMethod(Method):
    name = "hira"
    label, color = "HiRA", "#937860"
    config_cls = HiraConfig
    renames = {"rank": "r", "dropout": "hira_dropout"}

    @classmethod
    def yaml_fields(cls) -> dict[str, str]:
        return {"dropout": "float"}

    @classmethod
    def resolve(cls, options: dict[str, Any], rank: int) -> dict[str, Any]:
        if not 0.0 <= options.get("dropout", 0.0) < 1.0:
            raise option_error("dropout", options["dropout"], "a probability in [0, 1)")
        return dict(options)

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return lora_params(layers, rank)
