"""One trainer for every method and task, on accelerate. Methods plug in through `TrainHooks` (aux loss, routing
statistics); tasks through `Task.evaluate`. No branching on method names here. Split by job: the loop is here;
selection (evaluating, keeping the best weights, reporting) is `selection.py`; the checkpoint state (what a resume
needs, taken and put back) is `trainstate.py`."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import checkpoint as ckpt
from . import engines
from .choices import MIXED_PRECISION
from .errors import UserError
from .methods.base import TrainHooks
from .rundir import RunLogger
from .selection import FitResult, Selecting, Selection
from .tasks.base import Task, TaskData
from .trainstate import Checkpointing, LoopState

log = logging.getLogger(__name__)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffle, sort by length inside mega-batches of 50 batches, shuffle the batches: less padding, still random."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 50):
        self.lengths, self.bs, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.bs)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.bs * self.mega
        batches = []
        for i in range(0, len(perm), size):
            chunk = sorted(perm[i : i + size], key=lambda j: -self.lengths[j])
            batches += [chunk[j : j + self.bs] for j in range(0, len(chunk), self.bs)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([batches[i] for i in order])


def set_epoch(loader: Any, sampler: LengthGroupedBatchSampler | None, epoch: int) -> None:
    """Set the epoch on the loader and on our batch sampler directly: with several processes accelerate wraps the
    sampler in a BatchSamplerShard, and its DataLoaderShard.set_epoch never reaches a custom batch sampler (every
    epoch would repeat the same order)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp32 otherwise. Asking for what the device cannot do is an error."""
    has_cuda = torch.cuda.is_available() and not cpu
    if requested == "auto":
        return "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "no"
    if requested not in ("no", "bf16", "fp16"):
        raise UserError(f"trainer.mixed_precision={requested!r}; allowed: {list(MIXED_PRECISION)}")
    if requested == "fp16" and not has_cuda:
        raise UserError("trainer.mixed_precision=fp16 needs a CUDA GPU; this run is on CPU (use 'no' or 'auto')")
    if requested == "bf16" and has_cuda and not torch.cuda.is_bf16_supported():
        raise UserError("trainer.mixed_precision=bf16: this GPU does not support bf16 (use fp16 or 'no')")
    return requested


class Trainer(Selecting, Checkpointing):
    """The loop. Selection (`trainer.select`): `val_from_train` scores the held-out validation split every
    `eval_every` steps (`select_metric`: loss, as upstream, or the task's main metric), keeps the best weights, and
    evaluates the reported split once at the end with them; `best_dev` (GLUE only: dev is the reported set) keeps the
    best dev evaluation; `last` reports the final weights."""

    def __init__(
        self,
        tcfg: Any,
        accelerator: Accelerator,
        model: torch.nn.Module,
        task: Task,
        data: TaskData,
        collate: Any,
        hooks: TrainHooks,
        logger: RunLogger,
        seed: int,
        ckpt_root: Any = None,
        config_hash: str | None = None,
    ):
        self.cfg, self.acc, self.task, self.hooks, self.logger, self.seed = tcfg, accelerator, task, hooks, logger, seed
        self.ckpt_root, self.config_hash = ckpt_root, config_hash
        self.gen = torch.Generator().manual_seed(
            seed
        )  # the shuffle order; its state at each epoch start is checkpointed
        self.selection = Selection.from_config(tcfg, task, data)
        self.dev_curve = bool(tcfg.get("dev_curve", False))
        if self.dev_curve and task.report_split != "dev":
            raise UserError(f"trainer.dev_curve=true would evaluate {task.name}'s {task.report_split} set during training; "
                            "test sets are evaluated once, at the end")  # fmt: skip
        bs = int(tcfg.batch_size)
        self.length_sampler: LengthGroupedBatchSampler | None = None
        if tcfg.group_by_length:
            self.length_sampler = LengthGroupedBatchSampler(data.train.lengths, bs, seed)
            train_dl = DataLoader(
                data.train,
                batch_sampler=self.length_sampler,
                collate_fn=collate,
                num_workers=int(tcfg.num_workers),
            )
        else:
            train_dl = DataLoader(
                data.train,
                batch_size=bs,
                shuffle=True,
                collate_fn=collate,
                generator=self.gen,
                num_workers=int(tcfg.num_workers),
            )

        def eval_loader(split: Any) -> DataLoader:
            return DataLoader(split, batch_size=int(tcfg.eval_batch_size), shuffle=False, collate_fn=collate)

        # The engine first (FSDP shards the model in place), then the optimizer over the parameters as they now are.
        strategy = str(tcfg.get("strategy", "ddp"))
        engines.check_strategy(strategy)
        self.sharded = engines.shard(model, strategy, accelerator.num_processes)
        if tcfg.get("compile"):  # in place (nn.Module.compile): parameter names, saving and unwrapping unchanged
            model.compile()
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(tcfg.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(tcfg.lr),
        )
        if self.sharded:  # FSDP reduces the gradients itself: accelerate must not wrap the model in DDP too
            self.opt, self.train_dl = accelerator.prepare(opt, train_dl)
            self.model = model
        else:
            self.model, self.opt, self.train_dl = accelerator.prepare(model, opt, train_dl)
        self.eval_dls = {k: accelerator.prepare(eval_loader(v)) for k, v in data.evals.items()}
        self.val_dl = accelerator.prepare(eval_loader(data.val)) if data.val is not None else None
        self.val_eval_dls = {k: accelerator.prepare(eval_loader(v)) for k, v in (data.val_evals or {}).items()}
        self.trainable = trainable
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / int(tcfg.grad_accum)))
        self.total_steps = int(tcfg.max_steps) if tcfg.max_steps else int(tcfg.epochs) * self.steps_per_epoch
        warm = (
            tcfg.warmup_steps if tcfg.warmup_steps is not None else round(float(tcfg.warmup_ratio) * self.total_steps)
        )
        self.sched = get_linear_schedule_with_warmup(self.opt, int(warm), self.total_steps)
        self.eval_every = int(tcfg.eval_every) if tcfg.eval_every else self.steps_per_epoch
        self.report_evals = 0
        self.report_counts: dict[str, int] | None = None  # examples per reported split, from its last evaluation

    def _grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """The global L2 norm of the trainable gradients of this optimizer step, before clipping (clipped to
        `max_norm` when set). Logged: it is the check that accumulation and multi-process averaging give the gradient
        of the full batch, which the loss and the weights after AdamW (invariant to the gradient's scale) cannot show."""
        if max_norm:
            return engines.full(self.acc.clip_grad_norm_(self.trainable, float(max_norm)).detach())
        grads = [engines.full(p.grad.detach().norm()) for p in self.trainable if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())

    def _check_finite(self, run_loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(run_loss).all():
            raise FloatingPointError(f"non-finite training loss at step {step}; the last good checkpoint is kept")

    def fit(self, resume: dict[str, Any] | None = None, eval_time_before: float = 0.0) -> FitResult:
        """Train, select, report. `eval_time_before`: seconds of forward passes made for this run before training (the
        cosine head's fit on train), counted as evaluation time so the compute tables include them."""
        if not self.trainable:
            return self._zero_shot(eval_time_before)
        v = LoopState(eval_time=float(eval_time_before))
        pending_rng = self._resume(v, resume) if resume is not None else None
        p = _Progress(
            run_loss=torch.tensor(float(v.run_loss), device=self.acc.device),
            bar=tqdm(
                total=self.total_steps,
                initial=v.step,
                disable=not (self.cfg.progress and self.acc.is_main_process),
                desc=f"{self.task.name}",
                unit="step",
                dynamic_ncols=True,
            ),  # fmt: skip
            stop=_SignalCatcher(),
        )
        self.model.train()
        p.t0 = time.perf_counter()
        try:
            while v.step < self.total_steps:
                for batch in self._epoch_batches(v):
                    if pending_rng is not None:
                        ckpt.set_rng_state(pending_rng)
                        pending_rng = None
                    if self._micro_step(batch, v, p) and self._after_step(v, p):
                        break
                v.epoch += 1
                v.batch_in_epoch = 0
            v.train_time += time.perf_counter() - p.t0
            p.bar.close()
            p.stop.immediate = True  # a signal now stops the final evaluation at once
            try:
                return self._finish(v)
            except TrainingInterrupted:
                if self.ckpt_root is not None:  # training is done: a resume only re-runs the final evaluation
                    self._save_checkpoint(v, v.step)
                raise TrainingInterrupted(
                    f"{p.stop.signal} during the final evaluation; checkpoint saved at step {v.step}, resume with "
                    "trainer.resume=auto to evaluate without retraining"
                ) from None
        finally:
            p.stop.restore()
            p.bar.close()

    def _epoch_batches(self, v: LoopState) -> Any:
        """The current epoch's micro-batches in its shuffle order, minus those already consumed (a mid-epoch resume)."""
        set_epoch(self.train_dl, self.length_sampler, v.epoch)
        if v.batch_in_epoch:
            self.gen.set_state(v.epoch_gen_state)
            return skip_first_batches(self.train_dl, v.batch_in_epoch)
        v.epoch_gen_state = self.gen.get_state()
        return self.train_dl

    def _micro_step(self, batch: dict, v: LoopState, p: _Progress) -> bool:
        """Forward and backward one micro-batch (the optimizer steps when accumulation is complete); True when this
        micro-batch ended an optimizer step."""
        acc, rec = self.acc, self.hooks.routing
        stats_every = int(self.cfg.routing_stats_every) if self.cfg.routing_stats_every else 0
        v.batch_in_epoch += 1
        self.hooks.set_batch(batch)
        with acc.accumulate(self.model):
            # decided inside accumulate(), where sync_gradients says whether this micro-batch ends the optimizer
            # step: one routing snapshot per optimizer step, on its last micro-batch
            stats_now = bool(stats_every and rec is not None and acc.sync_gradients and (v.step + 1) % stats_every == 0)
            if stats_now:
                rec.start()
            loss = self.model(**batch).loss
            aux = self.hooks.aux_loss()
            acc.backward(loss + aux if aux is not None else loss)
            if acc.sync_gradients:
                p.grad_norm = self._grad_norm(self.cfg.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        p.run_loss += loss.detach()
        v.n_micro += 1
        rows = batch["labels"] if "labels" in batch else batch["input_ids"]  # a siamese batch holds 2 rows per example
        v.samples += int(rows.shape[0]) * acc.num_processes
        if stats_now:
            self.logger.log({"step": v.step + 1, "routing_train": rec.stop()["aggregate"]})
        return bool(acc.sync_gradients)

    def _after_step(self, v: LoopState, p: _Progress) -> bool:
        """One optimizer step done: schedule, log, evaluate, checkpoint, stop on a signal; True when training is over."""
        cfg, acc = self.cfg, self.acc
        self.sched.step()
        v.step += 1
        step = v.step
        p.bar.update(1)
        if step % int(cfg.log_every) == 0 or step == self.total_steps:
            self._check_finite(p.run_loss, step)
            mean_loss = acc.reduce(p.run_loss, "mean").item() / v.n_micro
            self.logger.log({"step": step, "epoch": v.epoch, "loss": mean_loss, "grad_norm": float(p.grad_norm),
                             "lr": self.sched.get_last_lr()[0], "samples": v.samples})  # fmt: skip
            p.post["loss"] = f"{mean_loss:.4f}"
            p.bar.set_postfix(p.post)
            p.run_loss.zero_()
            v.n_micro = 0
        if step % self.eval_every == 0 or step == self.total_steps:
            v.train_time += time.perf_counter() - p.t0
            t_eval = time.perf_counter()
            self._eval_step(v, step)
            v.eval_time += time.perf_counter() - t_eval
            if v.best_score is not None:  # the selecting metric as reported, with the step it is from
                sel = self.selection
                p.post[f"best {sel.split}_{sel.key}"] = f"{sel.shown(v.best_score):.4f}@{v.best_step}"
                p.bar.set_postfix(p.post)
            p.t0 = time.perf_counter()
        ckpt_every = int(cfg.checkpoint_every) if cfg.get("checkpoint_every") else 0
        periodic = ckpt_every and step % ckpt_every == 0 and step < self.total_steps
        if self.ckpt_root is not None and (periodic or p.stop.signal):
            self._check_finite(p.run_loss, step)
            v.run_loss = float(p.run_loss.item())
            v.train_time += time.perf_counter() - p.t0
            p.t0 = time.perf_counter()
            self._save_checkpoint(v, step)
        if p.stop.signal:
            raise TrainingInterrupted(
                f"{p.stop.signal} at step {step}; checkpoint saved, resume with trainer.resume=auto"
            )
        return step >= self.total_steps


@dataclass
class _Progress:
    """What one `fit` call tracks besides the checkpointed LoopState: the loss accumulated on the device since the last
    log record, the progress bar and its postfix, the signal catcher, and the start of the current timed stretch."""

    run_loss: torch.Tensor
    bar: Any
    stop: _SignalCatcher
    post: dict[str, str] = field(default_factory=dict)
    grad_norm: Any = 0.0
    t0: float = 0.0


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after SIGTERM/SIGINT once a checkpoint is on disk; the run is marked "interrupted"."""


class _SignalCatcher:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next optimizer step and stops (main thread only)."""

    def __init__(self):
        self.signal: str | None = None
        self.immediate = False  # raise from the handler (the final evaluation) instead of setting the flag only
        self.prev: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.prev[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.immediate:
            raise TrainingInterrupted(self.signal)

    def restore(self) -> None:
        for sig, h in self.prev.items():
            signal.signal(sig, h)
