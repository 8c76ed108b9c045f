"""One training run from a composed config: build everything, train, write the run-directory contract."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch.utils.data import DataLoader

from . import budget as budget_mod
from . import checkpoint as ckpt
from . import engines
from .errors import UserError
from .heads import fit_cosine_head
from .identity import IDENTITY_FILE, identity, mismatch_error, read_identity, same_config
from .methods import build_method, find_target_layers, method_config
from .models import load_model, load_tokenizer
from .record import DIGEST_KEY, RunRecord, edited, record_digest
from .rundir import (
    RunDirBusy,
    RunDirLock,
    RunLogger,
    atomic_write_json,
    atomic_write_text,
    is_fresh,
    read_jsonl,
    read_status,
)
from .tasks import build_task
from .trainer import Trainer, resolve_mixed_precision
from .validate import validate_config

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


def set_resolved(cfg: DictConfig, key: str, value: Any) -> None:
    """Write a value decided at build time (the budget's rank, LoRA's alpha) into the run's config."""
    with read_write(cfg), open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)


@dataclass
class Built:
    """What `build` returns: everything a run (or a re-evaluation) needs before data and training."""

    task: Any
    tokenizer: Any
    model: torch.nn.Module  # the peft model: adapters injected, heads as modules_to_save
    method: Any
    budget: budget_mod.BudgetResult
    layers: list  # the adapted layers (TargetLayer)


def build(cfg: DictConfig) -> Built:
    """Task, tokenizer, model with adapters injected (rank from the budget), method and data."""
    validate_config(cfg)
    mcfg = method_config(cfg.method)
    task = build_task(cfg.task)
    task.set_pair_encoding(str(cfg.model.get("pair_encoding", "cross")))
    kind = "causal" if task.kind == "causal" else "encoder"
    if cfg.model.kind != kind:
        raise UserError(
            f"task {cfg.task.family}/{task.name} needs a model of kind {kind!r}, but model={cfg.model.name} is {cfg.model.kind!r}; "
            f"e.g. model={'smollm2-135m' if kind == 'causal' else 'minilm'}"
        )
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    set_seed(int(cfg.seed))
    model = load_model(cfg.model, task, cfg.paths.cache_dir, tok, cpu=bool(cfg.trainer.cpu))
    method = build_method(mcfg)
    targets = list(cfg.model.target_modules)
    layers = find_target_layers(model, targets)
    res = budget_mod.solve(method, layers, cfg.budget, mcfg.rank, mcfg.num_experts)
    mcfg.rank = res.rank
    set_resolved(cfg, "method.rank", res.rank)
    for key, value in method.resolved().items():
        set_resolved(cfg, f"method.{key}", value)
    heads = list(cfg.model.get("head_modules") or [])
    model = method.inject(model, targets, heads, task.kind)
    keep_heads_precise(model, heads, mcfg.adapter_dtype)
    if cfg.trainer.get("gradient_checkpointing"):
        # non-reentrant: works with frozen inputs and with every method's adapters (tested against no checkpointing)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    task.tokenizer, task.gen = tok, cfg.get("eval")
    return Built(task, tok, model, method, res, layers)


