import math

import numpy as np
import pytest
import torch
from torch import nn

from talklora_exp.routing import RoutingRecorder, aggregate, balance_stats, summarize
from talklora_exp.tuners.mixture import Routed


def test_uniform_load():
    s = balance_stats(np.full(4, 0.25))
    assert s["load_entropy"] == pytest.approx(1.0) and s["cv"] == pytest.approx(0.0)
    assert s["max_min_ratio"] == pytest.approx(1.0) and s["gini"] == pytest.approx(0.0)


def test_collapsed_load():
    s = balance_stats(np.array([1.0, 0.0, 0.0, 0.0]))
    assert s["load_entropy"] == pytest.approx(0.0)
    assert s["cv"] == pytest.approx(math.sqrt(3))  # std([1,0,0,0]) = sqrt(3)/4, mean 1/4
    assert s["max_min_ratio"] is None  # an unused expert: infinite ratio, reported as null
    assert s["gini"] == pytest.approx(3 / 4)  # (E-1)/E


def test_hand_made_load():
    P = np.array([0.5, 0.3, 0.2])
    s = balance_stats(P)
    H = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    assert s["load_entropy"] == pytest.approx(H)
    assert s["max_min_ratio"] == pytest.approx(2.5)
    # mean abs difference over all ordered pairs: (0.2+0.3+0.1)*2/9; gini = that / (2*mean)
    assert s["gini"] == pytest.approx((1.2 / 9) / (2 / 3))


def test_summarize_and_aggregate():
    # two tokens: (1, 0) and (0.5, 0.5)
    out = summarize(np.array([1.5, 0.5]), np.array([2, 0]), ent_sum=math.log(2), sens_sum=0.4, n=2)
    assert out["load"] == pytest.approx([0.75, 0.25])
    assert out["token_entropy"] == pytest.approx(0.5)  # (0 + log2) / 2 / log2
    assert out["top1_share"] == pytest.approx(1.0) and out["sensitivity"] == pytest.approx(0.2)
    agg = aggregate({"a": out, "b": {**out, "sensitivity": 0.4}})
    assert agg["sensitivity"] == pytest.approx(0.3)


class FixedRouter(nn.Module, Routed):
    """Stand-in layer whose routing is a fixed distribution: sensitivity must be exactly 0."""

    def __init__(self, g):
        super().__init__()
        self.g = torch.tensor(g)
        self.init_taps()

    def probs(self, x):
        return self.g.expand(*x.shape[:-1], -1)


def test_recorder_skips_padding_and_constant_router_has_zero_sensitivity():
    lyr = FixedRouter([0.7, 0.2, 0.1])
    rec = RoutingRecorder({"fixed": lyr})
    x = torch.randn(2, 3, 5)
    g = lyr.probs(x).clone()
    g[1, 2] = torch.tensor([0.0, 0.0, 1.0])  # a padding token that must not count
    rec.set_mask(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    lyr.route(g, x)  # not active yet: not recorded
    rec.start()
    lyr.route(g, x)  # what a layer's forward does
    out = rec.stop()["layers"]["fixed"]
    assert out["tokens"] == 5 and out["load"] == pytest.approx([0.7, 0.2, 0.1])
    assert out["sensitivity"] == pytest.approx(0.0)


def test_recorder_counts_a_beam_searched_prompt_once_and_skips_decode_steps():
    """Beam search runs each prompt row once per beam (rows repeated in place): the statistics are the prompt's own,
    token count included; the one-token decode steps that follow do not line up with the mask and are skipped."""
    lyr = FixedRouter([0.5, 0.3, 0.2])
    x = torch.randn(2, 3, 5)
    g = lyr.probs(x).clone()
    g[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    g[1, 2] = torch.tensor([0.0, 0.0, 1.0])  # padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = []
    for n_beams in (1, 4):
        rec = RoutingRecorder({"fixed": lyr})
        rec.set_mask(mask)
        rec.start()
        lyr.route(g.repeat_interleave(n_beams, 0), x.repeat_interleave(n_beams, 0))
        lyr.route(lyr.probs(x[:, :1]).repeat_interleave(n_beams, 0), x[:, :1].repeat_interleave(n_beams, 0))
        stats.append(rec.stop()["layers"]["fixed"])
    assert stats[1]["tokens"] == stats[0]["tokens"] == 5
    assert stats[1]["load"] == pytest.approx(stats[0]["load"])
    assert stats[0]["load"] == pytest.approx([(1.0 + 4 * 0.5) / 5, 4 * 0.3 / 5, 4 * 0.2 / 5])


def test_sensitivity_of_a_real_layer_matches_its_definition():
    """(|g(x+dx) - g(x)| / |g(x)|) / (|dx| / |x|) per token, averaged, with |dx| = 1% of |x| in a random direction:
    recomputed here with the recorder's own noise stream (seed 0)."""
    from test_methods import single

    torch.manual_seed(0)
    model, lyr = single(nn.Linear(16, 16), r=8, num_experts=4, dropout=0.0, share_b=False)
    rec = RoutingRecorder({"l": lyr})
    rec.start()
    x = torch.randn(4, 7, 16)
    model(x)
    out = rec.stop()
    xf = x.reshape(-1, 16)
    noise = torch.randn(xf.shape, generator=torch.Generator().manual_seed(0))
    dx = noise / noise.norm(dim=-1, keepdim=True) * 0.01 * xf.norm(dim=-1, keepdim=True)
    g0, g1 = lyr.probs(xf), lyr.probs(xf + dx)
    expected = (((g1 - g0).norm(dim=-1) / g0.norm(dim=-1)) / 0.01).mean().item()
    assert out["layers"]["l"]["sensitivity"] == pytest.approx(expected, rel=1e-5)
    assert out["layers"]["l"]["sensitivity"] > 0 and out["layers"]["l"]["tokens"] == 28
    assert not rec.active and rec.acc == {}
