"""What the CLI checks before Hydra starts, with Hydra's own override parser: only what Hydra does not do itself.
Hydra's errors span many lines (these are one); it composes a sweep job's config only when it reaches the job,
possibly hours in (these check every job first); its glob sees only a group's direct options (the task group nests
glue/*, commonsense/*); and it would fail with a traceback on a run dir it cannot create (too long a name, a
read-only mount). `cli.main` calls these."""

from __future__ import annotations

import difflib
import os
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
