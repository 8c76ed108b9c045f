"""MoELoRA and TalkLoRA in the trainer: the peft tuners of `talklora_exp.tuners.talklora` (the layer math lives
there) and their parameter formula."""

from __future__ import annotations

from typing import Any

from ..tuners import MoELoRAConfig, TalkLoRAConfig
from .base import Method, TargetLayer


class MixtureMethod(Method):
    """Registered as both `moelora` and `talklora`; the config fields pick the variant."""

    name = "talklora"
    routed = True

    def peft_config(self, targets: list[str], head_modules: list[str], task_kind: str) -> Any:
        c = self.cfg
        cls = MoELoRAConfig if c.name == "moelora" else TalkLoRAConfig
        return cls(r=c.rank, num_experts=c.num_experts, dropout=c.dropout, alpha=c.alpha, scaling=c.scaling,
                   share_b=c.share_b, talk=c.talk, expert_mixer=c.expert_mixer, router_input=c.router_input,
                   top_k=c.top_k, balance_loss=c.balance_loss, **self.common(targets, head_modules, task_kind))  # fmt: skip

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        """Adapter parameters by formula (tests check this against the peft model)."""
        c, E = self.cfg, self.cfg.num_experts
        k = rank // E
        n = 0
        for t in layers:
            n += rank * t.d_in  # A
            n += E * k * k if c.expert_mixer else 0  # M_i
            n += E * E if (c.talk != "off" and c.router_input == "talked") else 0  # T
            n += E * (t.d_in if c.router_input == "x" else rank)  # router
            n += 0 if c.share_b else rank * t.d_out  # per-layer B
        if c.share_b:
            n += sum(rank * d_out for d_out in {t.proj_type: t.d_out for t in layers}.values())
        return n
