"""The trainer's selection job: evaluation of the validation and reported splits, the best-so-far weights, and the
reported result at the end (`trainer.select`: val_from_train, best_dev, last). `Selection` is the choice, decided once;
`Selecting` is the part of `Trainer` that acts on it (it reads the Trainer's model, loaders, task, hooks and logger)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from . import engines
from .choices import SELECT_METRICS, SELECT_PROTOCOLS
from .errors import UserError
from .tasks.base import EvalResult, Task, TaskData
from .tasks.metrics import is_better
from .trainstate import LoopState


@dataclass(frozen=True)
class Selection:
    """How the reported checkpoint is chosen (`trainer.select`, `trainer.select_metric`), checked and decided once.
    `key` is the metric that selects (the validation loss, or the task's main metric; None for `last`), scored so
    that higher is better."""

    protocol: str  # val_from_train | best_dev | last
    key: str | None
    on_main: bool  # select_metric=main: the validation split also gets the task's metrics

    @classmethod
    def from_config(cls, tcfg: Any, task: Task, data: TaskData) -> Selection:
        protocol, metric = str(tcfg.select), str(tcfg.select_metric)
        if protocol not in SELECT_PROTOCOLS:
            raise UserError(f"trainer.select={protocol!r}; allowed: {list(SELECT_PROTOCOLS)}")
        if metric not in SELECT_METRICS:
            raise UserError(f"trainer.select_metric={metric!r}; allowed: {list(SELECT_METRICS)}")
        if protocol == "best_dev" and task.report_split != "dev":
            raise UserError(
                f"trainer.select=best_dev would pick the checkpoint on {task.name}'s {task.report_split} set; "
                "use trainer.select=val_from_train (or last)"
            )
        if protocol == "val_from_train" and data.val is None:
            raise UserError("trainer.select=val_from_train needs a validation split: task.val_size must be positive")
        loss = protocol == "val_from_train" and metric == "loss"
        return cls(protocol, None if protocol == "last" else "loss" if loss else task.main_metric, metric == "main")

    @property
    def on_val(self) -> bool:
        return self.protocol == "val_from_train"

    @property
    def on_dev(self) -> bool:
        return self.protocol == "best_dev"

    @property
    def split(self) -> str | None:
        return {"val_from_train": "val", "best_dev": "dev"}.get(self.protocol)

    def score(self, metrics: dict[str, float]) -> float | None:
        """Higher is better: the negated loss, or the main metric."""
        return -metrics["loss"] if self.key == "loss" else metrics.get(self.key or "")

    def shown(self, score: float) -> float:
        """A score as the metric reads (the loss positive again)."""
        return -score if self.key == "loss" else score

    def record(self, step: int, score: float | None) -> dict[str, Any]:
        """metrics.json's "selection"."""
        value = self.shown(score) if score is not None else None
        return {"protocol": self.protocol, "split": self.split, "metric": self.key, "step": step, "value": value}


@dataclass
class FitResult:
    selection: dict[str, Any]  # protocol, split, metric, step, value
    report: dict[str, float]  # metrics on the reported split (dev / test) with the selected weights
    val: dict[str, float] | None  # validation metrics at the selected step
    routing: dict[str, Any] | None
    predictions: list[dict] | None
    counts: dict[str, int] | None  # examples scored per reported split
    total_steps: int
    train_runtime_s: float
    eval_runtime_s: float  # validation and dev-curve evaluations during training, and the final report
    train_samples: int
    report_evals: int  # how often the reported split was evaluated (test sets: exactly once)


class Selecting:
    """Evaluate, keep the best weights, report with them. A part of `Trainer`, not used alone."""

    def evaluate(self) -> tuple[EvalResult, dict[str, Any] | None]:
        """The reported split(s), with routing statistics."""
        self.report_evals += 1
        rec = self.hooks.routing
        if rec is not None:
            rec.start()
        show = bool(self.cfg.progress)
        result = self.task.evaluate(self.model, self.eval_dls, self.acc, on_batch=self.hooks.set_batch, progress=show)
        self.report_counts = result.counts
        routing = rec.stop() if rec is not None else None
        self.model.train()
        return result, routing

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss (exact mean over the split's supervised tokens / examples), plus the task's metrics on the
        validation split when they select."""
        self.model.eval()
        if self.selection.on_main and getattr(self.task, "loss_with_metrics", False):
            (dl,) = self.val_eval_dls.values()  # the validation split itself, in evaluate()'s format
            out = self.task.evaluate(self.model, {"": dl}, self.acc, on_batch=self.hooks.set_batch, with_loss=True)
            self.model.train()
            return out.metrics
        tot = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        cnt = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        for batch in self.val_dl:
            self.hooks.set_batch(batch)
            loss, weight = self.task.example_losses(self.model, batch)
            loss, weight = self.acc.gather_for_metrics((loss, weight))
            tot += loss.double().sum()
            cnt += weight.double().sum()
        out = {"loss": float(tot / cnt.clamp_min(1))}
        if self.selection.on_main:
            out.update(
                self.task.evaluate(
                    self.model, self.val_eval_dls, self.acc, on_batch=self.hooks.set_batch, selecting=True
                ).metrics
            )
        self.model.train()
        return out

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Whole tensors (gathered when sharded: every process calls this), so a checkpoint can carry them."""
        return {str(i): engines.full(p.detach()).cpu().clone() for i, p in enumerate(self.trainable)}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.trainable):
            engines.load_full(p, snap[str(i)])

    def _eval_step(self, v: LoopState, step: int) -> None:
        rec: dict[str, Any] = {"step": step, "epoch": v.epoch}
        score, report, routing, result = None, None, None, None
        sel = self.selection
        if sel.on_val:
            rec["val"] = self.validate()
            score = sel.score(rec["val"])
        if sel.on_dev or self.dev_curve:
            result, routing = self.evaluate()
            report = result.metrics
            rec.update(split=self.task.report_split, eval=report)
            if routing is not None:
                rec["routing"] = routing["aggregate"]
            if sel.on_dev:
                score = sel.score(report)
        self.logger.log(rec)
        if sel.key is not None and is_better(score, v.best_score):
            v.best_score, v.best_step, v.best_val, v.best_snap = score, step, rec.get("val"), self._snapshot()
            if sel.on_dev:
                v.best_eval, v.best_routing = report, routing
                v.best_preds = result.predictions if result is not None else None
        if report is not None:
            v.last_eval = report

    def _finish(self, v: LoopState) -> FitResult:
        """Restore the selected weights and evaluate the reported split with them (once, unless best_dev already did)."""
        step, t_report = v.step, time.perf_counter()
        selected = v.best_step if v.best_snap is not None else step  # metric undefined at every eval: the last
        if selected != step:
            self._restore(v.best_snap)  # the saved adapter reproduces the reported metrics
        counts = self.report_counts
        if self.selection.on_dev and v.best_eval is not None:
            report, routing, preds = v.best_eval, v.best_routing, v.best_preds
        elif self.selection.on_dev and v.last_eval is not None:  # no step scored: the last evaluation's
            report, routing, preds = v.last_eval, None, None
        else:
            result, routing = self.evaluate()
            report, preds, counts = result.metrics, result.predictions, result.counts
            rec_ = {"step": step, "split": self.task.report_split, "report": report, "selected_step": selected}
            self.logger.log(rec_)
        return FitResult(self.selection.record(selected, v.best_score), report, v.best_val, routing, preds, counts, step, v.train_time,
                         v.eval_time + time.perf_counter() - t_report, v.samples, self.report_evals)  # fmt: skip

    def _zero_shot(self, eval_time_before: float) -> FitResult:
        """Nothing to train (`method=none`): the validation loss for reference, and the reported split once."""
        t = time.perf_counter()
        val = self.validate() if self.val_dl is not None else None
        result, routing = self.evaluate()
        report = result.metrics
        self.logger.log({"step": 0, "split": self.task.report_split, "report": report, "selected_step": 0, "val": val})
        selection = {"protocol": "none", "split": None, "metric": None, "step": 0, "value": None}
        return FitResult(selection, report, val, routing, result.predictions, result.counts, 0, 0.0,
                         eval_time_before + time.perf_counter() - t, 0, self.report_evals)  # fmt: skip
