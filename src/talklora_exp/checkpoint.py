"""Atomic training checkpoints (adapter-sized, not the frozen base model) for `trainer.resume=auto`.

A checkpoint holds the trainable tensors, optimizer and scheduler states, every RNG state, the shuffle generator's
state at the start of the current epoch plus the number of batches consumed (the data position), and the best-so-far
bookkeeping, and the run's config hash. It is written to `checkpoints/step-N.tmp/` with a manifest holding the state
file's sha256, renamed to `checkpoints/step-N/`, and only then does the pointer `checkpoints/latest.json` move (write +
rename). The two newest checkpoints are kept: a checkpoint that fails its checksum or does not load is skipped and the
previous one used; when none is usable, resuming says so instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class NoUsableCheckpoint(Exception):
    """Checkpoints exist but none passes its checksum and loads."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(ckpt_root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, move the pointer, then drop older checkpoints beyond `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "sha256": _sha256(tmp / "state.pt")}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd, ptr_tmp = tempfile.mkstemp(dir=ckpt_root, prefix=".latest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"step": step, "dir": final.name}, f)
    os.replace(ptr_tmp, ckpt_root / "latest.json")
    old = sorted(
        (p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
        key=lambda p: int(p.name[5:]),
    )
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_one(d: Path) -> dict[str, Any]:
    manifest = json.loads((d / "manifest.json").read_text())
    if _sha256(d / "state.pt") != manifest["sha256"]:
        raise ValueError("checksum mismatch")
    return torch.load(d / "state.pt", map_location="cpu", weights_only=False)


def load_latest(ckpt_root: Path) -> dict[str, Any] | None:
    """The newest complete checkpoint (None when there is none at all). Half-written `.tmp` dirs are never read; a
    corrupt newest checkpoint falls back to the previous one."""
    if not ckpt_root.exists():
        return None
    dirs = sorted(
        (p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and p.name[5:].isdigit()),
        key=lambda p: -int(p.name[5:]),
    )
    problems = []
    for d in dirs:
        try:
            return _load_one(d)
        except Exception as e:  # missing manifest, truncated or bit-flipped state, unpicklable
            problems.append(f"{d.name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    if problems:
        raise NoUsableCheckpoint(f"no usable checkpoint in {ckpt_root} ({'; '.join(problems)})")
    return None
