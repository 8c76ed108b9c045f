"""Score a completed cloze run dir again with lm-evaluation-harness and compare, example by example, with the
predictions the run wrote itself: the real-model counterpart of tests/test_options.py's tiny-model agreement test.

    TALKLORA_DATA_DIR=../shared/data OMP_NUM_THREADS=1 .venv/bin/python scripts/lm_eval_agreement.py \
        results/repro/commonsense_cloze/method=talklora,seed=1 --limit 10

Prints, per set, the largest |log-likelihood difference| over the options and how many of the first N examples get
the same acc and acc_norm verdict; exits 1 if any acc verdict differs. WinoGrande's acc_norm is not compared: lm-eval
normalises it by the contexts' length, this project by the continuation's (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from talklora_exp.lm_eval.__main__ import main as lm_eval_main

SETS = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "siqa", "hellaswag": "hellaswag", "winogrande": "winogrande",
        "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "openbookqa": "openbookqa"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--limit", type=int, default=10, help="first N test examples of each set")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {','.join(SETS)}")
    p.add_argument("--batch_size", type=int, default=8)
    a = p.parse_args(argv)
    sets = a.sets.split(",")
    if bad := [s for s in sets if s not in SETS]:
        print(f"--sets: unknown {bad}; allowed: {', '.join(SETS)}", file=sys.stderr)
        return 2
    preds = a.run_dir / "predictions.jsonl"
    if not preds.is_file():
        print(f"{preds}: not found; a completed cloze run dir has it", file=sys.stderr)
        return 2
    ours: dict[str, list[dict]] = {}
    for row in map(json.loads, preds.read_text().splitlines()):
        ours.setdefault(row["task"], []).append(row)
    with tempfile.TemporaryDirectory() as out:
        tasks = ",".join(f"talklora_{SETS[s]}_text" for s in sets)
        rc = lm_eval_main([str(a.run_dir), "--tasks", tasks, "--limit", str(a.limit), "--log_samples",
                           "--output_path", out, "--batch_size", str(a.batch_size)])  # fmt: skip
        if rc:
            return rc
        theirs = {}
        for f in Path(out).rglob("samples_*.jsonl"):
            theirs[f.name[len("samples_") :].rsplit("_", 1)[0]] = sorted(
                map(json.loads, f.read_text().splitlines()), key=lambda r: r["doc_id"]
            )
    ok = True
    print("| set | n | max abs ll diff | acc same | acc_norm same |\n|---|---|---|---|---|")
    for s in sets:
        mine, lm = ours.get(s, [])[: a.limit], theirs[f"talklora_{SETS[s]}_text"]
        n = min(len(mine), len(lm))
        diff = max(abs(x - float(r[0][0])) for m, b in zip(mine, lm) for x, r in zip(m["ll"], b["resps"]))
        same = sum(float(m["acc"]) == b["acc"] for m, b in zip(mine, lm))
        norm = "–" if s == "winogrande" else str(sum(float(m["acc_norm"]) == b["acc_norm"] for m, b in zip(mine, lm)))
        ok &= same == n
        print(f"| {s} | {n} | {diff:.2e} | {same} | {norm} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
