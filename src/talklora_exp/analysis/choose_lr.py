"""`python -m talklora_exp.analysis.choose_lr GRID_DIR [GRID_DIR ...] [--out DIR]`: the learning rate (and, for
sentence pairs, the pair encoding; where a grid tried them, the epochs and train subsample) per task from grid sweeps,
chosen on the validation split held out of train (each
run's selected validation score, averaged over its seeds), never on dev. Prints a table and writes choice.md and
choice.json (the values the table preset copies; `make tables` does not read them) into --out (default: the first
grid dir).

The table's epochs per task come from the same runs by a fixed rule (EPOCH_FACTOR, MIN_EPOCHS): twice the epochs the
chosen run needed to reach its selected step, at least 3, never more than the grid ran. The factor gives methods that
converge more slowly than LoRA (the table trains all of them) room past LoRA's best step; the cap keeps the table
inside what the grid measured."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from ..identity import missing_fixes
from .collect import Run, collect
from .tables import compute_table

EPOCH_FACTOR = 2.0
MIN_EPOCHS = 3


def choose(runs: list[Run]) -> dict[str, dict]:
    """{task: {lr, pair_encoding, train_cap, val_score, selected_step, epochs, all: [every setting tried]}}. A setting
    is (pair encoding, lr, grid epochs, train cap); ties go to `cross`, then to the cheaper schedule (epochs x train
    examples), then to the smaller lr. A loss selects lower-is-better (its score is negated)."""
    settings: dict[tuple, list[tuple[float, int, float | None, float | None, int]]] = defaultdict(list)
    for r in runs:
        sel = r.metrics.get("selection") or {}
        if sel.get("split") != "val" or sel.get("value") is None:
            continue
        cfg = r.config
        score = -sel["value"] if sel.get("metric") == "loss" else sel["value"]
        key = (r.metrics["task"], *_run_setting(cfg).values())
        n_train = (r.metrics.get("data") or {}).get("n_train") or 0
        settings[key].append((score, sel["step"], r.main_value, _epochs_at(sel["step"], r.metrics, cfg), n_train))
    by_task: dict[str, list[dict]] = defaultdict(list)
    for (task, pair, lr, epochs, cap), rows in settings.items():
        by_task[task].append({"pair_encoding": pair, "lr": lr, "grid_epochs": epochs, "train_cap": cap,
                              "val_score": mean(x[0] for x in rows), "step": rows[0][1],
                              "dev": mean(x[2] for x in rows) if all(x[2] is not None for x in rows) else None,
                              "seeds": len(rows), "epochs_at_step": rows[0][3],
                              "cost": (epochs or 0) * rows[0][4]})  # fmt: skip
    out = {}
    for task, rows in sorted(by_task.items()):
        rows.sort(key=lambda a: (a["pair_encoding"], a["cost"], a["lr"]))
        best = max(rows, key=lambda a: (a["val_score"], a["pair_encoding"] == "cross", -a["cost"], -a["lr"]))
        out[task] = {"lr": best["lr"], "pair_encoding": best["pair_encoding"], "train_cap": best["train_cap"],
                     "val_score": best["val_score"], "selected_step": best["step"],
                     "epochs_at_step": best["epochs_at_step"], "grid_epochs": best["grid_epochs"],
                     "epochs": table_epochs(best["epochs_at_step"], best["grid_epochs"]), "all": rows}  # fmt: skip
    return out


def _run_setting(cfg: dict) -> dict:
    """The grid setting a run's config belongs to (its identity.json "config"), in `_setting`'s keys and order."""
    return {"pair_encoding": str(cfg.get("model.pair_encoding", "cross")),  # absent: runs made before the key (cross)
            "lr": float(cfg["trainer.lr"]), "grid_epochs": cfg.get("trainer.epochs"),
            "train_cap": cfg.get("trainer.max_train_samples")}  # fmt: skip


def _setting(a: dict) -> str:
    """How a setting is named in choice.md and in the curves' legend."""
    s = f"{a['pair_encoding']} lr {a['lr']:g} {a['grid_epochs']}ep"
    return s + (f" cap {a['train_cap']}" if a.get("train_cap") else "")


