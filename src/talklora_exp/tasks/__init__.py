"""Task registry: `task.family` in the config picks the class (no if-chains in the trainer)."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Task
from .generation import CommonsenseTask, Gsm8kTask
from .glue import GlueTask

TASK_FAMILIES: dict[str, type[Task]] = {"glue": GlueTask, "commonsense": CommonsenseTask, "gsm8k": Gsm8kTask}


def build_task(cfg: Any) -> Task:
    fam = cfg.get("family")
    if fam not in TASK_FAMILIES:
        raise UserError(f"task.family={fam!r} unknown; valid: {sorted(TASK_FAMILIES)}")
    return TASK_FAMILIES[fam](cfg)
