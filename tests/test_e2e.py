"""End to end on the real MiniLM: loss goes down, every contract file is written, a saved run re-evaluates equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_cfg

pytestmark = pytest.mark.slow

LEARN = ["task=glue/sst2", "trainer.batch_size=16", "trainer.max_steps=40", "trainer.lr=3e-3", "trainer.log_every=5",
         "trainer.eval_every=20", "trainer.warmup_ratio=0.0", "model.max_length=32", "trainer.progress=false", "task.val_size=8"]  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "talklora"])
def test_loss_goes_down_contract_and_reload(glue_dir: Path, tmp_path: Path, method: str):
    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.run import run

    run_dir = tmp_path / "run"
    m = run(compose_cfg([f"method={method}", f"paths.data_dir={glue_dir}", *LEARN]), run_dir)
    logs = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    assert [r["step"] for r in logs if "val" in r] == [20, 40]  # validation (held out of train) selects
    assert [r["step"] for r in logs if "report" in r] == [40] and m["report_evals"] == 1  # dev evaluated once
    assert m["selection"]["split"] == "val" and m["selection"]["step"] in (20, 40)
    for f in (
        "config.yaml",
        "metrics.json",
        "train_log.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run_dir / f).exists(), f
    saved = json.loads((run_dir / "metrics.json").read_text())
    for k in ("status", "task", "method", "model", "seed", "trainable_params", "total_params", "eval", "best_step",
              "train_runtime_s", "train_samples_per_s"):  # fmt: skip
        assert k in saved, k
    assert saved["status"] == "completed" and saved["eval"] == m["eval"] and saved["eval"]["accuracy"] > 0.5
    again, out = evaluate_run(run_dir)
    assert again == pytest.approx(saved["eval"]) and out.parent == run_dir and out.name == "evaluate-default.json"
    assert json.loads((run_dir / "metrics.json").read_text()) == saved  # the run's own result is untouched
    # adapter/ is a standard peft adapter: PeftModel.from_pretrained on the same base model gives evaluate's model
    from peft import PeftModel

    from talklora_exp.models import load_model, load_tokenizer
    from talklora_exp.run import build
    from talklora_exp.tasks import build_task

    cfg = compose_cfg([f"method={method}", f"paths.data_dir={glue_dir}", *LEARN])
    tok = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    base = load_model(cfg.model, build_task(cfg.task), cfg.paths.cache_dir, tok, cpu=True)
    theirs = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    b = build(cfg)
    ours = b.method.load(b.model, run_dir / "adapter").eval()
    batch = tok(["a fine film", "dull and slow"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-6)


def test_cli_main_command_and_skip_completed(glue_dir: Path, tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TALKLORA_DATA_DIR": str(glue_dir)}
    args = [sys.executable, "-m", "talklora_exp", "method=talklora", "task=glue/rte", "trainer.max_steps=4", "model.max_length=32",
            "trainer.batch_size=8", "task.val_size=8", f"hydra.run.dir={tmp_path}/X"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "X" / "metrics.json").read_text())
    assert m["status"] == "completed" and "accuracy" in m["eval"] and (tmp_path / "X" / "routing.json").exists()
    before = (tmp_path / "X" / "metrics.json").read_text()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "already completed" in r.stdout + r.stderr
    assert (tmp_path / "X" / "metrics.json").read_text() == before  # a finished run is never overwritten
