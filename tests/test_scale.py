"""Paper-scale switches on a tiny LLaMA built from a config (no download): bf16 base weights with fp32 adapters and a
finite loss, and gradient checkpointing giving the same loss and adapter gradients as the run without it."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from talklora_exp.methods import METHODS, build_method, method_config

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ADAPTERS = [m for m, cls in METHODS.items() if cls.adapts]  # every registered method with an adapter


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(conf).to(dtype)


def _method(name: str, **over):
    """The method as its conf/method yaml sets it, at rank 8."""
    d = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")), "rank": 8, **over}
    return build_method(method_config(d))


@torch.no_grad()
def randomize_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero adapters (B starts at zero), so every adapter tensor gets a gradient; the same draws every call."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("name", ADAPTERS)
def test_bf16_base_keeps_fp32_adapters_and_a_finite_loss(name):
    method = _method(name)
    model = method.inject(tiny_llama(torch.bfloat16), TARGETS, [], "causal")
    adapters = set(method.adapter_param_names(model))
    assert adapters and all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in adapters)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and p.ndim == 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    loss = model(**_batch()).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in adapters
    )


@pytest.mark.parametrize("name", ADAPTERS)
def test_gradient_checkpointing_matches_plain_backward(name):
    grads, losses = [], []
    for ckpt in (False, True):
        method = _method(name, dropout=0.0)
        model = method.inject(tiny_llama(), TARGETS, [], "causal")
        randomize_trainable(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model.train()
        loss = model(**_batch()).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


ROUTED = [m for m in ADAPTERS if build_method(method_config({"name": m, "rank": 8})).routed]


@pytest.mark.parametrize("name", ROUTED)
def test_checkpointing_observes_routing_once_and_keeps_nothing_past_the_step(name):
    """Gradient checkpointing recomputes each block's forward inside backward. The routing taps are not called then:
    training routing statistics (token counts and sensitivity, whose noise stream a recompute would consume), the
    balance loss and every gradient (balance term included, dropout on) equal the run without checkpointing, and no
    balance-loss term is held after the step."""
    from talklora_exp.methods.base import RoutedHooks
    from talklora_exp.tuners.mixture import mixture_layers

    out = []
    for ckpt in (False, True):
        method = _method(name, dropout=0.1, balance_loss=0.05)
        model = method.inject(tiny_llama(), TARGETS, [], "causal")
        randomize_trainable(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        hooks = method.hooks(model)
        assert isinstance(hooks, RoutedHooks)
        model.train()
        batch = _batch()
        batch["attention_mask"][1, -3:] = 0  # padding the statistics must skip
        hooks.set_batch(batch)
        hooks.routing.start()
        torch.manual_seed(5)  # the dropout draws
        loss = model(**batch).loss
        aux = hooks.aux_loss()
        assert aux is not None and hooks.pending() == 0
        (loss + aux).backward()
        stats = hooks.routing.stop()
        assert hooks.pending() == 0  # the recompute added no terms
        layer_taps = {len(lyr.taps) for lyr in mixture_layers(model).values()}
        assert layer_taps == {1}  # the balance loss's; the recorder taps only between start() and stop()
        out.append(
            (
                loss.item(),
                aux.item(),
                stats,
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (l0, a0, s0, g0), (l1, a1, s1, g1) = out
    assert l0 == pytest.approx(l1, rel=1e-6) and a0 == pytest.approx(a1, rel=1e-6)
    assert s0["layers"].keys() == s1["layers"].keys()
    for k in s0["layers"]:
        assert s0["layers"][k]["tokens"] == s1["layers"][k]["tokens"] == 21
        for stat in ("sensitivity", "load_entropy", "token_entropy"):
            assert s0["layers"][k][stat] == pytest.approx(s1["layers"][k][stat], rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7)