def keep_heads_precise(model: torch.nn.Module, heads: list[str], adapter_dtype: str) -> None:
    """Trained head modules (classifier, pooler) follow the adapters' precision on a half-precision base: cast to it,
    with their inputs cast on the way in (the base hands them bf16 activations)."""
    from .methods.base import DTYPES
    from .tuners.mixture import adapter_dtype_for

    floor = DTYPES[adapter_dtype]
    for name, mod in model.named_modules():
        if not any(name == h or name.endswith("." + h) for h in heads) or not any(True for _ in mod.parameters()):
            continue
        cur = next(mod.parameters()).dtype
        dt = adapter_dtype_for(cur, floor)
        if dt == cur:
            continue
        mod.to(dt)
        mod.register_forward_pre_hook(
            lambda m, args, dt=dt: tuple(a.to(dt) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )


def load_data(cfg: DictConfig, task: Any, tok: Any) -> Any:
    """The task's splits; the validation split is held out of train only when the protocol selects on it."""
    t = cfg.trainer
    val_size = int(cfg.task.get("val_size", 0) or 0) if t.select == "val_from_train" else 0
    return task.load(tok, cfg.paths.data_dir, int(cfg.model.max_length), t.max_train_samples, t.max_eval_samples,
                     val_size=val_size, val_seed=int(cfg.task.get("val_seed", 58)))  # fmt: skip


def device_name(acc: Accelerator) -> str:
    if acc.device.type == "cuda":
        return torch.cuda.get_device_name(acc.device)
    return acc.device.type


def _agree(acc: Accelerator, error: str | None) -> str | None:
    """Every process learns the main process's verdict (so no rank waits at a barrier the others never reach)."""
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    return error


def run(cfg: DictConfig, run_dir: Path, on_claim: Callable[[Path], None] | None = None) -> dict[str, Any] | None:
    """Train and evaluate one configuration into run_dir. Returns metrics (None when skipped as completed).
    `on_claim(run_dir)` runs once run_dir is proven to be this run's, before anything is written there (the CLI writes
    Hydra's record then)."""
    run_dir = Path(run_dir)
    validate_config(cfg)  # bad values stop here: nothing written, no lock taken
    method_config(cfg.method)
    ident = identity(cfg)
    tcfg = cfg.trainer
    mp = resolve_mixed_precision(str(tcfg.mixed_precision), bool(tcfg.cpu))
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=int(tcfg.grad_accum), cpu=bool(tcfg.cpu))
    main = acc.is_main_process
    lock = RunDirLock(run_dir)
    busy = None
    if main:
        try:
            lock.acquire()
        except RunDirBusy as e:
            busy = str(e)
        except OSError as e:  # a read-only or vanished run dir
            busy = f"{e.filename or run_dir}: {e.strerror or e}; the run dir must be writable (nothing was written)"
    busy = _agree(acc, busy)
    if busy:
        raise UserError(busy)
    try:
        return _run_locked(cfg, run_dir, ident, acc, mp, on_claim)
    except OSError as e:  # disk full, read-only or vanished run dir: one line; the last good checkpoint is kept
        where = e.filename or run_dir
        raise UserError(f"{where}: {e.strerror or e}; the run stopped (free space / fix permissions, then resume "
                        "with trainer.resume=auto)") from None  # fmt: skip
    finally:
        lock.release()


@contextlib.contextmanager
def _log_outside(run_dir: Path) -> Iterator[None]:
    """Log without writing into run_dir: Hydra's job log handler points into the run dir, and a message about a
    finished run (a sweep skipping it) must leave that run's committed files byte for byte as they were."""
    root, inside = logging.getLogger(), run_dir.resolve()
    held = [h for h in root.handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().is_relative_to(inside)]  # fmt: skip
    for h in held:
        root.removeHandler(h)
    try:
        yield
    finally:
        for h in held:
            root.addHandler(h)


