"""What the mixture tuners (TalkLoRA, MoELoRA, TeamLoRA) share as peft tuners: the layer that holds one mixture of
experts per adapter name, the tuner that injects it, and the routing taps that statistics and the balance loss read.

A method supplies an experts module (its parameters and its math: `forward(x)` gives the update, `probs(x)` the
dropout-free routing) and a config; peft's BaseTuner/BaseTunerLayer do matching, injection, trainable marking,
`modules_to_save`, multiple adapters, `disable_adapter()` and saving.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn


def kaiming(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (upstream initialises A, M, T and the router this way)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def adapter_dtype_for(base: torch.dtype, floor: torch.dtype = torch.float32) -> torch.dtype:
    """Adapters are kept at least at `floor` (fp32, as upstream's fp32 adapters on a bf16 model; the trainer's
    `method.adapter_dtype`); a wider base (fp32, or fp64 in the exactness tests) keeps its own dtype."""
    return base if base.itemsize >= floor.itemsize else floor


def proj_type(path: str) -> str:
    """A layer's projection type: its path with block indices wildcarded (`layers.3.q_proj` -> `layers.*.q_proj`)."""
    return re.sub(r"\.\d+\.", ".*.", path)


def recomputing() -> bool:
    """True inside autograd's backward: a gradient-checkpointed block's forward being recomputed (both of torch's
    checkpoint modes recompute from within the backward's graph task). Routing is observed once per forward, so a
    recompute neither counts tokens twice, nor consumes the sensitivity statistic's random draws, nor adds
    balance-loss terms that would outlive the step."""
    return torch._C._current_graph_task_id() != -1


class Routed:
    """What an experts module shares: `taps`, the callables `tap(layer, x, g)` that see its routing probabilities `g`
    (before gate dropout) for input `x` on each forward. Statistics (`routing.RoutingRecorder`) and the balance loss
    (`methods.base.RoutedHooks`) add and remove theirs explicitly; the layer calls them from `route`, never on a
    checkpoint recompute. A plain list, not module state: nothing of it is saved, moved or sharded."""

    def init_taps(self) -> None:
        object.__setattr__(self, "taps", [])

    def route(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        taps = self.__dict__.get("taps")
        if taps and not recomputing():
            for tap in taps:
                tap(self, x, g)
        return g


class MixtureLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer plus one experts module per adapter name (in `<prefix>experts`). The update is added in
    the base output's dtype; adapters keep their own precision."""

    experts_cls: type[nn.Module] = nn.Module
    merge_error = "routing depends on the input, so the update is not a fixed weight and cannot be merged"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **experts_kw: Any):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear
            raise TypeError(f"{type(self).__name__} adapts nn.Linear layers (bitsandbytes' Linear4bit and Linear8bitLt "
                            f"included), not {type(base_layer).__module__}.{type(base_layer).__name__}")  # fmt: skip
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **experts_kw)

    @property
    def experts(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: Any, **experts_kw: Any) -> None:
        w = self.base_layer.weight
        self.experts[adapter_name] = self.experts_cls(
            self.in_features, self.out_features, config, device=w.device, dtype=adapter_dtype_for(w.dtype), **experts_kw
        )
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:  # peft's mixed batch: row i through adapter_names[i] ("__base__": none)
            for name in sorted(set(adapter_names)):
                if name in self.experts:
                    rows = [i for i, a in enumerate(adapter_names) if a == name]
                    result[rows] += self.experts[name](x[rows]).to(result.dtype)
            return result
        for name in self.active_adapters:  # adapters, not experts: one pass per active adapter
            if name in self.experts:
                result = result + self.experts[name](x).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(f"{type(self).__name__}: {self.merge_error}")

    def unmerge(self) -> None:
        raise ValueError(f"{type(self).__name__}: {self.merge_error}")


class MixtureTuner(BaseTuner):
    """BaseTuner for the mixtures: nn.Linear targets only, no merging. Subclasses set prefix, tuner_layer_cls and
    `layer_kwargs` (what a layer needs beyond its config: TalkLoRA's shared B)."""

    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        if peft_config.target_modules is None:
            raise ValueError(f"{type(peft_config).__name__}: set target_modules (e.g. ['q_proj', 'v_proj'])")
        return peft_config

    def layer_kwargs(self, config: Any, adapter_name: str, current_key: str, target: nn.Linear) -> dict[str, Any]:
        return {}

    def _create_and_replace(self, peft_config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **_: Any) -> None:  # fmt: skip
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kw = self.layer_kwargs(peft_config, adapter_name, current_key, base)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **kw)
            return
        new = self.tuner_layer_cls(base, adapter_name, peft_config, **kw)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        setattr(parent, target_name, new)

    def _check_merge_allowed(self) -> None:
        raise ValueError(f"{type(self).__name__}: {MixtureLayer.merge_error}")

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """`model(..., adapter_names=[...])` (peft's mixed batch, inference only): each row through its own adapter,
        `__base__` through none. Beam search repeats each row's name once per beam, as peft's LoRA does."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {a for m in self.model.modules() if isinstance(m, MixtureLayer) for a in m.experts}
        unknown = sorted({n for n in names if n != "__base__"} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:
            names = [n for n in names for _ in range(beams)]
        from peft.utils.other import AuxiliaryTrainingWrapper

        def pre(module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
            return a, {**kw, "adapter_names": names}

        handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in self.model.modules()
                   if isinstance(m, (MixtureLayer, AuxiliaryTrainingWrapper))]  # fmt: skip
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def mixture_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """{layer path in the base model: experts module of the active (or named) adapter} for every mixture layer."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MixtureLayer):
            names = [adapter_name] if adapter_name else mod.active_adapters
            for a in names:
                if a in mod.experts:
                    out[re.sub(r"^(base_model\.model\.)", "", name)] = mod.experts[a]
    return out
