"""GLUE dev-set metrics, computed offline (`evaluate.load("glue")` needs the hub).

Where is the CoLA metric? `matthews_correlation` below; the task -> metric table is `GLUE_METRICS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef


def accuracy(preds: Sequence, labels: Sequence) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean())


def f1(preds: Sequence, labels: Sequence) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    return float(f1_score(np.asarray(labels), np.asarray(preds), pos_label=1, average="binary", zero_division=0))


def matthews_correlation(preds: Sequence, labels: Sequence) -> float:
    """CoLA's official metric. sklearn returns 0.0 when predictions are constant."""
    return float(matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def _corr(fn: Callable, preds: Sequence, labels: Sequence) -> float:
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return float("nan")  # undefined for constant inputs; never silently 0
    return float(fn(p, y)[0])


def pearson(preds: Sequence, labels: Sequence) -> float:
    return _corr(stats.pearsonr, preds, labels)


def spearman(preds: Sequence, labels: Sequence) -> float:
    return _corr(stats.spearmanr, preds, labels)


METRIC_FNS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
}

GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),  # reported per dev set: matched_accuracy, mismatched_accuracy
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def compute(names: Sequence[str], preds: Sequence, labels: Sequence, prefix: str = "") -> dict[str, float]:
    return {prefix + n: METRIC_FNS[n](preds, labels) for n in names}


def is_better(new: float | None, old: float | None) -> bool:
    """Best-step comparison that treats NaN/None as worst, so an undefined metric never wins."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return True
    return new > old
