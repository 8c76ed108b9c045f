"""Worker of `scripts/bench.py --engines` (run under torchrun --nproc_per_node 2): the same MiniLM + method as the
adapter bench, one train step timed under DDP and under FSDP2 (talklora_exp.engines.shard), interleaved; prints, on
rank 0, one JSON line: per-strategy median step seconds and this process's parameter + optimizer-state bytes."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import base_model, build, make_batch  # noqa: E402

from talklora_exp import engines  # noqa: E402


def local_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters (this process's shards) + optimizer state held by this process."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if engines.is_sharded(t) else t
        return t.numel() * t.element_size()

    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    return sum(nbytes(p) for p in model.parameters()) + state


def main() -> None:
    method, rank, experts, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    me = dist.get_rank()
    base = base_model()
    batch = make_batch(16, 64, torch.device("cpu"))
    batch = {k: v[me * 8 : (me + 1) * 8] for k, v in batch.items()}  # global batch 16 = 2 x 8
    variants = {}
    for strategy in ("ddp", "fsdp"):
        model = build(method, rank, experts, base).train()
        if strategy == "fsdp":
            engines.shard(model, "fsdp", 2)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        variants[strategy] = (model, opt)
    times = {k: [] for k in variants}
    for i in range(steps + 2):
        for k, (model, opt) in variants.items():
            dist.barrier()
            t = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    out = {k: {"step_s": statistics.median(v), "bytes": local_bytes(*variants[k])} for k, v in times.items()}
    if me == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
