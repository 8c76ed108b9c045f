"""Hydra entry point: `python -m talklora_exp <overrides>` (add `-m` for sweeps, `+dry_run=true` to list a sweep's jobs
with their ranks, adapter parameters and memory estimates without training). The overrides are checked first
(`preflight.py`: one-line errors for what Hydra would report in many lines, or only when a sweep reaches a job)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .preflight import (
    CONF_DIR,
    GROUPS,
    check_dir_names,
    check_dirs_writable,
    check_group_overrides,
    check_override_keys,
    expand_group_globs,
    group_options,
)

__all__ = ["CONF_DIR", "GROUPS", "check_group_overrides", "check_override_keys", "dry_run", "expand_group_globs",
           "group_options", "main"]  # fmt: skip


def _spread_over_gpus(hc: Any) -> None:
    """Local parallel sweeps (joblib) on a multi-GPU box: job i uses GPU i mod n. Distributed launches set their own."""
    if "LOCAL_RANK" in os.environ or hc.mode.name != "MULTIRUN":
        return
    import torch

    n = torch.cuda.device_count()
    if n > 1:
        torch.cuda.set_device(int(hc.job.num) % n)


def _is_dry_run(argv: list[str]) -> bool:
    return any(a.lstrip("+") in ("dry_run=true", "dry_run=True") for a in argv)


def _dry_run_argv(argv: list[str], out: str) -> list[str]:
    """Hydra's own sweep expansion, minus everything a dry run must not do: no launcher (basic, in-process), no output
    dirs or log files in the project (a temp dir), no .hydra/ subdir."""
    keep = [
        a
        for a in argv
        if not a.startswith(("hydra/launcher=", "hydra.launcher.", "hydra.sweep.dir=", "hydra.run.dir="))
    ]
    return keep + [f"hydra.sweep.dir={out}", f"hydra.run.dir={out}", "hydra.output_subdir=null", "hydra/launcher=basic",
                   "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]  # fmt: skip


DRY_RUN_JOBS: list[dict[str, Any]] = []


def main() -> None:
    argv = sys.argv[1:]
    err = check_group_overrides(argv) or check_override_keys(argv) or check_dir_names(argv) or check_dirs_writable(argv)
    argv = expand_group_globs(argv)
    if err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    dry = _is_dry_run(argv)
    tmp = tempfile.mkdtemp(prefix="talklora_dry_run_") if dry else None
    sys.argv = [sys.argv[0], *(_dry_run_argv(argv, tmp) if dry else argv)]
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .errors import UserError
    from .identity import ConfigMismatch

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.types import RunMode

        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        if cfg.get("dry_run"):
            from .dryrun import describe_job

            DRY_RUN_JOBS.append(describe_job(cfg, hc.overrides.task))
            return None
        from .run import run

        logging.getLogger("talklora_exp").setLevel(logging.INFO)
        _spread_over_gpus(hc)

        def record_hydra(run_dir: Path) -> None:  # what hydra.output_subdir=.hydra would write, written once ours
            from omegaconf import OmegaConf

            from .rundir import atomic_write_text

            d = run_dir / ".hydra"
            atomic_write_text(d / "config.yaml", OmegaConf.to_yaml(cfg))
            atomic_write_text(d / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
            atomic_write_text(d / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))

        try:
            metrics = run(cfg, Path(hc.runtime.output_dir), on_claim=record_hydra)
        except ConfigMismatch as e:  # a decision for the user, not a job failure: stop the whole sweep
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (UserError, FloatingPointError) as e:  # OSError (disk full, read-only) arrives as a UserError
            print(f"error: {e}", file=sys.stderr)
            if multirun:  # keep sweeping; the run dir says "failed" and the tables list it
                return None
            sys.exit(2 if isinstance(e, UserError) else 3)
        except KeyboardInterrupt as e:
            print(f"interrupted: {e or 'KeyboardInterrupt'}", file=sys.stderr)
            sys.exit(130)

        if metrics is None:
            return None
        return metrics["eval"].get(metrics["main_metric"])  # for Hydra sweepers (e.g. Optuna)

    try:
        _main()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if dry:
        from .dryrun import print_summary

        sys.exit(print_summary(DRY_RUN_JOBS))


def dry_run(argv: list[str]) -> tuple[list[dict[str, Any]], int]:
    """In-process `python -m talklora_exp -m <argv> +dry_run=true`: (job rows, exit code). Used by the tests, which
    dry-run every preset without paying a Python start per preset."""
    import sys

    from hydra.core.global_hydra import GlobalHydra

    saved = sys.argv
    DRY_RUN_JOBS.clear()
    GlobalHydra.instance().clear()
    sys.argv = [saved[0], "-m", *[a for a in argv if a != "-m"], "+dry_run=true"]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return list(DRY_RUN_JOBS), code
