"""The training loop's data order and options the presets use: the length-grouped sampler, epochs reaching the
sampler under accelerate's multi-process wrapping, gradient accumulation, routing snapshots once per optimizer step."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import compose_cfg
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from talklora_exp.trainer import LengthGroupedBatchSampler, set_epoch


def _epoch(sampler, e):
    sampler.set_epoch(e)
    return [list(b) for b in sampler]


def test_length_grouped_sampler_orders():
    lengths = [(i * 7) % 23 + 1 for i in range(103)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, mega=4)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    for order in (e0, e1):
        flat = [i for b in order for i in b]
        assert sorted(flat) == list(range(103))  # every index exactly once per epoch
        assert len(order) == len(s) == 13 and all(len(b) <= 8 for b in order)
    assert e0 != e1  # a new order every epoch
    assert _epoch(LengthGroupedBatchSampler(lengths, 8, seed=3, mega=4), 1) == e1  # same seed and epoch: same order
    assert _epoch(LengthGroupedBatchSampler(lengths, 8, seed=4, mega=4), 1) != e1
    # inside a mega-batch (4 batches of 8) batches are sorted by length: less padding
    for b in e0:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_epoch_reaches_the_sampler_under_multi_process_wrapping():
    s = LengthGroupedBatchSampler(list(range(1, 41)), batch_size=4, seed=0)
    dl = prepare_data_loader(DataLoader(list(range(40)), batch_sampler=s), num_processes=2, process_index=0,
                             put_on_device=False)  # fmt: skip
    dl.set_epoch(5)
    assert s.epoch == 0  # accelerate's own set_epoch does not reach a wrapped custom batch sampler ...
    set_epoch(dl, s, 5)
    assert s.epoch == 5  # ... the trainer's does
    first = [x.tolist() for x in dl]
    set_epoch(dl, s, 6)
    assert [x.tolist() for x in dl] != first


TINY = ["method=talklora", "task=glue/sst2", "trainer.max_steps=6", "trainer.eval_every=6", "model.max_length=32",
        "trainer.progress=false", "task.val_size=8", "method.dropout=0.0", "trainer.log_every=1", "trainer.lr=2e-3",
        "+model.hf_config={hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0}"]  # fmt: skip


def _run_recording_grads(cfg, run_dir):
    """Run and record, at every optimizer step, the gradients the optimizer is about to apply (a global pre-hook:
    accelerate's wrapper calls the inner AdamW only when an accumulation cycle ends)."""
    from talklora_exp.run import run

    grads: list[list[torch.Tensor]] = []

    def hook(opt, args, kwargs):
        grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        out = run(cfg, run_dir)
    finally:
        handle.remove()
    return out, grads


@pytest.mark.slow
def test_grad_accum_matches_the_full_batch_and_routing_snapshots_once_per_step(glue_dir, tmp_path):
    """2 micro-batches of 4 must give the gradient of one batch of 8. Compared where the comparison is sharp: the first
    step's gradients, taken from identical weights, agree up to float32 summation order: relative 1e-5 of each
    tensor's norm (~256 tokens x 384 features summed in another order, eps 6e-8; 2e-7 measured). The weights after
    AdamW are not compared: AdamW is invariant to the gradient's scale, so they cannot show a mis-scaled accumulation,
    and it amplifies float noise on near-zero gradients to ~lr-sized moves (1.2e-5 seen), so no float32 tolerance fits.
    Later steps start from weights that differ by that noise, so each step is checked by its global gradient norm
    and loss (relative 1e-4; 1e-7 measured). A wrong scale or a dropped micro-batch moves them by tens of percent."""
    full, g_full = _run_recording_grads(
        compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.batch_size=8"]), tmp_path / "full"
    )
    acc, g_acc = _run_recording_grads(
        compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.batch_size=4", "trainer.grad_accum=2",
                     "trainer.routing_stats_every=2"]), tmp_path / "acc")  # fmt: skip
    assert acc["total_steps"] == full["total_steps"] == 6 and len(g_acc) == len(g_full) == 6
    assert len(g_acc[0]) == len(g_full[0]) > 0
    assert any(b.norm() > 0 for b in g_full[0])
    for a, b in zip(g_acc[0], g_full[0]):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12
    logs = {
        k: [json.loads(x) for x in (tmp_path / k / "train_log.jsonl").read_text().splitlines()] for k in ("full", "acc")
    }
    la = [r["loss"] for r in logs["acc"] if "loss" in r]
    lf = [r["loss"] for r in logs["full"] if "loss" in r]
    assert len(la) == 6 and la == pytest.approx(lf, rel=1e-4)  # 2 x 4 accumulated = one batch of 8, step by step
    na = [r["grad_norm"] for r in logs["acc"] if "loss" in r]
    nf = [r["grad_norm"] for r in logs["full"] if "loss" in r]
    assert na == pytest.approx(nf, rel=1e-4) and min(nf) > 0
    snaps = [r["step"] for r in logs["acc"] if "routing_train" in r]
    assert snaps == [2, 4, 6]  # one routing snapshot per optimizer step, not per micro-batch


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_one_pass_validation_equals_loss_pass_plus_metric_pass(task):
    """GLUE validation reads the split once for its loss and its metrics; both must equal what the separate loss pass
    (example_losses, exact mean) and metric pass (evaluate) give, bit for bit, so selection is unchanged."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf
    from transformers import BertConfig, BertForSequenceClassification

    from talklora_exp.tasks.glue import GlueTask

    t = GlueTask(OmegaConf.create({"name": task, "main_metric": "accuracy" if task == "rte" else "pearson"}))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=1 if t.is_regression else 2)  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    batches = []
    for n, length in ((5, 7), (4, 3), (3, 9)):
        ids = torch.randint(1, 50, (n, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # some padding
        y = torch.rand(n) * 5 if t.is_regression else torch.randint(0, 2, (n,))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    acc = Accelerator(cpu=True)
    losses = [t.example_losses(model, b)[0].double().sum() for b in batches]
    expect = {
        "loss": float(sum(losses, torch.zeros((), dtype=torch.float64)) / 12),
        **t.evaluate(model, {"": batches}, acc).metrics,
    }
    res = t.evaluate(model, {"": batches}, acc, with_loss=True)
    got = res.metrics
    assert got == expect and list(got) == list(expect) and res.counts == {"dev": 12}
