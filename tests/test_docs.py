"""Every command the README and docs quote still works: training commands compose through Hydra and validate (a sweep
at its first combination), other entry points answer `--help`, `make` targets exist. Docs that drift from the code
fail here instead of in a reader's shell."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY = re.compile(r"(?:^|\s)(python(?:3)? -m talklora_exp[\w.]*|python(?:3)? scripts/\w+\.py|make \w[\w-]*)")


def quoted_commands(path: Path) -> list[str]:
    """Commands in fenced shell blocks (continuation lines joined, comments dropped) and in inline code spans."""
    cmds: list[str] = []
    prose: list[str] = []
    fence: str | None = None  # the open fence's info string
    block: list[str] = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            if fence is None:
                fence, block = line.strip()[3:], []
                continue
            if fence in ("", "bash", "sh", "console"):
                for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                    cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
                    if ENTRY.search(cmd):
                        cmds.append(cmd)
            fence = None
            continue
        (block if fence is not None else prose).append(line)
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        span = " ".join(span.split())
        if span.split()[0] in ("python", "python3", "make", "torchrun") and ENTRY.search(" " + span):
            cmds.append(span)
    return cmds


def _entry_args(cmd: str) -> tuple[str, list[str]]:
    """(entry point, its arguments): env assignments, torchrun's own flags and `time` are dropped."""
    words = [w for w in shlex.split(cmd) if not re.match(r"^[A-Z_]+=", w)]
    while words and words[0] in ("time", "nohup", "setsid"):
        words = words[1:]
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m") :]]
    if words[0] == "make":
        return "make", words[1:]
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


@cache
def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def _help_argv(entry: str) -> list[str]:
    return [sys.executable, str(ROOT / entry)] if entry.endswith(".py") else [sys.executable, "-m", entry]


@cache
def _help_codes() -> dict[str, int]:
    """`--help` exit code of every non-training entry point quoted, run in parallel (each pays a torch import)."""
    from concurrent.futures import ThreadPoolExecutor

    entries = sorted({e for e, a in (_entry_args(c) for _, c in ALL) if e not in ("make", "talklora_exp")}
                     | {"talklora_exp"})  # fmt: skip
    run = lambda e: subprocess.run([*_help_argv(e), "--help"], capture_output=True, timeout=300).returncode  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(entries, pool.map(run, entries)))


def _first_job(args: list[str]) -> list[str]:
    """The overrides of a sweep's first job (Hydra's parser: a,b lists, range(), glob() over nested groups)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from talklora_exp.cli import expand_group_globs

    out = []
    for o in OverridesParser.create().parse_overrides(expand_group_globs([a for a in args if a != "-m"])):
        text = o.input_line
        if o.is_sweep_override():
            text = f"{text.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}"
        out.append(text)
    return out


@cache
def _hydra() -> None:
    """Hydra initialised once for every composition here (compose_cfg re-initialises per call)."""
    from conftest import CONF
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONF), version_base="1.3").__enter__()


def _compose(overrides: list[str]):
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        _hydra.cache_clear()
    _hydra()
    return compose(config_name="config", overrides=overrides)


ALL = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS if p.exists() for c in quoted_commands(p)]


def test_the_docs_quote_commands():
    assert len([c for p, c in ALL if p == "README.md"]) >= 8 and len({p for p, _ in ALL}) >= 3


@pytest.mark.parametrize("where,cmd", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_quoted_command_works(where: str, cmd: str):
    from talklora_exp.cli import check_group_overrides
    from talklora_exp.methods import method_config
    from talklora_exp.validate import validate_config

    entry, args = _entry_args(cmd)
    if entry == "make":
        assert args and args[0] in _make_targets(), f"{where}: `{cmd}`: no such make target"
    elif entry == "talklora_exp" and not any(a.startswith("--") for a in args):
        job = _first_job(args)
        assert check_group_overrides(job) is None, f"{where}: `{cmd}`: {check_group_overrides(job)}"
        cfg = _compose(job)
        validate_config(cfg)
        method_config(cfg.method)
    else:
        assert _help_codes()[entry] == 0, f"{where}: `{cmd}`: `{entry} --help` failed"


def test_choices_page_is_generated_from_the_code():
    """docs/choices.md lists the same closed sets validation uses (one definition: talklora_exp.choices and the
    method configs' `choices`); a new or changed choice must regenerate it."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "choices_doc.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    text = (ROOT / "docs" / "choices.md").read_text()
    assert "| `trainer.select` | `val_from_train`, `best_dev`, `last` | all |" in text
    assert "| `method.talk` | `learned`, `identity`, `off` | `moelora`, `talklora` |" in text


def test_the_quickstart_numbers_the_docs_quote_are_the_presets():
    """README and docs/tables.md describe `make run` by its subsample and learning rate: they must be the preset's."""
    from omegaconf import OmegaConf

    t = OmegaConf.load(ROOT / "conf" / "experiment" / "quickstart.yaml").trainer
    row = next(x for x in (ROOT / "docs" / "tables.md").read_text().splitlines() if x.startswith("| `quickstart`"))
    n, lr = re.search(r"over a (\d+)-example subsample, lr ([\d.e-]+)", row).groups()
    assert int(n) == t.max_train_samples and float(lr) == t.lr
    assert f"a stated {t.max_train_samples}-example subsample" in (ROOT / "README.md").read_text()
