"""A method's config as the trainer holds it: the four keys every `conf/method/<name>.yaml` has for the trainer
(name, rank, num_experts, adapter_dtype), and `options`, every other key, which are the fields of the method's peft
config (`Method.config_cls`: TalkLoRAConfig, peft's LoraConfig, ...). That peft config is the only typed
description of a method: its field types coerce the yaml values, its `__post_init__` validates them (once), its
defaults fill keys a yaml leaves out. Errors are one line naming `method.<key>`, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..choices import ADAPTER_DTYPES
from ..errors import UserError

TRAINER_KEYS = ("name", "rank", "num_experts", "adapter_dtype")


def option_error(key: str, value: Any, allowed: str) -> UserError:
    """The one-line error for `method.<key>=<value>`."""
    return UserError(f"method.{key}={value!r}; allowed: {allowed}")


@dataclass
class MethodConfig:
    """The trainer's keys, typed, and the method's own options (peft config field -> value, defaults filled in)."""

    name: str
    rank: int
    num_experts: int = 1  # budget solving searches ranks that are multiples of this
    adapter_dtype: str = "fp32"  # adapters are kept at least this precise (upstream: fp32 adapters on a bf16 base)
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse(d: Any, method: type) -> MethodConfig:
    """Coerce and validate a `method` mapping (a DictConfig or dict) for `method`; unknown keys are an error."""
    d = dict(d)
    name = d.get("name")
    settable = method.yaml_fields()
    unknown = sorted(set(d) - set(TRAINER_KEYS) - set(settable) - set(method.inert))
    if unknown:
        raise UserError(f"method={name}: unknown key(s) {unknown}; its keys are {sorted([*TRAINER_KEYS, *settable])}")
    rank = _coerce("rank", d.get("rank", 8), "int")
    experts = _coerce("num_experts", d.get("num_experts", 1), "int")
    for key, value in (("rank", rank), ("num_experts", experts)):
        if value < 1:
            raise option_error(key, value, "a positive integer")
    dtype = d.get("adapter_dtype", "fp32")
    if dtype not in ADAPTER_DTYPES:
        raise option_error("adapter_dtype", dtype, str(list(ADAPTER_DTYPES)))
    given = {key: _coerce(key, d[key], typ) for key, typ in settable.items() if key in d}
    cfg = MethodConfig(name=name, rank=rank, num_experts=experts, adapter_dtype=dtype)
    if method.config_cls is None:
        return cfg
    # rank % num_experts is checked where the rank is final (after budget solving): validate with a rank that fits
    build_peft_config(method, given, rank if rank % experts == 0 else experts, experts)
    # keys the yaml leaves out take the config's field defaults as declared, not as resolved at the probe's rank
    # (LoRA's alpha: null stays null, so 2 x rank follows the rank the budget picks)
    declared = {
        f.name: f.default for f in dataclasses.fields(method.config_cls) if f.default is not dataclasses.MISSING
    }
    defaults = {k: declared[method.renames.get(k, k)] for k in settable if method.renames.get(k, k) in declared}
    cfg.options = {**defaults, **method.defaults, **given}
    return cfg


def build_peft_config(method: type, options: dict[str, Any], rank: int, num_experts: int,
                      **managed: Any) -> Any:  # fmt: skip
    """The method's peft config from yaml-named options; its own ValueError becomes one line in yaml names."""
    kw = {method.renames.get(k, k): v for k, v in method.resolve(options, rank).items()}
    kw["r"] = rank
    if "num_experts" in {f.name for f in dataclasses.fields(method.config_cls)}:
        kw["num_experts"] = num_experts
    try:
        return method.config_cls(**kw, **method.fixed, **managed)
    except (ValueError, TypeError) as e:
        raise UserError(yaml_names(str(e).splitlines()[0], method)) from None


def yaml_names(msg: str, method: type) -> str:
    """A peft config's message in the yaml's names: `r=6 is not divisible by num_experts=4` ->
    `method.rank=6 is not divisible by method.num_experts=4`."""
    back = {v: k for k, v in method.renames.items()}
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    out = re.sub(r"\b([a-z_]+)=", lambda m: f"method.{back.get(m[1], m[1])}=" if m[1] in fields else m[0], msg)
    return out if out.startswith("method.") else f"method={method.name}: {out}"


def _coerce(key: str, value: Any, typ: str) -> Any:
    """Hydra hands CLI values over as parsed YAML; accept ints for floats, reject everything else with one line."""
    optional = "None" in typ or "Optional" in typ
    if value is None:
        if optional:
            return None
        raise option_error(key, value, f"a value of type {typ}")
    base = re.sub(r"\s*\|\s*None|Optional\[(.*)\]", r"\1", typ).strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise option_error(key, value, "true or false")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise option_error(key, value, "an integer" + (" or null" if optional else ""))
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise option_error(key, value, "a number" + (" or null" if optional else ""))
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise option_error(key, value, "a string")
        return value
    return value
