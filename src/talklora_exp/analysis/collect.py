"""Read run directories into flat records; failed, interrupted or partial runs are kept apart, never averaged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    dir: Path
    metrics: dict[str, Any]
    routing: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        m = self.metrics
        return (
            m.get("task_family", "?"),
            m.get("task", "?"),
            m.get("method", "?"),
            m.get("budget", {}).get("name", "?"),
            m.get("model", "?"),
        )

    @property
    def main_value(self) -> float | None:
        return self.metrics.get("eval", {}).get(self.metrics.get("main_metric", ""))


def collect(dirs: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs, and (dir, reason) for every run dir that is not completed."""
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
            if m.get("status") != "completed":
                bad.append((d, f"status={m.get('status')}: {m.get('error', '')}".strip()))
                continue
            rp = d / "routing.json"
            lp = d / "train_log.jsonl"
            done.append(
                Run(
                    d,
                    m,
                    json.loads(rp.read_text()) if rp.exists() else None,
                    [json.loads(x) for x in lp.read_text().splitlines() if x.strip()] if lp.exists() else [],
                )
            )
    return expand_multi_task(done), bad


def expand_multi_task(runs: list[Run]) -> list[Run]:
    """A `commonsense/all` run reports `<task>/accuracy` per eval set: one virtual run per task for the tables."""
    out: list[Run] = []
    for r in runs:
        per = {k.split("/")[0]: v for k, v in r.metrics.get("eval", {}).items() if k.endswith("/accuracy")}
        if r.metrics.get("task") != "all" or not per:
            out.append(r)
            continue
        for t, v in sorted(per.items()):
            out.append(
                Run(
                    r.dir / t,
                    {**r.metrics, "task": t, "eval": {"accuracy": v}, "main_metric": "accuracy"},
                    r.routing,
                    r.log,
                )
            )
    return out
