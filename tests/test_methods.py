"""TalkLoRA / MoELoRA math: hand-computed cases, special-case reductions, loop equivalence, parameter counts."""

import copy
import math

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from torch import nn

from talklora_exp.errors import UserError
from talklora_exp.methods import build_method, find_target_layers
from talklora_exp.methods.base import switch_balance_loss
from talklora_exp.methods.reference import swap_to_loop
from talklora_exp.tuners import TalkLoRAConfig
from talklora_exp.tuners.mixture import MixtureLayer

TALK = dict(name="talklora", rank=8, num_experts=4, alpha=16, dropout=0.0, scaling=False, share_b=True, talk="learned",
            expert_mixer=True, router_input="talked", top_k=None, balance_loss=0.0)  # fmt: skip
MOE = {**TALK, "name": "moelora", "share_b": False, "talk": "off", "expert_mixer": False, "router_input": "x"}


class Block(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, 4)
        self.up_proj = nn.Linear(d, 10)

    def forward(self, x):
        return self.q_proj(x).sum(-1) + self.v_proj(x).sum(-1) + self.up_proj(x).sum(-1)


class Tiny(nn.Module):
    def __init__(self, d=6, n=3):
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.classifier = nn.Linear(d, 2)

    def forward(self, x):
        return sum(b(x) for b in self.layers)


def inject(cfg: dict, model=None, targets=("q_proj", "v_proj", "up_proj")):
    torch.manual_seed(0)
    model = model or Tiny()
    method = build_method(OmegaConf.create(cfg))
    return method, method.inject(model, list(targets), ["classifier"], "raw")


def single(base: nn.Linear, config_cls=TalkLoRAConfig, **kw):
    """One nn.Linear under a mixture tuner: (the peft model, its layer's experts module)."""
    from peft import get_peft_model

    model = get_peft_model(nn.Sequential(base), config_cls(target_modules=["0"], **kw))
    return model, model.base_model.model[0].experts["default"]


def randomize(model):
    """B is zero at init (the adapter is a no-op); give every adapter tensor values so the math is exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_hand_computed_single_layer():
    """r=2, E=2, k=1: every quantity is a scalar per expert, so the output is checked by hand."""
    base = nn.Linear(2, 1, bias=False)
    base.weight.data = torch.tensor([[1.0, 0.0]])
    lyr, ex = single(base, r=2, num_experts=2, dropout=0.0, share_b=False)
    with torch.no_grad():
        ex.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # h = x
        ex.M.copy_(torch.tensor([[[2.0]], [[3.0]]]))  # M_1=2, M_2=3
        ex.T.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swap the experts
        ex.router.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # logit_1 = talked h_1 = h_2
        ex.B.copy_(torch.tensor([[1.0, 1.0]]))  # B_1 = B_2 = 1
    x = torch.tensor([[1.0, 2.0]])
    # h=(1,2); talked=(2,1); logits=(2,0); g=softmax; y = x_1 + g1*2*1 + g2*3*2
    g1 = math.exp(2) / (math.exp(2) + 1)
    expected = 1.0 + g1 * 2.0 + (1 - g1) * 6.0
    assert lyr(x).item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_talk_identity_keeps_t_at_the_identity():
    """talk=identity initialises T = I (learned from there): at init the router sees h itself, not the swap."""
    base = nn.Linear(2, 1, bias=False)
    base.weight.data = torch.tensor([[1.0, 0.0]])
    lyr, ex = single(base, r=2, num_experts=2, dropout=0.0, talk="identity", share_b=False)
    torch.testing.assert_close(ex.T.data, torch.eye(2))
    assert ex.T.requires_grad
    with torch.no_grad():
        ex.A.copy_(torch.eye(2))
        ex.M.copy_(torch.tensor([[[2.0]], [[3.0]]]))
        ex.router.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # logit_1 = h_1 (no swap)
        ex.B.copy_(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0]])
    # h=(1,2); talked=h; logits=(1,0); y = x_1 + g1*2*1 + g2*3*2
    g1 = math.exp(1) / (math.exp(1) + 1)
    assert lyr(x).item() == pytest.approx(1.0 + g1 * 2.0 + (1 - g1) * 6.0, rel=1e-6)


@pytest.mark.parametrize(
    "over",
    [{}, {"talk": "identity"}, {"router_input": "h"}, {"expert_mixer": False}, {"share_b": False}, {"top_k": 2},
     {"scaling": True}, {"num_experts": 2}, {"num_experts": 8}, MOE],
)  # fmt: skip
def test_vectorized_equals_per_expert_loop(over):
    """float64, so the only difference left is the summation order (the README's claim: ~1e-13)."""
    cfg = {**TALK, **over}
    _, model = inject(cfg)
    randomize(model)
    model = model.double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    fast = model(x)
    slow = swap_to_loop(model)(x)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [TALK, MOE], ids=["talklora", "moelora"])
