"""The mixtures as peft tuners, used the way a researcher uses them in their own code: `get_peft_model`, a
`transformers.Trainer`, `save_pretrained`, `PeftModel.from_pretrained` in a fresh process; plus peft's multi-adapter
API, merging, and the registration this relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import HiraConfig, LoraConfig, PeftModel, get_peft_model
from test_scale import ADAPTERS, _method
from torch import nn

import talklora_exp
from talklora_exp import MoELoRAConfig, TalkLoRAConfig, TeamLoRAConfig
from talklora_exp.tuners import PEFT_MAPPINGS, TUNERS, register
from talklora_exp.tuners.mixture import MixtureLayer

CONFIGS = {peft_type.lower(): config for peft_type, (config, _) in TUNERS.items()}  # this package's tuners
IDS = torch.tensor([[1, 5, 9, 12, 7, 3], [2, 8, 4, 4, 30, 11]])


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


RELOAD = """
import sys, torch
import talklora_exp  # registers the tuners with peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[3])).logits, sys.argv[4])
"""


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_trainer_save_and_reload_in_a_fresh_process(tmp_path: Path, name: str):
    """The README's "use it in your own code": 2 steps of transformers.Trainer, save, reload elsewhere, same outputs."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, CONFIGS[name](r=8, num_experts=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every adapter tensor trained (B starts at zero and left it)

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == name.upper() and saved["r"] == 8 and saved["num_experts"] == 4
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    torch.save(IDS, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"),
                    str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], check=True)  # fmt: skip
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (got - expected).abs().max().item() <= 1e-6
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=IDS).logits, expected)  # the adapter changed the outputs


def _randomized(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "_experts." in n or "shared_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_adapters_by_name_disable_and_no_merge(name: str):
    cfg = CONFIGS[name]
    base = tiny_llama()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    model = get_peft_model(base, cfg(r=8, num_experts=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", cfg(r=4, num_experts=2, target_modules=["q_proj"]))
    _randomized(model, 0)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=IDS).logits
        model.set_adapter("second")
        second = model(input_ids=IDS).logits
        with model.disable_adapter():
            off = model(input_ids=IDS).logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(off, plain)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)  # set_adapter moves training to that adapter
    layers = [m for m in model.modules() if isinstance(m, MixtureLayer)]
    assert {tuple(sorted(m.experts)) for m in layers} == {("default", "second"), ("default",)}  # q: both, v: one
    with pytest.raises(ValueError, match="routing depends on the input.*cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                    LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
                                    HiraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)])  # fmt: skip
def test_lora_dora_hira_still_merge(config):
    model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        merged = model.merge_and_unload()(input_ids=IDS).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)


def test_talklora_shares_b_across_layers_and_saves_it_once(tmp_path: Path):
    model = get_peft_model(tiny_llama(), TalkLoRAConfig(r=8, num_experts=4, target_modules=["q_proj", "v_proj"]))
    store = model.base_model.talklora_shared_B["default"]
    assert sorted(store) == ["model__layers__N__self_attn__q_proj", "model__layers__N__self_attn__v_proj"]
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert sum("shared_B" in k for k in keys) == 2 and not any(k.endswith(".B") for k in keys)


def test_registration_names_what_it_relies_on(monkeypatch):
    from peft import mapping

    for m in PEFT_MAPPINGS:
        assert isinstance(getattr(mapping, m), dict), f"peft.mapping.{m} is gone: update talklora_exp.tuners"
    for peft_type in ("TALKLORA", "MOELORA", "TEAMLORA"):
        assert peft_type in mapping.PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in mapping.PEFT_TYPE_TO_TUNER_MAPPING
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["TALKLORA"] == "talklora_"
    register()  # idempotent
    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(ImportError, match=r"peft.mapping.\{PEFT_TYPE_TO_PREFIX_MAPPING\}.*range pyproject.toml pins"):
        register()


def test_config_checks_are_one_line_value_errors():
    with pytest.raises(ValueError, match=r"^r=6 is not divisible by num_experts=4$"):
        TalkLoRAConfig(r=6, num_experts=4)
    with pytest.raises(ValueError, match=r"^talk='loud'; allowed: \['learned', 'identity', 'off'\]$"):
        TalkLoRAConfig(talk="loud")
    assert MoELoRAConfig().talk == "off" and TalkLoRAConfig().talk == "learned" and TeamLoRAConfig().alpha == 64.0
    assert talklora_exp.TalkLoRAConfig is TalkLoRAConfig


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_methods_run_adapter_is_a_standard_peft_adapter(tmp_path: Path, name: str):
    """What a run writes to RUN_DIR/adapter (`Method.save`) loads with `PeftModel.from_pretrained`, as in the README."""
    method = _method(name)
    model = method.inject(tiny_llama(), ["q_proj", "v_proj"], [], "causal")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    method.save(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == (
        "LORA" if name == "dora" else name.upper()
    )
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapter_names_sends_each_row_through_its_own_adapter(name: str):
    """peft's mixed batch: rows through "default", "__base__" (no adapter) and "second" in one forward equal each
    row run alone with that adapter active (or adapters disabled); unknown names and training mode are refused."""
    cfg = CONFIGS[name]
    model = get_peft_model(tiny_llama(), cfg(r=8, num_experts=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", cfg(r=4, num_experts=2, target_modules=["q_proj"]))
    _randomized(model, 0)
    model.eval()
    ids = torch.cat([IDS, IDS[:1]])
    names = ["default", "__base__", "second"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        model.set_adapter("default")
        a = model(input_ids=ids[:1]).logits
        with model.disable_adapter():
            b = model(input_ids=ids[1:2]).logits
        model.set_adapter("second")
        c = model(input_ids=ids[2:]).logits
    assert not torch.allclose(a, c)  # the same tokens, another adapter: another answer
    torch.testing.assert_close(mixed, torch.cat([a, b, c]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=ids, adapter_names=["default", "nope", "second"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=names)


def test_set_requires_grad_covers_talkloras_shared_b():
    """peft's set_requires_grad(name, False) freezes every tensor of that adapter, the tuner-held shared B included,
    and True gives them all back."""
    model = get_peft_model(tiny_llama(), TalkLoRAConfig(r=8, num_experts=4, target_modules=["q_proj", "v_proj"]))
    shared = [n for n, _ in model.named_parameters() if "shared_B" in n]
    assert shared
    model.set_requires_grad("default", False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "talklora_" in n)
    model.set_requires_grad("default", True)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in shared or "_experts." in n)


def test_readme_own_loop_recipe_runs_as_written():
    """The README's own-training-loop block, executed verbatim on a tiny TalkLoRA LLaMA: the balance loss reaches the
    routers (their gradient differs from the run without it) and the statistics come back."""
    import re

    from conftest import ROOT

    block = re.search(r"```python\n(hooks = talklora_exp\.routing_hooks.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's own-loop block is gone"
    routers = []
    for w in (0.01, 1.0):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), TalkLoRAConfig(r=8, num_experts=4, target_modules=["q_proj"], dropout=0.0))
        _randomized(model, 0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
        scope = {"talklora_exp": talklora_exp, "torch": torch, "model": model, "loader": [batch], "optimizer": opt}
        exec(block.group(1).replace("balance_loss=0.01", f"balance_loss={w}"), scope)
        assert scope["stats"]["aggregate"]["load_entropy"] is not None and scope["stats"]["layers"]
        routers.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "router" in n]))
    assert not torch.allclose(routers[0], routers[1])  # the balance loss's weight changed the routers' update