def table_epochs(epochs_at_step: float | None, grid_epochs: int | None) -> int | None:
    """ceil(EPOCH_FACTOR x epochs at the selected step), at least MIN_EPOCHS, at most the grid's epochs (None when the
    grid run does not say how long it ran)."""
    if epochs_at_step is None or grid_epochs is None:
        return None
    return int(min(int(grid_epochs), max(MIN_EPOCHS, math.ceil(EPOCH_FACTOR * epochs_at_step - 1e-9))))


def _epochs_at(step: int, metrics: dict, cfg: dict) -> float | None:
    """Training epochs done at `step`: how long the schedule had to run for the selected step, the basis for sizing a
    shorter table schedule."""
    n = (metrics.get("data") or {}).get("n_train")
    per_step = int(cfg.get("trainer.batch_size", 0)) * int(cfg.get("trainer.grad_accum", 1) or 1)
    per_step *= int(metrics.get("num_processes") or 1)
    if not n or not per_step:
        return None
    return round(step / math.ceil(n / per_step), 2)


def _plot(runs: list[Run], picked: dict[str, dict], out: Path) -> None:
    from .plots import grid_curves

    runs = [r for r in runs if (r.metrics.get("selection") or {}).get("split") == "val"]
    setting = {r.dir: _setting(_run_setting(r.config)) for r in runs}
    grid_curves(runs, setting, {t: _setting(c) for t, c in picked.items()}, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m talklora_exp.analysis.choose_lr", description=__doc__.split("\n\n")[0])
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    missing = [str(g) for g in args.grids if not g.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs, _ = collect(args.grids, one_config=False)  # every lr of a cell: the grid compares configs
    picked = choose(runs)
    if not picked:
        print(f"error: no completed run with a validation selection under {', '.join(map(str, args.grids))}",
              file=sys.stderr)  # fmt: skip
        return 2
    out = args.out or args.grids[0]
    lines = ["### Learning rate (and pair encoding) per task, chosen on the validation split held out of train", "",
             f"From: {', '.join(str(g) for g in args.grids)}", "",
             "| Task | pair encoding | lr | train cap | val score | selected step (epochs of grid's) | table epochs "
             "| (dev there, not used) | every setting: val score |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t, c in picked.items():
        others = ", ".join(f"{_setting(a)}: {a['val_score']:.4f}" for a in c["all"])
        chosen = next(a for a in c["all"] if _setting(a) == _setting(c))
        dev_s = f"{chosen['dev']:.4f}" if chosen["dev"] is not None else "-"
        ep = f" ({c['epochs_at_step']:g} of {c['grid_epochs']})" if c.get("epochs_at_step") is not None else ""
        te = c["epochs"] if c.get("epochs") is not None else "-"
        lines.append(f"| {t} | {c['pair_encoding']} | {c['lr']:g} | {c['train_cap'] or 'all'} | {c['val_score']:.4f} | "
                     f"{c['selected_step']}{ep} | {te} | {dev_s} | {others} |")  # fmt: skip
    lines += [
        "",
        f"Table epochs: ceil({EPOCH_FACTOR:g} x epochs at the selected step), at least {MIN_EPOCHS}, at most the "
        "grid's epochs (room for methods slower than LoRA; the table still selects its step on validation).",
    ]
    stale = Counter(f for r in runs for f in missing_fixes(r.config))
    if stale:  # the choice stands as made, but a reader must know which runs predate a fix that changes results
        lines += ["", "Runs made before a result-changing fix (identity.RESULT_FIXES): "
                  + "; ".join(f"{n} of {len(runs)} before `{f}`" for f, n in sorted(stale.items())) + "."]  # fmt: skip
    lines += ["", "Curves of every setting: grid_curves.png (validation chooses; dev is drawn, never used).", ""]
    ct = compute_table(runs)
    if ct:
        ct.title = "Compute of the grids"
    text = "\n".join(lines) + "\n" + (ct.markdown() if ct else "")
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        _plot(runs, picked, out)
    (out / "choice.md").write_text(text)
    choice = {t: {"lr": c["lr"], "pair_encoding": c["pair_encoding"], "epochs": c["epochs"], "train_cap": c["train_cap"]}
              for t, c in picked.items()}  # fmt: skip
    (out / "choice.json").write_text(json.dumps(choice, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