def test_dropout_at_upstreams_three_places_equals_the_loop(cfg):
    """Training mode, dropout p=0.3: the same seed gives the same masks on x, on the gates and on the weighted sum in
    the vectorised layer and in the literal loop (upstream's order), so the outputs agree in float64. Dropping any of
    the three, or moving one, changes the masks and the output."""
    _, model = inject({**cfg, "dropout": 0.3})
    randomize(model)
    model = model.double().train()
    slow_model = swap_to_loop(copy.deepcopy(model)).train()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    torch.manual_seed(5)
    fast = model(x)
    torch.manual_seed(5)
    slow = slow_model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(fast, model.eval()(x))  # the dropout acted


def test_one_expert_moelora_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    _, moe = inject({**MOE, "num_experts": 1})
    randomize(moe)
    torch.manual_seed(0)
    base = Tiny()
    lora = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, mod in moe.base_model.model.named_modules():
            if isinstance(mod, MixtureLayer):
                pl = lora.base_model.model.get_submodule(name)
                pl.lora_A["default"].weight.copy_(mod.experts["default"].A)
                pl.lora_B["default"].weight.copy_(mod.experts["default"].B)
    moe.eval()
    lora.eval()
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(moe(x), lora(x))


def _yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"))


def test_real_talklora_config_with_communication_off_is_the_real_moelora():
    """conf/method/talklora.yaml with its four communication fields switched off is conf/method/moelora.yaml, field
    for field (rank, E, dropout, scaling, routing...), and builds the same layers: parameters and outputs agree."""
    talk, moe = _yaml("talklora"), _yaml("moelora")
    reduced = {**talk, "talk": "off", "expert_mixer": False, "share_b": False, "router_input": "x"}
    assert {k: v for k, v in reduced.items() if k != "name"} == {k: v for k, v in moe.items() if k != "name"}
    assert {k for k in talk if talk[k] != moe[k]} == {"name", "talk", "expert_mixer", "share_b", "router_input"}
    _, a = inject({**reduced, "dropout": 0.0})
    _, b = inject({**moe, "dropout": 0.0})
    randomize(a)
    renamed = {k.replace("talklora_", "moelora_"): v for k, v in a.state_dict().items()}  # each tuner's own prefix
    assert renamed.keys() == b.state_dict().keys()
    b.load_state_dict(renamed)
    a.eval()
    b.eval()
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(a(x), b(x))


def test_zero_b_is_a_noop_and_shapes():
    torch.manual_seed(0)
    ref = Tiny()
    _, model = inject(TALK, model=copy.deepcopy(ref))  # B is zero at init: the adapted model is the base model
    x = torch.randn(2, 5, 6)
    lyr = model.base_model.model.layers[0].q_proj.experts["default"]
    torch.testing.assert_close(model(x), ref(x))
    with torch.no_grad():
        next(iter(model.base_model.talklora_shared_B["default"].values())).fill_(0.1)
    assert not torch.allclose(model(x), ref(x))  # and the comparison can fail
    assert lyr.A.shape == (8, 6) and lyr.M.shape == (4, 2, 2) and lyr.T.shape == (4, 4)
    assert lyr.router.shape == (4, 8) and lyr.b_weight().shape == (6, 8) and "B" not in dict(lyr.named_parameters())


def test_b_shared_across_layers_per_projection_type():
    _, model = inject(TALK)
    blocks = model.base_model.model.layers
    q = [b.q_proj.experts["default"] for b in blocks]
    assert all(m.b_weight() is q[0].b_weight() for m in q)
    assert blocks[0].v_proj.experts["default"].b_weight() is not q[0].b_weight()
    store = model.base_model.talklora_shared_B["default"]
    assert len(store) == 3  # q, v, up
    # each shared tensor appears once in the state dict and gets gradient from every layer
    randomize(model)
    model(torch.randn(2, 6)).sum().backward()
    assert sum("talklora_shared_B" in k for k in model.state_dict()) == 3
    assert all(p.grad is not None for p in store.values())


def _layers(model):
    return find_target_layers(model, ["q_proj", "v_proj", "up_proj"])


