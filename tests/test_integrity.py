"""Sweeps you can trust: a run is its config hash (skip/resume only on a match), one process per run dir, corrupt
checkpoints are never loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONF, ROOT, compose_cfg

from talklora_exp import checkpoint as ckpt
from talklora_exp.identity import NOT_RESULTS, ConfigMismatch, diff_keys, identity

TINY = ["method=lora", "task=glue/rte", "trainer.max_steps=2", "trainer.batch_size=8", "model.max_length=32",
        "trainer.progress=false", "task.val_size=8", "trainer.eval_every=2"]  # fmt: skip


def test_hash_ignores_only_the_named_keys():
    a = identity(compose_cfg(TINY))
    assert a == identity(compose_cfg([*TINY, "trainer.progress=true", "trainer.checkpoint_every=5", "tag=x"]))
    b = identity(compose_cfg([*TINY, "trainer.lr=0.01"]))
    assert b["config_hash"] != a["config_hash"] and diff_keys(a["config"], b["config"]) == [
        "trainer.lr: 0.0005 -> 0.01"
    ]
    c = identity(compose_cfg([*TINY, "seed=7"]))
    assert c["config_hash"] != a["config_hash"] and c["group_hash"] == a["group_hash"]  # same table cell
    assert not any(k.startswith(("paths.", "hydra.")) for k in a["config"]) and "trainer.lr" in a["config"]
    assert "trainer.progress" in NOT_RESULTS and "trainer.lr" not in NOT_RESULTS


@pytest.mark.slow
def test_changed_config_is_refused_then_redone_with_overwrite(glue_dir, tmp_path):
    from talklora_exp.run import run

    d = tmp_path / "run"
    first = run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}"]), d)
    assert run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}"]), d) is None  # same hash: skipped
    with pytest.raises(
        ConfigMismatch,
        match=r"it holds a completed run of a different config \(1 key\(s\) differ: trainer\.lr: 0\.0005 -> 0\.002\)",
    ):
        run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.lr=2e-3"]), d)
    assert json.loads((d / "metrics.json").read_text())["config_hash"] == first["config_hash"]  # untouched
    redo = run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.lr=2e-3", "overwrite=true"]), d)
    assert redo["status"] == "completed" and redo["config_hash"] != first["config_hash"]


def _env(data):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TALKLORA_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}


def _run_files(runs) -> dict:
    """Every file a run dir commits (Hydra's .hydra/ record and the lock stay out of git), byte for byte."""
    return {str(f): f.read_bytes() for d in runs for f in sorted(d.rglob("*"))
            if f.is_file() and ".hydra" not in f.parts and f.name != ".lock"}  # fmt: skip


@pytest.mark.slow
def test_editing_a_preset_stops_the_sweep_naming_the_key(glue_dir, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    preset = conf / "experiment" / "tiny.yaml"
    body = ("# @package _global_\nsweep_name: tiny\ntrainer:\n  lr: 1.0e-3\n  max_steps: 2\n  batch_size: 8\n"
            "  progress: false\n  eval_every: 2\nmodel:\n  max_length: 32\ntask:\n  val_size: 8\n"
            "hydra:\n  sweeper:\n    params:\n      seed: 1,2\n")  # fmt: skip
    preset.write_text(body)
    env = {**_env(glue_dir), "TALKLORA_CONF_DIR": str(conf)}
    args = [
        sys.executable,
        "-m",
        "talklora_exp",
        "-m",
        "experiment=tiny",
        "task=glue/rte",
        f"paths.results_dir={tmp_path}/res",
    ]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(m.parent for m in (tmp_path / "res" / "sweeps" / "tiny").rglob("metrics.json"))
    assert len(runs) == 2 and all(json.loads((d / "metrics.json").read_text())["status"] == "completed" for d in runs)
    before = _run_files(runs)
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # the same sweep again
    assert r.returncode == 0, r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("skip: ") == 2
    assert _run_files(runs) == before  # skipping wrote nothing into the finished runs (their log included)
    preset.write_text(body.replace("lr: 1.0e-3", "lr: 5.0e-3"))
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "trainer.lr: 0.001 -> 0.005" in err[0] and "overwrite=true" in err[0]
    assert _run_files(runs) == before  # refused: nothing of the finished runs changed
    r = subprocess.run([*args, "overwrite=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(json.loads((d / "identity.json").read_text())["config"]["trainer.lr"] == 5e-3 for d in runs)


@pytest.mark.slow
def test_second_process_on_a_busy_run_dir_exits_at_once(glue_dir, tmp_path):
    d = tmp_path / "busy"
    # The first run cannot finish during the test (a loaded machine once let 60 steps end before the second process
    # had started, so it found a completed run); it is stopped with SIGTERM once the second has been turned away.
    args = [sys.executable, "-m", "talklora_exp", *[a for a in TINY if "max_steps" not in a], "trainer.max_steps=100000",
            f"hydra.run.dir={d}"]  # fmt: skip
    first = subprocess.Popen(
        args, cwd=ROOT, env=_env(glue_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not (d / "train_log.jsonl").exists():  # the first run holds the lock and is training
        assert first.poll() is None and time.time() < deadline, (
            first.stderr.read() if first.poll() is not None else "timeout"
        )
        time.sleep(0.2)
    second = subprocess.run(args, cwd=ROOT, env=_env(glue_dir), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [f"error: {d} is in use by another process (pid {first.pid}); "
                                                  "wait for it to finish, or use another hydra.run.dir"]  # fmt: skip
    assert first.poll() is None and not (d / "metrics.json").exists()  # the busy one wrote nothing
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 130, err[-2000:]
    assert json.loads((d / "metrics.json").read_text())["status"] == "interrupted"


def _state(step: int) -> dict:
    return {"loop": {"step": step}, "trainable": [torch.full((2,), float(step))]}


def test_corrupt_or_half_written_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save(root, 4, _state(4))
    ckpt.save(root, 8, _state(8))
    assert ckpt.load_latest(root)["loop"]["step"] == 8
    (root / "step-12.tmp").mkdir()  # a crash mid-write leaves a temp dir: ignored
    (root / "step-12.tmp" / "state.pt").write_bytes(b"partial")
    assert ckpt.load_latest(root)["loop"]["step"] == 8
    blob = bytearray((root / "step-8" / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: the checksum catches it, the previous checkpoint is used
    (root / "step-8" / "state.pt").write_bytes(bytes(blob))
    assert ckpt.load_latest(root)["loop"]["step"] == 4
    (root / "step-4" / "state.pt").write_bytes(b"")  # truncated too: nothing usable, and it says so
    with pytest.raises(
        ckpt.NoUsableCheckpoint, match=r"no usable checkpoint in .*step-8: ValueError: checksum mismatch; step-4"
    ):
        ckpt.load_latest(root)
    assert ckpt.load_latest(tmp_path / "none") is None


def test_pointer_to_a_missing_dir_and_keep_two(tmp_path):
    root = tmp_path / "c"
    for s in (2, 4, 6):
        ckpt.save(root, s, _state(s))
    assert sorted(p.name for p in root.glob("step-*")) == ["step-4", "step-6"]
    shutil.rmtree(root / "step-6")  # the pointer names a dir that is gone: the newest complete one is used
    assert json.loads((root / "latest.json").read_text())["dir"] == "step-6"
    assert ckpt.load_latest(root)["loop"]["step"] == 4


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_config(glue_dir, tmp_path, monkeypatch):
    from talklora_exp.errors import UserError
    from talklora_exp.run import run

    d = tmp_path / "r"
    base = [
        *TINY,
        f"paths.data_dir={glue_dir}",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=2",
        "trainer.resume=auto",
    ]
    real = ckpt.save

    def crash(*a, **k):
        out = real(*a, **k)
        if a[1] == 4:
            raise SystemExit("killed")
        return out

    monkeypatch.setattr(ckpt, "save", crash)
    with pytest.raises(SystemExit):
        run(compose_cfg(base), d)
    monkeypatch.setattr(ckpt, "save", real)
    # refused before the checkpoint is read: the run dir records another config (identity.json)
    with pytest.raises(ConfigMismatch, match=r"of a different config .*trainer\.lr"):
        run(compose_cfg([*base, "trainer.lr=0.01"]), d)
    (d / "checkpoints" / "step-4" / "state.pt").write_bytes(b"junk")
    (d / "checkpoints" / "step-2" / "state.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="no usable checkpoint in .*; rerun without trainer.resume=auto"):
        run(compose_cfg(base), d)


def test_a_result_changing_fix_orphans_only_the_runs_it_changes():
    """LoRA/DoRA with a trained pooler under mean pooling carry the padding fix in their identity, so a run recorded
    before it (no such key) is a different config and a sweep stops on it; other methods' identities are untouched."""
    from talklora_exp.identity import mismatch_error, same_config

    lora = identity(compose_cfg(["method=lora", "task=glue/rte"]))
    assert lora["config"]["fix.mean_pool_mask_under_peft"] is True
    before = {k: v for k, v in lora["config"].items() if not k.startswith("fix.")}
    recorded = {"config_hash": "made-before-the-fix", "config": before}
    assert not same_config(recorded, lora)
    assert "fix.mean_pool_mask_under_peft: '<absent>' -> True" in str(mismatch_error(ROOT, "it", recorded, lora))
    for over in (
        ["method=talklora"],
        ["method=lora", "model.pooling=cls"],
        ["method=lora", "model.head_modules=[classifier]"],
    ):
        assert not any(k.startswith("fix.") for k in identity(compose_cfg([*over, "task=glue/rte"]))["config"])


def test_a_lookup_table_acts_only_through_the_keys_it_resolves_into():
    """The GLUE presets' per-task tables (`glue_choice`, `glue_schedule`) are not part of a run's identity: changing
    RTE's entry leaves a CoLA run the same run (it never reads RTE's entry), changes the RTE run, and a run recorded
    with the table in its identity (before the key was listed) is still that run and still groups with the runs
    recorded after."""
    from talklora_exp.identity import group_hash, same_config

    def ident(task: str, *over: str) -> dict:
        return identity(compose_cfg(["experiment=glue_table", "method=lora", f"task=glue/{task}", *over]))

    cola, rte = ident("cola"), ident("rte")
    assert not any(k.startswith(("glue_choice", "glue_schedule")) for k in cola["config"])
    assert ident("cola", "glue_choice.lr.rte=0.005", "glue_schedule.eval_every.rte=7") == cola
    moved = ident("rte", "glue_choice.lr.rte=0.005", "glue_schedule.eval_every.rte=7")
    assert diff_keys(rte["config"], moved["config"]) == ["trainer.eval_every: 35 -> 7", "trainer.lr: 0.001 -> 0.005"]
    recorded_config = {**cola["config"], "glue_choice.lr.rte": 0.002, "glue_choice.pair_encoding.rte": "cross"}
    recorded = {"config_hash": "made-with-the-table", "config": recorded_config}
    assert same_config(recorded, cola) and group_hash(recorded_config) == cola["group_hash"]
    edited = {"config_hash": "x", "config": {**recorded_config, "trainer.lr": 0.01}}
    assert not same_config(edited, cola) and group_hash(edited["config"]) != cola["group_hash"]


@pytest.mark.slow
def test_committed_table_runs_keep_their_identity():
    """A refactor is not a config change: every committed table run still composes (its sweep's experiment plus the
    overrides in its dir name) to the config it recorded, so a sweep skips it and the tables keep it. HiRA's seed-1
    runs predate `hira_is_peft` and are the one expected exception."""
    from talklora_exp.identity import current_keys, same_config

    checked = 0
    for sweep in ("glue_table", "glue_table_baselines"):
        for path in sorted((ROOT / "results" / "repro" / sweep).glob("*/*/identity.json")):
            overrides = "/".join(path.parent.relative_to(path.parents[2]).parts).split(",")
            stored = json.loads(path.read_text())
            new = identity(compose_cfg([f"experiment={sweep}", *overrides]))
            if "method=hira" in overrides and not stored["config"].get("fix.hira_is_peft"):
                assert "fix.hira_is_peft: '<absent>' -> True" in diff_keys(
                    current_keys(stored["config"]), new["config"]
                )
                continue
            assert same_config(stored, new), (path, diff_keys(current_keys(stored["config"]), new["config"]))
            checked += 1
    assert checked >= 55  # the GLUE table (3 methods x 5 tasks x 3 seeds) and the baselines landed so far
    for sweep in ("commonsense_table", "commonsense_cloze"):  # one level: method=...,seed=... (an unfinished one too)
        for path in sorted((ROOT / "results" / "repro" / sweep).glob("*/identity.json")):
            stored = json.loads(path.read_text())
            new = identity(compose_cfg([f"experiment={sweep}", *path.parent.name.split(",")]))
            assert same_config(stored, new), (path, diff_keys(current_keys(stored["config"]), new["config"]))
            checked += 1
    assert checked >= 66  # + the label commonsense table's 10 runs and the cloze table's zero-shot row
