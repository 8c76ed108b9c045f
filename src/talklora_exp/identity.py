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
# resuming, paths, launcher/sweep bookkeeping, and lookup tables that act only through keys they resolve into.
# Everything else is part of the run's identity. A key moved here later stops counting for runs recorded with it too.
NOT_RESULTS = (
    "trainer.progress",
    "trainer.strategy",  # an engine computes what one process computes (tests/test_engines.py)
    "trainer.compile",  # compiled equals eager within float32 tolerance (tests/test_engines.py)
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
    # the GLUE presets' per-task tables (conf/glue_repro_schedule.yaml, conf/glue_table_choice.yaml): a run uses
    # them only through the trainer.*/task.*/model.* keys they resolve into, which are in its identity; the whole
    # table in it would make a CoLA run mismatch when RTE's entry changes
    "glue_schedule",
    "glue_choice",
)
# Keys added after runs were made, with the value that does what those runs did. At that value a key is left out of
# the hash, so adding a key (with its old behaviour as default) never turns finished runs into mismatches; any other
# value is part of the identity as usual.
ADDED_WITH_DEFAULT: dict[str, Any] = {
    "model.pair_encoding": "cross",
    "task.answer_format": "label",
    "task.prompt_style": "alpaca",
    "eval.scoring": "generate",
    "model.quantization": None,
}
# Code fixes that change what some configs compute. A config a fix applies to carries `fix.<name>: true` in its
# identity, so runs made before the fix never match it again: a sweep stops on them (naming the fix) instead of
# reusing their numbers, and the analysis never averages them with runs made after it.
RESULT_FIXES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # heads.apply_pooling: LoRA/DoRA train the pooler through peft's modules_to_save copy, which never saw the
    # attention mask, so their mean pooling ran over the padding
    "mean_pool_mask_under_peft": lambda c: (
        c.get("method.name") in ("lora", "dora") and c.get("model.pooling") == "mean"
        and c.get("model.kind") == "encoder" and "pooler" in (c.get("model.head_modules") or [])
    ),
    # HiRA is peft's HiraConfig: the same math, but its initialisation draws more random numbers (randn for A and B
    # before A's kaiming init), so a seed gives other weights than the earlier own layer did
    "hira_is_peft": lambda c: c.get("method.name") == "hira",
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


def current_keys(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded flat config under today's rules: keys since listed in NOT_RESULTS, or sitting at their old
    behaviour, dropped. Recorded `fix.*` marks are kept as they are (they say what code made the run)."""
    return {k: v for k, v in recorded.items() if not _excluded(k) and not _at_old_behaviour(k, v)}


def same_config(stored: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a run dir's recorded identity is this config: equal hashes, or equal configs under today's rules (a run
    recorded before a key was listed as not a result, or as added with its old behaviour, is the same run)."""
    if stored is None:
        return False
    if stored.get("config_hash") == new["config_hash"]:
        return True
    old = current_keys(stored.get("config") or {})
    return bool(old) and old == new["config"]


def group_hash(recorded: dict[str, Any]) -> str:
    """The group hash (config without the seed) of a recorded flat config under today's rules: runs of one table cell
    recorded before and after a key stopped counting still group together."""
    return _hash({k: v for k, v in current_keys(recorded).items() if k != "seed"})


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """{"config_hash", "group_hash" (the same without the seed: runs of one table cell share it), "config": flat}."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat = current_keys(_flatten(container))
    flat.update({f"fix.{name}": True for name, applies in RESULT_FIXES.items() if applies(flat)})
    flat = dict(sorted(flat.items()))
    return {"config_hash": _hash(flat), "group_hash": group_hash(flat), "config": flat}


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