def _run_locked(
    cfg: DictConfig, run_dir: Path, ident: dict, acc: Accelerator, mp: str, on_claim: Callable[[Path], None] | None
) -> RunRecord | None:
    """Prove run_dir is this run's, claim it, build, train, write the record (metrics.json last)."""
    tcfg, main = cfg.trainer, acc.is_main_process
    overwrite = bool(cfg.get("overwrite", False))
    stored = read_identity(run_dir)
    status = read_status(run_dir)
    if status == "completed" and not overwrite:
        return _skip_completed(run_dir, stored, ident)
    if tcfg.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    _check_ours(run_dir, stored, ident, overwrite)  # before anything in run_dir is read, deleted or rewritten
    if status == "corrupt" and not overwrite:  # this config's dir, but `[]` or a truncated file: never redone over
        raise UserError(f"{run_dir}/metrics.json is not a run record (a JSON object with a status); nothing in the run "
                        "dir was changed: look at it, move the dir aside, or rerun with overwrite=true")  # fmt: skip
    ckpt_root = run_dir / "checkpoints"
    resume_state = _find_resume(run_dir, stored, ident) if tcfg.get("resume") == "auto" and not overwrite else None
    if main:
        _claim(run_dir, ident, resume_state, on_claim)
    hashes = {"config_hash": ident["config_hash"], "group_hash": ident["group_hash"]}
    b, data = _build_and_load(cfg, acc, run_dir, hashes)
    cosine = str(cfg.model.get("pair_encoding", "cross")) == "cosine"
    head_fit = _fit_head(cfg, b, data, acc) if cosine and resume_state is None else None  # resumed: in the checkpoint
    base = _base_record(cfg, b, data, acc, hashes, head_fit)
    logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), enabled=main)
    if head_fit is not None:
        logger.log({"step": 0, "head_fit": head_fit})  # kept by a resume's log truncation (step 0)
    t_start = time.time()
    try:
        trainer = Trainer(tcfg, acc, b.model, b.task, data, b.task.collator(b.tokenizer), b.method.hooks(b.model),
                          logger, int(cfg.seed), ckpt_root, config_hash=ident["config_hash"])  # fmt: skip
        if resume_state is not None:
            log.info("resuming from %s (step %d)", ckpt_root, resume_state["loop"]["step"])
        result = trainer.fit(resume_state, eval_time_before=head_fit["seconds"] if head_fit else 0.0)
    except BaseException as e:
        if main:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            _write_status(run_dir, {"status": status, **base, "error": f"{type(e).__name__}: {e}"})
        logger.finish()
        raise
    acc.wait_for_everyone()
    metrics = _completed_record(base, result, resume_state, b.task, mp, acc, time.time() - t_start)
    metrics[DIGEST_KEY] = record_digest(metrics)  # type: ignore[typeddict-unknown-key]  # tells a later edit
    state = engines.full_state_dict(b.model)  # a sharded model's whole weights, gathered by every process
    if main:
        try:
            _write_results(run_dir, b, acc, result, metrics, state)
        except OSError as e:  # disk full, read-only: say so on disk where possible; nothing claims completion
            _write_status(run_dir, {"status": "failed", **base, "error": f"OSError: {e.strerror or e} ({e.filename})"})
            raise
    logger.finish({"eval": result.report})
    return metrics


def _completed_record(
    base: dict, result: Any, resume_state: dict | None, task: Any, mp: str, acc: Accelerator, wall_s: float
) -> RunRecord:
    """metrics.json of a completed run: what ran (`base`), what it reports and what it cost."""
    return {
        "status": "completed",
        **base,
        "resumed_from_step": resume_state["loop"]["step"] if resume_state else None,
        "report_split": task.report_split,
        "eval": result.report,
        "selection": result.selection,
        "val": result.val,
        "main_metric": task.main_metric,
        "best_step": result.selection["step"],
        "total_steps": result.total_steps,
        "report_evals": result.report_evals,
        "train_runtime_s": round(result.train_runtime_s, 3),
        "train_samples_per_s": round(result.train_samples / max(result.train_runtime_s, 1e-9), 3),
        "eval_runtime_s": round(result.eval_runtime_s, 3),  # with train_runtime_s: the run's compute, over resumes
        "wall_time_s": round(wall_s, 3),
        "mixed_precision": mp,
        "eval_counts": result.counts,
        "num_processes": acc.num_processes,
    }


def _skip_completed(run_dir: Path, stored: dict | None, ident: dict) -> None:
    """A completed run of this config is skipped (never redone, never touched); of another config, refused."""
    if not same_config(stored, ident):
        raise mismatch_error(run_dir, "it holds a completed run", stored, ident)
    record = json.loads((run_dir / "metrics.json").read_text())
    if edited(record):  # a hand-edited result is never passed off as this config's finished run
        raise UserError(f"{run_dir}/metrics.json was edited after the run finished ({DIGEST_KEY} does not match its "
                        "content); nothing was changed: restore it, or rerun with overwrite=true")  # fmt: skip
    with _log_outside(run_dir):
        log.info(
            "skip: %s already completed (same config hash %s; overwrite=true to redo)", run_dir, ident["config_hash"]
        )
    return None


