"""Figures (PNG + PDF): learning and loss curves, expert-load heatmaps, routing balance over training, sensitivity by
layer, score vs params. Every method found in the runs gets a line and a colour (known ones fixed, others from a
palette)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..methods import METHODS
from .collect import Run
from .tables import GLUE_LABEL, GLUE_ORDER, METHOD_ORDER, by_seed, in_order, label

COLORS = {m: cls.color for m, cls in METHODS.items() if cls.adapts}  # from the registry
PALETTE = ["#8C8C8C", "#CCB974", "#64B5CD", "#C44E52", "#1F77B4", "#FF7F0E", "#2CA02C", "#9467BD"]


def methods_of(runs: list[Run]) -> list[str]:
    return in_order({r.metrics["method"] for r in runs}, METHOD_ORDER)


def color(method: str, all_methods: list[str]) -> str:
    if method in COLORS:
        return COLORS[method]
    others = sorted(m for m in all_methods if m not in COLORS)
    return PALETTE[others.index(method) % len(PALETTE)] if method in others else PALETTE[0]


def _tlabel(task: str) -> str:
    return GLUE_LABEL.get(task, task)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "svg.hashsalt": "talklora"})
    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    import matplotlib.pyplot as plt

    plt.close(fig)  # pyplot keeps every figure open until closed: a whole table's figures would pile up
    return paths


def _curve(ax, series: dict[int, list[float]], m: str, ms: list[str]) -> None:
    """Mean over seeds with a min-max band; a single point (the zero-shot row's step 0) as a marker, since a line of
    one point draws nothing."""
    steps = sorted(series)
    mean = np.array([np.mean(series[x]) for x in steps])
    point = {"marker": "o", "ms": 4} if len(steps) == 1 else {}
    ax.plot(steps, mean, "-", label=label(m), color=color(m, ms), lw=1.2, **point)
    if any(len(series[x]) > 1 for x in steps):
        lo, hi = np.array([min(series[x]) for x in steps]), np.array([max(series[x]) for x in steps])
        ax.fill_between(steps, lo, hi, color=color(m, ms), alpha=0.18, lw=0)


def _curve_grid(
    series: dict[tuple[str, str, str], dict[int, list[float]]],
    kinds: list[str],
    ms: list[str],
    ylabel: dict[tuple[str, str], str],
    hlines: dict[tuple[str, str], float],
    out: Path,
    stem: str,
) -> list[Path]:
    """One column per task, one row per kind of curve, one line per method (`_curve`), a dashed reference where
    `hlines` has one; the shared layout of the learning and loss curves."""
    tasks = in_order({k[0] for k in series}, GLUE_ORDER)
    plt = _plt()
    fig, axes = plt.subplots(len(kinds), len(tasks), figsize=(3.0 * len(tasks), 2.5 * len(kinds)), squeeze=False)
    for j, t in enumerate(tasks):
        for i, kind in enumerate(kinds):
            ax = axes[i][j]
            for m in ms:
                if (t, m, kind) in series:
                    _curve(ax, series[(t, m, kind)], m, ms)
            if (t, kind) in hlines:
                ax.axhline(hlines[(t, kind)], color="0.45", ls="--", lw=0.9, label="majority class / constant")
            ax.set_title(_tlabel(t)) if i == 0 else None
            ax.set_xlabel("step") if i == len(kinds) - 1 else None
            ax.set_ylabel(ylabel.get((t, kind), kind), fontsize=7)
    lines = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    axes[0][0].legend(list(lines.values()), list(lines), fontsize=7)  # every method, and the dashed line if drawn
    fig.tight_layout()
    return _save(fig, out, stem)


def learning_curves(runs: list[Run], out: Path, trivial: dict[tuple[str, str], float] | None = None) -> list[Path]:
    """Per task, the dev metric (when logged during training) and the validation score over optimizer steps; one
    line per method, mean over seeds with a min-max band, so a reader can see whether each method converged; dashed,
    the trivial predictor on that split (`trivial.py`), so a reader can see whether it learned at all."""
    rows = {"eval": "dev (reported split)", "val": "validation (selects)"}
    series: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ylabel: dict[tuple[str, str], str] = {}
    for r in runs:
        main = r.metrics.get("main_metric", "")
        for rec in r.log:
            for kind in rows:
                vals = rec.get(kind)
                if not isinstance(vals, dict):
                    continue
                metric = main if vals.get(main) is not None else ("loss" if vals.get("loss") is not None else None)
                if metric is None:
                    continue
                key = (r.metrics["task"], r.metrics["method"], kind)
                series[key][int(rec["step"])].append(vals[metric])
                ylabel[(r.metrics["task"], kind)] = f"{rows[kind]}: {metric}"
    if not series:
        return []
    kinds = [k for k in rows if any(s[2] == k for s in series)]
    hlines = {
        tk: v for tk, v in (trivial or {}).items() if ylabel.get(tk, "").endswith(("accuracy", "correlation"))
    }  # a constant's score means something for accuracy and correlation, not for a loss
    return _curve_grid(series, kinds, methods_of(runs), ylabel, hlines, out, "learning_curves")


def loss_curves(runs: list[Run], out: Path) -> list[Path]:
    """Per task, the training loss (mean of the steps logged since the previous validation) and the validation loss,
    at each validation step; one line per method, mean over seeds with a min-max band. Side by side they show
    overfitting that the metric curves hide: training loss falling while validation loss rises (RTE here)."""
    rows = {"train": "training loss (mean since last validation)", "val": "validation loss"}
    series: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        t, m, window = r.metrics["task"], r.metrics["method"], []
        for rec in r.log:
            if isinstance(rec.get("loss"), (int, float)):
                window.append(rec["loss"])
            val = rec.get("val")
            if isinstance(val, dict) and isinstance(val.get("loss"), (int, float)):
                step = int(rec["step"])
                series[(t, m, "val")][step].append(val["loss"])
                if window:
                    series[(t, m, "train")][step].append(float(np.mean(window)))
                window = []
    if not series:
        return []
    tasks = {k[0] for k in series}
    ylabel = {(t, kind): text for t in tasks for kind, text in rows.items()}
    return _curve_grid(series, list(rows), methods_of(runs), ylabel, {}, out, "loss_curves")


def grid_curves(runs: list[Run], setting: dict[Path, str], chosen: dict[str, str], out: Path) -> list[Path]:
    """A hyper-parameter grid's runs (one seed each): per task, the validation score (which chooses) and the dev metric
    (never used to choose) over steps, one line per setting; the chosen setting is drawn thick. It shows a reader
    whether any setting learns, e.g. a task left at chance by every learning rate."""
    rows = {"val": "validation (chooses)", "eval": "dev (not used)"}
    tasks = in_order({r.metrics["task"] for r in runs}, GLUE_ORDER)
    if not tasks:
        return []
    plt = _plt()
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.0 * len(tasks), 5.0), squeeze=False)
    for j, t in enumerate(tasks):
        rs = sorted((r for r in runs if r.metrics["task"] == t), key=lambda r: setting[r.dir])
        for k, r in enumerate(rs):
            main, name = r.metrics.get("main_metric", ""), setting[r.dir]
            for i, kind in enumerate(rows):
                pts = [(int(x["step"]), x[kind][main]) for x in r.log
                       if isinstance(x.get(kind), dict) and x[kind].get(main) is not None]  # fmt: skip
                if pts:
                    xs, ys = zip(*pts)
                    thick = name == chosen.get(t)
                    axes[i][j].plot(xs, ys, "-", color=PALETTE[k % len(PALETTE)], lw=2.2 if thick else 1.0,
                                    label=name + (" (chosen)" if thick else ""))  # fmt: skip
                axes[i][j].set_ylabel(f"{rows[kind]}: {main}", fontsize=7)
        axes[0][j].set_title(_tlabel(t))
        axes[1][j].set_xlabel("step")
        if axes[0][j].get_legend_handles_labels()[0]:
            axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out, "grid_curves")


def _layer_loads(runs: list[Run]) -> np.ndarray:
    """Mean over seeds of the per-layer expert load: layers x experts."""
    mats = [np.array([v["load"] for v in r.routing["layers"].values()]) for r in runs]
    return np.mean(mats, axis=0)


def _short(path: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> '3.query'."""
    m = re.search(r"\.(\d+)\..*?([A-Za-z_]\w*)$", path)
    return f"{m.group(1)}.{m.group(2)}" if m else path


def expert_load_heatmap(runs: list[Run], out: Path) -> list[Path]:
    routed = [r for r in runs if r.routing]
    g = by_seed(routed)
    tasks = in_order({k[1] for k in g}, GLUE_ORDER)
    methods = methods_of(routed)
    if not tasks or not methods:
        return []
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), len(methods), figsize=(3.2 * len(methods), 2.2 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            keys = [k for k in g if k[1] == t and k[2] == m]
            if not keys:
                ax.axis("off")
                continue
            seed_runs = list(g[keys[0]].values())
            loads = _layer_loads(seed_runs)
            im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(loads.max())))
            ax.set_title(f"{_tlabel(t)} · {label(m)}")
            ax.set_xlabel("expert")
            ax.set_ylabel("adapted layer")
            ax.set_xticks(range(loads.shape[1]))
            names = [_short(n) for n in seed_runs[0].routing["layers"]]
            ax.set_yticks(range(len(names)), names, fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046, label="mean load")
    fig.tight_layout()
    return _save(fig, out, "expert_load_heatmap")


