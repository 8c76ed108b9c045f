"""The trivial predictor of each GLUE task, drawn beside the methods: the best constant prediction, i.e. the split's
most frequent label (accuracy), or any constant (MCC 0 by convention, as scikit-learn returns). It is what "did not learn"
looks like (MRPC dev 68.4, RTE 52.7), so a table row or a dashed line tells learning from the majority class at a
glance. Read from the task's data (`TALKLORA_DATA_DIR`, or the source a run recorded); where the data is not found the
tables and figures leave it out. Pearson (STS-B) has no value for a constant prediction and gets none."""

from __future__ import annotations

import os
from collections import Counter

from ..errors import UserError
from ..tasks.base import split_and_cap
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
