"""Method registry: `method.name` -> the Method class (its peft config class, its parameter formula). Every method
goes through peft; the mixtures' peft tuners live in `talklora_exp.tuners`. Adding a method = a peft config (peft's, or
a tuner in `tuners/`), a `Method` subclass naming it, `conf/method/<name>.yaml`, and one line here. Everything that
lists methods (configs, bench, tables, tests) reads `METHODS`."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Method, TargetLayer, find_target_layers
from .config import MethodConfig, parse
from .hira import HiRAMethod
from .lora import DoRAMethod, LoRAMethod
from .none import NoneMethod
from .talklora import MoELoRAMethod, TalkLoRAMethod
from .teamlora import TeamLoRAMethod

METHODS: dict[str, type[Method]] = {  # in the tables' row order
    "none": NoneMethod,
    "lora": LoRAMethod,
    "dora": DoRAMethod,
    "hira": HiRAMethod,
    "moelora": MoELoRAMethod,
    "teamlora": TeamLoRAMethod,
    "talklora": TalkLoRAMethod,
}


def method_config(cfg: Any) -> MethodConfig:
    """The typed, validated config of `cfg` (a `method` DictConfig or a dict)."""
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if name not in METHODS:
        raise UserError(f"method.name={name!r} unknown; valid: {sorted(METHODS)}")
    return parse(cfg, METHODS[name])


def build_method(cfg: Any) -> Method:
    typed = cfg if isinstance(cfg, MethodConfig) else method_config(cfg)
    return METHODS[typed.name](typed)


__all__ = ["METHODS", "Method", "MethodConfig", "TargetLayer", "build_method", "find_target_layers", "method_config"]
