"""Atomic training checkpoints (adapter-sized, not the frozen base model) for `trainer.resume=auto`.

A checkpoint holds the trainable tensors, optimizer and scheduler states, every RNG state, the shuffle generator's
state at the start of the current epoch plus the number of batches consumed (the data position), and the best-so-far
bookkeeping, and the run's config hash. It is written to `checkpoints/step-N.tmp/` with a manifest holding the state
file's sha256, renamed to `checkpoints/step-N/`, and only then does the pointer `checkpoints/latest.json` move (write +
rename). The two newest checkpoints are kept: a checkpoint that fails its checksum or does not load is skipped and the
previous one used; when none is usable, resuming says so instead of guessing.

Checkpoints are untrusted input (run dirs are copied and shared): they are read with `torch.load(weights_only=True)`,
which builds tensors and plain containers and runs no code, and the manifest's config hash is checked before the state
file is read at all. The manifest's sha256 proves integrity, not origin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers only, so `weights_only` loading can read it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in s["python"]))
    st = s["numpy"]
    if isinstance(st, (list, tuple)) and torch.is_tensor(st[1]):
        st = (st[0], st[1].numpy().astype(np.uint32), *st[2:])
    np.random.set_state(st)
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


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """`step-<N>` dirs, newest first. Anything else in checkpoints/ (a stray `step-1.bak`, an editor's copy) is left
    alone with a warning: it is not ours to read or delete."""
    dirs, stray = [], []
    for p in ckpt_root.glob("step-*"):
        if p.is_dir() and not p.is_symlink() and p.name[5:].isdigit():
            dirs.append(p)
        elif not p.name.endswith(".tmp"):
            stray.append(p.name)
    if stray:
        log.warning("%s: ignoring %s (not a checkpoint this code wrote)", ckpt_root, ", ".join(sorted(stray)))
    return sorted(dirs, key=lambda p: -int(p.name[5:]))


def save(ckpt_root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, move the pointer, then drop older checkpoints beyond `keep`. A failed write
    (disk full) removes its own temp dir and leaves the previous checkpoints as they were."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        manifest = {"step": step, "sha256": _sha256(tmp / "state.pt"), "config_hash": state.get("config_hash")}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd, ptr_tmp = tempfile.mkstemp(dir=ckpt_root, prefix=".latest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"step": step, "dir": final.name}, f)
    os.replace(ptr_tmp, ckpt_root / "latest.json")
    for p in _step_dirs(ckpt_root)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    return final


class ForeignCheckpoint(Exception):
    """A checkpoint whose manifest names another config: refused before its state file is read."""


# Checkpoints written before RNG states were stored as tensors hold numpy's MT19937 key as an ndarray; these are the
# only globals needed to rebuild it (torch's documented allow-list for numpy arrays), and they construct data only.
_NUMPY_GLOBALS = [getattr(np, "_core", None) and np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32))]  # fmt: skip


def _load_one(d: Path, accept_hash: Any = None) -> dict[str, Any]:
    manifest = json.loads((d / "manifest.json").read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise ValueError("manifest.json is not a checkpoint manifest")
    ck = manifest.get("config_hash")
    if accept_hash is not None and ck is not None and not accept_hash(ck):
        raise ForeignCheckpoint(f"{d} belongs to config {ck}")
    if _sha256(d / "state.pt") != manifest["sha256"]:
        raise ValueError("checksum mismatch")
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"trainable", "loop"} <= state.keys():
        raise ValueError("state.pt is not a training checkpoint")
    return state


def load_latest(ckpt_root: Path, accept_hash: Any = None) -> dict[str, Any] | None:
    """The newest complete checkpoint (None when there is none at all). Half-written `.tmp` dirs are never read; a
    corrupt newest checkpoint falls back to the previous one. `accept_hash(config_hash) -> bool` refuses another
    config's checkpoint from its manifest, before anything is unpickled."""
    if not ckpt_root.exists():
        return None
    problems = []
    for d in _step_dirs(ckpt_root):
        try:
            return _load_one(d, accept_hash)
        except ForeignCheckpoint:
            raise
        except Exception as e:  # missing manifest, truncated or bit-flipped state, not weights-only loadable
            problems.append(f"{d.name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    if problems:
        raise NoUsableCheckpoint(f"no usable checkpoint in {ckpt_root} ({'; '.join(problems)})")
    return None
