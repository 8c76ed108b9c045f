"""Engines compute what one plain process computes: gradient checkpointing through the whole trainer (routing
statistics, balance loss), and (below) two-process DDP / FSDP against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from test_scale import ADAPTERS

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


# --- two CPU processes: FSDP (torch's fully_shard per block) and DDP against one process -----------------------------

MODELS = {  # model overrides, task and data, and the methods run, for each model kind
    "minilm": (["task=glue/sst2", "model.max_length=32", "+model.hf_config={hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0}"], "glue", ADAPTERS),
    # the causal LM costs ~75 s per method here: the mixtures and LoRA (peft's DoRA and HiRA are covered on MiniLM)
    "causal": ([*TINY_LM, "task=commonsense/boolq", "trainer.max_train_samples=48", "eval.max_new_tokens=4",
                "trainer.eval_batch_size=3"], "shared", ["lora", "moelora", "talklora", "teamlora"]),
}  # fmt: skip


def _launch(tmp_path: Path, data: Path, procs: int, args: list[str], script: list[str] | None = None):
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TALKLORA_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}
    head = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                                str(free_port())] if procs > 1 else [])  # fmt: skip
    cmd = head + (script or ["-m", "talklora_exp"]) + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _steps(run_dir: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in _log(run_dir) if "loss" in r]


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_fsdp_and_ddp_compute_what_one_process_computes(tmp_path: Path, glue_dir: Path, shared_data: Path, kind: str):
    """Dropout 0, global batch 8: one process x 8, torchrun x2 DDP x 4 and torchrun x2 FSDP x 4 give the same loss and
    gradient norm at every step (float32, another summation order), the same reported metrics and predictions, and
    adapters that agree; the FSDP run's adapter/ reloads in this process with PeftModel.from_pretrained and gives the
    one-process adapter's outputs. Every registered method on MiniLM (TalkLoRA's shared B in the root unit)."""
    over, data, methods = MODELS[kind]
    data_dir = glue_dir if data == "glue" else shared_data
    common = ["-m", *over, f"method={','.join(methods)}", "method.dropout=0.0", "trainer.max_steps=3",
              "trainer.eval_every=3", "trainer.progress=false", "trainer.lr=1e-3", "trainer.max_eval_samples=6",
              "trainer.cpu=true", "task.val_size=4", "trainer.log_every=1", "hydra.sweep.subdir=${method.name}"]  # fmt: skip
    runs = {
        "one": _launch(tmp_path, data_dir, 1, [*common, "trainer.batch_size=8", f"hydra.sweep.dir={tmp_path}/one"]),
        "ddp": _launch(tmp_path, data_dir, 2, [*common, "trainer.batch_size=4", f"hydra.sweep.dir={tmp_path}/ddp"]),
        "fsdp": _launch(
            tmp_path,
            data_dir,
            2,
            [*common, "trainer.batch_size=4", "trainer.strategy=fsdp", f"hydra.sweep.dir={tmp_path}/fsdp"],
        ),  # fmt: skip
    }
    for name, p in runs.items():
        assert p.returncode == 0, (name, p.stderr[-3000:])
    for method in methods:
        one = tmp_path / "one" / method
        m1 = json.loads((one / "metrics.json").read_text())
        for eng in ("ddp", "fsdp"):
            d = tmp_path / eng / method
            m = json.loads((d / "metrics.json").read_text())
            assert m["num_processes"] == 2 and m["eval_counts"] == m1["eval_counts"]
            assert m["eval"] == pytest.approx(m1["eval"], abs=1e-9), (method, eng)
            a, b = zip(*_steps(one)), zip(*_steps(d))
            for x, y in zip(a, b):
                assert len(x) == 3 and y == pytest.approx(x, rel=1e-4), (method, eng)
            if (one / "predictions.jsonl").exists():
                p1 = [json.loads(x)["generated"] for x in (one / "predictions.jsonl").read_text().splitlines()]
                p2 = [json.loads(x)["generated"] for x in (d / "predictions.jsonl").read_text().splitlines()]
                assert p1 == p2
            w1, w2 = _adapter(one), _adapter(d)
            assert w1.keys() == w2.keys()
            for k in w1:
                torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)
        _reload_equal(one, tmp_path / "fsdp" / method)


def _reload_equal(one: Path, fsdp: Path) -> None:
    """Each run's adapter/ into a freshly built base model (peft's own loader): the same outputs."""
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf
    from peft import PeftModel

    import talklora_exp  # noqa: F401  (registers the mixtures with peft)
    from talklora_exp.models import load_model, load_tokenizer
    from talklora_exp.tasks import build_task

    cfg = OmegaConf.load(one / "config.yaml")
    tok = load_tokenizer(cfg.model, None)
    outs = []
    for d in (one, fsdp):
        set_seed(int(cfg.seed))  # a shape model's random base: the run's own
        base = load_model(cfg.model, build_task(cfg.task), None, tok, cpu=True)
        model = PeftModel.from_pretrained(base, str(d / "adapter")).eval()
        ids = torch.tensor([tok.encode("Please answer: is the sky blue?")[:16]])
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path: Path, glue_dir: Path):
    """torchrun x2 FSDP, killed (os._exit: no cleanup) right after the step-4 checkpoint (gathered whole weights and
    the name-keyed optimizer state), resumed: the same losses, metrics and adapter as the run never interrupted."""
    from conftest import ROOT

    from talklora_exp import checkpoint as ckpt

    common = ["method=talklora", "task=glue/sst2", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.eval_every=3",
              "trainer.checkpoint_every=4", "trainer.log_every=1", "model.max_length=32", "trainer.progress=false",
              "trainer.lr=2e-3", "trainer.cpu=true", "task.val_size=8", "trainer.max_eval_samples=15",
              "trainer.strategy=fsdp"]  # fmt: skip
    data = glue_dir
    ref = _launch(tmp_path, data, 2, [*common, f"hydra.run.dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    crash = [str(ROOT / "tests" / "helpers" / "crash_after_checkpoint.py"), "4"]
    killed = _launch(tmp_path, data, 2, [*common, f"hydra.run.dir={tmp_path}/run"], script=crash)
    state = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    assert state is not None and state["sharded"] and state["loop"]["step"] == 4, killed.stderr[-3000:]
    assert killed.returncode != 0 and not (tmp_path / "run" / "adapter").exists()
    resumed = _launch(tmp_path, data, 2, [*common, "trainer.resume=auto", f"hydra.run.dir={tmp_path}/run"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["resumed_from_step"] == 4 and m["eval"] == m_ref["eval"] and m["best_step"] == m_ref["best_step"]
    assert _steps(tmp_path / "run") == _steps(tmp_path / "ref")
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- QLoRA: the mixtures on a bitsandbytes 4-bit base ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quant,method", [("nf4", "talklora"), ("nf4", "teamlora"), ("int8", "talklora")])
def test_qlora_trains_saves_and_reloads(tmp_path: Path, shared_data: Path, quant: str, method: str):
    """SmolLM2 with model.quantization=nf4 (int8): every adapted projection wraps a bitsandbytes Linear4bit
    (Linear8bitLt), the adapters are fp32 and train (finite loss), the adapter saves, and `evaluate` rebuilds the
    quantized base, reloads it and reproduces the run's numbers."""
    import bitsandbytes as bnb  # installed by make setup (the engines extra)

    layer_cls = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[quant]

    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.run import build, run

    over = ["model=smollm2-135m", f"model.quantization={quant}", f"method={method}", "task=commonsense/boolq",
            f"paths.data_dir={shared_data}", "eval=options", "task.answer_format=text", "task.prompt_style=lm_eval",
            "task.main_metric=acc_norm", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.grad_accum=1",
            "trainer.max_train_samples=12", "trainer.max_eval_samples=4", "task.val_size=2", "trainer.lr=1e-3",
            "trainer.progress=false", "trainer.log_every=1"]  # fmt: skip
    b = build(compose_cfg(over))
    wrapped = [m for n, m in b.model.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(m.base_layer, layer_cls) for m in wrapped)
    assert all(p.dtype == torch.float32 for n, p in b.model.named_parameters() if p.requires_grad)
    m = run(compose_cfg(over), tmp_path / "q")
    losses = [r["loss"] for r in _log(tmp_path / "q") if "loss" in r]
    assert m["status"] == "completed" and len(losses) == 3 and all(map(lambda x: x == x and x < 50, losses))
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()
    again, _ = evaluate_run(tmp_path / "q")
    assert again == pytest.approx(m["eval"])


