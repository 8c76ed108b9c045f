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


class AffineRouter(nn.Module, Routed):
    """Stand-in layer with "gates" g(x) = x + c: a perturbation moves g by exactly dx, so each token's sensitivity is
    |x| / |x + c| whatever random direction the recorder draws."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.tensor(c)
        self.init_taps()

    def probs(self, x):
        return x + self.c


def test_sensitivity_hand_computed():
    """(|g(x+dx) - g(x)| / |g(x)|) / (|dx| / |x|) per non-padding token, averaged: x = (3, 4) and (0, 2) with
    c = (-3, 4) give g = (0, 8) and (-3, 6), so 5/8 and 2/sqrt(45); the padding token counts for nothing."""
    lyr = AffineRouter([-3.0, 4.0])
    x = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [100.0, -7.0]]])
    for seed in (0, 1):  # the recorder's noise stream: the answer cannot depend on it
        rec = RoutingRecorder({"l": lyr}, seed=seed)
        rec.set_mask(torch.tensor([[1, 1, 0]]))
        rec.start()
        lyr.route(lyr.probs(x), x)
        out = rec.stop()["layers"]["l"]
        assert out["tokens"] == 2
        assert out["sensitivity"] == pytest.approx((5 / 8 + 2 / 45**0.5) / 2, rel=1e-5)
    assert not rec.active and rec.acc == {}
