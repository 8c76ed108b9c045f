"""Dry runs (`python -m talklora_exp -m <sweep> +dry_run=true`, or `python -m talklora_exp.sweep <sweep>`): Hydra
expands the sweep exactly as `-m` would; each job is composed, validated, and its budget solved against the model's
real layer shapes (a weightless meta-device model built from `model.arch`, so paper models need no download), and
its peak GPU memory estimated (`memory.py`). Nothing is trained or written. Only the CLI imports this module
(`cli.dry_run` runs one in-process)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .errors import UserError
from .models import meta_model


def describe_job(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Rank, adapter parameters and memory estimate of one job (or the one-line error it would stop with)."""
    from .budget import solve
    from .memory import estimate_memory
    from .methods import build_method, find_target_layers, method_config
    from .tasks import build_task
    from .validate import validate_config

    row: dict[str, Any] = {"overrides": [o for o in overrides if not o.startswith(("dry_run", "+dry_run"))]}
    try:
        validate_config(cfg)
        mcfg = method_config(cfg.method)
        task = build_task(cfg.task)
        model = meta_model(cfg, task)
        layers = find_target_layers(model, list(cfg.model.target_modules))
        method = build_method(mcfg)
        res = solve(method, layers, cfg.budget, mcfg.rank, mcfg.num_experts)
        row.update(task=task.name, method=mcfg.name, model=cfg.model.name, rank=res.rank,
                   adapter_params=res.actual_params, target=res.target_params)  # fmt: skip
        row["memory"] = estimate_memory(cfg, model, res.actual_params, task)
    except UserError as e:
        row["error"] = str(e)
    line = " ".join(row["overrides"]) or "(defaults)"
    if "error" in row:
        print(f"{line:<72} error: {row['error']}", flush=True)
    else:
        m = row["memory"]
        print(f"{line:<72} rank {row['rank']:>4}  adapter params {row['adapter_params']:>11,}  "
              f"est. GPU peak {m['total_gb']:.1f} GB ({'checkpointing' if m['checkpointing'] else 'no checkpointing'}; "
              f"{m['alt_total_gb']:.1f} GB {'without' if m['checkpointing'] else 'with'})", flush=True)  # fmt: skip
    return row


def print_summary(jobs: list[dict[str, Any]]) -> int:
    if not jobs:
        print("error: the sweep expands to no job (check glob() patterns and choice lists)")
        return 2
    bad = [j for j in jobs if "error" in j]
    print(f"{len(jobs)} jobs, {len(jobs) - len(bad)} OK" + (f", {len(bad)} would fail" if bad else ""))
    return 2 if bad else 0
