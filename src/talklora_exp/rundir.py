"""The run-directory contract: config.yaml, train_log.jsonl, adapter/, routing.json, and metrics.json (last, atomic)."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .choices import LOGGER_MODES


def _clean(o: Any) -> Any:
    """JSON has no NaN/inf: write them as null so files stay valid for every reader."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same dir, then rename: readers never see a half-written file, and a symlink at
    `path` is replaced, never followed. A failed write (disk full) removes its temp file and leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def open_append(path: Path) -> Any:
    """Append without following a symlink planted at `path` (O_NOFOLLOW: the open fails instead)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a")


def read_status(run_dir: Path) -> str | None:
    """metrics.json's status; "corrupt" for a file that is not a JSON object with a string status."""
    p = Path(run_dir) / "metrics.json"
    if not p.exists():
        return None
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return "corrupt"
    status = obj.get("status") if isinstance(obj, dict) else None
    return status if isinstance(status, str) else "corrupt"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a log; a torn line (a kill mid-write) or any other non-object line is skipped with a
    warning naming file and line."""
    import logging

    out = []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            logging.getLogger(__name__).warning(
                "%s:%d: skipping a line that is not a JSON object (torn write?)", path, i
            )
    return out


# What a run dir holds before this code writes anything in it: Hydra's record and job log, and our lock.
PRE_RUN_ENTRIES = frozenset({".hydra", ".lock", "talklora_exp.log"})


def is_fresh(run_dir: Path) -> bool:
    """Nothing in run_dir but what Hydra and the lock put there before the run starts."""
    return not Path(run_dir).is_dir() or all(p.name in PRE_RUN_ENTRIES for p in Path(run_dir).iterdir())


class RunLogger:
    """train_log.jsonl always; wandb (offline by default, never prompting) when logger=wandb."""

    def __init__(self, run_dir: Path, lcfg: Any, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "train_log.jsonl"
        self.wandb_run = None
        if enabled and lcfg.name == "wandb":
            self.wandb_run = _init_wandb(Path(run_dir), lcfg, config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open_append(self.path) as f:
            f.write(json.dumps(_clean(record)) + "\n")
        if self.wandb_run is not None:
            flat = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb_run.log(flat, step=int(record.get("step", 0)))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(_flatten(summary))
            self.wandb_run.finish()
            self.wandb_run = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _init_wandb(run_dir: Path, lcfg: Any, config: dict) -> Any:
    from .errors import UserError

    mode = str(lcfg.get("mode", "offline"))
    if mode not in LOGGER_MODES:
        raise UserError(f"logger.mode={mode!r}; allowed: {list(LOGGER_MODES)}")
    import wandb

    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        raise UserError("logger.mode=online needs WANDB_API_KEY (or `wandb login` beforehand); use logger.mode=offline")
    return wandb.init(
        project=lcfg.project,
        entity=lcfg.get("entity"),
        group=lcfg.get("group"),
        tags=list(lcfg.get("tags") or []),
        dir=str(run_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
    )


class RunDirBusy(Exception):
    """Another live process holds the run dir (its lock)."""


class RunDirLock:
    """An exclusive, non-blocking `flock` on `<run_dir>/.lock`, held for the whole run. The kernel drops it when the
    process dies (even by SIGKILL), so a crashed run never leaves a stale lock behind."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            why = "; a symlink there is refused" if e.errno == errno.ELOOP else "; the run dir must be writable"
            raise RunDirBusy(f"{self.path}: cannot open the run lock ({e.strerror}){why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise RunDirBusy(
                    f"{self.path}: this filesystem does not support flock ({e.strerror}); put hydra.run.dir / "
                    "hydra.sweep.dir on a filesystem that does (local disk, or NFS/Lustre mounted with locking)"
                ) from None
            if not isinstance(e, BlockingIOError):
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another process (pid {holder}); wait for it to finish, or use "
                "another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
