"""Run identity: a run *is* its resolved config. The hash of that config (minus the keys that cannot change results,
listed in `NOT_RESULTS` and nowhere else) is stored in `identity.json`, `metrics.json` and every checkpoint. A
completed run is skipped, and an unfinished one resumed, only when the hash matches; otherwise the run stops with the
keys that differ, so an edited preset can never be answered with stale numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

# Keys (and key prefixes) that cannot change what a run computes: progress display, logging, checkpoint cadence,
# resuming, paths, launcher/sweep bookkeeping. Everything else is part of the run's identity.
NOT_RESULTS = (
    "trainer.progress",
    "trainer.resume",
    "trainer.checkpoint_every",
    "trainer.num_workers",
    "trainer.log_every",
    "trainer.routing_stats_every",
    "logger",
    "paths",
    "hydra",
    "overwrite",
    "tag",
    "sweep_name",
    "dry_run",
)
# Keys added after runs were made, with the value that does what those runs did. At that value a key is left out of
# the hash, so adding a key (with its old behaviour as default) never turns finished runs into mismatches; any other
# value is part of the identity as usual.
ADDED_WITH_DEFAULT: dict[str, Any] = {
    "model.pair_encoding": "cross",
}
# Code fixes that change what some configs compute. A config a fix applies to carries `fix.<name>: true` in its
# identity, so runs made before the fix never match it again: a sweep stops on them (naming the fix) instead of
# reusing their numbers, and the analysis never averages them with runs made after it.
RESULT_FIXES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # models.apply_pooling: LoRA/DoRA train the pooler through peft's modules_to_save copy, which never saw the
    # attention mask, so their mean pooling ran over the padding (fixed 2026-12-02)
    "mean_pool_mask_under_peft": lambda c: (
        c.get("method.name") in ("lora", "dora") and c.get("model.pooling") == "mean"
        and c.get("model.kind") == "encoder" and "pooler" in (c.get("model.head_modules") or [])
    ),
}  # fmt: skip
IDENTITY_FILE = "identity.json"


def missing_fixes(config: dict[str, Any]) -> list[str]:
    """The RESULT_FIXES that apply to a recorded (flat) config but that it does not carry: the run predates them."""
    return [name for name, applies in RESULT_FIXES.items() if applies(config) and not config.get(f"fix.{name}")]


class ConfigMismatch(UserError):
    """The run dir holds a run of a different config; never reused, never overwritten without overwrite=true."""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or ({prefix[:-1]: {}} if prefix else {})
    return {prefix[:-1]: obj}


def _excluded(key: str) -> bool:
    return any(key == x or key.startswith(x + ".") for x in NOT_RESULTS)


def _at_old_behaviour(key: str, value: Any) -> bool:
    return key in ADDED_WITH_DEFAULT and value == ADDED_WITH_DEFAULT[key]


def same_config(stored: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a run dir's recorded identity is this config: equal hashes, or equal configs once keys sitting at their
    old behaviour are dropped (a run recorded with such a key spelled out, before it was listed, is the same run)."""
    if stored is None:
        return False
    if stored.get("config_hash") == new["config_hash"]:
        return True
    old = {k: v for k, v in (stored.get("config") or {}).items() if not _at_old_behaviour(k, v)}
    return bool(old) and old == new["config"]


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """{"config_hash", "group_hash" (the same without the seed: runs of one table cell share it), "config": flat}."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat = {k: v for k, v in sorted(_flatten(container).items()) if not _excluded(k) and not _at_old_behaviour(k, v)}
    flat.update({f"fix.{name}": True for name, applies in RESULT_FIXES.items() if applies(flat)})
    flat = dict(sorted(flat.items()))

    def h(d: dict) -> str:
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"config_hash": h(flat), "group_hash": h({k: v for k, v in flat.items() if k != "seed"}), "config": flat}


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (added or removed keys included)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / IDENTITY_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def mismatch_error(run_dir: Path, what: str, old: dict[str, Any] | None, new: dict[str, Any]) -> ConfigMismatch:
    if old is None:
        why = "it records no config hash (written by an older version)"
    else:
        d = diff_keys(old["config"], new["config"])
        why = f"{len(d)} key(s) differ: " + "; ".join(d[:4]) + (f"; ... (+{len(d) - 4} more)" if len(d) > 4 else "")
    return ConfigMismatch(
        f"{run_dir}: {what} of a different config ({why}); rerun with overwrite=true to redo it, or use a new "
        f"sweep_name / hydra.run.dir"
    )
