"""Paper tables (Markdown, LaTeX booktabs, CSV): GLUE / commonsense scores, routing balance, significance."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..methods import METHODS
from .collect import Run

# Display order and names of the known methods; any other method found in the runs is shown too, under its own name,
# after these (nothing is ever dropped for being unknown).
METHOD_ORDER = list(METHODS)  # the registry's order; a method it does not know sorts last
MARKS = ["†", "‡", "§", "¶", "♯", "♮", "♭"]  # one per baseline, in the order given
TEX_MARKS = {"†": r"$^\dagger$", "‡": r"$^\ddagger$", "§": r"$^\S$", "¶": r"$^\P$", "♯": r"$^\sharp$",
             "♮": r"$^\natural$", "♭": r"$^\flat$", "↓": r"$^\downarrow$"}  # fmt: skip


def label(method: str) -> str:
    """A method's row name: the registry's label (read now, so a method registered later has its own), else its name."""
    return METHODS[method].label if method in METHODS else method


@dataclass
class Compare:
    """Which method is the proposal and which are its baselines, for significance marks (an analysis option)."""

    proposal: str = "talklora"
    baselines: tuple[str, ...] = ("lora", "moelora")

    def mark(self, base: str) -> str:
        return MARKS[self.baselines.index(base) % len(MARKS)]

    def legend(self, present: set[str]) -> str:
        """The marks' meaning, for the baselines `present` in the table: no key for a baseline with no row."""
        pairs = ", ".join(f"{self.mark(b)} {label(b)}" for b in self.baselines if b in present)
        return (f"{pairs}: {label(self.proposal)} significantly better than that baseline; ↓ + mark: significantly "
                "worse (paired t-test over seeds, p < 0.05)")  # fmt: skip


GLUE_ORDER = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
GLUE_LABEL = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}  # fmt: skip
ROUTING_COLS = [
    ("load_entropy", "Load entropy"),
    ("cv", "CV"),
    ("max_min_ratio", "Max/min"),
    ("gini", "Gini"),
    ("sensitivity", "Sensitivity"),
]
ALPHA = 0.05


def in_order(items: Any, order: list[str]) -> list[Any]:
    """Items in a fixed display order (methods, tasks); unknown ones after, alphabetically."""
    return sorted(items, key=lambda x: (order.index(x) if x in order else len(order), x))


