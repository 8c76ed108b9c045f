"""A plain per-expert-loop transcription of the upstream TalkLoRA forward (nn.Linear per expert, explicit talking
step on permuted heads). Ground truth for the tests and the baseline in `make bench`; never used for training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners.mixture import MixtureLayer
from ..tuners.talklora import TalkLoRAExperts
from ..tuners.teamlora import TeamLoRAExperts
from .base import get_parent


class LoopTalkLoRALinear(nn.Module):
    """Same math as a TalkLoRA/MoELoRA layer, written the upstream way: a Python loop over experts."""

    def __init__(self, layer: MixtureLayer):
        super().__init__()
        src = layer.experts[layer.active_adapters[0]]
        self.base, self.E, self.k, self.r = layer.base_layer, src.E, src.k, src.r
        self.router_input, self.scale, self.dropout = src.router_input, src.scale, src.dropout
        self.top_k = src.top_k
        self.lora_A = nn.Linear(src.d_in, src.r, bias=False)
        self.lora_A.weight = src.A
        self.experts = nn.ModuleList()
        for i in range(self.E):
            m = nn.Linear(self.k, self.k, bias=False)
            if src.M is not None:
                m.weight = nn.Parameter(src.M.data[i].clone())
            self.experts.append(m if src.M is not None else nn.Identity())
        self.B = nn.ModuleList()
        for i in range(self.E):
            b = nn.Linear(self.k, src.d_out, bias=False)
            b.weight = nn.Parameter(src.b_weight().data[:, i * self.k : (i + 1) * self.k].clone())
            self.B.append(b)
        self.talk = None
        if src.T is not None:
            self.talk = nn.Linear(self.E, self.E, bias=False)
            self.talk.weight = nn.Parameter(src.T.data.clone())
        self.route = nn.Linear(src.router.shape[1], self.E, bias=False)
        self.route.weight = nn.Parameter(src.router.data.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        h = self.lora_A(self.dropout(x))
        splits = torch.chunk(h, self.E, dim=-1)
        outs = [self.B[i](self.experts[i](splits[i])) for i in range(self.E)]
        stack = torch.stack(outs, dim=-2)  # (..., E, d_out)
        if self.router_input == "x":
            logits = self.route(x)
        else:
            heads = h.view(*h.shape[:-1], self.E, self.k)
            if self.talk is not None:
                heads = self.talk(heads.transpose(-1, -2)).transpose(-1, -2)  # mix along the expert axis
            logits = self.route(heads.reshape(h.shape))
        if self.top_k is not None and self.top_k < self.E:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        g = self.dropout(F.softmax(logits, dim=-1)).unsqueeze(-1)
        return result + self.dropout((stack * g).sum(-2)) * self.scale


def _swap(model: nn.Module, experts_type: type, twin: type) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MixtureLayer) and isinstance(mod.experts[mod.active_adapters[0]], experts_type):
            parent, child = get_parent(model, name)
            setattr(parent, child, twin(mod))
    return model


def swap_to_loop(model: nn.Module) -> nn.Module:
    """Replace every TalkLoRA/MoELoRA layer in a model by its loop twin (weights copied; shared B becomes per
    layer)."""
    return _swap(model, TalkLoRAExperts, LoopTalkLoRALinear)


class LoopTeamLoRALinear(nn.Module):
    """TeamLoRA written literally, expert by expert, from the recovered upstream math (one nn.Linear per B_i)."""

    def __init__(self, layer: MixtureLayer):
        super().__init__()
        src = layer.experts[layer.active_adapters[0]]
        self.base, self.E, self.k, self.s, self.times = layer.base_layer, src.E, src.k, src.s, src.times
        self.dropout = src.dropout
        self.A = nn.Linear(src.d_in, src.r, bias=False)
        self.A.weight = nn.Parameter(src.A.data.clone())
        self.router = nn.Linear(src.d_in, self.E, bias=False)
        self.router.weight = nn.Parameter(src.router.data.clone())
        self.W_I = nn.Linear(self.E, self.E, bias=False)
        self.W_I.weight = nn.Parameter(src.interaction.data.clone())
        self.B = nn.ModuleList()
        for i in range(self.E):
            b = nn.Linear(self.k, src.d_out, bias=False)
            b.weight = nn.Parameter(src.B.data[:, i * self.k : (i + 1) * self.k].clone())
            self.B.append(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dropout(self.s * self.A(x))
        p = F.softmax(self.router(x), dim=-1)
        q = self.W_I(p)
        pt = q / q.sum(-1, keepdim=True)
        out = self.base(x)
        for i in range(self.E):
            out = out + self.times * pt[..., i : i + 1] * self.B[i](u[..., i * self.k : (i + 1) * self.k])
        return out


def swap_teamlora_to_loop(model: nn.Module) -> nn.Module:
    """Replace every TeamLoRA layer by its loop twin (weights copied)."""
    return _swap(model, TeamLoRAExperts, LoopTeamLoRALinear)


LOOP_TWINS: dict[type, type] = {TalkLoRAExperts: LoopTalkLoRALinear, TeamLoRAExperts: LoopTeamLoRALinear}


def loop_twin_of(model: nn.Module) -> type | None:
    """The experts type in `model` that has a literal loop twin (None: no mixture layer with one): how the bench finds
    a method's loop baseline without a list of method names."""
    for mod in model.modules():
        if isinstance(mod, MixtureLayer):
            t = type(mod.experts[mod.active_adapters[0]])
            if t in LOOP_TWINS:
                return t
    return None


def swap_any_to_loop(model: nn.Module) -> nn.Module:
    """Every mixture layer with a loop twin replaced by it (weights copied)."""
    for experts_type, twin in LOOP_TWINS.items():
        _swap(model, experts_type, twin)
    return model


class DirectMixture(nn.Module):
    """A mixture layer without peft's per-adapter dispatch: base(x) + experts(x). The bench times it beside the tuner
    layer: the difference is what the dispatch costs."""

    def __init__(self, layer: MixtureLayer):
        super().__init__()
        self.base = layer.base_layer
        self.experts = layer.experts[layer.active_adapters[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        return result + self.experts(x).to(result.dtype)


def swap_to_direct(model: nn.Module) -> nn.Module:
    """Replace every mixture tuner layer by its direct twin (the same modules and parameters, no copy)."""
    return _swap(model, nn.Module, DirectMixture)
