"""Hydra entry point: `python -m talklora_exp <overrides>` (add `-m` for sweeps, `+dry_run=true` to list a sweep's jobs
with their ranks, adapter parameters and memory estimates without training).

The checks before Hydra starts (`check_*`, `expand_group_globs`) parse the overrides with Hydra's own parser and do only
what Hydra does not: answer in one line (Hydra's errors span many), check every job of a sweep before the first one
runs (Hydra composes a job's config only when it reaches it, possibly hours in), glob nested config groups, and refuse
run dirs Hydra itself could not create (name too long, read-only)."""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CONF_DIR = Path(os.environ.get("TALKLORA_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
GROUPS = ("model", "method", "task", "budget", "trainer", "eval", "logger", "paths", "experiment")


def group_options(group: str) -> list[str]:
    """The choices Hydra offers for a config group (every yaml under conf/<group>)."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _parse(argv: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])


def _choices(o: Any, options: list[str]) -> list[str]:
    """The values a group override selects, as Hydra would expand them (glob(), a,b lists, single values)."""
    if o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
        return o.value().filter(options)
    if o.is_sweep_override():
        return list(o.sweep_string_iterator())
    v = o.value()
    return [] if v is None else [str(v)]


def expand_group_globs(argv: list[str]) -> list[str]:
    """`task=glob(glue/m*)` -> `task=glue/mnli,glue/mrpc`. Hydra's glob sees only a group's direct options, and the
    task group nests its options (glue/*, commonsense/*), so Hydra alone would expand it to nothing; the pattern is
    still Hydra's own Glob, matched against every option the group offers."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for arg in argv:
        if arg.startswith("-") or "glob(" not in arg:
            out.append(arg)
            continue
        o = parser.parse_override(arg)
        if o.key_or_group in GROUPS and o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
            picked = o.value().filter(group_options(o.key_or_group))
            out.append(f"{arg.split('=', 1)[0]}={','.join(picked)}" if picked else arg)
        else:
            out.append(arg)
    return out


def check_group_overrides(argv: list[str]) -> str | None:
    """One clear line for an unknown config-group choice (Hydra's own message spans many lines). Parsed by Hydra's
    override parser, so glob(), choice lists and ranges mean what they mean to Hydra."""
    from hydra.errors import HydraException

    try:
        overrides = _parse(argv)
    except HydraException as e:
        return f"cannot parse overrides: {str(e).splitlines()[0]}"
    for o in overrides:
        if o.key_or_group not in GROUPS or o.is_delete():
            continue
        valid = group_options(o.key_or_group)
        picked = _choices(o, valid)
        if o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP" and not picked:
            return f"{o.input_line} matches no option; valid: {', '.join(valid)}"
        for v in picked:
            if v not in valid and v != "null":
                return f"unknown {o.key_or_group} {v!r}; valid: {', '.join(valid)}"
    return None


def check_override_keys(argv: list[str]) -> str | None:
    """One clear line for `a.b=value` where a.b is not in the composed config (Hydra's message spans many lines)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = _parse(argv)
    plain = [o for o in overrides if o.type.name == "CHANGE" and o.key_or_group not in GROUPS
             and not o.key_or_group.startswith(("hydra.", "hydra/"))]  # fmt: skip
    if not plain:
        return None
    groups = []
    for o in overrides:
        if o.key_or_group in GROUPS and o.type.name == "CHANGE":
            picked = _choices(o, group_options(o.key_or_group))
            if picked:
                groups.append(f"{o.key_or_group}={picked[0]}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=groups)
    GlobalHydra.instance().clear()
    for o in plain:
        k = o.key_or_group
        if OmegaConf.select(cfg, k, default="__missing__", throw_on_missing=False) == "__missing__":
            parent, _, leaf = k.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            have = sorted(map(str, node.keys())) if OmegaConf.is_dict(node) else []
            near = difflib.get_close_matches(leaf, have, n=3, cutoff=0.6)
            return (
                f"unknown override key {k!r}"
                + (f"; did you mean {' or '.join(f'{parent}.{n}'.lstrip('.') for n in near)}?" if near else "")
                + (f" ({parent or 'the root'} has: {', '.join(have)})" if have else "")
                + f" (use +{k}=... to add a new key)"
            )
    return None


# conf/hydra/default.yaml's override_dirname.exclude_keys: these never reach a sweep job's dir name
_DIRNAME_EXCLUDED = ("hydra.", "hydra/", "experiment", "overwrite", "trainer.progress", "trainer.resume",
                     "trainer.num_workers", "dry_run", "paths.")  # fmt: skip
NAME_MAX = 255  # bytes per path component on Linux filesystems


def check_dirs_writable(argv: list[str]) -> str | None:
    """One line instead of Hydra's logging traceback when a given run/sweep dir cannot be written (a read-only mount):
    Hydra opens its job log there before any of this project's code runs."""
    try:
        overrides = _parse(argv)
    except Exception:
        return None
    for o in overrides:
        if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and "${" not in str(o.value()):
            p = Path(str(o.value())).expanduser().absolute()
            while not p.exists() and p != p.parent:
                p = p.parent
            if p.exists() and not os.access(p, os.W_OK):
                why = "a read-only file system" if _read_only(p) else "no write permission"
                return f"{o.key_or_group}={o.value()}: {p} cannot be written ({why}); nothing was written"
    return None


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_dir_names(argv: list[str]) -> str | None:
    """One line instead of Hydra's traceback when a sweep job's dir name (its overrides joined, Hydra's
    override_dirname) or a given run/sweep dir would have a path component longer than the filesystem allows."""
    try:
        overrides = _parse(argv)
    except Exception:
        return None  # check_group_overrides reports parse errors
    items = []
    for o in overrides:
        k = o.key_or_group
        if k in ("hydra.run.dir", "hydra.sweep.dir"):
            for part in str(o.value()).split("/"):
                if len(part.encode()) > NAME_MAX:
                    return (
                        f"{k}: the path component {part[:40]!r}... is {len(part.encode())} bytes (at most {NAME_MAX})"
                    )
        elif not k.startswith(_DIRNAME_EXCLUDED):
            try:
                vals = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
            except Exception:  # a glob or an interval: its values are config-group names or numbers, short
                vals = [""]
            items.append(f"{o.get_key_element()}={max(vals, key=len)}")
    if not any(a in ("-m", "--multirun") for a in argv) or any(
        o.key_or_group == "hydra.sweep.subdir" for o in overrides
    ):
        items = []  # a single run's dir is hydra.run.dir; a given sweep subdir replaces the overrides' joined name
    longest = max((len(p.encode()) for p in ",".join(sorted(items)).split("/")), default=0)
    if longest > NAME_MAX:
        return (f"a sweep job's dir name (its overrides joined) would be {longest} bytes, more than the {NAME_MAX} a file "
                "name may have; shorten the values, or put long settings in an experiment config")  # fmt: skip
    return None


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
