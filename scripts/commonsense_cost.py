"""Cost of a commonsense run on this machine, measured before its schedule is chosen (results/cost/*.json).

Builds what a real run builds (`run.build`, `run.load_data`: SmolLM2-135M, the commonsense prompts, the held-out
split) and times, on the real training data and test prompts:
  * token lengths of prompt and response (what the cutoffs cut),
  * one optimizer step (forward, backward, AdamW) at the run's batch size, per method and precision
    (fp32, or CPU bf16 autocast with fp32 adapters, through accelerate as the trainer does),
  * the loss curve of a short fp32 run and of the same run under bf16 autocast (same seed, same batches): bf16 is only
    usable if they match,
  * evaluation seconds per test example, greedy vs upstream's 4 beams vs option-likelihood scoring (label format and
    the cloze format), over the same examples,
  * `--bucket 32`: batches padded to a multiple of 32 tokens, so CPU bf16 (whose oneDNN kernels are built per new
    shape) is timed after its warm-up on a few shapes, not on a new shape every step.
Run it with the thread count and neighbours the sweep will have (e.g. OMP_NUM_THREADS=1 beside one other job).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from talklora_exp.run import build, load_data  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


CLOZE = ["task.answer_format=text", "task.prompt_style=lm_eval", "task.main_metric=acc_norm", "eval=options",
         "task.response_max_length=64"]  # experiment=commonsense_cloze's protocol  # fmt: skip
PROTOCOL: list[str] = []  # --protocol cloze sets CLOZE


def base_overrides(
    method: str, seed: int, max_train: int, max_eval: int, decoding: str, protocol: list[str] | None = None
) -> list[str]:
    """`protocol`: the overrides of the protocol measured (default: --protocol's)."""
    return [f"method={method}", "model=smollm2-135m", "task=commonsense/all", "budget=lora_r16", f"eval={decoding}",
            f"seed={seed}", f"trainer.max_train_samples={max_train or 'null'}",
            f"trainer.max_eval_samples={max_eval or 'null'}",
            "trainer.progress=false", *(PROTOCOL if protocol is None else protocol)]  # fmt: skip


def bucketed(collate, multiple: int):
    """Pad every batch to a multiple of `multiple` tokens (labels -100, mask 0): few distinct shapes."""
    if multiple <= 1:
        return collate

    def wrapped(rows):
        b = collate(rows)
        n = b["input_ids"].shape[1]
        extra = -n % multiple
        if extra:
            pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
            b["input_ids"], b["attention_mask"] = pad(b["input_ids"], 0), pad(b["attention_mask"], 0)
            b["labels"] = pad(b["labels"], -100)
        return b

    return wrapped


def _secs(r: dict) -> list[float]:
    return r["secs"]


def percentiles(xs: list[int]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": xs[-1], "mean": round(statistics.mean(xs), 1)}


def lengths(args) -> dict:
    cfg = compose(base_overrides("lora", 1, 0, 0, "greedy"))
    b = build(cfg)
    tok, task = b.tokenizer, b.task
    train, _, _ = task.records(os.environ.get("TALKLORA_DATA_DIR"))
    by_task: dict[str, list] = {}
    for r in train:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for t, recs in by_task.items():
        p = [len(task.prompt_ids(tok, r, False)) for r in recs]
        s = [len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in recs]
        out[t] = {"n": len(recs), "prompt": percentiles(p), "response": percentiles(s),
                  "over_256": sum(x > 256 for x in p), "over_128": sum(x > 128 for x in p)}  # fmt: skip
    return out


def train_steps(method: str, mp: str, steps: int, warmup: int, args) -> dict:
    """Per-step seconds and losses of `steps` optimizer steps after `warmup` untimed ones (same seed: same batches)."""
    cfg = compose(base_overrides(method, 1, args.max_train, 0, "greedy") + [f"trainer.mixed_precision={mp}"])
    torch.manual_seed(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # one process measures several precisions
    acc = Accelerator(mixed_precision=mp, cpu=True)
    b = build(cfg)
    data = load_data(cfg, b.task, b.tokenizer)
    g = torch.Generator().manual_seed(1)
    bs = int(cfg.trainer.batch_size)
    dl = DataLoader(data.train, batch_size=bs, shuffle=True, generator=g,
                    collate_fn=bucketed(b.task.collator(b.tokenizer), args.bucket))  # fmt: skip
    params = [p for p in b.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.trainer.lr), weight_decay=float(cfg.trainer.weight_decay))
    model, opt = acc.prepare(b.model, opt)
    model.train()
    secs, losses, tokens = [], [], []
    it = iter(dl)
    for i in range(warmup + steps):
        batch = next(it)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        acc.backward(loss)
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            secs.append(dt)
            losses.append(round(float(loss), 5))
            tokens.append(int(batch["attention_mask"].sum()))
        print(f"  {method} {mp} step {i + 1}/{warmup + steps}: {dt:.2f} s loss {float(loss):.4f}", flush=True)
    return {"method": method, "mixed_precision": mp, "batch_size": bs, "threads": torch.get_num_threads(), "secs": secs,
            "s_per_step_median": round(statistics.median(secs), 3), "s_per_step_mean": round(statistics.mean(secs), 3),
            "tokens_per_step_mean": round(statistics.mean(tokens), 1), "losses": losses}  # fmt: skip


def eval_cost(decoding: str, per_set: int, batch: int, args) -> dict:
    """Seconds per test example for one decoding (greedy, upstream; options: option likelihood in the label format;
    cloze: option likelihood in the cloze format), on the first `per_set` examples of every set (an untrained LoRA:
    the cost does not depend on the adapter's weights)."""
    # each decoding in its own protocol: greedy, upstream and options on the label format, cloze on the cloze format
    protocol = {"options": ["eval=options", "task.main_metric=acc_norm"], "cloze": CLOZE}.get(decoding, [])
    cfg = compose(base_overrides("lora", 1, 16, per_set, "greedy" if protocol else decoding, protocol))
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    b = build(cfg)
    data = load_data(cfg, b.task, b.tokenizer)
    collate = b.task.collator(b.tokenizer)
    loaders = {k: DataLoader(v, batch_size=batch, collate_fn=collate) for k, v in data.evals.items()}
    t0 = time.perf_counter()
    metrics = b.task.evaluate(b.model, loaders, acc).metrics
    dt = time.perf_counter() - t0
    n = sum(len(v) for v in data.evals.values())
    print(f"  eval {decoding}: {n} examples in {dt:.1f} s", flush=True)
    return {"decoding": decoding, "examples": n, "batch": batch, "seconds": round(dt, 1),
            "s_per_example": round(dt / n, 3), "threads": torch.get_num_threads(),
            "accuracy_untrained_lora": round(metrics.get("accuracy", metrics.get("acc_norm", 0.0)), 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "cost" / "commonsense_cost.json"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per (method, precision)")
    ap.add_argument("--curve-steps", type=int, default=40, help="steps of the fp32-vs-bf16 loss-curve comparison")
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--eval-per-set", type=int, default=4)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--methods", default="lora,moelora,talklora")
    ap.add_argument("--precisions", default="no,bf16", help="trainer.mixed_precision values to time")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: lengths,train,curve,eval")
    ap.add_argument(
        "--protocol", choices=("label", "cloze"), default="label", help="cloze: experiment=commonsense_cloze's"
    )
    ap.add_argument("--bucket", type=int, default=1, help="pad training batches to a multiple of this many tokens")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--decodings", default="greedy,upstream,options,cloze")
    args = ap.parse_args()
    if args.protocol == "cloze":
        PROTOCOL.extend(CLOZE)
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {"threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "protocol": args.protocol, "bucket": args.bucket, "argv": sys.argv[1:],
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count()}  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(out, indent=1) + "\n")

    if "lengths" not in skip:
        out["lengths"] = lengths(args)
        save()
    if "train" not in skip:
        out["train"] = [
            train_steps(m, mp, args.steps, args.warmup, args)
            for m in args.methods.split(",")
            for mp in args.precisions.split(",")
        ]
        save()
    if "curve" not in skip:
        runs = {mp: train_steps("talklora", mp, args.curve_steps, 0, args) for mp in ("no", "bf16")}
        out["curve"] = {mp: r["losses"] for mp, r in runs.items()}
        out["curve_s_per_step_last"] = {mp: round(statistics.median(_secs(r)[-10:]), 3) for mp, r in runs.items()}
        a, c = out["curve"]["no"], out["curve"]["bf16"]
        out["curve"]["max_abs_diff"] = round(max(abs(x - y) for x, y in zip(a, c)), 5)
        out["curve"]["mean_fp32_last10"] = round(statistics.mean(a[-10:]), 4)
        out["curve"]["mean_bf16_last10"] = round(statistics.mean(c[-10:]), 4)
        save()
    if "eval" not in skip:
        out["eval"] = [eval_cost(d, args.eval_per_set, args.eval_batch, args) for d in args.decodings.split(",")]
        save()
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "lengths"}, indent=1))


if __name__ == "__main__":
    main()
