"""Sharded data parallelism (`trainer.strategy=fsdp`): torch's FSDP2 `fully_shard`, applied by this project around
accelerate's `prepare` so one code path serves CPU (gloo) and GPU (accelerate 1.16 will not shard on CPU at all).

Wrap policy: each transformer block (decoder / encoder layer) is one FSDP unit; the root unit holds the rest, which
includes TalkLoRA's cross-layer shared B (`base_model.talklora_shared_B`): every block reads it, so it must be
unsharded for the whole forward and backward, which is what the root unit does. Everything that reads or writes
parameters (grad norm, snapshots, checkpoints, the saved adapter) goes through the helpers here, which gather full
tensors collectively on every process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .choices import STRATEGIES
from .errors import UserError


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"trainer.strategy={strategy!r}; allowed: {list(STRATEGIES)}")
    if strategy in ("zero2", "zero3"):
        raise UserError(f"trainer.strategy={strategy}: DeepSpeed ZeRO is not wired into the trainer yet; use "
                        "trainer.strategy=fsdp (sharded) or ddp")  # fmt: skip


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of a class the model lists in `_no_split_modules`, else the members of the
    first ModuleList as long as the config's layer count."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if found:
        return found
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for m in base.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return list(m)
    raise UserError(f"trainer.strategy=fsdp: cannot find the transformer blocks of {type(base).__name__} to shard")


def shard(model: nn.Module, strategy: str, num_processes: int) -> bool:
    """FSDP2 on each block, then on the root; True when the model is now sharded."""
    if strategy != "fsdp" or num_processes < 2:
        return False
    from torch.distributed.fsdp import fully_shard

    for b in blocks(model):
        fully_shard(b)
    fully_shard(model)
    return True


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any of the model's parameters is sharded (FSDP2 turned it into a DTensor)."""
    return any(is_sharded(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def load_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, into this process's shard when it is sharded."""
    with torch.no_grad():
        if is_sharded(p):
            from torch.distributed.tensor import distribute_tensor

            p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(value.to(p.device, p.dtype))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on CPU for a sharded model (collective; None when not sharded: read it as usual)."""
    if not is_sharded_model(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, opt: Any, sharded: bool) -> dict[str, Any]:
    """The optimizer's state: its own `state_dict()`, or for a sharded model the full, name-keyed one (collective)."""
    if not sharded:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(opt, "optimizer", opt)
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: Any, state: dict[str, Any], sharded: bool) -> None:
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(opt, "optimizer", opt)
    set_optimizer_state_dict(model, inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
