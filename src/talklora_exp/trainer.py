"""One trainer for every method and task, on accelerate. Methods plug in through `TrainHooks` (aux loss, routing
statistics); tasks through `Task.evaluate`. No branching on method names here."""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import checkpoint as ckpt
from .errors import UserError
from .methods.base import TrainHooks
from .rundir import RunLogger
from .tasks.base import Task, TaskData
from .tasks.metrics import is_better


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


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp32 otherwise. Asking for what the device cannot do is an error."""
    has_cuda = torch.cuda.is_available() and not cpu
    if requested == "auto":
        return "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "no"
    if requested not in ("no", "bf16", "fp16"):
        raise UserError(f"trainer.mixed_precision={requested!r}; allowed: ['auto', 'no', 'bf16', 'fp16']")
    if requested == "fp16" and not has_cuda:
        raise UserError("trainer.mixed_precision=fp16 needs a CUDA GPU; this run is on CPU (use 'no' or 'auto')")
    if requested == "bf16" and has_cuda and not torch.cuda.is_bf16_supported():
        raise UserError("trainer.mixed_precision=bf16: this GPU does not support bf16 (use fp16 or 'no')")
    return requested


@dataclass
class FitResult:
    best_step: int
    best_eval: dict[str, float]
    final_eval: dict[str, float]
    best_routing: dict[str, Any] | None
    best_predictions: list[dict] | None
    total_steps: int
    train_runtime_s: float
    train_samples: int


class Trainer:
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
    ):
        self.cfg, self.acc, self.task, self.hooks, self.logger, self.seed = tcfg, accelerator, task, hooks, logger, seed
        self.ckpt_root = ckpt_root
        self.gen = torch.Generator().manual_seed(
            seed
        )  # the shuffle order; its state at each epoch start is checkpointed
        for key in ("batch_size", "eval_batch_size", "grad_accum"):
            if int(tcfg[key]) <= 0:
                raise UserError(f"trainer.{key}={tcfg[key]} must be a positive integer")
        for key in ("max_steps", "epochs", "eval_every", "log_every", "routing_stats_every", "checkpoint_every"):
            if tcfg.get(key) is not None and int(tcfg[key]) <= 0:
                raise UserError(f"trainer.{key}={tcfg[key]} must be positive (or null)")
        bs = int(tcfg.batch_size)
        if tcfg.group_by_length:
            train_dl = DataLoader(
                data.train,
                batch_sampler=LengthGroupedBatchSampler(data.train.lengths, bs, seed),
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
        eval_dls = {
            k: DataLoader(v, batch_size=int(tcfg.eval_batch_size), shuffle=False, collate_fn=collate)
            for k, v in data.evals.items()
        }
        trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(tcfg.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(tcfg.lr),
        )
        self.model, self.opt, self.train_dl = accelerator.prepare(model, opt, train_dl)
        self.eval_dls = {k: accelerator.prepare(v) for k, v in eval_dls.items()}
        self.trainable = trainable
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / int(tcfg.grad_accum)))
        self.total_steps = int(tcfg.max_steps) if tcfg.max_steps else int(tcfg.epochs) * self.steps_per_epoch
        warm = (
            tcfg.warmup_steps if tcfg.warmup_steps is not None else round(float(tcfg.warmup_ratio) * self.total_steps)
        )
        self.sched = get_linear_schedule_with_warmup(self.opt, int(warm), self.total_steps)
        self.eval_every = int(tcfg.eval_every) if tcfg.eval_every else self.steps_per_epoch

    # -- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, float], dict[str, Any] | None]:
        rec = self.hooks.routing
        if rec is not None:
            rec.start()
        metrics = self.task.evaluate(self.model, self.eval_dls, self.acc, on_batch=self.hooks.set_batch)
        routing = rec.stop() if rec is not None else None
        self.model.train()
        return metrics, routing

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {str(i): p.detach().cpu().clone() for i, p in enumerate(self.trainable)}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.trainable):
                p.copy_(snap[str(i)].to(p.device, p.dtype))

    # -- training ---------------------------------------------------------------------------------------------------
    def _state(self, v: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: weights, optimizer, scheduler, RNGs, data position, best-so-far."""
        return {
            "trainable": [p.detach().cpu().clone() for p in self.trainable],
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": ckpt.rng_state(),
            "loop": {k: v[k] for k in LOOP_KEYS},
        }

    def _check_finite(self, run_loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(run_loss).all():
            raise FloatingPointError(f"non-finite training loss at step {step}; the last good checkpoint is kept")

    def fit(self, resume: dict[str, Any] | None = None) -> FitResult:
        cfg, acc = self.cfg, self.acc
        main = self.task.main_metric
        log_every = int(cfg.log_every)
        stats_every = int(cfg.routing_stats_every) if cfg.routing_stats_every else 0
        ckpt_every = int(cfg.checkpoint_every) if cfg.get("checkpoint_every") else 0
        rec = self.hooks.routing
        v: dict[str, Any] = dict(step=0, samples=0, epoch=0, batch_in_epoch=0, train_time=0.0, best_val=None, best_step=0,
                                 best_eval={}, best_routing=None, best_snap=None, best_preds=None, last_eval={},
                                 run_loss=0.0, n_micro=0, epoch_gen_state=None)  # fmt: skip
        if resume is not None:
            with torch.no_grad():
                for p, t in zip(self.trainable, resume["trainable"]):
                    p.copy_(t.to(p.device, p.dtype))
            self.opt.load_state_dict(resume["optimizer"])
            self.sched.load_state_dict(resume["scheduler"])
            v.update(resume["loop"])
            ckpt.set_rng_state(resume["rng"])
        run_loss = torch.tensor(float(v["run_loss"]), device=acc.device)
        post: dict[str, str] = {}
        pbar = tqdm(total=self.total_steps, initial=v["step"], disable=not (cfg.progress and acc.is_main_process),
                    desc=f"{self.task.name}", unit="step", dynamic_ncols=True)  # fmt: skip
        stop = _SignalCatcher()
        self.model.train()
        t0 = time.perf_counter()
        try:
            while v["step"] < self.total_steps:
                if hasattr(self.train_dl, "set_epoch"):
                    self.train_dl.set_epoch(v["epoch"])
                dl = self.train_dl
                if v["batch_in_epoch"]:  # resuming mid-epoch: the epoch's shuffle order, minus the batches done
                    self.gen.set_state(v["epoch_gen_state"])
                    dl = skip_first_batches(self.train_dl, v["batch_in_epoch"])
                else:
                    v["epoch_gen_state"] = self.gen.get_state()
                for batch in dl:
                    v["batch_in_epoch"] += 1
                    stats_now = stats_every and rec is not None and (v["step"] + 1) % stats_every == 0
                    if stats_now:
                        rec.start()
                    self.hooks.set_batch(batch)
                    with acc.accumulate(self.model):
                        loss = self.model(**batch).loss
                        aux = self.hooks.aux_loss()
                        acc.backward(loss + aux if aux is not None else loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(self.trainable, float(cfg.max_grad_norm))
                        self.opt.step()
                        self.opt.zero_grad(set_to_none=True)
                    run_loss += loss.detach()
                    v["n_micro"] += 1
                    v["samples"] += int(batch["input_ids"].shape[0]) * acc.num_processes
                    if stats_now:
                        self.logger.log({"step": v["step"] + 1, "routing_train": rec.stop()["aggregate"]})
                    if not acc.sync_gradients:
                        continue
                    self.sched.step()
                    v["step"] += 1
                    step = v["step"]
                    pbar.update(1)
                    if step % log_every == 0 or step == self.total_steps:
                        self._check_finite(run_loss, step)
                        mean_loss = acc.reduce(run_loss, "mean").item() / v["n_micro"]
                        rec_ = {
                            "step": step,
                            "epoch": v["epoch"],
                            "loss": mean_loss,
                            "lr": self.sched.get_last_lr()[0],
                            "samples": v["samples"],
                        }
                        self.logger.log(rec_)
                        post["loss"] = f"{mean_loss:.4f}"
                        pbar.set_postfix(post)
                        run_loss.zero_()
                        v["n_micro"] = 0
                    if step % self.eval_every == 0 or step == self.total_steps:
                        v["train_time"] += time.perf_counter() - t0
                        last_eval, routing = self.evaluate()
                        v["last_eval"] = last_eval
                        rec_ = {"step": step, "epoch": v["epoch"], "eval": last_eval}
                        if routing is not None:
                            rec_["routing"] = routing["aggregate"]
                        self.logger.log(rec_)
                        if is_better(last_eval.get(main), v["best_val"]):
                            v.update(best_val=last_eval[main], best_step=step, best_eval=last_eval, best_routing=routing,
                                     best_snap=self._snapshot(), best_preds=getattr(self.task, "last_predictions", None))  # fmt: skip
                        post[main] = f"{last_eval.get(main, float('nan')):.4f}"
                        pbar.set_postfix(post)
                        t0 = time.perf_counter()
                    want_ckpt = self.ckpt_root is not None and ((ckpt_every and step % ckpt_every == 0) or stop.signal)
                    if want_ckpt and step < self.total_steps:
                        self._check_finite(run_loss, step)
                        v["run_loss"] = float(run_loss.item())
                        v["train_time"] += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        if acc.is_main_process:
                            ckpt.save(self.ckpt_root, step, self._state(v))
                        acc.wait_for_everyone()
                    if stop.signal:
                        raise TrainingInterrupted(
                            f"{stop.signal} at step {step}; checkpoint saved, resume with trainer.resume=auto"
                        )
                    if step >= self.total_steps:
                        break
                v["epoch"] += 1
                v["batch_in_epoch"] = 0
        finally:
            stop.restore()
            pbar.close()
        v["train_time"] += time.perf_counter() - t0
        step = v["step"]
        best_snap, best_step, best_eval, best_preds = v["best_snap"], v["best_step"], v["best_eval"], v["best_preds"]
        if best_snap is None:  # metric undefined at every eval: keep the final weights and report the final eval
            best_step, best_eval = step, v["last_eval"]
            best_preds = getattr(self.task, "last_predictions", None)
        elif best_step != step:
            self._restore(best_snap)  # the saved adapter reproduces the reported (best-step) metrics
        return FitResult(
            best_step,
            best_eval,
            v["last_eval"],
            v["best_routing"],
            best_preds,
            step,
            v["train_time"],
            v["samples"],
        )


LOOP_KEYS = ("step", "samples", "epoch", "batch_in_epoch", "train_time", "best_val", "best_step", "best_eval", "best_routing",
             "best_snap", "best_preds", "last_eval", "run_loss", "n_micro", "epoch_gen_state")  # fmt: skip


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after SIGTERM/SIGINT once a checkpoint is on disk; the run is marked "interrupted"."""


class _SignalCatcher:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next optimizer step and stops (main thread only)."""

    def __init__(self):
        self.signal: str | None = None
        self.prev: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.prev[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, h in self.prev.items():
            signal.signal(sig, h)
