"""Parameter budgets: pick each method's rank (a multiple of its expert count) closest to a target count."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .choices import BUDGET_TYPES
from .errors import UserError
from .methods.base import Method, TargetLayer
from .methods.lora import lora_params


@dataclass
class BudgetResult:
    name: str
    rank: int
    target_params: int | None
    actual_params: int
    rel_error: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_params(bcfg: Any, layers: list[TargetLayer]) -> int | None:
    """The adapter-parameter target of a budget preset (None for budget=none)."""
    kind = bcfg.type
    if kind == "none":
        return None
    if kind == "relative":
        return lora_params(layers, int(bcfg.lora_rank))  # LoRA at that rank on the same targets
    if kind == "absolute":
        return int(bcfg.params)
    raise UserError(f"budget.type={kind!r}; allowed: {list(BUDGET_TYPES)}")


def solve(method: Method, layers: list[TargetLayer], bcfg: Any, given_rank: int, num_experts: int = 1) -> BudgetResult:
    """Closest rank (multiple of num_experts) to the budget; a clear error when nothing is within tolerance."""
    target = target_params(bcfg, layers)
    if not method.adapts:  # no adapter: no budget to meet (the rank stays the unused method.rank)
        return BudgetResult(bcfg.name, given_rank, None, 0, None)
    if target is None:
        return BudgetResult(bcfg.name, given_rank, None, method.param_count(layers, given_rank), None)
    if target <= 0:
        raise UserError(f"budget {bcfg.name}: target of {target} parameters must be positive")
    best: tuple[float, int, int] | None = None
    rank = num_experts
    while True:
        n = method.param_count(layers, rank)
        err = abs(n - target) / target
        if best is None or err < best[0]:
            best = (err, rank, n)
        if n > target:
            break
        rank += num_experts
    err, rank, n = best
    tol = float(bcfg.get("tolerance", 0.15))
    if err > tol:
        raise UserError(
            f"budget {bcfg.name}: no rank (multiple of {num_experts}) of method {method.cfg.name} lands within "
            f"{tol:.0%} of {target} adapter params (closest: rank {rank} -> {n}, off by {err:.1%}); "
            f"change budget.tolerance, the budget, or method.num_experts"
        )
    return BudgetResult(bcfg.name, rank, target, n, err)
