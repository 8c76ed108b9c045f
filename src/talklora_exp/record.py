"""metrics.json, the record a run leaves: one schema that run.py writes and the analysis reads and checks.

A run dir may come from elsewhere, so the reader never trusts a record: `record_problem` says why a "completed" record
cannot be tabled (a missing or mistyped field), and the tables leave that run out with the reason.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypedDict


class SelectionRecord(TypedDict):
    protocol: str  # val_from_train | best_dev | last | none (zero-shot)
    split: str | None  # the split that selected: val | dev | None
    metric: str | None  # loss or the task's main metric; None when nothing selects
    step: int  # the optimizer step whose weights are reported
    value: float | None  # the selecting metric at that step, as it reads (a loss is positive)


class RunRecord(TypedDict, total=False):
    """metrics.json. `status` is always there: "completed" (then every field below) | "failed" | "interrupted"
    (then the identity fields and `error`)."""

    status: str
    error: str  # failed / interrupted: "<exception type>: <message>"
    # what ran
    task: str
    task_family: str  # glue | commonsense | gsm8k
    method: str
    model: str
    seed: int
    config_hash: str
    group_hash: str  # the config without the seed: one table cell
    budget: dict[str, Any]  # budget.BudgetResult: name, rank, target_params, actual_params, rel_error
    rank: int
    num_experts: int
    tag: str | None
    trainable_params: int
    adapter_params: int
    head_params: int
    total_params: int
    data: dict[str, Any]  # source, train_source, n_train, n_val, n_eval, ...
    device: str
    tokenizer: str
    head_fit: dict[str, Any]  # cosine pair encoding only
    shape_model: dict[str, Any]  # random-weight shape models only
    # what it reports
    resumed_from_step: int | None
    report_split: str  # dev | test
    eval: dict[str, float]  # the reported split's metrics with the selected weights
    selection: SelectionRecord
    val: dict[str, float] | None  # validation metrics at the selected step
    main_metric: str
    best_step: int
    total_steps: int
    report_evals: int  # how often the reported split was evaluated (test sets: once)
    train_runtime_s: float
    train_samples_per_s: float
    eval_runtime_s: float
    wall_time_s: float
    mixed_precision: str
    eval_counts: dict[str, int] | None
    num_processes: int


# The fields the tables read, with their types: a completed record without them (forged, or hand-edited) is left out
# with the reason instead of breaking the tables.
REQUIRED: dict[str, type | tuple[type, ...]] = {"task": str, "method": str, "model": str, "eval": dict,
                                                "main_metric": str, "budget": dict}  # fmt: skip


DIGEST_KEY = "record_sha256"


def record_digest(m: dict[str, Any]) -> str:
    """sha256 of a record without its own digest (sorted keys): written into every completed metrics.json, so a record
    edited afterwards is told from what the run wrote. It proves integrity, not origin (anyone can recompute it);
    records written before it existed have none and are read as before."""
    body = {k: v for k, v in m.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def edited(m: dict[str, Any]) -> bool:
    """True when the record carries a digest that its content no longer matches."""
    return DIGEST_KEY in m and m[DIGEST_KEY] != record_digest(m)


def record_problem(m: dict[str, Any]) -> str | None:
    """Why a "completed" metrics.json cannot be tabled, or None."""
    if edited(m):
        return f"edited after the run ({DIGEST_KEY} does not match its content)"
    for k, t in REQUIRED.items():
        if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
            return f"{k}={m.get(k)!r} (needs {getattr(t, '__name__', t)})"
    bad = [
        k for k, v in m["eval"].items() if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
    ]
    if bad:
        return f"eval.{bad[0]}={m['eval'][bad[0]]!r} is not a number"
    if m["main_metric"] not in m["eval"] and not any(k.endswith("/" + m["main_metric"]) for k in m["eval"]):
        return f"main_metric {m['main_metric']!r} is not in eval"
    if not isinstance(m["budget"].get("name"), str):
        return "budget.name is missing"
    sel = m.get("selection")
    if sel is not None and (not isinstance(sel, dict) or not isinstance(sel.get("step", 0), int)):
        return f"selection={sel!r} (needs an object with an integer step)"
    return None