def routing_over_training(runs: list[Run], out: Path) -> list[Path]:
    """Load entropy and CV over training steps (train-time snapshots and evals), mean over seeds per method."""
    series: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for rec in r.log:
            agg = rec.get("routing_train") or rec.get("routing")
            if agg:
                for stat in ("load_entropy", "cv"):
                    if agg.get(stat) is not None:
                        series[(r.metrics["task"], r.metrics["method"], stat)][int(rec["step"])].append(agg[stat])
    if not series:
        return []
    tasks = in_order({k[0] for k in series}, GLUE_ORDER)
    ms = in_order({k[1] for k in series}, METHOD_ORDER)
    plt = _plt()
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.0 * len(tasks), 4.4), squeeze=False)
    for j, t in enumerate(tasks):
        for i, (stat, ylab) in enumerate((("load_entropy", "load entropy H(P)/log E"), ("cv", "load CV"))):
            ax = axes[i][j]
            for m in ms:
                s = series.get((t, m, stat))
                if s:
                    steps = sorted(s)
                    ax.plot(
                        steps, [np.mean(s[x]) for x in steps], "o-", ms=2.5, label=label(m), color=color(m, ms), lw=1.2
                    )
            ax.set_title(_tlabel(t)) if i == 0 else None
            ax.set_xlabel("step") if i == 1 else None
            ax.set_ylabel(ylab) if j == 0 else None
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "routing_over_training")