def _find_resume(run_dir: Path, stored: dict | None, ident: dict) -> dict[str, Any] | None:
    """The latest usable checkpoint of this config in run_dir (trainer.resume=auto), or None to start fresh."""

    def ours(ck: Any) -> bool:  # this config's checkpoint, or the recorded run's when that record is this config
        recorded = stored is not None and ck == stored.get("config_hash") and same_config(stored, ident)
        return ck == ident["config_hash"] or recorded

    try:
        state = ckpt.load_latest(run_dir / "checkpoints", accept_hash=ours)
    except ckpt.ForeignCheckpoint:
        raise mismatch_error(run_dir, "its checkpoint is", stored, ident) from None
    except ckpt.NoUsableCheckpoint as e:
        raise UserError(f"{e}; rerun without trainer.resume=auto (or with overwrite=true) to start over") from None
    if state is not None and not ours(state.get("config_hash")):
        raise mismatch_error(run_dir, "its checkpoint is", stored, ident)
    return state


def _claim(run_dir: Path, ident: dict, resume_state: dict | None, on_claim: Callable[[Path], None] | None) -> None:
    """Make run_dir this run's (main process): results of an unfinished run go, its log is cut to the checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_claim is not None:
        on_claim(run_dir)
    for stale in ("metrics.json", "routing.json", "predictions.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)  # only reached for unfinished runs or overwrite=true
    _truncate_log(run_dir / "train_log.jsonl", resume_state["loop"]["step"] if resume_state else 0)
    if resume_state is None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    atomic_write_json(run_dir / IDENTITY_FILE, ident)


def _build_and_load(cfg: DictConfig, acc: Accelerator, run_dir: Path, hashes: dict) -> tuple[Built, Any]:
    """Model, method and data; a bad input is recorded as a failed run (nothing claims completion) and re-raised."""
    try:
        b = build(cfg)
        if acc.is_main_process:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return b, load_data(cfg, b.task, b.tokenizer)
    except UserError as e:
        if acc.is_main_process:  # sweeps and tables see why this run has no result
            _write_status(run_dir, {"status": "failed", **hashes, "error": f"UserError: {e}"})
        raise


def _fit_head(cfg: DictConfig, b: Built, data: Any, acc: Accelerator) -> dict[str, Any]:
    """The cosine pair encoding's head, fitted once on the training pairs before fine-tuning (LP-FT)."""
    t0, lengths = time.time(), data.train.lengths
    by_length = [data.train[i] for i in sorted(range(len(lengths)), key=lengths.__getitem__)]  # little padding
    loader = DataLoader(by_length, batch_size=int(cfg.trainer.eval_batch_size), collate_fn=b.task.collator(b.tokenizer))
    head_fit = fit_cosine_head(b.model.to(acc.device), loader, b.task.is_regression, acc.device)
    head_fit["seconds"] = round(time.time() - t0, 1)
    log.info("cosine head fitted on %d training pairs (LP-FT): %s", head_fit["n_train"], head_fit)
    return head_fit


