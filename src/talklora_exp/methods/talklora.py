"""MoELoRA and TalkLoRA in the trainer: the peft tuners of `talklora_exp.tuners.talklora` (the layer math and the
fields' defaults and checks live there; the yaml keys are its fields, `rank` being `r`) and their parameter formula."""

from __future__ import annotations

from ..tuners import MoELoRAConfig, TalkLoRAConfig
from .base import Method, TargetLayer


class TalkLoRAMethod(Method):
    name = "talklora"
    label, color = "TalkLoRA", "#55A868"
    config_cls = TalkLoRAConfig
    routed = True

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        """Adapter parameters by formula (tests check this against the peft model)."""
        c, E = self.cfg.options, self.cfg.num_experts
        k = rank // E
        n = 0
        for t in layers:
            n += rank * t.d_in  # A
            n += E * k * k if c["expert_mixer"] else 0  # M_i
            n += E * E if (c["talk"] != "off" and c["router_input"] == "talked") else 0  # T
            n += E * (t.d_in if c["router_input"] == "x" else rank)  # router
            n += 0 if c["share_b"] else rank * t.d_out  # per-layer B
        if c["share_b"]:
            n += sum(rank * d_out for d_out in {t.proj_type: t.d_out for t in layers}.values())
        return n


class MoELoRAMethod(TalkLoRAMethod):
    """TalkLoRA's layer with communication off (MoELoRAConfig's defaults)."""

    name = "moelora"
    label, color = "MoELoRA", "#DD8452"
    config_cls = MoELoRAConfig
