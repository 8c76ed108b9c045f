"""The bench's paper-shape path on CPU: one layer of Qwen2.5-7B's shape, a small vocabulary, LoRA vs TalkLoRA and
the per-expert loop. Checks the path runs and writes its JSON with the memory estimate beside each row; the timings
themselves are a benchmark's business, never a test's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_paper_shape_bench_runs_on_cpu(tmp_path):
    args = [sys.executable, "scripts/bench.py", "--paper-shape", "--shape-model", "qwen2.5-7b-shape", "--num-layers", "1",
            "--vocab-size", "512", "--batch", "1", "--seq", "24", "--steps", "1", "--warmup", "0", "--methods",
            "lora,talklora", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "paper_shape.json").read_text())
    assert out["layers"] == 1 and out["device"] == "cpu" and out["batch"] == [1, 24]
    (row,) = out["rows"]
    assert row["method"] == "talklora" and row["rank"] == 32 and row["experts"] == 4
    # the ratios are the medians' ratios, and the three of them are consistent (each is a median of the same steps)
    assert row["ratio_vs_lora"] == pytest.approx(row["step_ms"] / row["lora_step_ms"], rel=2e-3)
    assert row["ratio_vs_loop"] * row["loop_ratio_vs_lora"] == pytest.approx(row["ratio_vs_lora"], rel=1e-3)
    # memory estimates: TalkLoRA at r=32 holds more adapter state than LoRA at r=8 on the same base, never less
    assert row["estimated_peak_gb"] >= out["lora_estimated_peak_gb"] > 0
