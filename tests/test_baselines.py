"""TeamLoRA (upstream's form and the official flags), HiRA and DoRA: literal references on copied weights,
hand-computed cases, parameter formulas against the instantiated modules, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_methods import MOE, Tiny, _layers, inject, randomize, single
from torch import nn

from talklora_exp.methods import METHODS, build_method, method_config
from talklora_exp.methods.reference import swap_teamlora_to_loop
from talklora_exp.tuners import TeamLoRAConfig
from talklora_exp.tuners.mixture import MixtureLayer

TEAM = dict(name="teamlora", rank=8, num_experts=4, alpha=16.0, dropout=0.0)
HIRA = dict(name="hira", rank=4)
DORA = dict(name="dora", rank=4, alpha=8.0, dropout=0.0)


@pytest.mark.parametrize("over", [{}, {"scale_per_expert": True}, {"times_experts": True}, {"num_experts": 2}])
def test_teamlora_vectorized_equals_literal_loop(over):
    _, model = inject({**TEAM, **over})
    randomize(model)
    model = model.double().eval()  # float64: the renormalised gates divide by small sums; compare exactly
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    fast = model(x)
    torch.testing.assert_close(fast, swap_teamlora_to_loop(model)(x), rtol=1e-12, atol=1e-12)


def test_teamlora_init_is_upstreams():
    _, lyr = single(nn.Linear(6, 4), TeamLoRAConfig, r=8, num_experts=4, alpha=16.0)
    wi = lyr.interaction.data
    assert torch.equal(torch.diagonal(wi), torch.ones(4))
    off = wi[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() <= 0.1 and off.abs().sum() > 0
    assert torch.count_nonzero(lyr.B) == 0 and lyr.s == 16.0 / 8
    assert (
        single(nn.Linear(6, 4), TeamLoRAConfig, r=8, num_experts=4, alpha=16.0, scale_per_expert=True)[1].s == 16.0 / 2
    )


def test_teamlora_with_identity_interaction_is_moelora_scaled():
    """W_I = I and dropout off: p~ = p, so TeamLoRA = MoELoRA with scaling alpha / r on copied A, router and B."""
    _, team = inject(TEAM)
    _, moe = inject({**MOE, "scaling": True, "alpha": 16.0})
    randomize(team)
    with torch.no_grad():
        for t, m in zip(
            (m.experts["default"] for m in team.modules() if isinstance(m, MixtureLayer)),
            (m.experts["default"] for m in moe.modules() if isinstance(m, MixtureLayer)),
        ):
            t.interaction.copy_(torch.eye(4))
            m.A.copy_(t.A)
            m.router.copy_(t.router)
            m.B.copy_(t.B)
    team.eval()
    moe.eval()
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(team(x), moe(x))


def test_teamlora_hand_computed():
    """d_in = 2, r = 2, E = 2, k = 1, alpha = 2 (s = 1)."""
    base = nn.Linear(2, 1, bias=False)
    base.weight.data = torch.tensor([[0.0, 0.0]])
    lyr, ex = single(base, TeamLoRAConfig, r=2, num_experts=2, alpha=2.0, dropout=0.0)
    with torch.no_grad():
        ex.A.copy_(torch.eye(2))  # u = x
        ex.router.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # logits (x_1, 0)
        ex.interaction.copy_(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))  # q_1 = p_1 + p_2 / 2, q_2 = p_2
        ex.B.copy_(torch.tensor([[1.0, 10.0]]))
    x = torch.tensor([[1.0, 2.0]])
    p1 = math.exp(1) / (math.exp(1) + 1)
    q1, q2 = p1 + (1 - p1) / 2, 1 - p1
    expected = (q1 * 1.0 * 1.0 + q2 * 10.0 * 2.0) / (q1 + q2)
    assert lyr(x).item() == pytest.approx(expected, rel=1e-6)


def test_hira_zero_b_is_the_base_and_hand_computed():
    from peft import HiraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    ref = copy.deepcopy(base)
    lyr = get_peft_model(nn.Sequential(base), HiraConfig(r=2, target_modules=["0"]))
    x = torch.randn(4, 3)
    torch.testing.assert_close(lyr(x), ref(x))  # B = 0 at init: exactly the frozen layer
    layer = lyr.base_model.model[0]
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
        layer.hira_A["default"].copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
        layer.hira_B["default"].copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    # BA = [[1,0,1],[2,1,2]]; W0 o (1 + BA) = [[2,2,0],[0,-2,9]]; x = (1,1,1) -> (4, 7) + bias
    out = lyr(torch.ones(1, 3))
    torch.testing.assert_close(out, torch.tensor([[4.5, 6.5]]))


def test_dora_at_init_is_the_base_model():
    torch.manual_seed(0)
    ref = Tiny()

    method = build_method(method_config(DORA))
    model = method.inject(copy.deepcopy(ref), ["q_proj", "v_proj", "up_proj"], ["classifier"], "raw")
    model.eval()
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), ref(x))
    assert any("lora_magnitude_vector" in n for n in method.adapter_param_names(model))


@pytest.mark.parametrize("cfg", [TEAM, {**TEAM, "num_experts": 2}, HIRA, DORA])
def test_param_count_formula_matches_modules(cfg):
    method = build_method(method_config(cfg))
    torch.manual_seed(0)
    model = method.inject(Tiny(), ["q_proj", "v_proj", "up_proj"], ["classifier"], "raw")
    actual = sum(p.numel() for n, p in model.named_parameters() if n in set(method.adapter_param_names(model)))
    assert method.param_count(_layers(Tiny()), cfg["rank"]) == actual
    assert actual > 0


def test_param_counts_by_hand():
    layers = _layers(Tiny())  # 3 blocks x (q: 6->6, v: 6->4, up: 6->10)
    per_block_lora = 4 * ((6 + 6) + (6 + 4) + (6 + 10))
    assert build_method(method_config(HIRA)).param_count(layers, 4) == 3 * per_block_lora  # as LoRA
    assert build_method(method_config(DORA)).param_count(layers, 4) == 3 * (per_block_lora + 6 + 4 + 10)
    team = build_method(method_config(TEAM)).param_count(layers, 8)
    assert team == 3 * sum(8 * 6 + 8 * d + 4 * 6 + 16 for d in (6, 4, 10))


@pytest.mark.parametrize("name", ["teamlora", "hira", "dora"])
def test_save_load_roundtrip(tmp_path, name):
    cfg = {"teamlora": TEAM, "hira": HIRA, "dora": DORA}[name]
    method = build_method(method_config(cfg))
    torch.manual_seed(0)
    model = method.inject(Tiny(), ["q_proj", "v_proj", "up_proj"], ["classifier"], "raw")
    randomize(model)
    method.save(model, tmp_path / "a")
    torch.manual_seed(0)  # the same frozen base; the adapter values come from the file (fresh B is zero)
    fresh = method.inject(Tiny(), ["q_proj", "v_proj", "up_proj"], ["classifier"], "raw")
    method.load(fresh, tmp_path / "a")
    model.eval()
    fresh.eval()
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), fresh(x))


def test_registry_has_a_typed_config_and_a_yaml_per_method():
    from conftest import ROOT
    from omegaconf import OmegaConf

    for name in METHODS:
        cfg = method_config(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"))
        n = build_method(cfg).param_count(_layers(Tiny()), 8)
        assert cfg.name == name and (n == 0 if name == "none" else n > 0)  # none: the zero-shot row, no adapter
