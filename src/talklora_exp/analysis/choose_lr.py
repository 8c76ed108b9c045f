"""`python -m talklora_exp.analysis.choose_lr GRID_DIR`: the learning rate per task from a grid sweep, chosen on the
validation split held out of train (each run's selected validation score), never on dev. Prints a table and writes
GRID_DIR/choice.md and choice.json (the values the table preset uses; `make tables` does not read them)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .collect import collect


def choose(grid: Path) -> dict[str, dict]:
    runs, _ = collect([grid])
    by_task: dict[str, list[tuple[float, float, int, float | None]]] = defaultdict(list)
    for r in runs:
        sel = r.metrics.get("selection") or {}
        if sel.get("split") != "val" or sel.get("value") is None:
            continue
        lr = float(json.loads((r.dir / "identity.json").read_text())["config"]["trainer.lr"])
        # higher is better for a metric, lower for a loss
        score = -sel["value"] if sel.get("metric") == "loss" else sel["value"]
        by_task[r.metrics["task"]].append((score, lr, sel["step"], r.main_value))
    return {
        t: {"lr": best[1], "val_score": best[0], "selected_step": best[2],
            "all": sorted(({"lr": lr, "val_score": s, "step": st, "dev": d} for s, lr, st, d in rows), key=lambda x: x["lr"])}
        for t, rows in sorted(by_task.items())
        for best in [max(rows, key=lambda x: (x[0], -x[1]))]  # ties: the smaller lr
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m talklora_exp.analysis.choose_lr GRID_DIR", file=sys.stderr)
        return 2
    grid = Path(argv[0])
    picked = choose(grid)
    lines = ["### Learning rate per task (chosen on the validation split held out of train)", "",
             "| Task | lr | val score at the selected step | step | (dev at that step, not used) | all lrs: val score |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for t, c in picked.items():
        others = ", ".join(f"{a['lr']:g}: {a['val_score']:.4f}" for a in c["all"])
        dev = next(a["dev"] for a in c["all"] if a["lr"] == c["lr"])
        lines.append(f"| {t} | {c['lr']:g} | {c['val_score']:.4f} | {c['selected_step']} | {dev:.4f} | {others} |")
    text = "\n".join(lines) + "\n"
    (grid / "choice.md").write_text(text)
    (grid / "choice.json").write_text(json.dumps({t: c["lr"] for t, c in picked.items()}, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
