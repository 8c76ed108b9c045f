"""TalkLoRA and MoELoRA: one layer, faithful to the public TalkLoRA code by default. Where is the TalkLoRA forward?
`TalkLoRALinear.forward` below.

Per adapted linear W0 (d_in -> d_out), rank r, E experts, k = r / E:
    h = A drop(x)                       A: r x d_in, one per layer, shared by the layer's experts
    h_i = h[i*k:(i+1)*k]                the E chunks
    y_i = B_i (M_i h_i)                 M_i: k x k per layer (expert_mixer); B_i: d_out x k
    h~ = T . h (along the expert axis)  talking module T: E x E per layer; feeds only the router
    g = drop(softmax(R h~))             router R: E x r (or E x d_in on x for MoELoRA)
    out = W0 x + drop(sum_i g_i y_i)
B_1..B_E are shared across layers per projection type (share_b). MoELoRA is the same layer with talk=off,
expert_mixer=false, share_b=false, router_input=x.

Speed: no Python loop over experts, and the same two activation-sized matmuls as LoRA. The gate g_i is a scalar per
expert, so it commutes with M_i: sum_i g_i B_i (M_i h_i) = [B_1 M_1 .. B_E M_E] . concat_i(g_i h_i). The products B_i M_i
are formed on the weights each step (d_out x r x k, tiny next to tokens x d x r), then one matmul does every expert's
mixer and up-projection. The talking module is folded into the router weight the same way (R_eff = R (T kron I_k),
E x r), so talking costs no activation-sized work either. `reference.py` keeps the literal per-expert loop; the tests
check both agree for every flag.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import (
    DTYPES,
    AdapterMethod,
    TargetLayer,
    adapter_param_dtype,
    find_target_layers,
    switch_balance_loss,
)

TALK_MODES = ("learned", "identity", "off")
ROUTER_INPUTS = ("x", "h", "talked")
SHARED_B_ATTR = "talklora_shared_b"  # registered once on the model root, so state_dict holds each shared B once


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class TalkLoRALinear(nn.Module):
    """A frozen nn.Linear plus a mixture of low-rank experts (TalkLoRA, or MoELoRA with communication off)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        num_experts: int,
        dropout: float = 0.05,
        talk: str = "learned",
        expert_mixer: bool = True,
        router_input: str = "talked",
        top_k: int | None = None,
        scaling: bool = False,
        alpha: float = 64.0,
        shared_b: nn.ParameterDict | None = None,
        shared_key: str | None = None,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if rank % num_experts:
            raise UserError(f"method.rank={rank} is not divisible by method.num_experts={num_experts}")
        if talk not in TALK_MODES:
            raise UserError(f"method.talk={talk!r}; allowed: {list(TALK_MODES)}")
        if router_input not in ROUTER_INPUTS:
            raise UserError(f"method.router_input={router_input!r}; allowed: {list(ROUTER_INPUTS)}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise UserError(f"method.top_k={top_k} must be null or in [1, {num_experts}]")
        self.base = base
        self.d_in, self.d_out = base.in_features, base.out_features
        self.r, self.E, self.k = rank, num_experts, rank // num_experts
        self.router_input, self.top_k = router_input, top_k
        self.scale = alpha / rank if scaling else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, adapter_param_dtype(base.weight.dtype, adapter_dtype)
        self.lora_A = nn.Parameter(_kaiming(torch.empty(rank, self.d_in, device=dev, dtype=dt)))
        # M_i in nn.Linear convention (y = M_i h_i); kaiming per expert so fan_in is k, as upstream.
        self.lora_M = (
            nn.Parameter(
                torch.stack([_kaiming(torch.empty(self.k, self.k, device=dev, dtype=dt)) for _ in range(num_experts)])
            )
            if expert_mixer
            else None
        )
        # The talking module only exists where it feeds the router.
        self.lora_T: nn.Parameter | None = None
        if talk != "off" and router_input == "talked":
            T = (
                torch.eye(num_experts, device=dev, dtype=dt)
                if talk == "identity"
                else _kaiming(torch.empty(num_experts, num_experts, device=dev, dtype=dt))
            )
            self.lora_T = nn.Parameter(T)
        self.lora_router = nn.Parameter(
            _kaiming(torch.empty(num_experts, self.d_in if router_input == "x" else rank, device=dev, dtype=dt))
        )
        if shared_b is None:
            # [B_1 .. B_E] concatenated along columns: d_out x r. Zero init as upstream.
            self.lora_B: nn.Parameter | None = nn.Parameter(torch.zeros(self.d_out, rank, device=dev, dtype=dt))
        else:
            self.lora_B = None
        # Plain attributes, not submodules: the shared store lives on the model root, the recorder on the hooks.
        object.__setattr__(self, "_shared_b", shared_b)
        self.shared_key = shared_key
        object.__setattr__(self, "_recorder", None)
        self.name = ""
        self.last_aux: torch.Tensor | None = None
        self.balance_weight = 0.0

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B if self.lora_B is not None else self._shared_b[self.shared_key]

    def router_weight(self) -> torch.Tensor:
        """Router weight on h (or x). With a talking module, R_eff[o, e, m] = sum_j R[o, j, m] T[j, e]."""
        R = self.lora_router
        if self.lora_T is None:
            return R
        return torch.einsum("ojm,je->oem", R.view(self.E, self.E, self.k), self.lora_T).reshape(self.E, self.r)

    def up_weight(self) -> torch.Tensor:
        """[B_1 M_1 .. B_E M_E] (d_out x r). The gate is a scalar per expert, so g_i B_i (M_i h_i) = (B_i M_i)(g_i h_i):
        folding M into B costs d_out*r*k per step on weights instead of an extra pass over the activations."""
        if self.lora_M is None:
            return self.B
        return torch.einsum("oej,ejm->oem", self.B.view(self.d_out, self.E, self.k), self.lora_M).reshape(
            self.d_out, self.r
        )

    def gate(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Routing probabilities (before gate dropout)."""
        logits = F.linear(x if self.router_input == "x" else h, self.router_weight())
        if self.top_k is not None and self.top_k < self.E:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Routing probabilities for an input, without dropout (used by the sensitivity statistic)."""
        x = x.to(self.lora_A.dtype)
        return self.gate(x, F.linear(x, self.lora_A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        xa = x.to(self.lora_A.dtype)
        h = F.linear(self.dropout(xa), self.lora_A)  # (..., r): one matmul for all experts
        g = self.gate(xa, h)  # (..., E)
        if self._recorder is not None and self._recorder.active:
            self._recorder.observe(self, xa, g)
        if self.balance_weight > 0 and self.training:
            self.last_aux = self._balance_loss(g)
        g = self.dropout(g)
        gh = (h.unflatten(-1, (self.E, self.k)) * g.unsqueeze(-1)).flatten(-2)  # g_i h_i for every expert
        y = F.linear(gh, self.up_weight())  # sum_i B_i M_i (g_i h_i) = sum_i g_i y_i, one matmul
        y = self.dropout(y)
        if self.scale != 1.0:
            y = y * self.scale
        return result + y.to(result.dtype)

    def _balance_loss(self, g: torch.Tensor) -> torch.Tensor:
        return switch_balance_loss(g, self._recorder)


class MixtureMethod(AdapterMethod):
    """Registered as both `moelora` and `talklora`; the config fields pick the variant."""

    name = "talklora"
    keep = ("lora_", SHARED_B_ATTR)
    layer_type = TalkLoRALinear
    routed = True

    def _layer_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return dict(num_experts=c.num_experts, dropout=c.dropout, talk=c.talk, expert_mixer=c.expert_mixer,
                    router_input=c.router_input, top_k=c.top_k, scaling=c.scaling, alpha=c.alpha,
                    adapter_dtype=DTYPES[c.adapter_dtype])  # fmt: skip

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        """Adapter parameters by formula (tests check this against the instantiated modules)."""
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

    def inject(self, model: nn.Module, targets: list[str], head_modules: list[str], task_kind: str) -> nn.Module:
        layers = find_target_layers(model, targets)
        rank, kw = self.cfg.rank, self._layer_kwargs()
        if rank % kw["num_experts"]:
            raise UserError(f"method.rank={rank} is not divisible by method.num_experts={kw['num_experts']}")
        shared = None
        if self.cfg.share_b:
            ref = model.get_submodule(layers[0].path).weight
            dt = adapter_param_dtype(ref.dtype, kw["adapter_dtype"])
            shared = nn.ParameterDict()
            for t in layers:
                key = t.proj_type.replace(".", "__").replace("*", "N")  # ParameterDict keys cannot contain dots
                if key not in shared:
                    shared[key] = nn.Parameter(torch.zeros(t.d_out, rank, device=ref.device, dtype=dt))
            model.add_module(SHARED_B_ATTR, shared)

        def make(t: TargetLayer, base: nn.Linear) -> TalkLoRALinear:
            key = t.proj_type.replace(".", "__").replace("*", "N") if shared is not None else None
            new = TalkLoRALinear(base, rank, shared_b=shared, shared_key=key, **kw)
            new.name, new.balance_weight = t.path, self.cfg.balance_loss
            return new

        return self.wrap_targets(model, targets, head_modules, make)
