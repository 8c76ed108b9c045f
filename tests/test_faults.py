"""Faults a user meets, made real: a full disk (a small tmpfs) while the adapter is written, a read-only run dir (a
read-only mount: root ignores permission bits), and a completed run dir whose metrics.json is `[]`. Each ends in one
line and exit 2, with nothing on disk claiming completion, and nothing finished overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

ARGS = ["method=talklora", "task=glue/sst2", "trainer.max_steps=2", "model.max_length=32", "trainer.progress=false",
        "task.val_size=8", "trainer.max_eval_samples=8"]  # fmt: skip


def _cli(glue_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TALKLORA_DATA_DIR": str(glue_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "talklora_exp", *ARGS, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture
def mount(tmp_path: Path):
    """A tmpfs of a given size (and read-only on request), unmounted afterwards; skipped where mounting is not allowed."""
    made = []

    def make(size: str, read_only: bool = False, prepare=None) -> Path:
        d = tmp_path / f"mnt{len(made)}"
        d.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True
        ).returncode:
            pytest.skip("mounting a tmpfs needs root with mount rights")
        made.append(d)
        if prepare:
            prepare(d)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d

    yield make
    for d in made:
        subprocess.run(["umount", str(d)], capture_output=True)


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return errors[0]


@pytest.mark.slow
def test_disk_full_while_the_adapter_is_written(glue_dir: Path, mount):
    """300 KB: the logs fit, the adapter (about 1.3 MB) does not. One line naming the adapter dir and the cause; the
    run's metrics.json says failed."""
    d = mount("300k")
    err = _one_line_error(_cli(glue_dir, f"hydra.run.dir={d}/run"))
    assert "adapter" in err and "No space left on device" in err
    m = json.loads((d / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and "No space left" in m["error"]


def test_read_only_run_dir(glue_dir: Path, mount):
    d = mount("1m", read_only=True, prepare=lambda p: (p / "run").mkdir())
    err = _one_line_error(_cli(glue_dir, f"hydra.run.dir={d}/run"))
    assert "read-only file system" in err and "nothing was written" in err
    assert list((d / "run").iterdir()) == []


@pytest.mark.parametrize("content", ["[]", '{"status": "completed", "eval": {"accu'])
def test_a_corrupt_metrics_json_is_never_redone_over(glue_dir: Path, tmp_path: Path, content: str):
    """A run dir of this config with train_log.jsonl and a metrics.json that is `[]` (or truncated): the run stops in
    one line and every file stays byte for byte."""
    from conftest import compose_cfg

    from talklora_exp.identity import IDENTITY_FILE, identity
    from talklora_exp.rundir import atomic_write_json

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_cfg([*ARGS, f"paths.data_dir={glue_dir}"])
    atomic_write_json(run_dir / IDENTITY_FILE, identity(cfg))
    (run_dir / "metrics.json").write_text(content)
    (run_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    err = _one_line_error(_cli(glue_dir, f"hydra.run.dir={run_dir}", f"paths.data_dir={glue_dir}"))
    assert "metrics.json is not a run record" in err and "overwrite=true" in err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name not in (".lock", ".hydra", "talklora_exp.log")}
    assert after == before


def test_a_data_dir_that_is_a_file_is_named_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from talklora_exp.data import data_dirs
    from talklora_exp.errors import UserError

    f = tmp_path / "data.tar"
    f.write_text("not a folder")
    monkeypatch.delenv("TALKLORA_DATA_DIR", raising=False)
    with pytest.raises(UserError, match=rf"^paths.data_dir={f}: {f} is a file, not a directory; point it at"):
        data_dirs(str(f))
    assert data_dirs(str(tmp_path / "absent")) == [tmp_path / "absent"]  # absent: searched, reported as not found
    monkeypatch.setenv("TALKLORA_DATA_DIR", str(f))
    with pytest.raises(UserError, match=r"^TALKLORA_DATA_DIR=.* is a file, not a directory"):
        data_dirs(None)


@pytest.mark.slow
def test_an_edited_metrics_json_is_never_reused_or_tabled(glue_dir: Path, tmp_path: Path):
    """A completed run's metrics.json carries a digest of itself: after a hand edit of a result, the sweep that would
    skip the run stops in one line (nothing changed), and the tables leave the run out with the reason."""
    from conftest import compose_cfg

    from talklora_exp.analysis.collect import collect
    from talklora_exp.errors import UserError
    from talklora_exp.run import run

    run_dir = tmp_path / "run"
    cfg = compose_cfg([*ARGS, f"paths.data_dir={glue_dir}", "trainer.cpu=true"])
    m = run(cfg, run_dir)
    assert run(cfg, run_dir) is None  # untouched: skipped as completed
    rec = json.loads((run_dir / "metrics.json").read_text())
    rec["eval"]["accuracy"] = 0.99
    (run_dir / "metrics.json").write_text(json.dumps(rec))
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(UserError, match=r"metrics.json was edited after the run finished .* overwrite=true$"):
        run(cfg, run_dir)
    assert (run_dir / "metrics.json").read_bytes() == before
    runs, bad = collect([run_dir])
    assert not runs and "edited after the run" in bad[0][1] and m["eval"]["accuracy"] != 0.99
