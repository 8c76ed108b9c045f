"""Generation tasks: label masks, answer extraction on tricky strings, data readers, end to end on SmolLM2."""

import json
from pathlib import Path

import pytest
from conftest import compose_cfg

from talklora_exp.errors import UserError
from talklora_exp.tasks import build_task
from talklora_exp.tasks.generation import (
    ANSWER_OPTIONS,
    COMMONSENSE_TASKS,
    IGNORE,
    cut_generation,
    extract_commonsense,
    extract_last_number,
    gsm8k_gold,
    read_json_records,
    render_prompt,
)


class CharTok:
    """A character-level stand-in tokenizer: exact, so masks can be checked position by position."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def _task(name="commonsense/boolq", **over):
    cfg = compose_cfg([f"task={name}", "model=smollm2-135m"] + [f"task.{k}={v}" for k, v in over.items()])
    return build_task(cfg.task)


def test_training_layout_is_upstreams_written_out_by_hand():
    """Upstream (dataset/format_inputs.py, template_type 4): prompt without BOS, cut to the prompt cutoff; stripped
    response cut to the response cutoff, no EOS; labels -100 on the prompt. Char tokenizer: ids are ord(c)."""
    rec = {"instruction": "Q", "input": "", "output": "  the correct answer is true "}
    f = _task(prompt_max_length=5, response_max_length=3).encode_train(CharTok(), rec)
    # left truncation keeps the prompt's last 5 characters, "nse:\n"; the response keeps "the"
    assert f["input_ids"] == [110, 115, 101, 58, 10, 116, 104, 101]
    assert f["labels"] == [-100, -100, -100, -100, -100, 116, 104, 101]
    assert f["attention_mask"] == [1] * 8
    # upstream's own tokenizer setting cuts the prompt's end instead: "Below"
    r = _task(prompt_max_length=5, response_max_length=3, prompt_truncation="right").encode_train(CharTok(), rec)
    assert r["input_ids"] == [66, 101, 108, 111, 119, 116, 104, 101]
    # the deviations are flags: BOS (id 1) before the prompt, EOS (id 0) after the response
    b = _task(prompt_max_length=5, response_max_length=3, train_bos=True, train_eos=True).encode_train(CharTok(), rec)
    assert b["input_ids"] == [1, 110, 115, 101, 58, 10, 116, 104, 101, 0]
    assert b["labels"] == [-100] * 6 + [116, 104, 101, 0]
    full = _task(prompt_max_length=5, response_max_length=3, train_on_prompt=True).encode_train(CharTok(), rec)
    assert full["labels"] == full["input_ids"]
    # test prompts: BOS first (upstream's f"{bos_token}" + prompt), same prompt cutoff, no response
    t = _task(prompt_max_length=5).encode_eval(CharTok(), {**rec, "id": "x", "answer": "true"}, 256)
    assert t["prompt_ids"] == [1, 110, 115, 101, 58, 10]


def test_template_is_upstreams_character_for_character():
    task = _task()
    p = render_prompt(task.templates, "Is the sky blue?", "")
    assert p == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
        "\n\n### Instruction:\nIs the sky blue?\n\n### Response:\n"
    )


def test_gsm8k_cutoffs_are_upstreams():
    t = _task("gsm8k")
    assert (t.prompt_max, t.response_max, t.gen is None) == (155, 200, True)
    assert compose_cfg(["task=gsm8k", "model=smollm2-135m", "eval=upstream"]).eval.max_new_tokens == 200
    assert compose_cfg(["task=commonsense/piqa", "model=smollm2-135m", "eval=upstream"]).eval.max_new_tokens == 16


@pytest.mark.parametrize(
    "raw,eos,pad,expected",
    [
        ("the correct answer is true<|im_end|>more text", "<|im_end|>", "<|im_end|>", "the correct answer is true"),
        ("answer1 Q: what next", "</s>", "<unk>", "answer1 "),
        ("solution2\nR: reply", "</s>", "<unk>", "solution2\n"),
        ("<unk>ending3<unk> R: x Q: y", "</s>", "<unk>", "ending3 "),
        ("option1</s>Q: tail", "</s>", "<unk>", "option1"),
        ("plain", None, None, "plain"),
    ],
)
def test_decoding_cut_at_eos_q_r(raw, eos, pad, expected):
    assert cut_generation(raw, eos, pad, ["Q:", "R:"]) == expected


def test_gold_answers_are_checked_against_the_options(tmp_path: Path):
    root = make_cs_dir(tmp_path)
    bad = json.loads((root / "commonsense/boolq/test.json").read_text())
    bad[2]["answer"] = "True"
    (root / "commonsense/boolq/test.json").write_text(json.dumps(bad))
    with pytest.raises(
        UserError, match=r"test\.json record 2: answer 'True' is not one of boolq's options \['true', 'false'\]"
    ):
        _task().records(str(root))


def test_input_field_uses_the_with_input_template():
    task = _task()
    p = render_prompt(task.templates, "Pick one", "A or B")
    assert "### Input:\nA or B\n\n### Response:\n" in p and "paired with an input" in p


@pytest.mark.parametrize(
    "task,text,expected",
    [
        ("boolq", "the correct answer is false, not true", "false"),
        ("boolq", "The correct answer is True", ""),  # upstream is case-sensitive
        ("boolq", "it is untrue", "true"),  # upstream matches substrings
        ("piqa", "solution2 is better than solution1", "solution2"),
        ("social_i_qa", "the correct answer is answer3.", "answer3"),
        ("ARC-Challenge", "answer5", "answer5"),
        ("ARC-Easy", "I think answer12", "answer1"),  # substring, as upstream
        ("openbookqa", "no idea", ""),
        ("hellaswag", "ending4 fits; ending1 does not", "ending4"),
        ("winogrande", "the correct answer is option2", "option2"),
    ],
)
def test_extraction_tricky_strings(task, text, expected):
    assert extract_commonsense(task, text) == expected


def test_extraction_case_insensitive_flag():
    assert extract_commonsense("boolq", "The correct answer is True", case_sensitive=False) == "true"
    assert set(COMMONSENSE_TASKS) == {
        "boolq",
        "piqa",
        "social_i_qa",
        "hellaswag",
        "winogrande",
        "ARC-Easy",
        "ARC-Challenge",
        "openbookqa",
    }


@pytest.mark.parametrize(
    "text,expected",
    [("so the answer is 1,234.", "1234"), ("-3 apples then 12.50", "12.5"), ("#### 72", "72"), ("x = 4.0", "4"), ("none", ""),
     ("costs $18 and 3 more = 21 dollars", "21")],
)  # fmt: skip
def test_gsm8k_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_gsm8k_gold():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_gold("#### 1,000") == "1000"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


def test_json_readers_errors(tmp_path: Path):
    p = tmp_path / "t.json"
    p.write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(UserError, match=r"t\.json record 0: needs fields \['instruction', 'output', 'answer'\]"):
        read_json_records(p, ("instruction", "output", "answer"))
    q = tmp_path / "t.jsonl"
    q.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: malformed JSON line"):
        read_json_records(q, ("question", "answer"))


def make_cs_dir(root: Path) -> Path:
    d = root / "commonsense"
    rows = [{"instruction": f"Q{i}: is {i} even? Answer format: true/false", "input": "", "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}",
             "answer": "true" if i % 2 == 0 else "false"} for i in range(12)]  # fmt: skip
    for t in ("boolq",):
        (d / t).mkdir(parents=True)
        (d / t / "train.json").write_text(json.dumps(rows))
        (d / t / "test.json").write_text(json.dumps(rows[:6]))
    g = root / "gsm8k"
    g.mkdir()
    lines = [
        json.dumps(
            {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
        )
        for i in range(12)
    ]
    (g / "train.jsonl").write_text("\n".join(lines) + "\n")
    (g / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return root


def test_commonsense_training_source_is_reported(tmp_path: Path):
    """A single set trains on its own train file (upstream's single-task mode), even beside commonsense_170k.json;
    `all` trains on the combined data: commonsense_170k.json when present, else every per-task train file."""
    root = make_cs_dir(tmp_path)
    cs = root / "commonsense"
    for t, opts in ANSWER_OPTIONS.items():
        (cs / t).mkdir(exist_ok=True)
        row = {"instruction": "pick", "input": "", "output": f"the correct answer is {opts[0]}", "answer": opts[0]}
        if t != "boolq":
            (cs / t / "test.json").write_text(json.dumps([row] * 2))
    arc_rows = [
        {"instruction": "pick", "input": "", "output": "the correct answer is answer1", "answer": "answer1"}
    ] * 5
    (cs / "ARC-Easy" / "train.json").write_text(json.dumps(arc_rows))
    train, _, info = _task().records(str(root))
    assert len(train) == 12 and info["train_source"] == "boolq/train.json (the set's own train file)"
    train, _, info = _task("commonsense/ARC-Easy").records(str(root))
    assert len(train) == 5 and {r["task"] for r in train} == {"ARC-Easy"}
    train, _, info = _task("commonsense/all").records(str(root))
    assert len(train) == 17 and info["train_source"] == "per-task train files: boolq, ARC-Easy"
    train, _, info = _task("commonsense/hellaswag").records(str(root))
    assert (
        len(train) == 17
        and info["train_source"] == "combined (hellaswag has no train file): per-task train files: boolq, ARC-Easy"
    )
    (cs / "commonsense_170k.json").write_text(json.dumps(json.loads((cs / "boolq/train.json").read_text())[:3]))
    train, _, info = _task("commonsense/all").records(str(root))
    assert len(train) == 3 and info["train_source"].endswith("commonsense_170k.json")
    train, _, info = _task().records(str(root))
    assert len(train) == 12 and info["train_source"].startswith("boolq/train.json")


def test_model_kind_mismatch_is_clear(tmp_path: Path):
    from talklora_exp.run import build

    with pytest.raises(
        UserError, match=r"needs a model of kind 'causal', but model=minilm is 'encoder'; e.g. model=smollm2-135m"
    ):
        build(compose_cfg(["task=commonsense/boolq", "model=minilm"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,method,decoding", [("commonsense/boolq", "talklora", "upstream"), ("gsm8k", "lora", "greedy")]
)
def test_smollm2_end_to_end(tmp_path: Path, task: str, method: str, decoding: str):
    from talklora_exp.run import run

    root = make_cs_dir(tmp_path / "data")
    cfg = compose_cfg([f"method={method}", "model=smollm2-135m", f"task={task}", f"paths.data_dir={root}", "trainer.max_steps=2",
                       "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.max_eval_samples=4", "eval.max_new_tokens=8",
                       "trainer.progress=false", "trainer.log_every=1", "task.val_size=2", f"eval={decoding}"])  # fmt: skip
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and "accuracy" in m["eval"] and m["data"]["train_source"]
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4
    assert set(preds[0]) == {"id", "task", "prompt", "generated", "extracted", "gold", "correct"}
    assert m["eval"]["accuracy"] == sum(p["correct"] for p in preds) / 4
    if method == "talklora":  # B shared across layers per projection type on a LLaMA model
        assert m["adapter_params"] > 0
        routing = json.loads((tmp_path / "run" / "routing.json").read_text())
        assert routing["layers"] and all(v["tokens"] > 0 for v in routing["layers"].values())  # the prompts, once


def test_data_root_is_not_mixed_across_dirs(tmp_path: Path, monkeypatch):
    """The configured dir wins for the whole dataset, even when $TALKLORA_DATA_DIR has more files."""
    mine = make_cs_dir(tmp_path / "mine")
    other = make_cs_dir(tmp_path / "other")
    arc = other / "commonsense" / "ARC-Easy"
    arc.mkdir()
    (arc / "train.json").write_text((other / "commonsense" / "boolq" / "train.json").read_text())
    monkeypatch.setenv("TALKLORA_DATA_DIR", str(other))
    train, _, info = _task().records(str(mine))
    assert len(train) == 12 and info["root"] == str(mine / "commonsense")


def test_val_split_is_held_out_of_train_like_upstream(tmp_path: Path):
    """random.seed(58); random.shuffle(data); train, val = data[:-n], data[-n:] (upstream's split script), exactly."""
    import random

    task = _task(val_size=3)
    root = make_cs_dir(tmp_path)
    recs, _, _ = task.records(str(root))
    data = task.load(CharTok(), str(root), 0, None, None, val_size=3, val_seed=58)
    expect = list(recs)
    random.seed(58)
    random.shuffle(expect)
    assert [r["id"] for r in data.val_evals[""].features] == [r["id"] for r in expect[-3:]]
    assert len(data.train) == 9 and len(data.val) == 3 and data.info["n_val"] == 3
    train_ids = {tuple(f["input_ids"]) for f in data.train.features}
    assert not train_ids & {tuple(f["input_ids"]) for f in data.val.features}  # no validation example is trained on


def test_caps_cut_after_the_holdout_so_val_never_depends_on_max_train():
    """random.Random(58).shuffle(range(10)) = [2, 4, 7, 0, 1, 6, 5, 8, 3, 9]: val is its last 3, then capped at 2."""
    from talklora_exp.tasks.base import split_and_cap

    train, val, evals = split_and_cap(list(range(10)), {"": [100, 101, 102]}, 3, 58, 4, 2)
    assert train == [2, 4, 7, 0] and val == [8, 3] and evals == {"": [100, 101]}
    assert split_and_cap(list(range(10)), {}, 3, 58, None, None)[:2] == ([2, 4, 7, 0, 1, 6, 5], [8, 3, 9])


def test_examples_without_supervised_tokens_are_dropped(tmp_path: Path):
    task = _task()
    root = make_cs_dir(tmp_path)
    rows = json.loads((root / "commonsense/boolq/train.json").read_text())
    rows[0]["output"] = "   "  # tokenizes to nothing after strip(): no supervised token, NaN loss if kept
    (root / "commonsense/boolq/train.json").write_text(json.dumps(rows))
    data = task.load(CharTok(), str(root), 0, None, None)
    assert data.info["dropped_no_target"] == 1 and data.info["n_train"] == 11 == len(data.train)
    assert all(any(t != IGNORE for t in f["labels"]) for f in data.train.features)


@pytest.mark.slow
def test_zero_shot_row_evaluates_the_base_model_once(tmp_path: Path):
    """method=none: no adapter, no step; the same prompts, decoding and extraction; the base model's generations are
    exactly what the model gives without any adapter; metrics.json as any run; evaluate reproduces it."""
    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.run import run

    root = make_cs_dir(tmp_path / "data")
    over = ["method=none", "model=smollm2-135m", "task=commonsense/boolq", f"paths.data_dir={root}",
            "trainer.max_eval_samples=4", "eval.max_new_tokens=8", "trainer.progress=false", "task.val_size=2"]  # fmt: skip
    m = run(compose_cfg(over), tmp_path / "run")
    assert m["status"] == "completed" and m["adapter_params"] == 0 and m["trainable_params"] == 0
    assert m["selection"] == {"protocol": "none", "split": None, "metric": None, "step": 0, "value": None}
    assert m["total_steps"] == 0 and m["report_evals"] == 1 and "loss" in m["val"]
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and m["eval"]["accuracy"] == sum(p["correct"] for p in preds) / 4
    again, _ = evaluate_run(tmp_path / "run")
    assert again == pytest.approx(m["eval"])
    with pytest.raises(UserError, match="method=none evaluates the base model zero-shot"):
        run(compose_cfg(["method=none", "task=glue/rte"]), tmp_path / "glue")
