"""One trainer for every method and task, on accelerate. Methods plug in through `TrainHooks` (aux loss, routing
statistics); tasks through `Task.evaluate`. No branching on method names here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

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
    total_steps: int
    train_runtime_s: float
    train_samples: int
    history: list[dict] = field(default_factory=list)


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
    ):
        self.cfg, self.acc, self.task, self.hooks, self.logger, self.seed = tcfg, accelerator, task, hooks, logger, seed
        for key in ("batch_size", "eval_batch_size", "grad_accum"):
            if int(tcfg[key]) <= 0:
                raise UserError(f"trainer.{key}={tcfg[key]} must be a positive integer")
        for key in ("max_steps", "epochs", "eval_every", "log_every", "routing_stats_every"):
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
                generator=torch.Generator().manual_seed(seed),
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
        metrics = self.task.evaluate(self.model, self.eval_dls, self.acc)
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
    def fit(self) -> FitResult:
        cfg, acc = self.cfg, self.acc
        main = self.task.main_metric
        log_every = int(cfg.log_every)
        stats_every = int(cfg.routing_stats_every) if cfg.routing_stats_every else 0
        rec = self.hooks.routing
        best_val: float | None = None
        best_step, best_eval, best_routing, best_snap = 0, {}, None, None
        last_eval: dict[str, float] = {}
        history: list[dict] = []
        step, samples, epoch = 0, 0, 0
        run_loss = torch.zeros((), device=acc.device)
        n_micro = 0
        train_time = 0.0
        post: dict[str, str] = {}
        pbar = tqdm(
            total=self.total_steps,
            disable=not (cfg.progress and acc.is_main_process),
            desc=f"{self.task.name}",
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        t0 = time.perf_counter()
        while step < self.total_steps:
            if hasattr(self.train_dl, "set_epoch"):
                self.train_dl.set_epoch(epoch)
            for batch in self.train_dl:
                stats_now = stats_every and rec is not None and (step + 1) % stats_every == 0
                if stats_now:
                    rec.start()
                self.hooks.set_batch(batch)
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    aux = self.hooks.aux_loss()
                    total = loss + aux if aux is not None else loss
                    acc.backward(total)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.trainable, float(cfg.max_grad_norm))
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                run_loss += loss.detach()
                n_micro += 1
                samples += int(batch["input_ids"].shape[0]) * acc.num_processes
                if stats_now:
                    history.append({"step": step + 1, "routing_train": rec.stop()["aggregate"]})
                    self.logger.log(history[-1])
                if not acc.sync_gradients:
                    continue
                self.sched.step()
                step += 1
                pbar.update(1)
                if step % log_every == 0 or step == self.total_steps:
                    mean_loss = acc.reduce(run_loss, "mean").item() / n_micro
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"non-finite training loss ({mean_loss}) at step {step}")
                    rec_ = {
                        "step": step,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": self.sched.get_last_lr()[0],
                        "samples": samples,
                    }
                    history.append(rec_)
                    self.logger.log(rec_)
                    post["loss"] = f"{mean_loss:.4f}"
                    pbar.set_postfix(post)
                    run_loss.zero_()
                    n_micro = 0
                if step % self.eval_every == 0 or step == self.total_steps:
                    train_time += time.perf_counter() - t0
                    last_eval, routing = self.evaluate()
                    rec_ = {"step": step, "epoch": epoch, "eval": last_eval}
                    if routing is not None:
                        rec_["routing"] = routing["aggregate"]
                    history.append(rec_)
                    self.logger.log(rec_)
                    if is_better(last_eval.get(main), best_val):
                        best_val, best_step, best_eval, best_routing = last_eval[main], step, last_eval, routing
                        best_snap = self._snapshot()
                    post[main] = f"{last_eval.get(main, float('nan')):.4f}"
                    pbar.set_postfix(post)
                    t0 = time.perf_counter()
                if step >= self.total_steps:
                    break
            epoch += 1
        pbar.close()
        if best_snap is None:  # metric undefined at every eval: keep the final weights and report the final eval
            best_step, best_eval = step, last_eval
        elif best_step != step:
            self._restore(best_snap)  # the saved adapter reproduces the reported (best-step) metrics
        return FitResult(best_step, best_eval, last_eval, best_routing, step, train_time, samples, history)
