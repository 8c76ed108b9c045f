"""Dry-run a sweep preset: `python -m talklora_exp.sweep experiment=glue_table [overrides]`.

Expands `hydra.sweeper.params` into jobs, composes each one, and solves each job's budget against the model's real
layer shapes (the model is built on the meta device from its config: no weights, no training). Prints one line per
job with the rank it would train at, and fails on the first job that would fail.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from .cli import CONF_DIR
from .errors import UserError


def _compose(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def grid(overrides: list[str]) -> list[list[str]]:
    """Every job of the sweep: the cartesian product of hydra.sweeper.params (command-line sweeps included)."""
    fixed = [o for o in overrides if "," not in o.partition("=")[2]]
    swept = {o.partition("=")[0]: o.partition("=")[2].split(",") for o in overrides if "," in o.partition("=")[2]}
    cfg = _compose(fixed, hydra_cfg=True)
    params = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    params.update(swept)
    keys = sorted(params)
    return [
        fixed + [f"{k}={v.strip()}" for k, v in zip(keys, combo)]
        for combo in itertools.product(*(params[k] for k in keys))
    ]


_SHAPES: dict[str, Any] = {}


def layer_shapes(cfg: DictConfig, task: Any) -> list:
    """Target layers of the model, from a meta-device model built from its config (cached per model and targets)."""
    key = f"{cfg.model.name}:{list(cfg.model.target_modules)}:{task.kind}"
    if key not in _SHAPES:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from .methods import find_target_layers
        from .models import _source

        path, kw = _source(cfg.model, cfg.paths.cache_dir)
        mcfg = AutoConfig.from_pretrained(path, **kw)
        if task.kind != "causal":
            mcfg.num_labels = task.num_labels
        with torch.device("meta"):
            model = (AutoModelForCausalLM if task.kind == "causal" else AutoModelForSequenceClassification).from_config(
                mcfg
            )
        _SHAPES[key] = find_target_layers(model, list(cfg.model.target_modules))
    return _SHAPES[key]


def dry_run(overrides: list[str], with_models: bool = True) -> list[dict[str, Any]]:
    from .budget import solve
    from .methods import build_method
    from .tasks import build_task

    jobs = []
    for job in grid(overrides):
        cfg = _compose(job)
        task = build_task(cfg.task)
        method = build_method(cfg.method)
        row: dict[str, Any] = {
            "overrides": job[len(overrides) :] or job,
            "task": task.name,
            "method": cfg.method.name,
            "model": cfg.model.name,
        }
        if with_models:
            layers = layer_shapes(cfg, task)
            res = solve(method, layers, cfg.budget, int(cfg.method.rank), int(cfg.method.get("num_experts", 1) or 1))
            row.update(rank=res.rank, adapter_params=res.actual_params, target=res.target_params)
        jobs.append(row)
    GlobalHydra.instance().clear()
    return jobs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    offline_models = "--no-models" not in argv
    overrides = [a for a in argv if a != "--no-models"]
    try:
        jobs = dry_run(overrides, with_models=offline_models)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for j in jobs:
        extra = f"rank {j['rank']:>4}  adapter params {j['adapter_params']:>9}" if "rank" in j else ""
        print(f"{' '.join(j['overrides']):<70} {extra}")
    print(f"{len(jobs)} jobs OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