def _base_record(
    cfg: DictConfig, b: Built, data: Any, acc: Accelerator, hashes: dict, head_fit: dict | None
) -> dict[str, Any]:
    """What ran, for metrics.json (every status); logs the run's header line."""
    task, bres, method = b.task, b.budget, b.method
    counts = count_params(b.model, set(method.adapter_param_names(b.model)))
    budget = (f"budget {bres.name}: {bres.target_params} target" if bres.target_params is not None
              else "no budget: method.rank")  # fmt: skip
    log.info(
        "%s | %s | %s | rank %d | adapter params %d (%s) | head %d | select %s | data %s",
        task.name, method.cfg.name, cfg.model.name, bres.rank, counts["adapter_params"], budget,
        counts["head_params"], cfg.trainer.select, data.info.get("source"),
    )  # fmt: skip
    base = {
        "task": task.name,
        "task_family": cfg.task.family,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        **hashes,
        "budget": bres.as_dict(),
        "rank": bres.rank,
        "num_experts": method.cfg.num_experts,
        "tag": cfg.get("tag"),
        **counts,
        "data": data.info,
        "device": device_name(acc),
        "tokenizer": getattr(b.tokenizer, "talklora_source", cfg.model.name),
        **({"head_fit": head_fit} if head_fit else {}),  # a resumed run's fit is its train_log's step-0 record
    }
    if cfg.model.get("shape_only"):
        base["shape_model"] = {"random_weights": True, "vocab_size": len(b.tokenizer),
                               "note": "random-weight paper-shape model, for benchmarks and memory checks: its metrics mean nothing"}  # fmt: skip
    return base


def _write_results(
    run_dir: Path, b: Built, acc: Accelerator, result: Any, metrics: RunRecord, state: dict | None = None
) -> None:
    """The adapter, predictions and routing, then metrics.json last: its presence with "completed" means done.
    `state`: the whole state dict of a sharded model (peft saves the adapter's part of it)."""
    b.method.save(acc.unwrap_model(b.model), run_dir / "adapter", state_dict=state)
    if result.predictions:
        rows = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions)
        atomic_write_text(run_dir / "predictions.jsonl", rows)
    if result.routing is not None:
        atomic_write_json(run_dir / "routing.json", {"step": result.selection["step"], **result.routing})
    atomic_write_json(run_dir / "metrics.json", metrics)
    log.info("%s", result_line(metrics, b.task.report_split, run_dir))


def result_line(metrics: dict[str, Any], split: str, run_dir: Path) -> str:
    """The one line a run ends with: the reported numbers, the step they come from and how it was chosen, where."""
    nums = ", ".join(f"{k}={v:.4f}" for k, v in (metrics.get("eval") or {}).items() if isinstance(v, (int, float)))
    sel = metrics.get("selection") or {}
    how = (f"selected on {sel['split']} {sel['metric']}={sel['value']:.4f}" if sel.get("metric") and sel.get("value")
           is not None else "the last step")  # fmt: skip
    return f"{split}: {nums} | step {sel.get('step')} of {metrics.get('total_steps')}, {how} | {run_dir}"


def _write_status(run_dir: Path, record: dict) -> None:
    """Record why a run stopped, if the disk lets us: the original error is the one to report, not this write's."""
    try:
        atomic_write_json(run_dir / "metrics.json", record)
    except OSError as e:
        log.warning("could not write %s/metrics.json (%s)", run_dir, e.strerror or e)


def _check_ours(run_dir: Path, stored: dict | None, ident: dict, overwrite: bool) -> None:
    """A run dir is cleaned up only when it is provably this run's: it records this config (identity.json), or holds
    nothing but what Hydra and the lock put there. `overwrite=true` also redoes a run dir of another config, but never
    a directory this code did not write (no identity.json): that could be anyone's data."""
    if is_fresh(run_dir) or (stored is not None and (overwrite or same_config(stored, ident))):
        return
    if stored is None:
        present = sorted(p.name for p in run_dir.iterdir())[:6]
        raise UserError(
            f"{run_dir} holds files this run did not write ({', '.join(present)}) and no {IDENTITY_FILE}; nothing was "
            "deleted: point hydra.run.dir / hydra.sweep.dir at a new or empty directory"
        )
    raise mismatch_error(run_dir, "it holds a run", stored, ident)


def _truncate_log(path: Path, keep_until: int) -> None:
    """Fresh runs start an empty log; resumed runs keep the records up to the checkpoint's step (a torn last line of
    a killed run is dropped with a warning)."""
    if not path.exists():
        return
    if keep_until <= 0:
        path.unlink()
        return
    keep = [r for r in read_jsonl(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= keep_until]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
