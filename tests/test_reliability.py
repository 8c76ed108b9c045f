"""Resume after a crash, SIGTERM, NaN stop, determinism, wandb offline, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg, free_port
from safetensors.torch import load_file

from talklora_exp import checkpoint as ckpt
from talklora_exp.run import run

pytestmark = pytest.mark.slow

BASE = ["method=talklora", "task=glue/sst2", "trainer.batch_size=8", "trainer.max_steps=12", "trainer.eval_every=6",
        "trainer.checkpoint_every=4", "trainer.log_every=2", "model.max_length=32", "trainer.progress=false", "trainer.lr=2e-3", "task.val_size=8"]  # fmt: skip


def _cfg(glue_dir, *extra):
    return compose_cfg([*BASE, f"paths.data_dir={glue_dir}", *extra])


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("group", [False, True])
def test_resume_after_crash_matches_uninterrupted(glue_dir, tmp_path, group):
    """24 training examples at batch 8 = 3 batches per epoch: the step-8 checkpoint sits mid-epoch (2 of 3 batches of
    epoch 2 done), so the resumed run must replay that epoch's order minus the consumed batches."""
    extra = [f"trainer.group_by_length={str(group).lower()}"]
    ref = run(_cfg(glue_dir, *extra), tmp_path / "ref")
    assert ref["data"]["n_train"] == 24

    # the CLI in its own process, killed by os._exit (as SIGKILL: no cleanup, no final status) right after the step-8
    # checkpoint is on disk (tests/helpers/crash_after_checkpoint.py)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    crash = [sys.executable, str(ROOT / "tests" / "helpers" / "crash_after_checkpoint.py"), "8", *BASE,
             f"paths.data_dir={glue_dir}", *extra, f"hydra.run.dir={tmp_path / 'crash'}"]  # fmt: skip
    killed = subprocess.run(crash, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    record = tmp_path / "crash" / "metrics.json"  # a kill writes no status: nothing may claim completion
    assert not record.exists() or json.loads(record.read_text())["status"] != "completed"
    assert not (tmp_path / "crash" / "adapter").exists()
    state = ckpt.load_latest(tmp_path / "crash" / "checkpoints")
    assert state["loop"]["step"] == 8 and state["loop"]["batch_in_epoch"] == 2  # mid-epoch
    resumed = run(_cfg(glue_dir, *extra, "trainer.resume=auto"), tmp_path / "crash")
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 8
    assert resumed["eval"] == ref["eval"] and resumed["best_step"] == ref["best_step"]
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = {
        k: [json.loads(x) for x in (tmp_path / k / "train_log.jsonl").read_text().splitlines()]
        for k in ("ref", "crash")
    }
    assert [r["step"] for r in logs["crash"]] == [
        r["step"] for r in logs["ref"]
    ]  # each step once, as if never interrupted
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in logs.items()}
    assert len(losses["ref"]) == 6 and losses["crash"] == losses["ref"]  # bit-identical, including after the resume


