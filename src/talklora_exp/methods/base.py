"""The one adapter path every method takes: a peft config, `get_peft_model`, peft's save and load. A method supplies
only its peft config class (with how yaml keys name its fields) and its parameter formula (the budget solver needs
counts before a model exists)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..tuners.mixture import adapter_dtype_for, mixture_layers, proj_type

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal": "CAUSAL_LM"}  # any other task kind: a bare PeftModel
# peft config fields the trainer sets (never a yaml key): the rank, the expert count, targets and heads
MANAGED = {"r", "num_experts", "target_modules", "exclude_modules", "modules_to_save"}


@dataclass(frozen=True)
class TargetLayer:
    """One adapted linear layer: its path, shape and projection type (path with block indices wildcarded)."""

    path: str
    d_in: int
    d_out: int

    @property
    def proj_type(self) -> str:
        return proj_type(self.path)


def _matches(path: str, targets: list[str]) -> bool:
    # peft's list semantics: the full name, or a suffix after a dot.
    return any(path == t or path.endswith("." + t) for t in targets)


def find_target_layers(model: nn.Module, targets: list[str]) -> list[TargetLayer]:
    """All nn.Linear layers whose name matches a target; a clear error listing the linear names when none do."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = [TargetLayer(n, m.in_features, m.out_features) for n, m in linears.items() if _matches(n, list(targets))]
    if not found:
        other = sorted({f"{type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()
                        if n and _matches(n, list(targets)) and not list(m.children())})  # fmt: skip
        if other:
            raise UserError(f"model.target_modules={list(targets)} are {', '.join(other)} layers, not nn.Linear; the "
                            "methods here adapt nn.Linear layers (bitsandbytes' Linear4bit and Linear8bitLt included)")  # fmt: skip
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise UserError(
            f"model.target_modules={list(targets)} match no linear layer; this model's linear layer names: {names}"
        )
    return found


class TrainHooks:
    """What the trainer asks of a method each step; the default does nothing (LoRA, DoRA, HiRA)."""

    routing: Any = None  # a RoutingRecorder for mixture methods

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def set_batch(self, batch: dict) -> None:
        """Called before each forward so per-token statistics can skip padding."""


