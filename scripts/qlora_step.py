"""One QLoRA step per mixture on a paper-shape model (random weights): every target projection replaced by a
bitsandbytes 4-bit NF4 `Linear4bit` holding the same weights, the method injected, one forward + backward + AdamW
step; peak memory and step time per method, and the loss finite. Used by `scripts/gpu_check.sh` (CUDA), and on CPU at
toy sizes by its dry mode. A check that the path runs, not a benchmark of record."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench import build, make_batch  # noqa: E402


def quantize_targets(model: torch.nn.Module, targets: list[str], device: torch.device) -> int:
    """Swap each target nn.Linear for a Linear4bit (NF4) with its weights; returns how many were swapped."""
    import bitsandbytes as bnb

    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=mod.weight.dtype, quant_type="nf4")  # fmt: skip
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            q = q.to(device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=None, help="a smaller hidden size (CPU dry run)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--methods", default="moelora,talklora,teamlora")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from talklora_exp.models import arch_config

    device = torch.device(args.device)
    mcfg = OmegaConf.load(ROOT / "conf" / "model" / "llama3-8b.yaml")
    conf = arch_config(mcfg, None)
    conf.num_hidden_layers, conf.vocab_size = args.num_layers, args.vocab_size
    if args.hidden:
        conf.hidden_size, conf.intermediate_size = args.hidden, 2 * args.hidden
        conf.num_attention_heads, conf.num_key_value_heads = 4, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    targets = list(mcfg.target_modules)
    batch = make_batch(args.batch, args.seq, device, vocab=(0, conf.vocab_size), causal=True)
    rows = []
    for m in args.methods.split(","):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(conf, dtype=dtype)
        swapped = quantize_targets(base, targets, device)
        model = build(m, 32, 4, base.to(device), targets=targets, heads=(), kind="causal").to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"method": m, "swapped_linear4bit": swapped, "loss": loss.item(), "finite": math.isfinite(loss.item()),
               "step_s": round(time.perf_counter() - t, 3),
               "peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if device.type == "cuda" else None}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, base, opt
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{'gpu_' if device.type == 'cuda' else ''}qlora_step.json"
    path.write_text(json.dumps({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                                "layers": args.num_layers, "batch": [args.batch, args.seq], "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    if not all(r["finite"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
