"""Checkpoint selection (trainer.select): the reported step comes from the validation split, the test set is
evaluated exactly once, and best_dev is refused where the reported split is a test set. A scripted task drives the
real Trainer, so the step each split would pick is known in advance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from talklora_exp.errors import UserError
from talklora_exp.methods.base import TrainHooks
from talklora_exp.rundir import RunLogger
from talklora_exp.tasks.base import EvalResult, Split, Task, TaskData
from talklora_exp.trainer import Trainer


class Toy(nn.Module):
    """One weight pulled towards 10 by the loss: it grows every step, so "the weight now" names the step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, labels=None, attention_mask=None):
        return SimpleNamespace(loss=((self.w - 10.0) ** 2).sum())


class ScriptedTask(Task):
    """Validation loss follows a script (one value per validation pass); the reported metric is the weight itself,
    so it increases every step and selecting on it would always pick the last step."""

    kind = "seq_cls"

    def __init__(self, val_losses: list[float], report_split: str = "test"):
        self.name, self.main_metric, self.report_split = "toy", "accuracy", report_split
        self.val_losses = list(val_losses)
        self.weights_at_val: list[float] = []
        self.report_calls = 0

    def example_losses(self, model, batch):
        self.weights_at_val.append(model.w.item())
        return torch.tensor([self.val_losses.pop(0)]), torch.tensor([1.0])

    def evaluate(self, model, loaders, accelerator, on_batch=None, progress=False):
        self.report_calls += 1
        return EvalResult({"accuracy": model.w.item()})


def _data(n_val: int = 1) -> TaskData:
    feats = [{"input_ids": torch.tensor([i])} for i in range(4)]
    val = Split([{"input_ids": torch.tensor([0])}] * n_val) if n_val else None
    return TaskData(train=Split(feats), evals={"": Split(feats[:1])}, val=val, val_evals={"": val} if val else None)


def _tcfg(**over):
    base = dict(batch_size=4, eval_batch_size=4, grad_accum=1, lr=0.5, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.0,
                max_grad_norm=None, eval_every=2, log_every=1, max_steps=8, epochs=None, group_by_length=False, num_workers=0,
                progress=False, routing_stats_every=None, checkpoint_every=None, select="val_from_train",
                select_metric="loss", dev_curve=False)  # fmt: skip
    return OmegaConf.create({**base, **over})


def _fit(task, tmp_path, data=None, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(tmp_path, OmegaConf.create({"name": "jsonl"}), {})
    collate = lambda b: {"input_ids": torch.stack([x["input_ids"] for x in b])}  # noqa: E731
    tr = Trainer(_tcfg(**over), Accelerator(cpu=True), Toy(), task, data or _data(), collate, TrainHooks(), logger, 0)
    return tr, tr.fit()


def test_validation_selects_the_step_and_test_is_evaluated_once(tmp_path):
    # evals at steps 2, 4, 6, 8; validation loss is lowest at the second (step 4); the test metric grows every step,
    # so selecting on it would report step 8
    task = ScriptedTask([0.9, 0.5, 0.7, 0.8])
    tr, res = _fit(task, tmp_path)
    assert res.selection == {"protocol": "val_from_train", "split": "val", "metric": "loss", "step": 4, "value": 0.5}
    assert task.report_calls == 1 and res.report_evals == 1
    assert res.report["accuracy"] == pytest.approx(task.weights_at_val[1])  # the weights of step 4, restored
    assert res.report["accuracy"] < task.weights_at_val[-1]  # not the last step's (what test-set selection gives)
    log = [OmegaConf.to_container(OmegaConf.create(x)) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val" in r] == [2, 4, 6, 8]
    assert [r for r in log if "report" in r or "eval" in r] == [
        {"step": 8, "split": "test", "report": res.report, "selected_step": 4}
    ]


def test_last_reports_the_final_weights(tmp_path):
    task = ScriptedTask([0.1] * 4)
    _, res = _fit(task, tmp_path / "a", select="last")
    assert res.selection["step"] == 8 and res.selection["split"] is None and task.report_calls == 1
    assert task.weights_at_val == []  # `last` never scores a validation split


def test_best_dev_selects_on_dev_and_is_refused_on_test(tmp_path):
    task = ScriptedTask([], report_split="dev")
    _, res = _fit(task, tmp_path / "a", data=_data(0), select="best_dev")
    # the dev metric grows every step: best_dev reports the last eval, evaluated at each of the 4 eval steps
    assert res.selection == {"protocol": "best_dev", "split": "dev", "metric": "accuracy", "step": 8,
                             "value": res.report["accuracy"]}  # fmt: skip
    assert task.report_calls == 4
    with pytest.raises(UserError, match="best_dev would pick the checkpoint on toy's test set"):
        _fit(ScriptedTask([]), tmp_path / "b", select="best_dev")
    with pytest.raises(UserError, match="dev_curve=true would evaluate toy's test set during training"):
        _fit(ScriptedTask([0.1] * 4), tmp_path / "c", dev_curve=True)
    with pytest.raises(UserError, match="needs a validation split"):
        _fit(ScriptedTask([]), tmp_path / "d", data=_data(0))