def switch_balance_loss(g: torch.Tensor, recorder: Any = None) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_i f_i P_i over (non-padding) tokens: f = top-1 shares, P = mean gates."""
    E = g.shape[-1]
    g2 = g.reshape(-1, E)
    mask = recorder.token_mask(g.shape[:-1]) if recorder is not None else None
    if mask is not None:
        g2 = g2[mask.reshape(-1)]
    f = torch.nn.functional.one_hot(g2.argmax(-1), E).to(g2.dtype).mean(0)
    return E * (f * g2.mean(0)).sum()


class RoutedHooks(TrainHooks):
    """For the mixtures: routing statistics over non-padding tokens, and the optional balance loss. Both read the
    gates through each layer's routing taps (`tuners.mixture.Routed`), which a gradient-checkpoint recompute never
    calls: the balance-loss terms are exactly this micro-batch's forward's, and `aux_loss` hands them over (the step's
    backward frees their graphs), so no routing tensor outlives the step."""

    def __init__(self, layers: dict[str, nn.Module], balance_weight: float):
        from ..routing import RoutingRecorder

        self.layers = layers
        self.balance_weight = balance_weight
        self.routing = RoutingRecorder(layers)
        self._terms: list[torch.Tensor] = []
        if balance_weight > 0:
            for lyr in layers.values():
                lyr.taps.append(self._collect)

    def _collect(self, layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        # The gates only: the loss is formed in aux_loss, outside any checkpointed block (work done here would be
        # saved for backward in the forward but not in the recompute, which checkpointing refuses).
        if layer.training:
            self._terms.append(g)

    def pending(self) -> int:
        """Gates held for the balance loss (0 after `aux_loss`: nothing kept past the step)."""
        return len(self._terms)

    def set_batch(self, batch: dict) -> None:
        self.routing.set_mask(batch.get("attention_mask"))
        self._terms = []  # gates of a forward whose loss was never taken (an evaluation) are dropped

    def aux_loss(self) -> torch.Tensor | None:
        gates, self._terms = self._terms, []
        if self.balance_weight <= 0 or not gates:
            return None
        return self.balance_weight * torch.stack([switch_balance_loss(g, self.routing) for g in gates]).mean()


def _is_head_param(name: str) -> bool:
    return ".modules_to_save." in name or ".original_module." in name


class Method:
    """A PEFT method through peft. A subclass names its peft config class and, where yaml keys differ from its fields,
    the renames; it supplies `param_count`. Injection, saving, loading and training hooks are shared."""

    name: str = ""
    label: str = ""  # the tables' row name
    color: str = "#8C8C8C"  # the plots' colour
    config_cls: type | None = None  # the method's peft config: its only typed config (None: no adapter)
    renames: dict[str, str] = {"rank": "r"}  # yaml key -> peft config field, where they differ
    fixed: dict[str, Any] = {}  # peft config fields the method sets itself (DoRA: use_dora=True)
    inert: tuple[str, ...] = ()  # yaml keys accepted and unused (method=none's dropout)
    defaults: dict[str, Any] = {}  # a yaml key's default where the method's convention differs from its config's
    routed = False  # True: the layers route tokens (routing statistics, balance loss)
    adapts = True  # False: no adapter, so no parameter budget (method=none)

    def __init__(self, cfg: Any):
        self.cfg = cfg  # a methods.config.MethodConfig

    @classmethod
    def yaml_fields(cls) -> dict[str, str]:
        """The method's own yaml keys -> type (a peft config field's annotation): the config's fields beyond what
        every peft config has and what the trainer sets (targets, heads, the rank, the expert count)."""
        if cls.config_cls is None:
            return {}
        from peft.config import PeftConfig

        common = {f.name for f in dataclasses.fields(PeftConfig)} | MANAGED
        back = {v: k for k, v in cls.renames.items()}
        return {back.get(f.name, f.name): str(f.type) for f in dataclasses.fields(cls.config_cls)
                if f.name not in common and f.name not in cls.fixed}  # fmt: skip

    @classmethod
    def resolve(cls, options: dict[str, Any], rank: int) -> dict[str, Any]:
        """Options as the peft config gets them once the rank is known (LoRA: alpha null -> 2 x rank); also where a
        rule the peft config does not check itself is checked."""
        return dict(options)

    def resolved(self) -> dict[str, Any]:
        """Yaml keys whose value the rank decides, recorded in the run's config (LoRA's alpha)."""
        return {}

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        """Adapter parameters by formula (tests check it against the peft model)."""
        raise NotImplementedError

    def peft_config(self, targets: list[str], head_modules: list[str], task_kind: str) -> Any:
        from .config import build_peft_config

        c = self.cfg
        return build_peft_config(type(self), c.options, c.rank, c.num_experts,
                                 **self.common(targets, head_modules, task_kind))  # fmt: skip

    def common(self, targets: list[str], head_modules: list[str], task_kind: str) -> dict[str, Any]:
        """The peft config fields every method sets the same way."""
        return dict(target_modules=list(targets), modules_to_save=list(head_modules) or None,
                    task_type=TASK_TYPES.get(task_kind))  # fmt: skip

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        """`get_peft_model`: adapters on the targets, heads trained as peft's `modules_to_save` copies."""
        from peft import get_peft_model

        find_target_layers(model, targets)  # the clear error when nothing matches
        c = self.cfg
        config = self.peft_config(targets, head_modules, task_kind)  # its checks: one line (methods.config)
        floor = DTYPES[c.adapter_dtype]
        # peft keeps adapters in fp32 on a half-precision base unless asked not to (adapter_dtype)
        try:
            model = get_peft_model(model, config, autocast_adapter_dtype=floor == torch.float32)
        except (TypeError, ValueError) as e:  # a base layer type the method cannot adapt (peft's or ours)
            raise UserError(f"method={c.name}: {str(e).splitlines()[0]}") from None
        if floor != torch.float32:  # the mixtures create fp32 adapters: narrow them as asked
            for n, p in model.named_parameters():
                if p.requires_grad and not _is_head_param(n) and p.dtype != (dt := adapter_dtype_for(p.dtype, floor)):
                    p.data = p.data.to(dt)
        return model

    def hooks(self, model: nn.Module) -> TrainHooks:
        if not self.routed:
            return TrainHooks()
        return RoutedHooks(mixture_layers(model), float(self.cfg.options.get("balance_loss", 0.0)))

    def adapter_param_names(self, model: nn.Module) -> list[str]:
        """Trainable parameters that are not task heads (the budget counts these)."""
        return [n for n, p in model.named_parameters() if p.requires_grad and not _is_head_param(n)]

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        """peft's format (adapter_model.safetensors + adapter_config.json); `state_dict`: the whole model's, gathered,
        when the model is sharded (its own parameters then hold only this process's shard)."""
        try:
            model.save_pretrained(str(out_dir), **({"state_dict": state_dict} if state_dict is not None else {}))
        except OSError:
            raise
        except Exception as e:  # safetensors reports a failed write (disk full) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out_dir)) from None

    def load(self, model: nn.Module, in_dir: Path) -> nn.Module:
        """peft's loader, made strict: every saved tensor must fit, and every trainable tensor must be saved."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        try:
            res = set_peft_model_state_dict(model, load_peft_weights(str(in_dir)))
        except RuntimeError as e:  # torch's load_state_dict: "size mismatch for <name>: ..."
            names = re.findall(r"size mismatch for ([^:]+):", str(e))
            if not names:
                raise
            raise UserError(
                f"{in_dir}: adapter does not fit this model/method config (shape mismatch for {names[:3]})"
            ) from None
        absent = sorted(k for k in res.missing_keys if k in trainable)
        if res.unexpected_keys or absent:  # peft loads non-strictly: another method's adapter would load as nothing
            what = (
                f"unknown tensors {res.unexpected_keys[:3]}"
                if res.unexpected_keys
                else f"no saved value for {absent[:3]}"
            )
            raise UserError(f"{in_dir}: adapter does not fit this model/method config ({what})")
        return model


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


__all__ = ["DTYPES", "Method", "RoutedHooks", "TargetLayer", "TrainHooks", "find_target_layers",
           "get_parent", "switch_balance_loss"]  # fmt: skip
