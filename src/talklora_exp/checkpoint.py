"""Atomic training checkpoints (adapter-sized, not the frozen base model) for `trainer.resume=auto`.

A checkpoint holds the trainable tensors, optimizer and scheduler states, every RNG state, the shuffle generator's
state at the start of the current epoch plus the number of batches consumed (the data position), and the best-so-far
bookkeeping. It is written to `checkpoints/step-N.tmp/`, renamed to `checkpoints/step-N/`, and only then does the
pointer `checkpoints/latest.json` move (write + rename). A crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

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


def save(ckpt_root: Path, step: int, state: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint `step` atomically, move the pointer, then drop older checkpoints beyond `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
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


def load_latest(ckpt_root: Path) -> dict[str, Any] | None:
    ptr = ckpt_root / "latest.json"
    if not ptr.exists():
        return None
    d = ckpt_root / json.loads(ptr.read_text())["dir"]
    return torch.load(d / "state.pt", map_location="cpu", weights_only=False)
