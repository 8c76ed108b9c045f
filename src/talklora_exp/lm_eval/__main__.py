"""`python -m talklora_exp.lm_eval RUN_DIR --tasks NAMES [--include_path DIR] [--limit N] [--output_path DIR]
[--batch_size N] [--log_samples] [--trust-remote-code]`

Evaluates a completed run dir's model (any method, or a `method=none` run: the base model) with
lm-evaluation-harness's own `HFLM`, offline. The model is rebuilt from the run's `config.yaml` (the same model source
and conversion as training) with its `adapter/` loaded; `HFLM` gets the run's `model.max_length`. Flags mean what
`lm_eval`'s own flags mean. The shipped tasks (`talklora_<set>_text`, `talklora_<set>_label`, tags
`talklora_commonsense_text` / `_label`; sets: boolq piqa siqa arc_easy arc_challenge openbookqa hellaswag winogrande)
read `$TALKLORA_DATA_DIR/commonsense`. lm-eval's result JSON is written unchanged under `--output_path` (default
`RUN_DIR/lm_eval/`); the run's own files are never touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import TASKS_DIR


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m talklora_exp.lm_eval", description=__doc__.split("\n\n")[1])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or tag names")
    p.add_argument("--include_path", action="append", default=[], help="more task YAML folders (lm-eval's flag)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1; lm-eval's flag)")
    p.add_argument(
        "--output_path", type=Path, default=None, help="where lm-eval writes its results (default RUN_DIR/lm_eval)"
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--log_samples", action="store_true", help="also write per-sample records (lm-eval's flag)")
    p.add_argument("--trust-remote-code", action="store_true", dest="trust_remote_code")
    return p.parse_args(argv)


def task_manager(names: list[str], include: list[Path]) -> Any:
    """Our YAMLs (and the user's include paths) first; lm-eval's own catalogue is scanned only when a name needs it."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(n in tm.all_tasks for n in names):
        return tm
    tm = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise UserError(
            f"--tasks: unknown task(s) {unknown}; shipped: {sorted(t for t in tm.all_tasks if t.startswith('talklora_'))}"
        )
    return tm


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """lm-eval's results for the run's model, and the folder they were written to."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    from ..evaluate import load_run

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give at least one task name")
    tm = task_manager(names, [Path(p) for p in args.include_path])
    run = load_run(args.run_dir, trust_remote_code=args.trust_remote_code)
    if run.built.task.kind != "causal":
        raise UserError(
            f"{args.run_dir}: lm-eval scores causal LMs; this run's model is {run.cfg.model.name} (an encoder)"
        )
    model = run.model.to(run.acc.device).eval()
    lm = HFLM(pretrained=model, tokenizer=run.built.tokenizer, batch_size=int(args.batch_size),
              max_length=int(run.cfg.model.max_length))  # fmt: skip
    out = args.output_path or (Path(args.run_dir) / "lm_eval")
    tracker = EvaluationTracker(output_path=str(out))
    results = simple_evaluate(model=lm, tasks=names, limit=args.limit, task_manager=tm, log_samples=args.log_samples,
                              evaluation_tracker=tracker)  # fmt: skip
    if results is None:  # a non-main process
        return {}, out
    samples = results.pop("samples", None) if args.log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples:
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=samples[name])
    return results, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        results, out = evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results:
        print(json.dumps(results.get("results", {}), indent=2, default=str))
        print(f"written under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
