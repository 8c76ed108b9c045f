"""The small interface every method implements, and helpers shared by the methods."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError


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
