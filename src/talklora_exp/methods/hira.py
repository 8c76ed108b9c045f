"""HiRA (Huang et al., ICLR 2025; the code base TalkLoRA forked) is peft's own `HiraConfig`: a Hadamard high-rank
update of the frozen weight, out = (W0 o (1 + B A)) x + b, A kaiming, B zero. Where is the HiRA forward? peft's
`peft/tuners/hira/layer.py`, `Linear.forward`. Same parameter count as LoRA at the same rank; no scaling (peft's layer
has none, and neither has the reference code)."""

from __future__ import annotations

from typing import Any

from .base import Method, TargetLayer


class HiRAMethod(Method):
    name = "hira"

    def param_count(self, layers: list[TargetLayer], rank: int) -> int:
        return sum(rank * (t.d_in + t.d_out) for t in layers)

    def peft_config(self, targets: list[str], head_modules: list[str], task_kind: str) -> Any:
        from peft import HiraConfig

        return HiraConfig(
            r=self.cfg.rank, hira_dropout=self.cfg.dropout, **self.common(targets, head_modules, task_kind)
        )
