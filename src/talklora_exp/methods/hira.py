"""HiRA (Huang et al., ICLR 2025; the code base TalkLoRA forked): a Hadamard high-rank update of the frozen weight.
Where is the HiRA forward? `HiRALinear.forward` below.

    out = (W0 o (1 + B A)) x + b = W0 x + b + (W0 o BA) x      A: r x d_in (kaiming), B: d_out x r (zero)
No dropout and no scaling (flags, off by default). Same parameter count as LoRA at the same rank; the update
W0 o BA has rank up to rank(W0) x r. The Hadamard product is formed on the weights each step (d_out x d_in x r),
so the activations see one extra matmul, as LoRA's two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import DTYPES, AdapterMethod, TargetLayer, adapter_param_dtype


class HiRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, dropout: float = 0.0, scale: float = 1.0,
                 adapter_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.base = base
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, adapter_param_dtype(base.weight.dtype, adapter_dtype)
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, base.in_features, device=dev, dtype=dt),
                                                            a=math.sqrt(5)))  # fmt: skip
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))

    def delta_weight(self) -> torch.Tensor:
        return self.base.weight.to(self.lora_A.dtype) * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        y = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.delta_weight())
        if self.scale != 1.0:
            y = y * self.scale
        return result + y.to(result.dtype)


class HiRAMethod(AdapterMethod):
    name = "hira"
    layer_type = HiRALinear

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) for t in layers)

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        c = self.cfg
        scale = c.alpha / c.rank if c.scaling else 1.0
        return self.wrap_targets(
            model,
            targets,
            head_modules,
            lambda t, base: HiRALinear(base, c.rank, c.dropout, scale, DTYPES[c.adapter_dtype]),
        )
