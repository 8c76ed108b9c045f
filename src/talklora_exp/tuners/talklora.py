"""TalkLoRA and MoELoRA as peft tuners: one layer, faithful to the public TalkLoRA code by default. Where is the
TalkLoRA forward? `TalkLoRAExperts.forward` below.

Per adapted linear W0 (d_in -> d_out), rank r, E experts, k = r / E:
    h = A drop(x)                       A: r x d_in, one per layer, shared by the layer's experts
    h_i = h[i*k:(i+1)*k]                the E chunks
    y_i = B_i (M_i h_i)                 M_i: k x k per layer (expert_mixer); B_i: d_out x k
    h~ = T . h (along the expert axis)  talking module T: E x E per layer; feeds only the router
    g = drop(softmax(R h~))             router R: E x r (or E x d_in on x for MoELoRA)
    out = W0 x + drop(sum_i g_i y_i)
B_1..B_E are shared across layers per projection type (share_b), held once on the tuner. MoELoRA is the same layer
with talk=off, expert_mixer=false, share_b=false, router_input=x.

Speed: no Python loop over experts, and the same two activation-sized matmuls as LoRA. The gate g_i is a scalar per
expert, so it commutes with M_i: sum_i g_i B_i (M_i h_i) = [B_1 M_1 .. B_E M_E] . concat_i(g_i h_i). The products B_i M_i
are formed on the weights each step (d_out x r x k, tiny next to tokens x d x r), then one matmul does every expert's
mixer and up-projection. The talking module is folded into the router weight the same way (R_eff = R (T kron I_k),
E x r), so talking costs no activation-sized work either. `methods/reference.py` keeps the literal per-expert loop; the
tests check both agree for every flag.

    from peft import get_peft_model
    from talklora_exp import TalkLoRAConfig
    model = get_peft_model(model, TalkLoRAConfig(r=32, num_experts=4, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from torch import nn

from .mixture import MixtureLayer, MixtureTuner, Routed, adapter_dtype_for, kaiming, proj_type

TALK_MODES = ("learned", "identity", "off")
ROUTER_INPUTS = ("x", "h", "talked")


@dataclass
class TalkLoRAConfig(PeftConfig):
    """TalkLoRA (arXiv 2604.06291) with upstream's defaults. Each field is one paper ablation away."""

    r: int = field(default=32, metadata={"help": "rank of the layer's A (split into num_experts chunks of r/E)"})
    num_experts: int = field(default=4, metadata={"help": "experts per layer; r must be divisible by it"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "as LoraConfig.target_modules"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "as LoraConfig.exclude_modules"})
    dropout: float = field(default=0.05, metadata={"help": "one p, applied to x, to the gates and to the sum"})
    alpha: float = field(default=64.0, metadata={"help": "scale alpha / r, used only when scaling=True"})
    scaling: bool = field(default=False, metadata={"help": "apply alpha / r (upstream computes it, never applies it)"})
    share_b: bool = field(default=True, metadata={"help": "one B_1..B_E per projection type, shared across layers"})
    talk: str = field(default="learned", metadata={"help": f"talking module: one of {list(TALK_MODES)}"})
    expert_mixer: bool = field(default=True, metadata={"help": "a k x k mixer M_i per expert"})
    router_input: str = field(default="talked", metadata={"help": f"router reads one of {list(ROUTER_INPUTS)}"})
    top_k: int | None = field(default=None, metadata={"help": "keep the top-k gate logits (None: dense routing)"})
    balance_loss: float = field(default=0.0, metadata={"help": "Switch-style balance loss weight (talklora_exp's "
                                                                "trainer adds it; see talklora_exp.routing)"})  # fmt: skip
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "as LoraConfig.modules_to_save"})

    peft_type_name = "TALKLORA"
    choices: ClassVar[dict[str, tuple]] = {"talk": TALK_MODES, "router_input": ROUTER_INPUTS}  # docs/choices.md

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self.peft_type_name
        check_mixture_fields(self)
        for key, allowed in self.choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}; allowed: {list(allowed)}")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}; allowed: null (None) or an integer in [1, {self.num_experts}]")


@dataclass
class MoELoRAConfig(TalkLoRAConfig):
    """MoELoRA: TalkLoRA's layer with communication off (no talking module, no mixers, per-layer B, router on x)."""

    share_b: bool = False
    talk: str = "off"
    expert_mixer: bool = False
    router_input: str = "x"

    peft_type_name = "MOELORA"


