"""Method registry: `method.name` picks (method class, typed config class). Every method goes through peft; the
mixtures' peft tuners live in `talklora_exp.tuners`. MoELoRA is TalkLoRA's layer with communication off. Adding a
method = a peft config + a parameter formula (one module), a config file in conf/method, one line here."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Method, TargetLayer, find_target_layers
from .config import DoRAConfig, HiRAConfig, LoRAConfig, MethodConfig, MixtureConfig, NoneConfig, TeamLoRAConfig
from .hira import HiRAMethod
from .lora import DoRAMethod, LoRAMethod
from .none import NoneMethod
from .talklora import MixtureMethod
from .teamlora import TeamLoRAMethod

METHODS: dict[str, tuple[type[Method], type[MethodConfig]]] = {
    "lora": (LoRAMethod, LoRAConfig),
    "moelora": (MixtureMethod, MixtureConfig),
    "talklora": (MixtureMethod, MixtureConfig),
    "teamlora": (TeamLoRAMethod, TeamLoRAConfig),
    "hira": (HiRAMethod, HiRAConfig),
    "dora": (DoRAMethod, DoRAConfig),
    "none": (NoneMethod, NoneConfig),
}


def method_config(cfg: Any) -> MethodConfig:
    """The typed, validated config of `cfg` (a `method` DictConfig or a dict)."""
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if name not in METHODS:
        raise UserError(f"method.name={name!r} unknown; valid: {sorted(METHODS)}")
    return METHODS[name][1].from_dict(cfg)


def build_method(cfg: Any) -> Method:
    typed = cfg if isinstance(cfg, MethodConfig) else method_config(cfg)
    return METHODS[typed.name][0](typed)


__all__ = ["METHODS", "Method", "MethodConfig", "TargetLayer", "build_method", "find_target_layers", "method_config"]
