"""The trivial predictor of each task, drawn beside the methods: the best constant prediction, i.e. the split's most
frequent label (accuracy), or any constant (MCC 0 by convention, as scikit-learn returns). It is what "did not learn"
looks like (MRPC dev 68.4, RTE 52.7; BoolQ's "true"), so a table row or a dashed line tells learning from the majority
answer at a glance. Read from the task's data (`TALKLORA_DATA_DIR`, or the folder a run recorded), on exactly the
examples the run scored; where the data is not found the tables and figures leave it out. Pearson (STS-B) has no value
for a constant prediction and gets none."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..data import find_local
from ..errors import UserError
from ..tasks.base import split_and_cap
from ..tasks.generation import ANSWER_OPTIONS, check_answers, read_json_records
from ..tasks.glue import GLUE_SPECS, load_local
from .collect import Run


def trivial_scores(runs: list[Run]) -> dict[tuple[str, str], float]:
    """(task, "eval" | "val") -> the trivial predictor's main metric on the dev split ("eval") and on the validation
    split held out of train ("val"), for the GLUE tasks among the runs; the first run of a task fixes its split."""
    out: dict[tuple[str, str], float] = {}
    seen: set[str] = set()
    for r in sorted(runs, key=lambda r: str(r.dir)):
        m = r.metrics
        task, metric = m.get("task"), m.get("main_metric")
        if m.get("task_family") == "commonsense" and task not in seen and task in ANSWER_OPTIONS:
            seen.add(task)
            rate = _commonsense_majority(task, m.get("data") or {})
            if rate is not None:
                out[(task, "eval")] = rate
            continue
        if m.get("task_family") != "glue" or task in seen or task not in GLUE_SPECS:
            continue
        seen.add(task)
        if metric == "matthews_correlation":
            out[(task, "eval")] = out[(task, "val")] = 0.0
            continue
        spec = GLUE_SPECS[task]
        if metric != "accuracy" or spec.labels is None or list(spec.dev_files) != [""]:
            continue
        cfg, data = r.config, m.get("data") or {}
        source = data.get("source")
        if not source:  # a run that did not record its data (hand-made, or older than the record): no guess
            continue
        try:  # the configured data dir first (a clone elsewhere); else the folder the run recorded (<data>/glue/<T>)
            loaded = load_local(task, spec, os.environ.get("TALKLORA_DATA_DIR")) or load_local(
                task, spec, os.path.dirname(os.path.dirname(source))
            )
        except UserError:
            loaded = None
        if loaded is None:
            continue
        train, devs, _ = loaded
        held = int(cfg.get("task.val_size") or 0) if data.get("n_val") else 0  # as run.load_data
        cap = cfg.get("trainer.max_eval_samples")
        _, val, devs = split_and_cap(
            train, devs, held, int(cfg.get("task.val_seed", 58)), None, int(cap) if cap else None
        )
        out[(task, "eval")] = _majority_rate(devs[""])
        if val:
            out[(task, "val")] = _majority_rate(val)
    return out


def _majority_rate(examples: list) -> float:
    return max(Counter(e.label for e in examples).values()) / len(examples)


def _commonsense_majority(task: str, data: dict) -> float | None:
    """The most frequent gold answer's share among the test examples the run scored (the first n of the set's
    test.json, n from its record: `n_eval["<task>/"]` for a commonsense/all run, `n_eval["test"]` for a single set)."""
    counts = data.get("n_eval") or {}
    n = counts.get(f"{task}/", counts.get("test"))
    if not isinstance(n, int) or n < 1:
        return None
    for root in (find_local(os.environ.get("TALKLORA_DATA_DIR"), "commonsense"), data.get("root")):
        path = os.path.join(str(root), task, "test.json") if root else None
        if path and os.path.exists(path):
            try:
                recs = check_answers(Path(path), task, read_json_records(Path(path), ("instruction", "answer")))
            except UserError:
                return None
            return max(Counter(r["answer"] for r in recs[:n]).values()) / min(n, len(recs))
    return None
