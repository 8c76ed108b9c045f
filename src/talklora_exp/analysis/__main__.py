"""`python -m talklora_exp.analysis [dirs...]` / `make tables`: run dirs -> <out>/tables and <out>/figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .collect import collect, whole_runs, with_metric
from .plots import all_plots
from .tables import (
    GLUE_LABEL,
    GLUE_ORDER,
    Compare,
    answer_share_table,
    compute_table,
    convergence_table,
    failed_table,
    method_pairs_table,
    routing_table,
    score_table,
    vs_zero_shot_table,
)
from .trivial import trivial_scores

CS_ORDER = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
CS_LABEL = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.",
            "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}  # fmt: skip
FAMILIES = (  # (task family, column order, labels, title, file stem)
    ("glue", GLUE_ORDER, GLUE_LABEL, "GLUE dev results", "glue"),
    ("commonsense", CS_ORDER, CS_LABEL, "Commonsense reasoning accuracy", "commonsense"),
    ("gsm8k", ["gsm8k"], {"gsm8k": "GSM8K"}, "GSM8K accuracy", "gsm8k"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m talklora_exp.analysis", description=__doc__)
    ap.add_argument("dirs", nargs="*", type=Path, default=[Path("results")], help="run dirs or folders holding them")
    ap.add_argument("--out", type=Path, default=Path("results"), help="writes <out>/tables and <out>/figures")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--proposal", default="talklora", help="the method the significance marks are about")
    ap.add_argument("--baselines", default="lora,moelora", help="comma-separated methods it is compared with")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.exists()]
    if missing:
        print(f"error: run dir(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    cmp = Compare(args.proposal, tuple(b for b in args.baselines.split(",") if b))
    runs, bad = collect(args.dirs)
    tables_dir, fig_dir = args.out / "tables", args.out / "figures"
    written = []
    trivial = trivial_scores(runs)
    dev_trivial = {task: v for (task, split), v in trivial.items() if split == "eval"}
    for family, order, labels, title, stem in FAMILIES:
        fam = [r for r in runs if r.metrics.get("task_family") == family]
        metrics = sorted({str(r.metrics.get("main_metric")) for r in fam})
        if metrics in (["acc"], ["acc_norm"]):  # option-likelihood scoring: say so, and add the other metric's table
            title = f"{title.replace(' accuracy', '')}, option likelihood: {metrics[0]}"
            other = "acc" if metrics == ["acc_norm"] else "acc_norm"
            res = score_table(with_metric(fam, other), family, order, labels, f"{title[: title.rindex(':')]}: {other}",
                              cmp, dev_trivial)  # fmt: skip
            if res:
                res[0].write(tables_dir, f"{stem}_{other}")
                written.append(f"{stem}_{other}")
        res = score_table(runs, family, order, labels, title, cmp, dev_trivial)
        if res:
            res[0].write(tables_dir, stem)
            res[1].write(tables_dir, f"{stem}_significance")
            written += [stem, f"{stem}_significance"]
    whole = whole_runs(runs)  # per run, not per commonsense set
    cs_whole = [r for r in whole if r.metrics.get("task_family") == "commonsense"]
    zs = vs_zero_shot_table(cs_whole, "Fine-tuned against zero-shot")
    if zs:
        zs.write(tables_dir, "commonsense_vs_zero_shot")
        written.append("commonsense_vs_zero_shot")
    pairs = method_pairs_table(cs_whole, "Method against method")
    if pairs:
        pairs.write(tables_dir, "commonsense_pairs")
        written.append("commonsense_pairs")
    shares = answer_share_table(cs_whole, CS_ORDER, CS_LABEL)
    if shares:
        shares.write(tables_dir, "commonsense_answers")
        written.append("commonsense_answers")
    rt = routing_table(whole)
    if rt:
        rt.write(tables_dir, "routing")
        written.append("routing")
    cv = convergence_table(whole)
    if cv:
        cv.write(tables_dir, "convergence")
        written.append("convergence")
    ct = compute_table(
        whole_runs(collect(args.dirs, one_config=False)[0])
    )  # every completed run cost compute, grids included
    if ct:
        ct.write(tables_dir, "compute")
        written.append("compute")
    tables_dir.mkdir(parents=True, exist_ok=True)
    (tables_dir / "left_out.md").write_text(failed_table(bad, args.out))
    figs = []
    if not args.no_plots:  # GLUE's figures in <out>/figures, each generation family's in a folder of its own
        figs = all_plots([r for r in runs if r.metrics.get("task_family") == "glue"], fig_dir, trivial)
        for family, *_ in FAMILIES[1:]:
            fam = whole_runs([r for r in runs if r.metrics.get("task_family") == family])
            figs += all_plots(fam, fig_dir / family) if fam else []
    print(
        f"{len(runs)} completed runs, {len(bad)} left out -> {tables_dir}/{{{','.join(written)}}}.{{md,tex,csv}}, {len(figs)} figure files"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
