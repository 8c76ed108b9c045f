"""TeamLoRA as a peft tuner, as the TalkLoRA code base ships it (math recovered from its bytecode). Where is the
TeamLoRA forward? `TeamLoRAExperts.forward` below.

Per adapted linear W0 (d_in -> d_out), rank r, E experts, k = r / E, s = alpha / r:
    u = drop(s . A x)                   A: r x d_in; u split into E chunks u_i (k each)
    p = softmax(R x)                    R: E x d_in (router on the input)
    q = W_I p;  p~ = q / sum_j q_j      W_I: E x E interaction, init U(-0.1, 0.1) with diagonal 1
    out = W0 x + sum_i p~_i B_i u_i     B_i: d_out x k, zero init
Official TeamLoRA (Lin et al. 2024) differs: `times_experts` multiplies the update by E, `scale_per_expert` uses
alpha / (r / E), `balance_loss` adds a load-balancing loss. Vectorised as TalkLoRA: the gate is a scalar per expert,
so sum_i p~_i B_i u_i = [B_1 .. B_E] . concat_i(p~_i u_i), one matmul (`methods/reference.py` keeps the loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from torch import nn

from .mixture import MixtureLayer, MixtureTuner, Routed, kaiming
from .talklora import check_mixture_fields


@dataclass
class TeamLoRAConfig(PeftConfig):
    """TeamLoRA with the TalkLoRA code base's defaults; the official TeamLoRA code's differences are flags."""

    r: int = field(default=32, metadata={"help": "rank of the shared A (split into num_experts chunks of r/E)"})
    num_experts: int = field(default=4, metadata={"help": "experts per layer; r must be divisible by it"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "as LoraConfig.target_modules"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "as LoraConfig.exclude_modules"})
    dropout: float = field(default=0.05, metadata={"help": "on s . A x"})
    alpha: float = field(default=64.0, metadata={"help": "s = alpha / r scales A x (upstream applies it)"})
    scale_per_expert: bool = field(default=False, metadata={"help": "official TeamLoRA: alpha / (r / E)"})
    times_experts: bool = field(default=False, metadata={"help": "official TeamLoRA: the update multiplied by E"})
    balance_loss: float = field(default=0.0, metadata={"help": "official TeamLoRA's load-balancing loss weight"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "as LoraConfig.modules_to_save"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TEAMLORA"
        check_mixture_fields(self)


class TeamLoRAExperts(nn.Module, Routed):
    def __init__(self, d_in: int, d_out: int, c: TeamLoRAConfig, device: Any = None, dtype: Any = None):
        super().__init__()
        rank, E = c.r, c.num_experts
        self.d_in, self.d_out = d_in, d_out
        self.r, self.E, self.k = rank, E, rank // E
        self.s = c.alpha / (rank / E) if c.scale_per_expert else c.alpha / rank
        self.times = float(E) if c.times_experts else 1.0
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(kaiming(torch.empty(rank, d_in, **kw)))
        self.B = nn.Parameter(torch.zeros(d_out, rank, **kw))  # [B_1 .. B_E]
        self.router = nn.Parameter(kaiming(torch.empty(E, d_in, **kw)))
        wi = torch.empty(E, E, **kw).uniform_(-0.1, 0.1)
        wi.fill_diagonal_(1.0)
        self.interaction = nn.Parameter(wi)
        self.init_taps()

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The team gates p~ (dropout-free), also what routing statistics see."""
        p = F.linear(x.to(self.A.dtype), self.router).softmax(-1)
        q = F.linear(p, self.interaction)  # q = W_I p
        return q / q.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = x.to(self.A.dtype)
        u = self.dropout(self.s * F.linear(xa, self.A))
        g = self.route(self.probs(xa), xa)
        gu = (u.unflatten(-1, (self.E, self.k)) * g.unsqueeze(-1)).flatten(-2)
        y = F.linear(gu, self.B)
        return y * self.times if self.times != 1.0 else y


class TeamLoRALinear(MixtureLayer):
    adapter_layer_names = ("teamlora_experts",)
    experts_cls = TeamLoRAExperts


class TeamLoRAModel(MixtureTuner):
    prefix = "teamlora_"
    tuner_layer_cls = TeamLoRALinear