def test_same_seed_same_metrics(glue_dir, tmp_path):
    a = run(_cfg(glue_dir, "trainer.checkpoint_every=null"), tmp_path / "a")
    b = run(_cfg(glue_dir, "trainer.checkpoint_every=null"), tmp_path / "b")
    assert a["eval"] == b["eval"]
    ta, tb = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(glue_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 6 else out

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 6"):
        run(_cfg(glue_dir, "trainer.log_every=1"), tmp_path / "nan")
    m = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert m["status"] == "failed" and "step 6" in m["error"]
    state = ckpt.load_latest(tmp_path / "nan" / "checkpoints")
    assert state["loop"]["step"] == 4 and all(torch.isfinite(t).all() for t in state["trainable"])


def _env(glue_dir):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TALKLORA_DATA_DIR": str(glue_dir), "OMP_NUM_THREADS": "1"}


def test_sigterm_checkpoints_and_marks_interrupted(glue_dir, tmp_path):
    run_dir = tmp_path / "sig"
    args = [sys.executable, "-m", "talklora_exp", *BASE[:2], "trainer.batch_size=8", "trainer.max_steps=100000", "trainer.checkpoint_every=3",
            "model.max_length=32", "trainer.progress=false", "task.val_size=8", f"hydra.run.dir={run_dir}"]  # fmt: skip
    p = subprocess.Popen(args, cwd=ROOT, env=_env(glue_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest.json").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: SIGTERM at step" in err
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted"
    assert ckpt.load_latest(run_dir / "checkpoints")["loop"]["step"] >= 3


def test_wandb_offline_writes_run_files(glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    m = run(_cfg(glue_dir, "logger=wandb", "trainer.checkpoint_every=null", "trainer.max_steps=4"), tmp_path / "wb")
    assert m["status"] == "completed"
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_two_processes_match_one_with_same_global_batch(glue_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), 4 per process vs 1 process x 8; eval gathered without duplicates."""
    common = ["method=lora", "task=glue/sst2", "trainer.max_steps=8", "trainer.eval_every=8", "model.max_length=32",
              "trainer.progress=false", "trainer.lr=1e-3", "trainer.max_eval_samples=15", "trainer.cpu=true", "method.dropout=0.0",
              "task.val_size=8", "trainer.log_every=1", "+model.hf_config={hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0}"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "talklora_exp", *common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path}/one"],
                         cwd=ROOT, env=_env(glue_dir), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                          "-m", "talklora_exp", *common,
                          "trainer.batch_size=4", f"hydra.run.dir={tmp_path}/two"],
                         cwd=ROOT, env=_env(glue_dir), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["num_processes"] == 2 and m2["eval_counts"] == m1["eval_counts"] == {"dev": 15}
    assert m2["train_samples_per_s"] > 0 and m1["eval"] == m2["eval"]
    # gradients averaged across processes: the same loss and the same gradient norm at every step, up to float32
    # summation order (relative 1e-4; see test_loop's accumulation test for why the weights after AdamW are not compared:
    # AdamW hides a mis-scaled gradient and amplifies float noise on near-zero gradients to ~lr-sized moves)
    logs = {
        k: [json.loads(x) for x in (tmp_path / k / "train_log.jsonl").read_text().splitlines()] for k in ("one", "two")
    }
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in logs.items()}
    assert len(losses["one"]) == 8 and losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    norms = {k: [r["grad_norm"] for r in v if "loss" in r] for k, v in logs.items()}
    assert min(norms["one"]) > 0 and norms["two"] == pytest.approx(norms["one"], rel=1e-4)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()


def _torchrun(glue_dir, tmp_path, *args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=_env(glue_dir), capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("group", [False, True])
def test_two_process_resume_mid_epoch_matches_uninterrupted(glue_dir, tmp_path, group):
    """torchrun x2, killed (no cleanup) right after the step-4 checkpoint: 24 examples at 2 x 4 = 3 steps per epoch, so
    step 4 is one batch into epoch 2. Dropout stays on, so every process must get its own RNG state back."""
    common = ["method=talklora", "task=glue/sst2", "trainer.batch_size=4", "trainer.max_steps=8", "trainer.eval_every=4",
              "trainer.checkpoint_every=4", "trainer.log_every=1", "model.max_length=32", "trainer.progress=false",
              "trainer.lr=2e-3", "trainer.cpu=true", "task.val_size=8", "trainer.max_eval_samples=15",
              f"trainer.group_by_length={str(group).lower()}"]  # fmt: skip
    ref = _torchrun(glue_dir, tmp_path, "-m", "talklora_exp", *common, f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    crash = ROOT / "tests" / "helpers" / "crash_after_checkpoint.py"
    killed = _torchrun(glue_dir, tmp_path, str(crash), "4", *common, f"hydra.run.dir={tmp_path}/run")
    state = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    if state is None:  # the launch itself failed before step 4 (seen once on loaded cores): once more, same dir
        killed = _torchrun(glue_dir, tmp_path, str(crash), "4", *common, f"hydra.run.dir={tmp_path}/run")
        state = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    assert state is not None, killed.stderr[-3000:]
    assert killed.returncode != 0 and not (tmp_path / "run" / "adapter").exists()
    assert state["loop"]["step"] == 4 and state["loop"]["batch_in_epoch"] == 1  # mid-epoch
    resumed = _torchrun(
        glue_dir, tmp_path, "-m", "talklora_exp", *common, "trainer.resume=auto", f"hydra.run.dir={tmp_path}/run"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["resumed_from_step"] == 4 and m["status"] == "completed"
    assert m["eval"] == m_ref["eval"] and m["val"] == m_ref["val"] and m["best_step"] == m_ref["best_step"]
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = {
        k: [json.loads(x) for x in (tmp_path / k / "train_log.jsonl").read_text().splitlines()] for k in ("ref", "run")
    }
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in logs.items()}
    assert len(losses["ref"]) == 8 and losses["run"] == losses["ref"]  # bit-identical per-step losses


def test_the_saved_adapter_is_the_selected_steps(glue_dir, tmp_path, monkeypatch):
    """Validation scripted so the first evaluation (step 6) wins over the last (12): the adapter written to the run
    dir must be step 6's weights, and re-evaluating it must give metrics.json's numbers."""
    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.trainer import Trainer

    losses, snaps = iter([0.1, 0.9]), []

    def scripted(self):
        snaps.append(
            {n: p.detach().clone() for n, p in self.acc.unwrap_model(self.model).named_parameters() if p.requires_grad}
        )
        return {"loss": next(losses)}

    monkeypatch.setattr(Trainer, "validate", scripted)
    m = run(_cfg(glue_dir, "trainer.checkpoint_every=null", "trainer.select_metric=loss"), tmp_path / "r")
    monkeypatch.undo()
    assert m["selection"]["step"] == 6 and m["total_steps"] == 12 and len(snaps) == 2
    saved = _adapter(tmp_path / "r")
    key = next(k for k in saved if "lora_B" in k or "shared_B" in k)
    name = next(n for n in snaps[0] if n.replace(".default", "") == key)  # peft saves keys without the adapter name
    assert torch.equal(saved[key], snaps[0][name]) and not torch.equal(saved[key], snaps[1][name])
    again, _ = evaluate_run(tmp_path / "r")
    assert again == pytest.approx(m["eval"])