def sensitivity_by_layer(runs: list[Run], out: Path) -> list[Path]:
    per: dict[str, list[list[float]]] = defaultdict(list)
    for r in runs:
        if r.routing:
            per[r.metrics["method"]].append([v["sensitivity"] for v in r.routing["layers"].values()])
    if not per:
        return []
    ms = in_order(per, METHOD_ORDER)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.0))
    for m in ms:
        width = min(len(v) for v in per[m])
        arr = np.array([v[:width] for v in per[m]])
        ax.errorbar(range(width), arr.mean(0), yerr=arr.std(0), label=label(m), color=color(m, ms), capsize=2, lw=1.2)
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("routing sensitivity")
    ax.set_title("Routing sensitivity by layer (mean ± std over runs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "sensitivity_by_layer")


def score_vs_params(runs: list[Run], out: Path) -> list[Path]:
    g = by_seed(runs)
    tasks = in_order({k[1] for k in g}, GLUE_ORDER)
    if not tasks:
        return []
    ms = methods_of(runs)
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 2.8), squeeze=False)
    for j, t in enumerate(tasks):
        ax = axes[0][j]
        for m in ms:
            pts = sorted(
                (np.mean([r.metrics["adapter_params"] for r in v.values()]),
                 100 * np.mean([r.main_value for r in v.values() if r.main_value is not None] or [np.nan]))
                for k, v in g.items() if k[1] == t and k[2] == m
            )  # fmt: skip
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", label=label(m), color=color(m, ms), ms=4, lw=1.2)
        ax.set_xscale("log")
        ax.set_title(_tlabel(t))
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel("main metric x100") if j == 0 else None
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "score_vs_params")


def all_plots(runs: list[Run], out: Path, trivial: dict[tuple[str, str], float] | None = None) -> list[Path]:
    fns = (expert_load_heatmap, routing_over_training, sensitivity_by_layer, score_vs_params)
    return learning_curves(runs, out, trivial) + loss_curves(runs, out) + [p for fn in fns for p in fn(runs, out)]
