"""TeamLoRA in the trainer: the peft tuner of `talklora_exp.tuners.teamlora` (the layer math and the fields'
defaults and checks live there; the yaml keys are its fields, `rank` being `r`) and its parameter formula."""

from __future__ import annotations

from ..tuners import TeamLoRAConfig
from .base import Method, TargetLayer


class TeamLoRAMethod(Method):
    name = "teamlora"
    label, color = "TeamLoRA", "#DA8BC3"
    config_cls = TeamLoRAConfig
    routed = True

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        E = self.cfg.num_experts
        return sum(rank * t.d_in + rank * t.d_out + E * t.d_in + E * E for t in layers)
