"""`python -m talklora_exp.evaluate RUN_DIR [overrides]`: reload a finished run's adapter and evaluate it again.

The run is rebuilt from its `config.yaml` (rank already resolved) and `adapter/`; overrides use Hydra's syntax:
`eval=upstream` (another decoding preset from conf/eval), `eval.num_beams=1`, `trainer.max_eval_samples=50`, and
`split=val` to score the held-out validation split instead of the reported one. A run dir is untrusted input: its
config never turns on `trust_remote_code` (pass `--trust-remote-code` to allow it) and only tensors are loaded. Results go to
`RUN_DIR/evaluate-<overrides>.json`; the run's own `metrics.json` is never touched.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict, read_write

from .errors import UserError

SPLITS = ("report", "val")


def _apply(cfg: Any, overrides: list[str]) -> str:
    """Apply Hydra-syntax overrides to a stored run config; returns the split to evaluate."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .cli import CONF_DIR, group_options

    split = "report"
    for o in OverridesParser.create().parse_overrides(overrides):
        key, value = o.key_or_group, o.value()
        if key == "split":
            split = {"test": "report", "dev": "report"}.get(str(value), str(value))
            if split not in SPLITS:
                raise UserError(f"split={value!r}; allowed: report (dev/test), val")
        elif key == "eval" and "." not in key:
            if value not in group_options("eval"):
                raise UserError(f"unknown eval {value!r}; valid: {', '.join(group_options('eval'))}")
            with read_write(cfg), open_dict(cfg):
                cfg.eval = OmegaConf.load(CONF_DIR / "eval" / f"{value}.yaml")
        else:
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not o.is_add():
                raise UserError(f"unknown override key {key!r} in the run's config (use +{key}=... to add one)")
            with read_write(cfg), open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.resolve(cfg)
    return split


def _load_adapter(method: Any, model: Any, adapter_dir: Path) -> Any:
    """The run's adapter into the rebuilt model; a deleted, truncated or foreign adapter file is one line."""
    if not any(adapter_dir.glob("*.safetensors")):
        raise UserError(f"{adapter_dir}: no adapter weights (*.safetensors); rerun the run to get one")
    try:
        return method.load(model, adapter_dir)
    except UserError:
        raise
    except Exception as e:  # safetensors' header/length errors, a config that is not JSON, ...
        raise UserError(
            f"{adapter_dir}: cannot load the adapter ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None


def load_run(run_dir: Path, overrides: list[str] | None = None, trust_remote_code: bool = False) -> LoadedRun:
    """A completed run dir's model rebuilt from its `config.yaml` (the same model source and conversion as training)
    with its `adapter/` loaded (a `method=none` run: the base model as it is), overrides applied."""
    from accelerate import Accelerator

    from .run import build
    from .rundir import read_status
    from .trainer import resolve_mixed_precision

    run_dir, overrides = Path(run_dir), list(overrides or [])
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (give a run dir: the folder holding metrics.json)")
    if read_status(run_dir) != "completed":
        raise UserError(f"{run_dir}: not a completed run (metrics.json status is {read_status(run_dir)!r})")
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
    except Exception as e:  # missing, unreadable, not YAML
        raise UserError(
            f"{run_dir}/config.yaml: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    if (
        not OmegaConf.is_dict(cfg)
        or not OmegaConf.is_dict(cfg.get("model"))
        or not OmegaConf.is_dict(cfg.get("method"))
    ):
        raise UserError(f"{run_dir}/config.yaml is not a run config (no model/method sections)")
    zero_shot = cfg.method.get("name") == "none"  # the base model as it is: no adapter to load
    if not zero_shot and not (run_dir / "adapter").is_dir():
        raise UserError(f"{run_dir}/adapter not found (adapters are not committed with result files; rerun to get one)")
    with read_write(cfg), open_dict(cfg):
        cfg.budget = {"name": "none", "type": "none"}  # the rank is already resolved in config.yaml
        # a run dir is untrusted input: its config never turns on remote code; only this command's flag does
        if cfg.model.get("trust_remote_code") is True and not trust_remote_code:
            raise UserError(f"{run_dir}/config.yaml sets model.trust_remote_code=true; evaluate runs no code from a "
                            "run dir unless you pass --trust-remote-code")  # fmt: skip
        cfg.model.trust_remote_code = bool(trust_remote_code)
    split = _apply(cfg, overrides)
    tcfg = cfg.trainer
    acc = Accelerator(
        mixed_precision=resolve_mixed_precision(str(tcfg.mixed_precision), bool(tcfg.cpu)), cpu=bool(tcfg.cpu)
    )
    b = build(cfg)
    model = b.model if zero_shot else _load_adapter(b.method, b.model, run_dir / "adapter")
    return LoadedRun(run_dir, cfg, acc, b, model, split)


@dataclass
class LoadedRun:
    """What `load_run` gives back: the run's config (overrides applied), accelerator, built parts and loaded model."""

    run_dir: Path
    cfg: Any
    acc: Any
    built: Any  # run.Built
    model: Any
    split: str


def evaluate_run(
    run_dir: Path, overrides: list[str] | None = None, trust_remote_code: bool = False
) -> tuple[dict[str, float], Path]:
    """(metrics, path written). The run must be completed and keep its adapter/."""
    from torch.utils.data import DataLoader

    from .run import load_data
    from .rundir import atomic_write_json

    overrides = list(overrides or [])
    r = load_run(run_dir, overrides, trust_remote_code)
    cfg, acc, b, split, run_dir = r.cfg, r.acc, r.built, r.split, r.run_dir
    tcfg = cfg.trainer
    data = load_data(cfg, b.task, b.tokenizer)
    splits = data.evals if split == "report" else data.val_evals
    if not splits:
        raise UserError(f"{run_dir}: the run has no {split} split (trainer.select={tcfg.select})")
    collate = b.task.collator(b.tokenizer)
    model = acc.prepare(r.model)
    loaders = {k: acc.prepare(DataLoader(v, batch_size=int(tcfg.eval_batch_size), shuffle=False, collate_fn=collate))
               for k, v in splits.items()}  # fmt: skip
    hooks = b.method.hooks(model)
    metrics = b.task.evaluate(model, loaders, acc, on_batch=hooks.set_batch).metrics
    name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", ",".join(overrides)) or "default"
    out = run_dir / f"evaluate-{name}.json"
    if acc.is_main_process:
        atomic_write_json(out, {"run_dir": str(run_dir), "overrides": overrides, "split": split, "eval": metrics,
                                "config_hash": json.loads((run_dir / "metrics.json").read_text()).get("config_hash")})  # fmt: skip
    return metrics, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    trust = "--trust-remote-code" in argv
    argv = [a for a in argv if a != "--trust-remote-code"]
    try:
        metrics, out = evaluate_run(Path(argv[0]), argv[1:], trust_remote_code=trust)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