class Table:
    """Header + rows of cells; cells may carry **bold** marks, rendered per format."""

    def __init__(self, title: str, header: list[str], rows: list[list[str]], note: str = ""):
        self.title, self.header, self.rows, self.note = title, header, rows, note

    def markdown(self) -> str:
        out = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out + ([""] + [self.note] if self.note else []) + [""])

    def latex(self) -> str:
        def tex(c: str) -> str:
            c = c.replace("±", r"$\pm$").replace("%", r"\%").replace("_", r"\_")
            for mark, cmd in TEX_MARKS.items():
                c = c.replace(mark, cmd)
            if c.startswith("**") and "**" in c[2:]:
                end = c.index("**", 2)
                c = r"\textbf{" + c[2:end] + "}" + c[end + 2 :]
            return c

        cols = "l" + "r" * (len(self.header) - 1)
        out = [
            r"\begin{tabular}{" + cols + "}",
            r"\toprule",
            " & ".join(tex(h) for h in self.header) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(tex(c) for c in r) + r" \\" for r in self.rows]
        out += [r"\bottomrule", r"\end{tabular}"]
        return f"% {self.title}\n" + "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header)
        for r in self.rows:
            w.writerow([c.replace("**", "") for c in r])
        return buf.getvalue()

    def write(self, out_dir: Path, stem: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(self.markdown())
        (out_dir / f"{stem}.tex").write_text(self.latex())
        (out_dir / f"{stem}.csv").write_text(self.csv())


def by_seed(runs: list[Run]) -> dict[tuple, dict[int, Run]]:
    """(family, task, method, budget, model) -> {seed: run}; a duplicate seed keeps the first dir in sorted order."""
    g: dict[tuple, dict[int, Run]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: str(r.dir)):
        g[r.key].setdefault(int(r.metrics["seed"]), r)
    return g


def paired_test(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None, int]:
    """Mean difference a-b over shared seeds and the paired t-test p-value (None with < 2 pairs or zero variance: the
    t statistic is undefined there, and on a metric counted over a few hundred examples two seeds give the same
    difference often enough that calling it p = 0 would mark chance as significant)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), None, len(d)
    if np.allclose(d, d[0]):
        return float(d.mean()), None, len(d)
    return float(d.mean()), float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue), len(d)


def _fmt(vals: list[float], scale: float = 100.0) -> str:
    v = np.array(vals, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def protocols(runs: list[Run]) -> str:
    """The selection protocols behind a set of runs, for captions (every table states how checkpoints were chosen)."""
    return "; ".join(sorted({r.protocol for r in runs})) or "–"


TRIVIAL_LABEL = {False: "_Majority class / constant_", True: "_Majority answer_"}  # {generation family?: row label}


def score_table(
    runs: list[Run],
    family: str,
    order: list[str],
    labels: dict[str, str],
    title: str,
    cmp: Compare | None = None,
    trivial: dict[str, float] | None = None,
) -> tuple[Table, Table] | None:
    """Rows = methods (adapter params), columns = tasks + average, mean ± std over seeds (x100), best in bold, the
    proposal marked per baseline where a paired t-test over seeds says it is better (mark) or worse (↓mark); a last
    row with the trivial predictor's score (task -> value, `trivial.py`) where known."""
    cmp = cmp or Compare()
    groups = {k: v for k, v in by_seed(runs).items() if k[0] == family}
    if not groups:
        return None
    settings = sorted({(k[3], k[4]) for k in groups})
    rows, sig_rows = [], []
    short = False
    for budget, model in settings:
        tasks = in_order({k[1] for k in groups if k[3:] == (budget, model)}, order)
        methods = in_order({k[2] for k in groups if k[3:] == (budget, model)}, METHOD_ORDER)
        vals = {(m, t): {s: r.main_value for s, r in groups.get((family, t, m, budget, model), {}).items() if r.main_value is not None}
                for m in methods for t in tasks}  # fmt: skip
        means = {mt: np.mean(list(v.values())) for mt, v in vals.items() if v}
        best = {t: max((means[(m, t)] for m in methods if (m, t) in means), default=None) for t in tasks}
        avg = {}
        for m in methods:  # per-seed average over tasks, for seeds that have every task
            seeds = set.intersection(*(set(vals[(m, t)]) for t in tasks)) if tasks else set()
            avg[m] = {s: float(np.mean([vals[(m, t)][s] for t in tasks])) for s in seeds}
        best_avg = max((np.mean(list(a.values())) for a in avg.values() if a), default=None)
        n_full = max((len(v) for v in [*vals.values(), *avg.values()]), default=0)
        for m in methods:
            params = sorted(
                {
                    r.metrics.get("adapter_params")
                    for t in tasks
                    for r in groups.get((family, t, m, budget, model), {}).values()
                }
            )
            p = "/".join(f"{x / 1e3:.1f}K" for x in params if x is not None)
            cells = [label(m), p]
            for t in tasks + ["__avg"]:
                v = avg[m] if t == "__avg" else vals[(m, t)]
                if not v:
                    cells.append("–")
                    continue
                c = _fmt(list(v.values()))
                mean = np.mean(list(v.values()))
                top = best_avg if t == "__avg" else best[t]
                if top is not None and math.isclose(mean, top):
                    c = f"**{c}**"
                if m == cmp.proposal:
                    for base in cmp.baselines:
                        ref = avg.get(base) if t == "__avg" else vals.get((base, t))
                        if ref:
                            diff, pval, n = paired_test(v, ref)
                            if pval is not None and pval < ALPHA:
                                c += cmp.mark(base) if diff > 0 else f"↓{cmp.mark(base)}"
                if len(v) < n_full and m != "none":  # a missing seed says so; zero-shot has none to miss
                    c += f" (n={len(v)})"
                    short = True
                cells.append(c)
            rows.append(cells)
        for t in tasks + ["__avg"]:
            for base in cmp.baselines:
                a = avg.get(cmp.proposal) if t == "__avg" else vals.get((cmp.proposal, t))
                b = avg.get(base) if t == "__avg" else vals.get((base, t))
                if a and b:
                    diff, pval, n = paired_test(a, b)
                    sig_rows.append([model, budget, "Avg" if t == "__avg" else labels.get(t, t), f"{label(cmp.proposal)} − {label(base)}",
                                     f"{100 * diff:+.2f}", "–" if pval is None else f"{pval:.3f}", str(n)])  # fmt: skip
        if len(settings) > 1:
            rows.append([f"_{model}, budget {budget}_"] + [""] * (len(tasks) + 2))
    task_cols = in_order({k[1] for k in groups}, order)
    header = ["Method", "Adapter params"] + [labels.get(t, t) for t in task_cols] + ["Avg"]
    trivial = {t: trivial[t] for t in task_cols if t in (trivial or {})}
    generation = family != "glue"
    if trivial:
        cells = [f"{100 * trivial[t]:.2f}" if t in trivial else "–" for t in task_cols]
        every = generation and len(trivial) == len(task_cols)  # an average only over every column
        avg_cell = f"{100 * float(np.mean([trivial[t] for t in task_cols])):.2f}" if every else "–"
        rows.append([TRIVIAL_LABEL[generation], "0", *cells, avg_cell])
    fam_runs = [r for rs in groups.values() for r in rs.values()]
    methods_all = {k[2] for k in groups}
    ranks = _ranks(fam_runs) if generation else ""
    note = (f"Main metric per task x100, mean ± std over seeds ({', '.join(f'{s[1]}/{s[0]}' for s in settings)}). "
            f"Reported split: {', '.join(sorted({r.metrics.get('report_split', 'dev') for r in fam_runs}))}; checkpoint "
            f"selection: {protocols(fam_runs)}. Bold: best mean. {cmp.legend(methods_all)}."
            + ranks
            + (" Zero-shot: the base model evaluated once per seed run (no training; without sampling every seed gives the same answers)."
               if "none" in methods_all else "")
            + (" (n=k): mean over only k seeds, fewer than the table's other cells." if short else "")
            + ((" Majority answer: always giving each set's most frequent gold answer, on the same test examples."
                if generation else " Majority class / constant: the best constant prediction on dev (its most "
                "frequent label; MCC 0; none for Pearson).") if trivial else ""))  # fmt: skip
    sig = Table(
        f"{title}: significance (paired over seeds)",
        ["Model", "Budget", "Task", "Comparison", "Δ (x100)", "p (paired t)", "seeds"],
        sig_rows,
    )
    return Table(title, header, rows, note), sig


def _ranks(runs: list[Run]) -> str:
    """The caption's rank (and experts) per method: a matched budget gives each method its own rank."""
    seen: dict[str, str] = {}
    for r in runs:
        m, rank, e = r.metrics.get("method"), r.metrics.get("rank"), r.metrics.get("num_experts")
        if m and m != "none" and rank is not None:
            seen.setdefault(m, f"{label(m)} r={rank}" + (f" (E={e})" if e and e > 1 else ""))
    return (" Rank per method: " + ", ".join(seen[m] for m in in_order(seen, METHOD_ORDER)) + ".") if seen else ""


def routing_table(runs: list[Run]) -> Table | None:
    """Routing balance per method and task at the reported (best) step: mean over seeds and layers."""
    groups = by_seed([r for r in runs if r.routing])
    if not groups:
        return None
    rows = []
    for key in sorted(
        groups,
        key=lambda k: (
            k[4],
            k[3],
            in_order([k[1]], GLUE_ORDER)[0],
            METHOD_ORDER.index(k[2]) if k[2] in METHOD_ORDER else 9,
        ),
    ):
        fam, task, method, budget, model = key
        cells = [GLUE_LABEL.get(task, task), label(method), str(len(groups[key]))]
        for col, _ in ROUTING_COLS:
            v = [
                r.routing["aggregate"][col] for r in groups[key].values() if r.routing["aggregate"].get(col) is not None
            ]
            cells.append(f"{np.mean(v):.3f}" if v else "–")
        rows.append(cells)
    note = ("Load entropy = H(mean load)/log E (1 = balanced); CV = std/mean of the mean load; Max/min load ratio; Gini of the load; "
            "Sensitivity = (|Δg|/|g|)/(|Δx|/|x|) under a 1% Gaussian input perturbation. Means over adapted layers and seeds, "
            "non-padding dev tokens.")  # fmt: skip
    return Table("Routing balance", ["Task", "Method", "Seeds"] + [c[1] for c in ROUTING_COLS], rows, note)


def eval_curve(run: Run) -> list[tuple[int, float, float | None]]:
    """(step, validation main metric, dev main metric) at each evaluation during training, in step order."""
    main = run.metrics.get("main_metric", "")
    pts = [(int(e["step"]), e["val"][main], (e.get("eval") or {}).get(main))
           for e in run.log if main in (e.get("val") or {})]  # fmt: skip
    return sorted(pts)


def _mean100(v: list[float]) -> str:
    return f"{100 * np.mean(v):.2f}" if v else "–"


def _span(v: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """min–max over seeds (one value when they all print the same)."""
    if not v:
        return "–"
    lo, hi = f"{scale * min(v):.{digits}f}", f"{scale * max(v):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def convergence_table(runs: list[Run]) -> Table | None:
    """Did each run converge, and how much did fine-tuning add to its first evaluation? Per task and method, over
    seeds: where the step chosen on validation falls in training, the validation and dev score at the first
    evaluation and at the chosen step, the best dev score of any evaluation (shown, never used), how wide dev moves
    over the evaluations, and how often the chosen step is also the best dev step. A step chosen at the end says the
    schedule may be short; a narrow band and first ≈ chosen say the task's number was mostly there at the start."""
    curves = {r.dir: eval_curve(r) for r in runs}  # read each run's log once
    trained = [r for r in runs if r.metrics.get("total_steps") != 0]  # a zero-shot run has no training to converge
    groups = by_seed(
        [r for r in trained if (r.metrics.get("selection") or {}).get("step") is not None and curves[r.dir]]
    )
    if not groups:
        return None
    rows = []
    for key in sorted(groups, key=lambda k: (k[4], k[3], in_order([k[1]], GLUE_ORDER)[0],
                                             METHOD_ORDER.index(k[2]) if k[2] in METHOD_ORDER else 9, k[2])):  # fmt: skip
        rs = list(groups[key].values())
        frac, v0, v1, d0, d1, best, band, hits = [], [], [], [], [], [], [], 0
        for r in rs:
            pts = curves[r.dir]
            sel = int(r.metrics["selection"]["step"])
            at = next((p for p in pts if p[0] == sel), pts[-1])
            frac.append(sel / int(r.metrics.get("total_steps") or pts[-1][0]))
            v0.append(pts[0][1])
            v1.append(at[1])
            dev = [p[2] for p in pts if p[2] is not None]
            if dev and pts[0][2] is not None and at[2] is not None:
                d0.append(pts[0][2])
                d1.append(at[2])
                best.append(max(dev))
                band.append(max(dev) - min(dev))
                hits += math.isclose(at[2], max(dev))
        spread = _span(frac, 1.0, 2)
        chosen = f"{np.mean(frac):.2f}" + (f" ({spread})" if "–" in spread else "")
        rows.append([GLUE_LABEL.get(key[1], key[1]), label(key[2]), str(len(rs)),
                     "/".join(map(str, sorted({len(curves[r.dir]) for r in rs}))), chosen,
                     f"{_mean100(v0)} → {_mean100(v1)}", f"{_mean100(d0)} → {_mean100(d1)}", _mean100(best),
                     _span(band), f"{hits} of {len(d1)}" if d1 else "–"])  # fmt: skip
    note = ("Means over seeds of each run's main metric x100 at its first evaluation during training and at the step "
            "chosen on validation (→); 'chosen at' is that step's fraction of the run's steps (mean, min–max over "
            "seeds); 'best dev' is the highest dev score at any evaluation, and 'dev band' how far dev moves between "
            "evaluations within a run (max − min, min–max over seeds): both are shown to read the curves, and neither "
            "chooses anything. 'chosen = best dev' counts the runs whose chosen step is also their best dev step.")  # fmt: skip
    header = ["Task", "Method", "Seeds", "Evals", "Chosen at", "Val: first → chosen", "Dev: first → chosen",
              "Best dev", "Dev band", "Chosen = best dev"]  # fmt: skip
    return Table("Convergence: the evaluations during training", header, rows, note)


def compute_table(runs: list[Run]) -> Table | None:
    """Process-hours per task and method, summed over the runs found (training and, where recorded, the evaluations
    during and after it; both add up over resumes). The reproduction's compute is read from the committed runs, not
    from a wall clock somebody remembered."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        if r.metrics.get("train_runtime_s") is not None:
            groups[(r.metrics["task"], r.metrics["method"])].append(r)
    if not groups:
        return None

    def hours(rs: list[Run], key: str) -> float:
        return sum(float(r.metrics.get(key) or 0.0) * int(r.metrics.get("num_processes") or 1) for r in rs) / 3600

    rows, all_runs = [], []
    for task, method in sorted(groups, key=lambda k: (in_order([k[0]], GLUE_ORDER)[0], METHOD_ORDER.index(k[1])
                                                      if k[1] in METHOD_ORDER else 9, k[1])):  # fmt: skip
        rs = groups[(task, method)]
        all_runs += rs
        rows.append(_compute_row(GLUE_LABEL.get(task, task), label(method), rs, hours))
    rows.append(_compute_row("**all**", "", all_runs, hours))
    note = ("Process-hours: seconds in the training loop (and in evaluation, where `eval_runtime_s` is recorded) times the "
            "number of processes, summed over runs; model loading and start-up are not counted. 'eval recorded' counts "
            "the runs whose evaluation time is known (runs made before it was recorded count training only). 'resumed' "
            "counts the runs continued from a checkpoint after an interruption: their time counts the steps kept, not "
            "those lost and redone, and a run paused or sharing its cores shows a longer time than its work needed.")  # fmt: skip
    header = ["Task", "Method", "Runs", "eval recorded", "resumed", "train h", "eval h", "total h"]
    return Table("Compute", header, rows, note)


def _compute_row(task: str, method: str, rs: list[Run], hours) -> list[str]:
    with_eval = sum(r.metrics.get("eval_runtime_s") is not None for r in rs)
    resumed = sum(bool(r.metrics.get("resumed_from_step")) for r in rs)
    train, ev = hours(rs, "train_runtime_s"), hours(rs, "eval_runtime_s")
    return [task, method, str(len(rs)), str(with_eval), str(resumed), f"{train:.2f}", f"{ev:.2f}", f"{train + ev:.2f}"]


def failed_table(bad: list[tuple[Path, str]], root: Path) -> str:
    lines = ["### Runs left out (not completed)", ""]
    if not bad:
        return "\n".join(lines + ["None: every run found is completed.", ""])
    lines += ["| run dir | reason |", "|---|---|"]
    for d, why in sorted(bad):
        try:
            d = d.relative_to(root)
        except ValueError:
            pass
        lines.append(f"| {d} | {why.replace('|', '/')[:200]} |")
    return "\n".join(lines + [""])


def answer_share_table(runs: list[Run], order: list[str], labels: dict[str, str]) -> Table | None:
    """How often each method gives its single most frequent answer per set (from `predictions.jsonl`), beside the
    gold answers' own top share: a method near 100 answers by position, not content, whatever its accuracy."""
    shares: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    gold: dict[str, dict[str, str]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: str(r.dir)):
        p = r.dir / "predictions.jsonl"
        if not p.exists():
            continue
        per: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for line in p.read_text().splitlines():
            row = json.loads(line)
            per[row["task"]].append(row)
        pick = {"acc": "ll_pick", "acc_norm": "ll_pick_norm"}.get(r.metrics.get("main_metric", ""), "extracted")
        for task, rows in per.items():
            top = Counter(str(x.get(pick, x.get("extracted"))) for x in rows).most_common(1)[0][1]
            shares[r.metrics["method"]][task].append(top / len(rows))
            gold[task].update({str(x["id"]): str(x["gold"]) for x in rows})
    tasks = in_order({t for m in shares.values() for t in m}, order)
    if not tasks:
        return None
    rows = []
    for method in in_order(shares, METHOD_ORDER):
        cells = [label(method), str(max(len(v) for v in shares[method].values()))]
        cells += [f"{100 * np.mean(shares[method][t]):.1f}" if shares[method].get(t) else "–" for t in tasks]
        rows.append(cells)
    top_gold = [Counter(gold[t].values()).most_common(1)[0][1] / len(gold[t]) for t in tasks]
    rows.append(["_Gold answers_", "–"] + [f"{100 * s:.1f}" for s in top_gold])
    scored = any(r.metrics.get("main_metric") in ("acc", "acc_norm") for r in runs)
    what = "answer (the option its main metric picks)" if scored else "extracted answer"
    note = (f"Share (%) of a set's test examples given the run's most frequent {what}, mean over the runs "
            "with predictions; the gold row is the most frequent gold answer's share (the majority-answer accuracy). "
            "100 = the same answer for every question.")  # fmt: skip
    return Table("Most frequent answer's share", ["Method", "Runs"] + [labels.get(t, t) for t in tasks], rows, note)


def _example_scores(run: Run, key: str) -> dict[str, float]:
    """{example id: 1.0 / 0.0} from a run's predictions.jsonl, by the field that says whether `key` was right."""
    p = run.dir / "predictions.jsonl"
    if not p.exists():
        return {}
    field_ = {"accuracy": "correct"}.get(key, key)
    out = {}
    for line in p.read_text().splitlines():
        row = json.loads(line)
        if field_ in row:
            out[str(row["id"])] = float(row[field_])
    return out


def sign_flip_p(d: np.ndarray, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(d) = 0: random sign flips of the paired differences (fixed seed, so
    the table regenerates byte for byte); the observed mean counts as one draw."""
    if not len(d) or np.allclose(d, 0):
        return 1.0
    rng = np.random.default_rng(seed)
    obs = abs(d.mean())
    flips = rng.choice([-1.0, 1.0], size=(draws, len(d)))
    null = np.abs((flips * d).mean(axis=1))
    return float((1 + (null >= obs - 1e-12).sum()) / (draws + 1))


def _p4(p: float) -> str:
    """A permutation p-value to 4 places; below the resolution of 20,000 draws it reads "< 0.0001"."""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def method_pairs_table(runs: list[Run], title: str) -> Table | None:
    """Do the fine-tuned methods separate? Every pair of methods on the sets' average, with two tests: paired over
    seeds (t-test of the per-seed differences, seeds both methods ran; the training randomness is the noise) and over
    examples (sign-flip permutation test on each test example's correctness averaged over those seeds; the test
    sample is the noise, the trained models held fixed). Only the first says a difference is beyond the seeds' spread."""
    by_method: dict[str, dict[int, Run]] = defaultdict(dict)
    main = None
    for r in sorted(runs, key=lambda r: str(r.dir)):
        m = r.metrics.get("method")
        main = main or r.metrics.get("main_metric", "accuracy")
        if m != "none" and r.metrics.get("eval", {}).get(main) is not None:
            by_method[m][int(r.metrics.get("seed", 0))] = r
    methods = in_order(by_method, METHOD_ORDER)
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            seeds = sorted(set(by_method[a]) & set(by_method[b]))
            if not seeds:
                continue
            va = np.array([by_method[a][s].metrics["eval"][main] for s in seeds], dtype=float)
            vb = np.array([by_method[b][s].metrics["eval"][main] for s in seeds], dtype=float)
            diff = vb - va
            p_seed = paired_test(dict(zip(seeds, vb)), dict(zip(seeds, va)))[1]
            ea = [_example_scores(by_method[a][s], main) for s in seeds]
            eb = [_example_scores(by_method[b][s], main) for s in seeds]
            ids = sorted(set.intersection(*map(set, ea + eb)))
            d = np.array([np.mean([e[x] for e in eb]) - np.mean([e[x] for e in ea]) for x in ids], dtype=float)
            sd = f"{100 * diff.std(ddof=1):.2f}" if len(seeds) > 1 else "–"
            rows.append([f"{label(b)} − {label(a)}", ",".join(map(str, seeds)), f"{100 * diff.mean():+.2f}", sd,
                         _p3(p_seed), _p4(sign_flip_p(d)) if len(ids) else "–", str(len(ids))])  # fmt: skip
    if not rows:
        return None
    note = (
        f"{main} x100, the average over the sets. Δ: mean over the seeds both methods ran of the per-seed difference; "
        "sd: its standard deviation over those seeds. p (seeds): paired t-test over those seeds (the seeds' spread "
        "is the noise). p (examples): two-sided sign-flip permutation test (20,000 draws, seed 0) of each test "
        "example's correctness averaged over those seeds, over the n examples every run scored; it holds the "
        "trained models fixed, so it does not say the methods differ beyond the seeds' spread."
    )
    header = ["Comparison", "Seeds", "Δ (x100)", "sd (x100)", "p (seeds)", "p (examples)", "n"]
    return Table(title, header, rows, note)


def _p3(p: float | None) -> str:
    """A t-test p-value to 3 places ("–" when there is no test)."""
    return "–" if p is None else ("< 0.001" if p < 1e-3 else f"{p:.3f}")


def vs_zero_shot_table(runs: list[Run], title: str) -> Table | None:
    """Does fine-tuning beat the untrained model? Per method: the 8-set average (mean ± std over seeds) against the
    zero-shot row's, with two tests: over seeds (one-sample t-test of the per-seed averages against zero-shot's one
    evaluation) and over examples (sign-flip permutation test on each test example's correctness averaged over seeds
    minus zero-shot's, all sets pooled)."""
    whole = {r.dir: r for r in runs}
    zs = [r for r in whole.values() if r.metrics.get("method") == "none"]
    if not zs:
        return None
    main = zs[0].metrics.get("main_metric", "accuracy")
    zs_avg = zs[0].metrics["eval"].get(main)
    zs_ex = _example_scores(zs[0], main)
    by_method: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(whole.values(), key=lambda r: str(r.dir)):
        if r.metrics.get("method") != "none" and r.metrics.get("eval", {}).get(main) is not None:
            by_method[r.metrics["method"]].append(r)
    rows = []
    for m in in_order(by_method, METHOD_ORDER):
        rs = by_method[m]
        vals = np.array([r.metrics["eval"][main] for r in rs], dtype=float)
        p_seed = (
            float(stats.ttest_1samp(vals, zs_avg).pvalue) if len(vals) > 1 and not np.allclose(vals, vals[0]) else None
        )
        per = [_example_scores(r, main) for r in rs]
        ids = sorted(set(zs_ex).intersection(*map(set, per))) if per else []
        d = np.array([np.mean([p[i] for p in per]) - zs_ex[i] for i in ids], dtype=float)
        rows.append([label(m), str(len(rs)), _fmt(list(vals)), f"{100 * zs_avg:.2f}", f"{100 * (vals.mean() - zs_avg):+.2f}",
                     _p3(p_seed), _p4(sign_flip_p(d)) if len(ids) else "–", str(len(ids))])  # fmt: skip
    note = (
        f"{main} x100, the average over the sets. p (seeds): one-sample t-test of the seeds' averages against the "
        "zero-shot value. p (examples): two-sided sign-flip permutation test (20,000 draws, seed 0) of each test "
        "example's correctness averaged over the seeds minus zero-shot's, over the n examples every run scored."
    )
    return Table(
        title, ["Method", "Seeds", "Avg", "Zero-shot", "Δ (x100)", "p (seeds)", "p (examples)", "n"], rows, note
    )
