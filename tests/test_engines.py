"""Engines compute what one plain process computes: gradient checkpointing through the whole trainer (routing
statistics, balance loss), and (below) two-process DDP / FSDP against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_cfg

# A tiny random causal LM through the whole run pipeline (llama3-8b's architecture shrunk; SmolLM2's offline tokenizer)
TINY_LM = ["model=llama3-8b-shape", "model.num_layers=2", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
           "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2", "model.max_length=128"]  # fmt: skip


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["talklora", "teamlora"])
def test_gradient_checkpointing_changes_nothing_a_run_records(tmp_path: Path, shared_data: Path, method: str):
    """trainer.gradient_checkpointing=true and false: the same losses and gradient norms, the same training routing
    statistics every step (sensitivity included), the same routing.json, with dropout and a balance loss on."""
    from talklora_exp.run import run

    recs = []
    for ckpt in (False, True):
        cfg = compose_cfg([*TINY_LM, f"method={method}", "method.balance_loss=0.05", "task=commonsense/boolq",
                           f"paths.data_dir={shared_data}", "trainer.max_train_samples=24", "trainer.max_steps=3",
                           "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.max_eval_samples=4",
                           "trainer.routing_stats_every=1", "trainer.log_every=1", "trainer.progress=false",
                           "task.val_size=4", f"trainer.gradient_checkpointing={str(ckpt).lower()}"])  # fmt: skip
        out = tmp_path / f"ckpt-{ckpt}"
        assert run(cfg, out)["status"] == "completed"
        recs.append((_log(out), json.loads((out / "routing.json").read_text())))
    (log0, r0), (log1, r1) = recs
    steps0 = [r for r in log0 if "loss" in r or "routing_train" in r]
    steps1 = [r for r in log1 if "loss" in r or "routing_train" in r]
    assert len(steps0) == len(steps1) == 6  # 3 steps: a loss record and a routing record each
    for a, b in zip(steps0, steps1):
        assert a.keys() == b.keys()
        for k in ("loss", "grad_norm"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5)
        if "routing_train" in a:
            assert a["routing_train"] == pytest.approx(b["routing_train"], rel=1e-5)
            assert a["routing_train"]["sensitivity"] > 0
    assert r0["layers"].keys() == r1["layers"].keys()
    for k in r0["layers"]:
        assert r0["layers"][k]["tokens"] == r1["layers"][k]["tokens"] > 0
        assert r0["layers"][k]["load"] == pytest.approx(r1["layers"][k]["load"], rel=1e-5)
        assert r0["layers"][k]["sensitivity"] == pytest.approx(r1["layers"][k]["sensitivity"], rel=1e-5)