def check_mixture_fields(c: Any) -> None:
    """The checks every mixture config makes (peft's ValueError, one line)."""
    if c.r < 1 or c.num_experts < 1:
        raise ValueError(f"r={c.r}, num_experts={c.num_experts}; allowed: positive integers")
    if c.r % c.num_experts:
        raise ValueError(f"r={c.r} is not divisible by num_experts={c.num_experts}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"dropout={c.dropout}; allowed: a probability in [0, 1)")
    if c.balance_loss < 0:
        raise ValueError(f"balance_loss={c.balance_loss}; allowed: a number >= 0")
    if c.alpha <= 0:
        raise ValueError(f"alpha={c.alpha}; allowed: a positive number")


class TalkLoRAExperts(nn.Module, Routed):
    """One layer's mixture of low-rank experts (TalkLoRA, or MoELoRA with communication off): the update only."""

    def __init__(self, d_in: int, d_out: int, c: TalkLoRAConfig, device: Any = None, dtype: Any = None,
                 shared_b: nn.ParameterDict | None = None, shared_key: str | None = None):  # fmt: skip
        super().__init__()
        rank, E = c.r, c.num_experts
        self.d_in, self.d_out = d_in, d_out
        self.r, self.E, self.k = rank, E, rank // E
        self.router_input, self.top_k = c.router_input, c.top_k
        self.scale = c.alpha / rank if c.scaling else 1.0
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(kaiming(torch.empty(rank, d_in, **kw)))
        # M_i in nn.Linear convention (y = M_i h_i); kaiming per expert so fan_in is k, as upstream.
        self.M = (
            nn.Parameter(torch.stack([kaiming(torch.empty(self.k, self.k, **kw)) for _ in range(E)]))
            if c.expert_mixer
            else None
        )
        # The talking module only exists where it feeds the router.
        self.T: nn.Parameter | None = None
        if c.talk != "off" and c.router_input == "talked":
            self.T = nn.Parameter(torch.eye(E, **kw) if c.talk == "identity" else kaiming(torch.empty(E, E, **kw)))
        self.router = nn.Parameter(kaiming(torch.empty(E, d_in if c.router_input == "x" else rank, **kw)))
        # [B_1 .. B_E] concatenated along columns: d_out x r. Zero init as upstream. Shared: held by the tuner, so a
        # plain attribute here (the state dict holds each shared B once).
        if shared_b is None:
            self.B = nn.Parameter(torch.zeros(d_out, rank, **kw))
        object.__setattr__(self, "_shared_b", shared_b)
        self.shared_key = shared_key
        self.init_taps()

    def b_weight(self) -> torch.Tensor:
        """[B_1 .. B_E]: this layer's own, or its projection type's shared one."""
        return self._shared_b[self.shared_key] if self._shared_b is not None else self.B

    def router_weight(self) -> torch.Tensor:
        """Router weight on h (or x). With a talking module, R_eff[o, e, m] = sum_j R[o, j, m] T[j, e]."""
        if self.T is None:
            return self.router
        return torch.einsum("ojm,je->oem", self.router.view(self.E, self.E, self.k), self.T).reshape(self.E, self.r)

    def up_weight(self) -> torch.Tensor:
        """[B_1 M_1 .. B_E M_E] (d_out x r). The gate is a scalar per expert, so g_i B_i (M_i h_i) = (B_i M_i)(g_i h_i):
        folding M into B costs d_out*r*k per step on weights instead of an extra pass over the activations."""
        if self.M is None:
            return self.b_weight()
        return torch.einsum("oej,ejm->oem", self.b_weight().view(self.d_out, self.E, self.k), self.M).reshape(
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
        x = x.to(self.A.dtype)
        return self.gate(x, F.linear(x, self.A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = x.to(self.A.dtype)
        h = F.linear(self.dropout(xa), self.A)  # (..., r): one matmul for all experts
        g = self.route(self.gate(xa, h), xa)  # (..., E); routing taps see it (not on a checkpoint recompute)
        g = self.dropout(g)
        gh = (h.unflatten(-1, (self.E, self.k)) * g.unsqueeze(-1)).flatten(-2)  # g_i h_i for every expert
        y = F.linear(gh, self.up_weight())  # sum_i B_i M_i (g_i h_i) = sum_i g_i y_i, one matmul
        y = self.dropout(y)
        return y * self.scale if self.scale != 1.0 else y


class TalkLoRALinear(MixtureLayer):
    adapter_layer_names = ("talklora_experts",)
    experts_cls = TalkLoRAExperts


class MoELoRALinear(MixtureLayer):
    adapter_layer_names = ("moelora_experts",)
    experts_cls = TalkLoRAExperts


def shared_b_key(path: str) -> str:
    """The shared-B key of a layer: its projection type, spelled for a ParameterDict (no dots)."""
    return proj_type(path).replace(".", "__").replace("*", "N")


class TalkLoRAModel(MixtureTuner):
    """peft tuner for TalkLoRA. The shared B_1..B_E per projection type live in `talklora_shared_B[adapter]` on the
    tuner (peft's shared-state mechanism, as VeRA's projections), so they are saved once and trained by every layer."""

    prefix = "talklora_"
    tuner_layer_cls = TalkLoRALinear
    uses_shared_state = True

    @property
    def shared_b(self) -> nn.ModuleDict:
        """{adapter name: {projection type: B}} (`<prefix>shared_B`, so the name carries the method's prefix)."""
        name = self.prefix + "shared_B"
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def layer_kwargs(self, config: Any, adapter_name: str, current_key: str, target: nn.Linear) -> dict[str, Any]:
        if not config.share_b:
            return {}
        if adapter_name not in self.shared_b:  # created on the adapter's first layer (peft's add_adapter included)
            self.shared_b[adapter_name] = nn.ParameterDict()
        store, key = self.shared_b[adapter_name], shared_b_key(current_key)
        if key not in store:
            w = target.weight
            store[key] = nn.Parameter(
                torch.zeros(target.out_features, config.r, device=w.device, dtype=adapter_dtype_for(w.dtype))
            )
        elif store[key].shape[0] != target.out_features:
            raise ValueError(f"share_b: layers of type {proj_type(current_key)} differ in out_features")
        return {"shared_b": store, "shared_key": key}

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for a, store in self.shared_b.items():
            store.requires_grad_(a in names and not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's per-adapter gradient switch, the shared B included (it lives on the tuner, not in a layer)."""
        super().set_requires_grad(adapter_names, requires_grad)
        for a in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if a in self.shared_b:
                self.shared_b[a].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.shared_b:
            del self.shared_b[adapter_name]


class MoELoRAModel(TalkLoRAModel):
    prefix = "moelora_"
    tuner_layer_cls = MoELoRALinear
