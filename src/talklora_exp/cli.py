"""Hydra entry point: `python -m talklora_exp <overrides>` (add `-m` for sweeps)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONF_DIR = Path(os.environ.get("TALKLORA_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
GROUPS = ("model", "method", "task", "budget", "trainer", "logger", "paths", "experiment")


def group_options(group: str) -> list[str]:
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def check_group_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown config-group choice (Hydra's own message spans many lines)."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS or value in ("", "null"):
            continue
        valid = group_options(key)
        for v in value.split(","):
            if v not in valid:
                return f"unknown {key} {v!r}; valid: {', '.join(valid)}"
    return None


def check_override_keys(argv: list[str]) -> str | None:
    """One clear line for `a.b=value` where a.b is not in the composed config (Hydra's message spans many lines)."""
    plain = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~", "hydra.", "hydra/"))]
    keys = [a.split("=", 1)[0] for a in plain if a.split("=", 1)[0] not in GROUPS + ("eval",)]
    if not keys:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    groups = [f"{k}={v.split(',')[0]}" for k, _, v in (a.partition("=") for a in plain) if k in GROUPS + ("eval",)]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=groups)
    GlobalHydra.instance().clear()
    for k in keys:
        if OmegaConf.select(cfg, k, default="__missing__", throw_on_missing=False) == "__missing__":
            parent, _, leaf = k.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            have = sorted(node.keys()) if OmegaConf.is_dict(node) else []
            return (
                f"unknown override key {k!r}"
                + (f"; {parent or 'the root'} has: {', '.join(map(str, have))}" if have else "")
                + f" (use +{k}=... to add a new key)"
            )
    return None


def _spread_over_gpus(hc) -> None:
    """Local parallel sweeps (joblib) on a multi-GPU box: job i uses GPU i mod n. Distributed launches set their own."""
    if "LOCAL_RANK" in os.environ or hc.mode.name != "MULTIRUN":
        return
    import torch

    n = torch.cuda.device_count()
    if n > 1:
        torch.cuda.set_device(int(hc.job.num) % n)


def main() -> None:
    err = check_group_overrides(sys.argv[1:]) or check_override_keys(sys.argv[1:])
    if err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .errors import UserError

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.types import RunMode

        from .run import run

        logging.getLogger("talklora_exp").setLevel(logging.INFO)
        hc = HydraConfig.get()
        _spread_over_gpus(hc)
        try:
            metrics = run(cfg, Path(hc.runtime.output_dir))
        except (UserError, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)
            if hc.mode == RunMode.MULTIRUN:  # keep sweeping; the run dir says "failed" and the tables list it
                return None
            sys.exit(2 if isinstance(e, UserError) else 3)
        except KeyboardInterrupt as e:
            print(f"interrupted: {e or 'KeyboardInterrupt'}", file=sys.stderr)
            sys.exit(130)

        if metrics is None:
            return None
        return metrics["eval"].get(metrics["main_metric"])  # for Hydra sweepers (e.g. Optuna)

    _main()
