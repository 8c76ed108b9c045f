"""TeamLoRA, as the TalkLoRA code base ships it (math recovered from its bytecode). Where is the TeamLoRA forward?
`TeamLoRALinear.forward` below.

Per adapted linear W0 (d_in -> d_out), rank r, E experts, k = r / E, s = alpha / r:
    u = drop(s . A x)                   A: r x d_in; u split into E chunks u_i (k each)
    p = softmax(R x)                    R: E x d_in (router on the input)
    q = W_I p;  p~ = q / sum_j q_j      W_I: E x E interaction, init U(-0.1, 0.1) with diagonal 1
    out = W0 x + sum_i p~_i B_i u_i     B_i: d_out x k, zero init
Official TeamLoRA (Lin et al. 2024) differs: `times_experts` multiplies the update by E, `scale_per_expert` uses
alpha / (r / E), `balance_loss` adds a load-balancing loss. Vectorised as TalkLoRA: the gate is a scalar per expert,
so sum_i p~_i B_i u_i = [B_1 .. B_E] . concat_i(p~_i u_i), one matmul (`reference.py` keeps the per-expert loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import DTYPES, AdapterMethod, TargetLayer, adapter_param_dtype, switch_balance_loss


class TeamLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, num_experts: int, alpha: float, dropout: float = 0.0,
                 scale_per_expert: bool = False, times_experts: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        from ..errors import UserError

        if rank % num_experts:
            raise UserError(f"method.rank={rank} is not divisible by method.num_experts={num_experts}")
        self.base = base
        self.d_in, self.d_out = base.in_features, base.out_features
        self.r, self.E, self.k = rank, num_experts, rank // num_experts
        self.s = alpha / (rank / num_experts) if scale_per_expert else alpha / rank
        self.times = float(num_experts) if times_experts else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, adapter_param_dtype(base.weight.dtype, adapter_dtype)
        kaiming = lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # noqa: E731
        self.lora_A = nn.Parameter(kaiming(torch.empty(rank, self.d_in, device=dev, dtype=dt)))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, rank, device=dev, dtype=dt))  # [B_1 .. B_E]
        self.lora_router = nn.Parameter(kaiming(torch.empty(num_experts, self.d_in, device=dev, dtype=dt)))
        wi = torch.empty(num_experts, num_experts, device=dev, dtype=dt).uniform_(-0.1, 0.1)
        wi.fill_diagonal_(1.0)
        self.lora_interaction = nn.Parameter(wi)
        object.__setattr__(self, "_recorder", None)
        self.name = ""
        self.last_aux: torch.Tensor | None = None
        self.balance_weight = 0.0

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The team gates p~ (dropout-free), also what routing statistics see."""
        p = F.linear(x.to(self.lora_A.dtype), self.lora_router).softmax(-1)
        q = F.linear(p, self.lora_interaction)  # q = W_I p
        return q / q.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        xa = x.to(self.lora_A.dtype)
        u = self.dropout(self.s * F.linear(xa, self.lora_A))
        g = self.probs(xa)
        if self._recorder is not None and self._recorder.active:
            self._recorder.observe(self, xa, g)
        if self.balance_weight > 0 and self.training:
            self.last_aux = switch_balance_loss(g, self._recorder)
        gu = (u.unflatten(-1, (self.E, self.k)) * g.unsqueeze(-1)).flatten(-2)
        y = F.linear(gu, self.lora_B)
        if self.times != 1.0:
            y = y * self.times
        return result + y.to(result.dtype)


class TeamLoRAMethod(AdapterMethod):
    name = "teamlora"
    layer_type = TeamLoRALinear
    routed = True

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        E = self.cfg.num_experts
        return sum(rank * t.d_in + rank * t.d_out + E * t.d_in + E * E for t in layers)

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        c = self.cfg

        def make(t: TargetLayer, base: nn.Linear) -> TeamLoRALinear:
            new = TeamLoRALinear(base, c.rank, c.num_experts, c.alpha, c.dropout, c.scale_per_expert, c.times_experts,
                                 DTYPES[c.adapter_dtype])  # fmt: skip
            new.name, new.balance_weight = t.path, c.balance_loss
            return new

        return self.wrap_targets(model, targets, head_modules, make)
