import pytest
from omegaconf import OmegaConf
from test_methods import MOE, TALK

from talklora_exp import budget
from talklora_exp.errors import UserError
from talklora_exp.methods import TargetLayer, build_method

# MiniLM query,value: 6 blocks x 2 layers of 384 -> 384
LAYERS = [
    TargetLayer(f"bert.encoder.layer.{i}.attention.self.{t}", 384, 384) for i in range(6) for t in ("query", "value")
]
LORA = {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0}


def B(**kw):
    return OmegaConf.create({"name": "b", "tolerance": 0.15, **kw})


def test_lora_r8_relative_budget_is_exact_for_lora():
    res = budget.solve(build_method(OmegaConf.create(LORA)), LAYERS, B(type="relative", lora_rank=8), 99, 1)
    assert res.target_params == 12 * 8 * 768 and res.rank == 8 and res.rel_error == 0.0


def test_mixtures_pick_closest_multiple_of_e():
    target = 12 * 16 * 768
    for cfg in (TALK, MOE):
        m = build_method(OmegaConf.create(cfg))
        res = budget.solve(m, LAYERS, B(type="relative", lora_rank=16), 32, 4)
        assert res.rank % 4 == 0
        # no other multiple of 4 is closer
        others = [abs(m.param_count(LAYERS, r) - target) for r in range(4, 200, 4)]
        assert abs(res.actual_params - target) == min(others)
        assert res.actual_params == m.param_count(LAYERS, res.rank)
    # shared B means TalkLoRA affords a larger rank than MoELoRA at the same budget
    rt = budget.solve(build_method(OmegaConf.create(TALK)), LAYERS, B(type="relative", lora_rank=16), 32, 4).rank
    rm = budget.solve(build_method(OmegaConf.create(MOE)), LAYERS, B(type="relative", lora_rank=16), 32, 4).rank
    assert rt > rm


def test_none_keeps_rank_and_absolute_budget():
    m = build_method(OmegaConf.create(TALK))
    res = budget.solve(m, LAYERS, B(type="none"), 32, 4)
    assert res.rank == 32 and res.target_params is None
    res = budget.solve(m, LAYERS, B(type="absolute", params=100_000), 32, 4)
    assert abs(res.actual_params - 100_000) / 100_000 <= 0.15


def test_moelora_router_makes_lora_r8_infeasible_at_e4():
    """MoELoRA's router (d_in x E per layer) plus E=4 rank steps: r=4 is 25% under LoRA r=8, r=8 is 25% over."""
    with pytest.raises(UserError, match=r"closest: rank (4|8) -> \d+, off by 25.0%"):
        budget.solve(build_method(OmegaConf.create(MOE)), LAYERS, B(type="relative", lora_rank=8), 32, 4)


def test_impossible_budget_fails_clearly():
    m = build_method(OmegaConf.create({**TALK, "num_experts": 16}))
    with pytest.raises(
        UserError, match=r"budget b: no rank \(multiple of 16\) of method talklora lands within 1% of 500"
    ):
        budget.solve(m, LAYERS, B(type="absolute", params=500, tolerance=0.01), 32, 16)


def test_lora_alpha_left_out_follows_the_rank_the_budget_picks():
    """alpha omitted (or null) means 2 x the final rank, not 2 x whatever rank the config was first checked at."""
    from talklora_exp.methods import method_config

    for d in ({"name": "lora", "rank": 4}, {"name": "lora", "rank": 4, "alpha": None}):
        m = build_method(method_config(d))
        res = budget.solve(m, LAYERS, B(type="relative", lora_rank=16), m.cfg.rank, 1)
        m.cfg.rank = res.rank
        assert res.rank == 16 and m.resolved() == {"alpha": 32.0}
