"""Dry runs (`python -m talklora_exp -m <sweep> +dry_run=true`, or `python -m talklora_exp.sweep <sweep>`): Hydra
expands the sweep exactly as `-m` would; each job is composed, validated, and its budget solved against the model's
real layer shapes (a weightless meta-device model built from `model.arch`, so paper models need no download), and
its peak GPU memory estimated (`memory.py`). Nothing is trained or written."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .errors import UserError

_MODELS: dict[str, Any] = {}


def arch_config(mcfg: Any, cache_dir: str | None, num_labels: int | None = None) -> Any:
    """The model's transformers config: `model.arch` when given (published configs of the paper models), else the
    config of the local/package model, else the hub's."""
    from transformers import AutoConfig

    from .models import _source

    arch = mcfg.get("arch")
    if arch:
        d = {k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v) for k, v in dict(arch).items()}
        conf = AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        path, kw = _source(mcfg, cache_dir)
        try:
            conf = AutoConfig.from_pretrained(path, **kw, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(
                f"model {mcfg.name!r}: architecture unknown offline ({str(e).splitlines()[0][:120]}); add model.arch"
            ) from None
    for key in ("num_layers",):  # shape-model depth override
        if mcfg.get(key):
            conf.num_hidden_layers = int(mcfg[key])
    if num_labels is not None:
        conf.num_labels = num_labels
    return conf


def meta_model(cfg: DictConfig, task: Any) -> Any:
    """A weightless (meta-device) model of the configured architecture; cached per model, depth and task kind."""
    key = f"{cfg.model.name}:{cfg.model.get('num_layers')}:{task.kind}:{task.num_labels}"
    if key not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        conf = arch_config(cfg.model, cfg.paths.cache_dir, None if task.kind == "causal" else task.num_labels)
        with torch.device("meta"):
            cls = AutoModelForCausalLM if task.kind == "causal" else AutoModelForSequenceClassification
            _MODELS[key] = cls.from_config(conf)
    return _MODELS[key]


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


def dry_run(argv: list[str]) -> tuple[list[dict[str, Any]], int]:
    """In-process `python -m talklora_exp -m <argv> +dry_run=true`: (job rows, exit code). Used by the tests, which
    dry-run every preset without paying a Python start per preset."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from . import cli

    saved = sys.argv
    cli.DRY_RUN_JOBS.clear()
    GlobalHydra.instance().clear()
    sys.argv = [saved[0], "-m", *[a for a in argv if a != "-m"], "+dry_run=true"]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return list(cli.DRY_RUN_JOBS), code
