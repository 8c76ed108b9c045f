"""One training run from a composed config: build everything, train, write the run-directory contract."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from . import budget as budget_mod
from . import checkpoint as ckpt
from .errors import UserError
from .methods import build_method, find_target_layers
from .models import load_model, load_tokenizer
from .rundir import RunLogger, atomic_write_json, read_status
from .tasks import build_task
from .trainer import Trainer, resolve_mixed_precision

log = logging.getLogger("talklora_exp")


def count_params(model: torch.nn.Module, adapter_names: set[str]) -> dict[str, int]:
    """Adapter, task-head and total parameters, reported separately (budgets count adapters only)."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapter = sum(v for n, v in trainable.items() if n in adapter_names)
    return {
        "trainable_params": sum(trainable.values()),
        "adapter_params": adapter,
        "head_params": sum(trainable.values()) - adapter,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def build(cfg: DictConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Task, tokenizer, model with adapters injected (rank from the budget), method and data."""
    for key, val in (("model.max_length", cfg.model.max_length), ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if int(val) <= 0:
            raise UserError(f"{key}={val} must be a positive integer")
    task = build_task(cfg.task)
    kind = "causal" if task.kind == "causal" else "encoder"
    if cfg.model.kind != kind:
        raise UserError(
            f"task {cfg.task.family}/{task.name} needs a model of kind {kind!r}, but model={cfg.model.name} is {cfg.model.kind!r}; "
            f"e.g. model={'smollm2-135m' if kind == 'causal' else 'minilm'}"
        )
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    set_seed(int(cfg.seed))
    model = load_model(cfg.model, task, cfg.paths.cache_dir, tok)
    method = build_method(cfg.method)
    targets = list(cfg.model.target_modules)
    layers = find_target_layers(model, targets)
    res = budget_mod.solve(method, layers, cfg.budget, int(cfg.method.rank), int(cfg.method.get("num_experts", 1) or 1))
    with _unlocked(cfg):
        cfg.method.rank = res.rank
    model = method.inject(model, targets, list(cfg.model.get("head_modules") or []), task.kind)
    task.tokenizer, task.gen = tok, cfg.get("eval")
    return {"task": task, "tokenizer": tok, "model": model, "method": method, "budget": res, "layers": layers}


class _unlocked:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        self.ro = OmegaConf.is_readonly(self.cfg)
        self.st = OmegaConf.is_struct(self.cfg)
        OmegaConf.set_readonly(self.cfg, False)
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *a):
        OmegaConf.set_readonly(self.cfg, self.ro)
        OmegaConf.set_struct(self.cfg, self.st)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train and evaluate one configuration into run_dir. Returns metrics (None when skipped as completed)."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status == "completed" and not cfg.get("overwrite", False):
        log.info("skip: %s already completed (overwrite=true to redo)", run_dir)
        return None
    tcfg = cfg.trainer
    mp = resolve_mixed_precision(str(tcfg.mixed_precision), bool(tcfg.cpu))
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=int(tcfg.grad_accum), cpu=bool(tcfg.cpu))
    main = acc.is_main_process
    if tcfg.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    ckpt_root = run_dir / "checkpoints"
    resume_state = None
    if tcfg.get("resume") not in (None, "auto"):
        raise UserError(f"trainer.resume={tcfg.resume!r}; allowed: null, auto")
    if tcfg.get("resume") == "auto":
        resume_state = ckpt.load_latest(ckpt_root)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "routing.json", "predictions.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)  # only reached for unfinished runs or overwrite=true
        _truncate_log(run_dir / "train_log.jsonl", resume_state["loop"]["step"] if resume_state else 0)
        if resume_state is None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    try:
        b = build(cfg, acc)
        task, tok, model, method, bres = b["task"], b["tokenizer"], b["model"], b["method"], b["budget"]
        if main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        data = task.load(
            tok, cfg.paths.data_dir, int(cfg.model.max_length), tcfg.max_train_samples, tcfg.max_eval_samples
        )
    except UserError as e:
        if main:  # nothing claims completion; sweeps and tables see why this run has no result
            atomic_write_json(run_dir / "metrics.json", {"status": "failed", "error": f"UserError: {e}"})
        raise
    resolved = OmegaConf.to_container(cfg, resolve=True)
    counts = count_params(model, set(method.adapter_param_names(model)))
    log.info(
        "%s | %s | %s | rank %d | adapter params %d (budget %s: target %s) | head %d | data %s",
        task.name, method.cfg.name, cfg.model.name, bres.rank, counts["adapter_params"], bres.name,
        bres.target_params, counts["head_params"], data.info.get("source"),
    )  # fmt: skip
    logger = RunLogger(run_dir, cfg.logger, resolved, enabled=main)
    base = {
        "task": task.name,
        "task_family": cfg.task.family,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "budget": bres.as_dict(),
        "rank": bres.rank,
        "num_experts": int(cfg.method.get("num_experts", 1) or 1),
        "tag": cfg.get("tag"),
        **counts,
        "data": data.info,
    }
    t_start = time.time()
    try:
        trainer = Trainer(
            tcfg, acc, model, task, data, task.collator(tok), method.hooks(model), logger, int(cfg.seed), ckpt_root
        )
        if resume_state is not None:
            log.info("resuming from %s/latest (step %d)", ckpt_root, resume_state["loop"]["step"])
        result = trainer.fit(resume_state)
    except BaseException as e:
        if main:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            atomic_write_json(run_dir / "metrics.json", {"status": status, **base, "error": f"{type(e).__name__}: {e}"})
        logger.finish()
        raise
    acc.wait_for_everyone()
    metrics = {
        "status": "completed",
        **base,
        "resumed_from_step": resume_state["loop"]["step"] if resume_state else None,
        "eval": result.best_eval,
        "final_eval": result.final_eval,
        "main_metric": task.main_metric,
        "best_step": result.best_step,
        "total_steps": result.total_steps,
        "train_runtime_s": round(result.train_runtime_s, 3),
        "train_samples_per_s": round(result.train_samples / max(result.train_runtime_s, 1e-9), 3),
        "wall_time_s": round(time.time() - t_start, 3),
        "mixed_precision": mp,
        "eval_counts": getattr(task, "last_eval_counts", None),
        "num_processes": acc.num_processes,
    }
    if main:
        method.save(acc.unwrap_model(model), run_dir / "adapter")
        if result.best_predictions:
            with open(run_dir / "predictions.jsonl", "w") as f:
                for row in result.best_predictions:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if result.best_routing is not None:
            atomic_write_json(run_dir / "routing.json", {"step": result.best_step, **result.best_routing})
        atomic_write_json(run_dir / "metrics.json", metrics)  # last: its presence with "completed" means done
    logger.finish({"eval": result.best_eval})
    return metrics


def _truncate_log(path: Path, keep_until: int) -> None:
    """Fresh runs start an empty log; resumed runs keep the records up to the checkpoint's step."""
    if not path.exists():
        return
    if keep_until <= 0:
        path.unlink()
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_until
    ]
    path.write_text("".join(line + "\n" for line in keep))


def reevaluate(run_dir: Path) -> dict[str, float]:
    """Rebuild a finished run from its config.yaml and adapter/ and evaluate it again (no training)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    with _unlocked(cfg):
        cfg.budget = {"name": "none", "type": "none"}  # the rank is already resolved in config.yaml
    tcfg = cfg.trainer
    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(str(tcfg.mixed_precision), bool(tcfg.cpu)), cpu=bool(tcfg.cpu)
    )
    b = build(cfg, acc)
    model = b["method"].load(b["model"], run_dir / "adapter")
    data = b["task"].load(b["tokenizer"], cfg.paths.data_dir, int(cfg.model.max_length), 1, tcfg.max_eval_samples)
    from torch.utils.data import DataLoader

    collate = b["task"].collator(b["tokenizer"])
    model = acc.prepare(model)
    loaders = {
        k: acc.prepare(DataLoader(v, batch_size=int(tcfg.eval_batch_size), shuffle=False, collate_fn=collate))
        for k, v in data.evals.items()
    }
    hooks = b["method"].hooks(model)
    return b["task"].evaluate(model, loaders, acc, on_batch=hooks.set_batch)
