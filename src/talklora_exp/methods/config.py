"""Typed method configs: one dataclass per method, built from `conf/method/<name>.yaml` and validated once, with
one-line errors naming the key, the value and what is allowed. The trainer, the budget solver, the bench and the tests
all use these (never a retyped dict)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..choices import ADAPTER_DTYPES
from ..errors import UserError
from ..tuners.talklora import ROUTER_INPUTS, TALK_MODES


def _fail(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"method.{key}={value!r}; allowed: {allowed}")


@dataclass
class MethodConfig:
    name: str
    rank: int = 8
    dropout: float = 0.05
    num_experts: int = 1  # budget solving searches ranks that are multiples of this
    adapter_dtype: str = "fp32"  # adapters are kept at least this precise (upstream: fp32 adapters on a bf16 base)

    choices: ClassVar[dict[str, tuple]] = {"adapter_dtype": ADAPTER_DTYPES}

    @classmethod
    def from_dict(cls, d: Any) -> MethodConfig:
        """Coerce and validate a config mapping (a DictConfig or dict); unknown keys are an error."""
        d = dict(d)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"method={d.get('name')}: unknown key(s) {unknown}; {cls.__name__} has {sorted(known)}")
        kw = {}
        for name, f in known.items():
            if name not in d:
                continue
            kw[name] = _coerce(name, d[name], f.type)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.rank < 1:
            raise _fail("rank", self.rank, "a positive integer")
        if self.num_experts < 1:
            raise _fail("num_experts", self.num_experts, "a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("dropout", self.dropout, "a probability in [0, 1)")
        for key, allowed in self.choices.items():
            if getattr(self, key) not in allowed:
                raise _fail(key, getattr(self, key), str(list(allowed)))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Hydra hands CLI values over as parsed YAML; accept ints for floats, reject everything else with one line."""
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    optional = "None" in t
    if value is None:
        if optional:
            return None
        raise _fail(key, value, f"a value of type {t.replace(' | None', '')}")
    base = t.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise _fail(key, value, "true or false")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "an integer" + (" or null" if optional else ""))
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, "a number" + (" or null" if optional else ""))
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise _fail(key, value, "a string")
        return value
    return value


@dataclass
class LoRAConfig(MethodConfig):
    """peft LoRA. alpha null = 2 x rank (the LLM-Adapters / DoRA convention: r=32 -> alpha 64), resolved after the
    budget picks the rank."""

    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None and self.alpha <= 0:
            raise _fail("alpha", self.alpha, "a positive number, or null for 2 x rank")

    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


@dataclass
class MixtureConfig(MethodConfig):
    """MoELoRA and TalkLoRA (one layer; the fields pick the variant). See tuners/talklora.py."""

    rank: int = 32
    num_experts: int = 4
    alpha: float = 64.0  # only used when scaling=true
    scaling: bool = False
    share_b: bool = False
    talk: str = "off"
    expert_mixer: bool = False
    router_input: str = "x"
    top_k: int | None = None
    balance_loss: float = 0.0

    choices: ClassVar[dict[str, tuple]] = {
        **MethodConfig.choices,
        "talk": TALK_MODES,
        "router_input": ROUTER_INPUTS,
    }

    def validate(self) -> None:
        super().validate()  # rank % num_experts is checked where the rank is final (after budget solving)
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise _fail("top_k", self.top_k, f"null or an integer in [1, {self.num_experts}]")
        if self.balance_loss < 0:
            raise _fail("balance_loss", self.balance_loss, "a number >= 0")
        if self.alpha <= 0:
            raise _fail("alpha", self.alpha, "a positive number")


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA through peft (LoraConfig(use_dora=True)): LoRA plus a learned magnitude per output feature."""


@dataclass
class HiRAConfig(MethodConfig):
    """HiRA (Huang et al., ICLR 2025) as peft's HiraConfig: W0 o (1 + BA). No dropout in the reference code (a flag,
    default off); no scaling (peft's layer has none)."""

    dropout: float = 0.0


@dataclass
class TeamLoRAConfig(MethodConfig):
    """TeamLoRA as upstream ships it (compiled-only in the TalkLoRA code base): shared A, per-expert B_i, router on x,
    an E x E interaction W_I mixing the gates, renormalised. The official TeamLoRA code's differences are flags."""

    rank: int = 32
    num_experts: int = 4
    alpha: float = 64.0  # s = alpha / r scales A x (upstream applies it)
    scale_per_expert: bool = False  # official TeamLoRA: alpha / (r / E) instead of alpha / r
    times_experts: bool = False  # official TeamLoRA: the update multiplied by E
    balance_loss: float = 0.0  # official TeamLoRA adds a load-balancing loss (Switch-style here)

    def validate(self) -> None:
        super().validate()
        if self.alpha <= 0:
            raise _fail("alpha", self.alpha, "a positive number")
        if self.balance_loss < 0:
            raise _fail("balance_loss", self.balance_loss, "a number >= 0")


@dataclass
class NoneConfig(MethodConfig):
    """`method=none`: no adapter, no training (the zero-shot row). Its fields exist only so every method config has
    the same shape; none of them acts."""

    dropout: float = 0.0
