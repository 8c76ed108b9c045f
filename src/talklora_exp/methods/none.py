"""`method=none`: the base model as it is, no adapter and no training, evaluated with the same prompts, decoding and
answer extraction as every method, so a generation table shows what fine-tuning added (the zero-shot row)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from .base import Method, TargetLayer


class NoneMethod(Method):
    name = "none"
    label, color = "Zero-shot (no training)", "#8C8C8C"
    inert = ("dropout",)  # the yaml keeps every method's shape; nothing acts
    adapts = False

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return 0

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        if task_kind != "causal":
            raise UserError("method=none evaluates the base model zero-shot; an encoder task's classifier head would be "
                            "untrained, so it runs on generation tasks only (task=commonsense/*, gsm8k)")  # fmt: skip
        model.requires_grad_(False)
        return model

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        """No adapter: nothing to save (the base model is named by the run's config)."""

    def load(self, model: nn.Module, in_dir: Path) -> nn.Module:
        return model

    def adapter_param_names(self, model: nn.Module) -> list[str]:
        return []