@pytest.mark.parametrize(
    "cfg", [TALK, MOE, {**TALK, "share_b": False}, {**TALK, "router_input": "x"}, {**TALK, "talk": "off"}]
)
def test_param_count_formula_matches_modules(cfg):
    method, model = inject(cfg)
    actual = sum(p.numel() for n, p in model.named_parameters() if n in set(method.adapter_param_names(model)))
    assert method.param_count(_layers(Tiny()), cfg["rank"]) == actual


def test_param_count_hand_computed():
    # 3 blocks x (q: 6->6, v: 6->4, up: 6->10); r=8, E=4, k=2
    layers = _layers(Tiny())
    talk = build_method(OmegaConf.create(TALK)).param_count(layers, 8)
    per_layer = 8 * 6 + 4 * 2 * 2 + 4 * 4 + 4 * 8  # A + M + T + router(E x r)
    assert talk == 9 * per_layer + 8 * (6 + 4 + 10)  # shared B once per projection type
    moe = build_method(OmegaConf.create(MOE)).param_count(layers, 8)
    assert moe == 3 * ((8 * 6 + 4 * 6 + 8 * 6) + (8 * 6 + 4 * 6 + 8 * 4) + (8 * 6 + 4 * 6 + 8 * 10))
    lora = build_method(OmegaConf.create({"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0})).param_count(
        layers, 8
    )
    assert lora == 3 * 8 * ((6 + 6) + (6 + 4) + (6 + 10))


def test_only_adapters_and_head_train():
    method, model = inject(TALK)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = "base_model.model.classifier.modules_to_save.default."
    assert {head + "weight", head + "bias"} <= trainable
    assert not any("base_layer" in n or "original_module" in n for n in trainable)
    assert not any(n in trainable for n in ("base_model.model.layers.0.q_proj.weight",))


def test_bad_rank_and_unknown_targets():
    with pytest.raises(UserError, match="method.rank=6 is not divisible by method.num_experts=4"):
        inject({**TALK, "rank": 6})
    with pytest.raises(
        UserError, match=r"match no linear layer; this model's linear layer names: \['classifier', 'q_proj'"
    ):
        inject(TALK, targets=("query",))
    with pytest.raises(UserError, match=r"method.talk='sometimes'; allowed"):
        inject({**TALK, "talk": "sometimes"})


def test_balance_loss_is_switch_style():
    g = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    # f = (2/3, 1/3), P = (2/3, 1/3) -> E * sum f*P = 2 * (4/9 + 1/9)
    assert switch_balance_loss(g).item() == pytest.approx(2 * 5 / 9)
    # E * sum f P is not bounded below by 1: f = (1/3, 2/3), P = (1.7/3, 1.3/3) gives 2 * 4.3/9 = 0.956
    g = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert switch_balance_loss(g).item() == pytest.approx(2 * (1 / 3 * 1.7 / 3 + 2 / 3 * 1.3 / 3))
    # the trainer's aux loss: weight x mean over layers of E * sum f P, recomputed here from each layer's own input
    method, model = inject({**TALK, "balance_loss": 0.1})
    hooks = method.hooks(model)
    randomize(model)
    model.train()
    seen = {}
    for name, lyr_ in hooks.layers.items():
        lyr_.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))
    hooks.set_batch({})
    model(torch.randn(2, 5, 6))
    expect = []
    for name, lyr_ in hooks.layers.items():
        gg = lyr_.probs(seen[name]).reshape(-1, 4)
        f = nn.functional.one_hot(gg.argmax(-1), 4).float().mean(0)
        expect.append(4 * (f * gg.mean(0)).sum())
    aux = hooks.aux_loss()
    assert aux.item() == pytest.approx(0.1 * torch.stack(expect).mean().item(), rel=1e-5)
    assert hooks.aux_loss() is None  # consumed: never added twice


def test_save_load_roundtrip(tmp_path):
    method, model = inject(TALK)
    randomize(model)
    method.save(model, tmp_path / "adapter")
    _, fresh = inject(TALK)
    method.load(fresh, tmp_path / "adapter")
    x = torch.randn(2, 6)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(model(x), fresh(x))


def test_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    method, model = inject(TALK)
    method.save(model, tmp_path / "a")
    other, fresh = inject({**TALK, "rank": 4})
    with pytest.raises(UserError, match=r"adapter does not fit this model/method config \(shape mismatch for"):
        other.load(fresh, tmp_path / "a")
    moe_m, moe = inject(MOE)
    with pytest.raises(UserError, match=r"adapter does not fit this model/method config \(unknown tensors"):
        moe_m.load(moe, tmp_path / "a")
