import math

import pytest

from talklora_exp.tasks import metrics as M


def test_accuracy_and_f1_hand_computed():
    preds, labels = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert M.accuracy(preds, labels) == pytest.approx(3 / 5)
    # TP=2, FP=1, FN=1 -> P=2/3, R=2/3, F1=2/3
    assert M.f1(preds, labels) == pytest.approx(2 / 3)


def test_matthews_hand_computed():
    preds, labels = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 1, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_correlation(preds, labels) == pytest.approx(mcc)
    assert M.matthews_correlation([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictions


def test_pearson_spearman_hand_computed():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    mx, my = 2.5, 3.75
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    r = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert M.pearson(x, y) == pytest.approx(r)
    # ranks of y with ties: [1, 2.5, 4, 2.5]
    ry = [1, 2.5, 4, 2.5]
    mr = 2.5
    cov = sum((a - mr) * (b - mr) for a, b in zip([1, 2, 3, 4], ry))
    rho = cov / math.sqrt(sum((a - mr) ** 2 for a in [1, 2, 3, 4]) * sum((b - mr) ** 2 for b in ry))
    assert M.spearman(x, y) == pytest.approx(rho)
    assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # undefined, never silently 0


# The GLUE paper's metric per task (Wang et al., ICLR 2019, Table 1), written out here, not read from the code
GLUE_PAPER = {"cola": "Matthews corr.", "sst2": "acc.", "mrpc": "acc./F1", "stsb": "Pearson/Spearman corr.",
              "qqp": "acc./F1", "mnli": "matched acc./mismatched acc.", "qnli": "acc.", "rte": "acc.", "wnli": "acc."}  # fmt: skip
PAPER_NAMES = {"Matthews corr.": ("matthews_correlation",), "acc.": ("accuracy",), "acc./F1": ("accuracy", "f1"),
               "Pearson/Spearman corr.": ("pearson", "spearman"),
               "matched acc./mismatched acc.": ("accuracy",)}  # MNLI: accuracy on each dev set  # fmt: skip


def test_every_glue_task_reports_the_glue_papers_metrics_and_best_is_nan_safe():
    assert {t: M.GLUE_METRICS[t] for t in GLUE_PAPER} == {t: PAPER_NAMES[m] for t, m in GLUE_PAPER.items()}
    assert set(M.GLUE_METRICS) == set(GLUE_PAPER)
    # compute() on the hand-computed case above: MRPC's pair of numbers, literal
    assert M.compute(M.GLUE_METRICS["mrpc"], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1], prefix="dev_") == pytest.approx(
        {"dev_accuracy": 0.6, "dev_f1": 2 / 3}
    )
    assert M.is_better(0.5, None) and not M.is_better(float("nan"), 0.1) and M.is_better(0.2, float("nan"))
