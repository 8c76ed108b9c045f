"""The trainer's checkpoint-state job: what a checkpoint holds to continue a run bit for bit (weights, optimizer,
scheduler, per-process RNGs, the loop's position and best-so-far in `LoopState`), taking it, writing it, and putting
it back. `checkpoint.py` does the files; `Checkpointing` is the part of `Trainer` that fills and reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from accelerate.utils import gather_object

from . import checkpoint as ckpt
from . import engines
from .errors import UserError

log = logging.getLogger("talklora_exp.trainer")


@dataclass
class LoopState:
    """The training loop's position and best-so-far: everything a checkpoint needs beyond weights, optimizer,
    scheduler and RNGs to continue bit for bit. `state_dict()` is what checkpoints store under "loop"."""

    step: int = 0
    samples: int = 0  # training examples seen (all processes)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    train_time: float = 0.0  # seconds in the training loop, summed over resumes
    eval_time: float = 0.0  # seconds in evaluation, summed over resumes
    best_score: float | None = None  # the selecting metric, higher is better (the loss negated)
    best_step: int = 0
    best_val: dict | None = None  # validation metrics at best_step
    best_eval: dict | None = None  # reported-split metrics at best_step (best_dev only)
    best_routing: dict | None = None
    best_snap: dict | None = None  # the trainable tensors at best_step
    best_preds: list | None = None
    last_eval: dict | None = None
    run_loss: float = 0.0  # the loss summed since the last log record
    n_micro: int = 0  # micro-batches in run_loss
    epoch_gen_state: Any = None  # the epoch's shuffling generator state, for a mid-epoch resume

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        unknown = sorted(set(d) - {f.name for f in fields(self)})
        if unknown:
            raise UserError(f"checkpoint: unknown loop state {unknown} (written by another version of the code?)")
        for k, val in d.items():
            setattr(self, k, val)


class Checkpointing:
    """Take, save and restore the training state. A part of `Trainer`, not used alone."""

    def _state(self, v: LoopState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: weights, optimizer, scheduler, RNGs, data position, best-so-far.
        Each process keeps its own RNG state (`rng_per_process`): ranks see batches of different lengths, so their
        dropout draws, and hence their generators, drift apart."""
        return {
            "trainable": [engines.full(p.detach()).cpu().clone() for p in self.trainable],
            "optimizer": engines.optimizer_state(self.model, self.opt, self.sharded),
            "sharded": self.sharded,  # the optimizer state's layout: by parameter name (FSDP) or by index
            "scheduler": self.sched.state_dict(),
            "rng_per_process": rngs,
            "loop": v.state_dict(),
            "config_hash": self.config_hash,
        }

    def _resume(self, v: LoopState, resume: dict[str, Any]) -> dict[str, Any] | None:
        """Put weights, optimizer, scheduler, loop state and RNG back from a checkpoint; returns the RNG state still to
        set after the resumed epoch's first batch (a mid-epoch resume), else None."""
        saved = [tuple(t.shape) for t in resume["trainable"]]
        if saved != [tuple(p.shape) for p in self.trainable]:
            raise UserError(f"checkpoint: its {len(saved)} trainable tensors do not fit this model's "
                            f"{len(self.trainable)} (written by another version of the code?); rerun without "
                            "trainer.resume=auto, or with overwrite=true")  # fmt: skip
        if bool(resume.get("sharded", False)) != self.sharded:
            raise UserError(f"checkpoint: written {'with' if resume.get('sharded') else 'without'} FSDP sharding, "
                            f"resumed {'with' if self.sharded else 'without'}; resume with the trainer.strategy and "
                            "process count it was written with")  # fmt: skip
        for p, t in zip(self.trainable, resume["trainable"]):
            engines.load_full(p, t)
        engines.load_optimizer_state(self.model, self.opt, resume["optimizer"], self.sharded)
        self.sched.load_state_dict(resume["scheduler"])
        v.load_state_dict(resume["loop"])
        acc = self.acc
        rngs = resume.get("rng_per_process") or [resume["rng"]]  # "rng": one RNG state shared by all processes
        if len(rngs) != acc.num_processes:
            log.warning("checkpoint from %d process(es), resuming on %d: data order and RNG streams differ from an "
                        "uninterrupted run", len(rngs), acc.num_processes)  # fmt: skip
        rng = rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0]
        # A DataLoader without a generator of its own (the length-grouped one) draws its base seed from the global
        # RNG when its iterator starts. An uninterrupted run made that draw at the epoch's start, before the
        # checkpoint; so a mid-epoch resume puts the RNG back after the new iterator's first batch.
        if v.batch_in_epoch:
            return rng
        ckpt.set_rng_state(rng)
        return None

    def _save_checkpoint(self, v: LoopState, step: int) -> None:
        acc = self.acc
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        state = self._state(v, rngs)  # every process: gathering sharded tensors is a collective
        if acc.is_main_process:
            ckpt.save(self.ckpt_root, step, state)
        acc.wait_for_everyone()
