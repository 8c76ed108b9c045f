"""Method registry: `method.name` picks the class. MoELoRA is TalkLoRA's layer with communication off."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Method, TargetLayer, find_target_layers
from .lora import LoRAMethod
from .talklora import MixtureMethod, TalkLoRALinear

METHODS: dict[str, type[Method]] = {"lora": LoRAMethod, "moelora": MixtureMethod, "talklora": MixtureMethod}


def build_method(cfg: Any) -> Method:
    if cfg.name not in METHODS:
        raise UserError(f"method.name={cfg.name!r} unknown; valid: {sorted(METHODS)}")
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "Method", "TargetLayer", "TalkLoRALinear", "build_method", "find_target_layers"]