def test_a_base_layer_the_mixtures_cannot_wrap_is_refused_in_one_line():
    from transformers.pytorch_utils import Conv1D

    from talklora_exp.errors import UserError
    from talklora_exp.methods import build_method, method_config

    model = torch.nn.Sequential()
    model.add_module("c_attn", Conv1D(8, 4))
    method = build_method(method_config({"name": "talklora", "rank": 4, "num_experts": 2}))
    with pytest.raises(UserError, match=r"are transformers.pytorch_utils.Conv1D layers, not nn.Linear"):
        method.inject(model, ["c_attn"], [], "other")


# --- torch.compile -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTERS)
def test_compiled_forward_and_backward_equal_eager(name: str):
    """nn.Module.compile (inductor) on a tiny LLaMA with the method's adapters: the same loss and every adapter
    gradient as eager (float32, fused kernels sum in another order); an adapted layer's forward compiles to one
    graph (no graph break inside it when no routing statistics are being taken)."""
    import torch._dynamo
    from test_scale import TARGETS, _batch, _method, randomize_trainable, tiny_llama

    out = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _method(name, dropout=0.0).inject(tiny_llama(), TARGETS, [], "causal")
        randomize_trainable(model)
        if compiled:
            model.compile()
        loss = model(**_batch()).loss
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert out[0][1].keys() == out[1][1].keys() and out[0][1]
    for k, ref in out[0][1].items():  # float32 sums of ~1.5K terms in another order: up to ~N eps of the largest
        torch.testing.assert_close(out[1][1][k], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if name in ("moelora", "talklora", "teamlora"):  # this project's layers (peft's DoRA breaks in peft's own code)
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(torch.randn(2, 5, 32))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_trainer_compile_logs_the_eager_losses(tmp_path: Path, shared_data: Path):
    """trainer.compile=true through the whole trainer (TalkLoRA, routing statistics every step, balance loss): the
    same per-step losses and gradient norms as eager."""
    from talklora_exp.run import run

    logs = []
    for compiled in (False, True):
        cfg = compose_cfg([*TINY_LM, "method=talklora", "method.dropout=0.0", "method.balance_loss=0.05",
                           "task=commonsense/boolq", f"paths.data_dir={shared_data}", "trainer.max_train_samples=16",
                           "trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_eval_samples=2",
                           "trainer.routing_stats_every=1", "trainer.log_every=1", "trainer.progress=false",
                           "task.val_size=2", "eval.max_new_tokens=1", f"trainer.compile={str(compiled).lower()}"])  # fmt: skip
        assert run(cfg, tmp_path / str(compiled))["status"] == "completed"
        logs.append([(r["loss"], r["grad_norm"]) for r in _log(tmp_path / str(compiled)) if "loss" in r])
    assert len(logs[0]) == 2
    for a, b in zip(*logs):
        assert b == pytest.approx(a, rel=1e-5)
