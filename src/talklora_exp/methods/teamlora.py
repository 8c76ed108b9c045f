"""TeamLoRA in the trainer: the peft tuner of `talklora_exp.tuners.teamlora` (the layer math lives there) and its
parameter formula."""

from __future__ import annotations

from typing import Any

from ..tuners import TeamLoRAConfig
from .base import Method, TargetLayer


class TeamLoRAMethod(Method):
    name = "teamlora"
    routed = True

    def peft_config(self, targets: list[str], head_modules: list[str], task_kind: str) -> Any:
        c = self.cfg
        return TeamLoRAConfig(r=c.rank, num_experts=c.num_experts, dropout=c.dropout, alpha=c.alpha,
                              scale_per_expert=c.scale_per_expert, times_experts=c.times_experts,
                              balance_loss=c.balance_loss, **self.common(targets, head_modules, task_kind))  # fmt: skip

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        E = self.cfg.num_experts
        return sum(rank * t.d_in + rank * t.d_out + E * t.d_in + E * E for t in layers)
