"""The small interface every method implements, and helpers shared by the methods."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def adapter_param_dtype(base: torch.dtype, floor: torch.dtype) -> torch.dtype:
    """Adapters are kept at least at `method.adapter_dtype` (fp32 by default, as upstream, whose adapters are fp32 on
    a bf16 base); a wider base (fp32, or fp64 in the exactness tests) keeps its own dtype."""
    return base if base.itemsize >= floor.itemsize else floor


@dataclass(frozen=True)
class TargetLayer:
    """One adapted linear layer: its path, shape and projection type (path with block indices wildcarded)."""

    path: str
    d_in: int
    d_out: int

    @property
    def proj_type(self) -> str:
        return re.sub(r"\.\d+\.", ".*.", self.path)


def _matches(path: str, targets: list[str]) -> bool:
    # peft's list semantics: the full name, or a suffix after a dot.
    return any(path == t or path.endswith("." + t) for t in targets)


def find_target_layers(model: nn.Module, targets: list[str]) -> list[TargetLayer]:
    """All nn.Linear layers whose name matches a target; a clear error listing the linear names when none do."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = [TargetLayer(n, m.in_features, m.out_features) for n, m in linears.items() if _matches(n, list(targets))]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise UserError(
            f"model.target_modules={list(targets)} match no linear layer; this model's linear layer names: {names}"
        )
    return found


class TrainHooks:
    """What the trainer asks of a method each step; the default does nothing (plain LoRA)."""

    routing: Any = None  # a RoutingRecorder for mixture methods

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def set_batch(self, batch: dict) -> None:
        """Called before each forward so per-token statistics can skip padding."""


class Method:
    """A PEFT method: inject adapters, count their parameters by formula, save and load them."""

    name: str = ""
    routed = False  # True: the layers route tokens (routing statistics, balance loss)

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        raise NotImplementedError

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        raise NotImplementedError

    def hooks(self, model: nn.Module) -> TrainHooks:
        return TrainHooks()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, model: nn.Module, in_dir: Path) -> nn.Module:
        raise NotImplementedError

    def adapter_param_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError


def mark_trainable(model: nn.Module, keep: list[str], head_modules: list[str]) -> None:
    """Freeze everything but parameters whose names contain a `keep` marker or sit under a head module."""
    heads = tuple(head_modules)
    for n, p in model.named_parameters():
        in_head = any(n == h or n.startswith(h + ".") or f".{h}." in f".{n}" for h in heads)
        p.requires_grad = any(k in n for k in keep) or in_head


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


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
    """For routed layers (MoELoRA, TalkLoRA, TeamLoRA): routing statistics over non-padding tokens, and the optional
    balance loss. A routed layer has `name`, `probs(x)`, `last_aux` and calls its recorder in forward."""

    def __init__(self, layers: list[nn.Module], balance_weight: float):
        from ..routing import RoutingRecorder

        self.layers = layers
        self.balance_weight = balance_weight
        self.routing = RoutingRecorder(layers)

    def set_batch(self, batch: dict) -> None:
        self.routing.set_mask(batch.get("attention_mask"))

    def aux_loss(self) -> torch.Tensor | None:
        if self.balance_weight <= 0:
            return None
        terms = [lyr.last_aux for lyr in self.layers if lyr.last_aux is not None]
        for lyr in self.layers:
            lyr.last_aux = None
        return self.balance_weight * torch.stack(terms).mean() if terms else None


class AdapterMethod(Method):
    """A method that wraps each target nn.Linear in its own module (the mixtures, HiRA): trainable tensors are found
    by name markers (`keep`), saved as safetensors with the method config, and loaded back strictly."""

    keep: tuple[str, ...] = ("lora_",)
    layer_type: type[nn.Module] = nn.Module

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, self.layer_type)]

    def wrap_targets(self, model: nn.Module, targets: list[str], head_modules: list[str], make: Any) -> nn.Module:
        """Replace every target nn.Linear by `make(target, linear)`, then freeze all but adapters and heads."""
        for t in find_target_layers(model, targets):
            parent, child = get_parent(model, t.path)
            setattr(parent, child, make(t, getattr(parent, child)))
        mark_trainable(model, list(self.keep), head_modules)
        return model

    def hooks(self, model: nn.Module) -> TrainHooks:
        if not self.routed:
            return TrainHooks()
        return RoutedHooks(self.layers(model), float(getattr(self.cfg, "balance_loss", 0.0)))

    def adapter_param_names(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if any(k in n for k in self.keep)]

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Trainable tensors (adapters, shared tensors once, task head) as safetensors, plus the method config."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out_dir / "adapter_model.safetensors"))
        meta = {"method": self.cfg.as_dict(), "tensors": sorted(state)}
        (out_dir / "adapter_config.json").write_text(json.dumps(meta, indent=2))

    def load(self, model: nn.Module, in_dir: Path) -> nn.Module:
        """Every saved tensor must exist in the model with the same shape, and every trainable tensor must be saved."""
        from safetensors.torch import load_file

        state = load_file(str(in_dir / "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        missing = sorted(n for n in state if n not in params)
        wrong = sorted(n for n in state if n in params and tuple(params[n].shape) != tuple(state[n].shape))
        absent = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
        if missing or wrong or absent:
            what = (f"unknown tensors {missing[:3]}" if missing else f"shape mismatch for {wrong[:3]}" if wrong
                    else f"no saved value for {absent[:3]}")  # fmt: skip
            raise UserError(f"{in_dir}: adapter does not fit this model/method config ({what})")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].dtype))
        return model
