"""Read run directories into flat records. Failed, interrupted or partial runs, and runs whose config differs from
the rest of their table cell (another config hash), are kept apart and listed in left_out.md, never averaged in."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..identity import group_hash
from ..record import record_problem


@dataclass
class Run:
    dir: Path
    metrics: dict[str, Any]
    routing: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    of: Run | None = None  # the commonsense/all run this per-set view was cut from (`expand_multi_task`)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """A table cell: (task family, task, method, budget, model); seeds are averaged within it."""
        m = self.metrics
        return (
            m.get("task_family", "?"),
            m.get("task", "?"),
            m.get("method", "?"),
            m.get("budget", {}).get("name", "?"),
            m.get("model", "?"),
        )

    @cached_property
    def config(self) -> dict[str, Any]:
        """The run's flat resolved config (identity.json "config"), read once; {} for runs without one."""
        p = self.dir / "identity.json"
        return json.loads(p.read_text()).get("config", {}) if p.exists() else {}  # checked by collect's _read_run

    @property
    def group(self) -> str | None:
        """The cell's config without the seed: recomputed from identity.json under today's identity rules, so a key
        that has since stopped counting (identity.NOT_RESULTS) does not split a cell; metrics.json's hash otherwise."""
        return group_hash(self.config) if self.config else self.metrics.get("group_hash")

    @property
    def main_value(self) -> float | None:
        return self.metrics.get("eval", {}).get(self.metrics.get("main_metric", ""))

    @property
    def protocol(self) -> str:
        """How the reported checkpoint was chosen (runs written before selection was recorded: best_dev)."""
        sel = self.metrics.get("selection") or {}
        if not sel:
            return "best_dev"
        return f"{sel.get('protocol')}" + (f" ({sel.get('split')} {sel.get('metric')})" if sel.get("split") else "")


def collect(dirs: list[Path], one_config: bool = True) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs, and (dir, reason) for every run dir that is not completed or does not fit its cell.
    `one_config=False` keeps every config of a cell (a hyper-parameter grid compares them)."""
    done: list[Run] = []
    bad: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for root in dirs:
        for marker in sorted([*Path(root).rglob("config.yaml"), *Path(root).rglob("metrics.json")]):
            d = marker.parent
            if d in seen or d.name == ".hydra":
                continue
            seen.add(d)
            mp = d / "metrics.json"
            if not mp.exists():
                bad.append((d, "no metrics.json (running, killed or crashed)"))
                continue
            try:
                m = json.loads(mp.read_text())
            except json.JSONDecodeError as e:
                bad.append((d, f"unreadable metrics.json ({e.msg})"))
                continue
            if not isinstance(m, dict) or m.get("status") != "completed":
                status = m.get("status") if isinstance(m, dict) else None
                bad.append((d, f"status={status}: {m.get('error', '') if isinstance(m, dict) else ''}".strip()))
                continue
            problem = record_problem(m)
            if problem is None:
                try:
                    run = _read_run(d, m)
                except (OSError, ValueError, AttributeError) as e:  # a side file that is not what it claims
                    problem = f"unreadable side file ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            if problem is not None:
                bad.append((d, f"malformed completed record: {problem}"))
                continue
            done.append(run)
    done, mixed = one_config_per_cell(done) if one_config else (done, [])
    return expand_multi_task(done), bad + mixed


def _read_run(d: Path, m: dict[str, Any]) -> Run:
    from ..rundir import read_jsonl

    rp, lp = d / "routing.json", d / "train_log.jsonl"
    routing = json.loads(rp.read_text()) if rp.exists() else None
    if routing is not None and not isinstance(routing, dict):
        raise ValueError("routing.json is not an object")
    if routing is not None and not routing.get("layers"):
        routing = None  # nothing was recorded (e.g. an evaluation where no token's mask lined up): no routing row
    run = Run(d, m, routing, read_jsonl(lp) if lp.exists() else [])
    if not isinstance(run.config, dict):
        raise ValueError("identity.json's config is not an object")
    return run


def one_config_per_cell(runs: list[Run]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Within a cell, keep the runs of the most common config (group hash: the config without the seed); the others
    ran a different config (an edited preset, another lr) and must not be averaged with them."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[r.key].append(r)
    keep, out = [], []
    for _key, rs in sorted(cells.items()):
        counts = Counter(r.group for r in rs)
        top = max(sorted(counts, key=str), key=lambda h: counts[h])
        for r in sorted(rs, key=lambda r: str(r.dir)):
            if r.group == top:
                keep.append(r)
            else:
                out.append((r.dir, f"config differs from the {counts[top]} other run(s) of its cell "
                                   f"(group hash {r.group} vs {top})"))  # fmt: skip
    return keep, out


def expand_multi_task(runs: list[Run]) -> list[Run]:
    """A `commonsense/all` run reports `<task>/<metric>` per eval set: one virtual run per task for the tables, with
    every metric of that set (`accuracy` from generation; `acc`, `acc_norm` from option scoring) and the run's main
    metric."""
    out: list[Run] = []
    for r in runs:
        main = r.metrics.get("main_metric", "accuracy")
        per: dict[str, dict[str, float]] = {}
        for k, v in r.metrics.get("eval", {}).items():
            if "/" in k:
                per.setdefault(k.split("/")[0], {})[k.split("/", 1)[1]] = v
        per = {t: m for t, m in per.items() if main in m}
        if r.metrics.get("task") != "all" or not per:
            out.append(r)
            continue
        for t, m in sorted(per.items()):
            out.append(Run(r.dir / t, {**r.metrics, "task": t, "eval": m, "main_metric": main}, r.routing, r.log, of=r))
    return out


def with_metric(runs: list[Run], metric: str) -> list[Run]:
    """The same runs read by another reported metric (e.g. `acc` beside the headline `acc_norm`); runs that do not
    report it are left out."""
    return [Run(r.dir, {**r.metrics, "main_metric": metric}, r.routing, r.log, of=r.of)
            for r in runs if metric in r.metrics.get("eval", {})]  # fmt: skip


def whole_runs(runs: list[Run]) -> list[Run]:
    """Undo `expand_multi_task`: each run once, as it was recorded (curves and routing are per run, not per set)."""
    out: list[Run] = []
    seen: set[Path] = set()
    for r in runs:
        whole = r.of or r
        if whole.dir not in seen:
            seen.add(whole.dir)
            out.append(whole)
    return out
