"""Option-likelihood scoring and the cloze format (tasks/options.py), and lm-eval as a second scorer (talklora_exp.lm_eval):
parsing over every shared record, hand-computed scores, and per-example agreement with lm-eval's own HFLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from talklora_exp.errors import UserError
from talklora_exp.tasks.generation import COMMONSENSE_TASKS, read_json_records
from talklora_exp.tasks.options import (
    Choices,
    ParseError,
    collate_rows,
    continuation_logprobs,
    encode_choices,
    encode_pair,
    parse_options,
    pick,
    requests,
)

ARC = (
    "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
    "Answer3: rock\n\nAnswer format: answer1/answer2/answer3"
)
WINO = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: Sam beat Max because _ "
    "was faster.\n\nOption1: Sam Option2: Max Answer format: option1/option2"
)
TEMPLATES = compose_cfg(["task=commonsense/boolq", "model=smollm2-135m"]).task.prompt

# A tiny random causal LM through the whole run pipeline (llama3-8b's architecture, shrunk; SmolLM2's offline tokenizer)
TINY_LM = ["model=llama3-8b-shape", "model.num_layers=2", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
           "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2", "model.max_length=256"]  # fmt: skip
CLOZE = ["task=commonsense/all", "eval=options", "task.answer_format=text", "task.prompt_style=lm_eval",
         "task.main_metric=acc_norm", "trainer.select_metric=main"]  # fmt: skip


def test_parse_written_out_by_hand():
    p = parse_options("ARC-Easy", ARC)
    assert p.question == "Which is a gas?" and p.options == ["ice", "steam", "rock"]
    assert p.labels == ["answer1", "answer2", "answer3"]
    w = parse_options("winogrande", WINO)
    assert w.question == "Sam beat Max because _ was faster." and w.options == ["Sam", "Max"]
    b = parse_options(
        "boolq",
        "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false",
    )
    assert b.question == "is it?" and b.options == ["yes", "no"]


@pytest.mark.parametrize(
    "bad,why",
    [
        (ARC.replace("\n\nAnswer format: answer1/answer2/answer3", ""), "Answer format"),
        (ARC.replace("Answer3: rock", "rock"), "Answer3"),
        (ARC.replace("answer1/answer2/answer3", "answer1/answer2"), "more options"),
        (ARC.replace("steam", ""), "empty"),
    ],
)
def test_parse_refuses_what_it_cannot_read(bad: str, why: str):
    with pytest.raises(ParseError, match=why):
        parse_options("ARC-Easy", bad)


def test_requests_in_each_format_and_style():
    rec = {"instruction": ARC, "input": "", "answer": "answer2"}
    text = requests("ARC-Easy", rec, "text", "lm_eval", TEMPLATES)
    assert text.contexts == ["Question: Which is a gas?\nAnswer:"] * 3
    assert text.continuations == [" ice", " steam", " rock"] and text.gold == 1
    label = requests("ARC-Easy", rec, "label", "alpaca", TEMPLATES)
    assert label.contexts[0].endswith("Answer format: answer1/answer2/answer3\n\n### Response:\n")
    assert label.continuations == ["the correct answer is answer1", "the correct answer is answer2",
                                   "the correct answer is answer3"]  # fmt: skip
    alpaca = requests("ARC-Easy", rec, "text", "alpaca", TEMPLATES)
    assert "Answer1" not in alpaca.contexts[0] and "Which is a gas?" in alpaca.contexts[0]
    assert alpaca.continuations == ["ice", "steam", "rock"]
    wino = requests("winogrande", {"instruction": WINO, "answer": "option1"}, "text", "lm_eval", TEMPLATES)
    assert wino.contexts == ["Sam beat Max because Sam", "Sam beat Max because Max"]
    assert wino.continuations == [" was faster."] * 2 and wino.gold == 0


def test_every_shared_record_parses(shared_data: Path):
    """Every record of every shared train and test file, both formats and both styles: zero failures, counted."""
    failures: dict[str, int] = {}
    seen = 0
    for task in COMMONSENSE_TASKS:
        for split in ("train", "test"):
            path = shared_data / "commonsense" / task / f"{split}.json"
            if not path.exists():
                continue
            for rec in read_json_records(path, ("instruction", "answer")):
                seen += 1
                for fmt, style in (("text", "lm_eval"), ("text", "alpaca"), ("label", "alpaca")):
                    try:
                        ch = requests(task, rec, fmt, style, TEMPLATES)
                        assert 2 <= len(ch.continuations) <= 5 and all(c.strip() for c in ch.continuations)
                    except ParseError:
                        failures[f"{task}/{split}"] = failures.get(f"{task}/{split}", 0) + 1
    assert seen > 40_000 and failures == {}


class WordTok:
    """Whitespace-kept word tokenizer: every character is a token (enough to check the lm-eval split by hand)."""

    def encode(self, s: str) -> list[int]:
        return [ord(c) for c in s]


def test_encode_pair_moves_trailing_space_to_the_continuation():
    ctx, cont = encode_pair(WordTok(), "Q: a\nA: ", "b")
    assert ctx == [ord(c) for c in "Q: a\nA:"] and cont == [ord(" "), ord("b")]


def test_scores_and_picks_by_hand():
    """A 3-token vocabulary whose logits are given: log-softmax sums over the continuation, acc and acc_norm."""
    ch = Choices(["ab", "ab"], ["a", "bb"], 0, ["x", "y"], "")
    tok = type("T", (), {"encode": lambda self, s: [{"a": 0, "b": 1}[c] for c in s]})()
    feats = [{"choice_rows": encode_choices(tok, ch, 16)}]
    b = collate_rows(feats, pad_id=2)
    assert b["input_ids"].tolist() == [[0, 1, 2], [0, 1, 1]]  # "ab"+"a" minus its last token; "ab"+"bb" minus last
    logits = torch.zeros(2, 3, 3)
    logits[:, :, 0] = math.log(2.0)  # every position: p(a) = 2/4, p(b) = 1/4, p(pad) = 1/4
    scores = [s for s, _ in continuation_logprobs(logits, b["cont"])]
    assert scores == pytest.approx([math.log(0.5), 2 * math.log(0.25)])
    assert pick(scores, [1, 2]) == (0, 0)
    assert pick([-4.0, -6.0], [1, 4]) == (0, 1)  # per character: -4 vs -1.5
    assert pick([-1.0, -1.0], [1, 1]) == (0, 0)  # ties: the first, as numpy's argmax


@pytest.mark.parametrize(
    "over,msg",
    [
        (["task=commonsense/boolq", "task.answer_format=text"], "needs task.answer_format=label"),
        (["task=gsm8k", "eval=options"], "gsm8k has no options"),
        (
            ["task=commonsense/boolq", "eval=options"],
            "task.main_metric='accuracy' is not reported with eval.scoring=options",
        ),
        (["task=commonsense/boolq", "eval.scoring=maybe"], "eval.scoring='maybe'; allowed"),
    ],
)
def test_scoring_combinations_are_checked_once(over: list[str], msg: str):
    from talklora_exp.validate import validate_config

    with pytest.raises(UserError, match=msg):
        validate_config(compose_cfg(["model=smollm2-135m", *over]))


def _samples(out: Path) -> dict[str, list[dict]]:
    found = {}
    for p in out.rglob("samples_*.jsonl"):
        name = p.name[len("samples_") :].rsplit("_", 1)[0]
        found[name] = [json.loads(x) for x in p.read_text().splitlines()]
    return found


@pytest.mark.slow
def test_lm_eval_agrees_with_our_scorer_per_example(tmp_path: Path, shared_data: Path, monkeypatch):
    """A TalkLoRA run (tiny random LM, 2 steps) scored by this project at the end of training, and its run dir scored
    again by lm-eval's HFLM through `python -m talklora_exp.lm_eval`: the same log-likelihood per option (float32,
    another batching) and the same prediction per example, on the first 4 of all 8 sets; and a `method=none` run."""
    from talklora_exp.lm_eval.__main__ import main
    from talklora_exp.run import run

    monkeypatch.setenv("TALKLORA_DATA_DIR", str(shared_data))  # what the shipped task YAMLs read
    common = [*TINY_LM, *CLOZE, f"paths.data_dir={shared_data}", "trainer.max_train_samples=16", "trainer.max_steps=2",
              "trainer.batch_size=4", "trainer.grad_accum=1", "trainer.max_eval_samples=4", "trainer.progress=false",
              "task.val_size=4", "trainer.eval_batch_size=3"]  # fmt: skip
    m = run(compose_cfg(["method=talklora", *common]), tmp_path / "talk")
    assert m["status"] == "completed" and m["selection"]["metric"] == "acc_norm"
    ours = {}
    for row in map(json.loads, (tmp_path / "talk" / "predictions.jsonl").read_text().splitlines()):
        ours.setdefault(row["task"], []).append(row)
    assert main([str(tmp_path / "talk"), "--tasks", "talklora_commonsense_text", "--limit", "4", "--log_samples",
                 "--output_path", str(tmp_path / "lm"), "--batch_size", "5"]) == 0  # fmt: skip
    theirs = _samples(tmp_path / "lm")
    short = {"social_i_qa": "siqa", "ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy"}
    assert len(theirs) == 8
    for task, rows in ours.items():
        lm_rows = sorted(theirs[f"talklora_{short.get(task, task)}_text"], key=lambda s: s["doc_id"])
        assert len(lm_rows) == len(rows) == 4
        for a, b in zip(rows, lm_rows):
            ll = [float(r[0][0]) for r in b["resps"]]  # lm-eval writes them as text
            assert a["ll"] == pytest.approx(ll, rel=1e-5, abs=1e-4), (task, a["id"])
            assert float(a["acc"]) == b["acc"], (task, a["id"])
            if (
                task != "winogrande"
            ):  # lm-eval normalises WinoGrande by its contexts' length; ours by the continuation's
                assert float(a["acc_norm"]) == b["acc_norm"], (task, a["id"])
    z = run(compose_cfg(["method=none", *common]), tmp_path / "zero")
    assert z["status"] == "completed"
    assert main([str(tmp_path / "zero"), "--tasks", "talklora_boolq_label,talklora_piqa_text", "--limit", "3",
                 "--output_path", str(tmp_path / "lm0")]) == 0  # fmt: skip
    res = json.loads(next((tmp_path / "lm0").rglob("results_*.json")).read_text())
    assert set(res["results"]) == {"talklora_boolq_label", "talklora_piqa_text"}


def test_lm_eval_cli_refuses_in_one_line(tmp_path: Path, capsys):
    from talklora_exp.lm_eval.__main__ import main

    assert main([str(tmp_path / "nope"), "--tasks", "talklora_boolq_text"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
