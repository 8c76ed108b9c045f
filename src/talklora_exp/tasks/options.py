"""Multiple-choice scoring by option likelihood, and the cloze answer format (`task.answer_format=text`).

Why: at 135M parameters a model does not bind the LLM-Adapters option *labels* ("answer3") to their content, so
generating a label measures the answer format, not knowledge. Scoring each option's own text by its log-likelihood
(lm-evaluation-harness's multiple-choice) measures what the model knows.

Definitions are lm-eval's (`api/model.py` `_encode_pair`, `models/huggingface.py` `_loglikelihood_tokens`,
`api/metrics.py` acc / acc_norm), so `python -m talklora_exp.lm_eval` is a second, independent scorer of the same
requests:
- a request is a (context, continuation) pair; trailing whitespace of the context moves to the continuation; the
  continuation's tokens are those of `encode(context + continuation)` after `len(encode(context))`;
- its score is the sum of the continuation tokens' log-probabilities given everything before them, the sequence cut
  from the left to `max_length + 1` tokens;
- acc = argmax of the scores; acc_norm = argmax of score / characters of the continuation.

Where this file is: `parse_options` reads an LLM-Adapters instruction into its question and option texts;
`requests` turns a record into its choices for a format (`label` | `text`) and prompt style (`alpaca` | `lm_eval`);
`encode_pair`, `collate_rows` and `continuation_logprobs` score them, batched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError

LABEL_PREFIX = "the correct answer is "  # upstream's response: "the correct answer is answer3"

# The option label that introduces each option in an instruction (LLM-Adapters' text), per set; BoolQ has none.
_OPTION_WORD = {
    "piqa": "Solution",
    "social_i_qa": "Answer",
    "ARC-Challenge": "Answer",
    "ARC-Easy": "Answer",
    "openbookqa": "Answer",
    "hellaswag": "Ending",
    "winogrande": "Option",
}
# BoolQ's options as text (lm-eval's boolq choices), in the order of its labels true / false.
BOOLQ_TEXT = {"true": "yes", "false": "no"}
_FORMAT = re.compile(r"\s*Answer format: ([A-Za-z0-9/]+)\s*$")


def render_prompt(templates: Any, instruction: str, inp: str) -> str:
    """The Alpaca template (`task.prompt`): its with-input form for records that have an input."""
    return (templates.with_input if inp else templates.no_input).format(instruction=instruction, input=inp)


class ParseError(ValueError):
    """An instruction that does not have the set's layout (counted by the parse test, never silently scored)."""


@dataclass(frozen=True)
class Parsed:
    question: str  # the question / context, without the set's header and options
    options: list[str]  # option texts in label order (BoolQ: the words of BOOLQ_TEXT)
    labels: list[str]  # the set's option labels in the same order (answer1.., true/false)


def parse_options(task: str, instruction: str) -> Parsed:
    """Question and option texts out of an LLM-Adapters instruction, e.g. ARC's
    `Please choose the correct answer to the question: Q\\n\\nAnswer1: a Answer2: b\\n\\nAnswer format: answer1/answer2`.
    The option count comes from the `Answer format:` line (ARC has 3-, 4- and 5-option questions)."""
    m = _FORMAT.search(instruction)
    if m is None:
        raise ParseError("no 'Answer format:' line")
    labels = m.group(1).split("/")
    body = instruction[: m.start()]
    head, sep, rest = body.partition(": ")
    if not sep:
        raise ParseError("no header ending in ': '")
    if task == "boolq":
        if labels != ["true", "false"] or not head.endswith("question"):
            raise ParseError(f"boolq labels {labels}")
        return Parsed(rest.strip(), [BOOLQ_TEXT[x] for x in labels], labels)
    word = _OPTION_WORD.get(task)
    if word is None:
        raise ParseError(f"unknown set {task!r}")
    if [x.rstrip("0123456789") for x in labels] != [word.lower()] * len(labels):
        raise ParseError(f"labels {labels} are not {word.lower()}N")
    starts, pos = [], 0
    for k in range(1, len(labels) + 1):
        # each option label once, in order; the first one follows the question's blank line (winogrande: one space)
        i = rest.find(f"{word}{k}: ", pos)
        if i < 0:
            raise ParseError(f"no '{word}{k}: '")
        starts.append(i)
        pos = i + len(f"{word}{k}: ")
    if rest.find(f"{word}{len(labels) + 1}: ", pos) >= 0:
        raise ParseError(f"more options than the answer format's {len(labels)}")
    question = rest[: starts[0]].strip()
    ends = [*starts[1:], len(rest)]
    options = [rest[s + len(f"{word}{k + 1}: ") : e].strip() for k, (s, e) in enumerate(zip(starts, ends))]
    if not question or any(not o for o in options):
        raise ParseError("an empty question or option")
    if task == "winogrande" and question.count("_") != 1:
        raise ParseError(f"{question.count('_')} blanks in the sentence (needs exactly one '_')")
    return Parsed(question, options, labels)


def _hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's ' [title]' marks become sentence breaks, other [..] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _lm_eval_context(task: str, question: str) -> str:
    """lm-eval's doc_to_text for each set, on the question as LLM-Adapters stores it (no BoolQ passage; SIQA's
    context and question already joined)."""
    if task in ("ARC-Easy", "ARC-Challenge", "piqa", "boolq"):
        return f"Question: {question}\nAnswer:"
    if task == "social_i_qa":
        return f"Q: {question}\nA:"
    if task == "hellaswag":
        return _hellaswag_text(question)
    return question  # openbookqa: the question stem itself


@dataclass(frozen=True)
class Choices:
    """One record's requests: choice i is scored as `contexts[i]` followed by `continuations[i]`."""

    contexts: list[str]
    continuations: list[str]
    gold: int  # index of the gold option
    labels: list[str]  # the set's option labels, so a prediction can be written as the label it picks
    delim: str  # what each continuation starts with before the option (lm-eval's target_delimiter)


def requests(task: str, rec: dict, answer_format: str, style: str, templates: Any = None) -> Choices:
    """The scored choices of one record.

    - `label` (upstream's format): the prompt, then "the correct answer is <label>" for each of the set's labels.
    - `text` (cloze): the prompt without the option list, then each option's own text. WinoGrande as lm-eval scores
      it: the option substituted into the blank ends the context, and the rest of the sentence is what is scored.
    `style`: `alpaca` wraps the instruction in `templates` (upstream's template; in `text` format the instruction
    keeps its header and question, not the options); `lm_eval` uses lm-eval's per-set prompt ("Question: ..
    \\nAnswer:") and a space before each continuation."""
    p = parse_options(task, rec["instruction"])
    if rec["answer"] not in p.labels:
        raise ParseError(f"answer {rec['answer']!r} not among {p.labels}")
    gold = p.labels.index(rec["answer"])
    delim = " " if style == "lm_eval" else ""
    if answer_format == "label":
        ctx = (f"Question: {rec['instruction']}\nAnswer:" if style == "lm_eval"
               else render_prompt(templates, rec["instruction"], rec.get("input", "")))  # fmt: skip
        return Choices([ctx] * len(p.labels), [delim + LABEL_PREFIX + lab for lab in p.labels], gold, p.labels, delim)
    if task == "winogrande":
        cut = p.question.index("_")
        before, after = p.question[:cut], p.question[cut + 1 :].strip()
        if style == "lm_eval":
            prompt = ""
        else:
            header = rec["instruction"].partition(": ")[0]
            prompt = render_prompt(templates, f"{header}: {p.question}", "")
        return Choices([prompt + before + o for o in p.options], [" " + after] * len(p.options), gold, p.labels, " ")
    if style == "lm_eval":
        ctx = _lm_eval_context(task, p.question)
        opts = [_hellaswag_text(o) for o in p.options] if task == "hellaswag" else p.options
    else:
        header = rec["instruction"].partition(": ")[0]
        ctx, opts = render_prompt(templates, f"{header}: {p.question}", rec.get("input", "")), p.options
    return Choices([ctx] * len(opts), [delim + o for o in opts], gold, p.labels, delim)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal LMs (the tokenizer's default special tokens, as HFLM's default)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def encode_choices(tokenizer: Any, ch: Choices, max_length: int) -> list[tuple[list[int], int]]:
    """Per choice: the model input (context + continuation minus its last token, cut from the left to `max_length`)
    and the continuation's token count, as lm-eval feeds them."""
    out = []
    for c, x in zip(ch.contexts, ch.continuations):
        ctx, cont = encode_pair(tokenizer, c, x)
        if not cont:
            raise UserError(f"an option's continuation {x!r} tokenizes to nothing")
        out.append(((ctx + cont)[-(max_length + 1) :][:-1], len(cont), (ctx + cont)[-len(cont) :]))
    return out


def collate_rows(feats: list[dict], pad_id: int) -> dict[str, Any]:
    """Every choice of every record in the batch as one right-padded row (a causal model's earlier positions do not
    see the padding): input ids, mask, the continuation's target ids and where they sit."""
    rows = [r for f in feats for r in f["choice_rows"]]
    n = max(len(inp) for inp, _, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (inp, _, _) in enumerate(rows):
        ids[i, : len(inp)] = torch.tensor(inp)
        mask[i, : len(inp)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "cont": [(len(inp), k, tgt) for inp, k, tgt in rows],
        "n_choices": [len(f["choice_rows"]) for f in feats],
    }


def continuation_logprobs(logits: torch.Tensor, cont: list[tuple[int, int, list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, is_greedy) of each row's continuation: the last k positions of its input predict
    its k continuation tokens (lm-eval's `_loglikelihood_tokens`)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (n, k, tgt) in enumerate(cont):
        lp = logp[i, n - k : n]
        t = torch.tensor(tgt, device=lp.device)
        out.append((float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all())))
    return out


def pick(scores: list[float], lengths: list[int]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice): argmax of the log-likelihood, and of it per character of the option
    (the continuation without its delimiter, as lm-eval counts `doc_to_choice`); the first maximum on ties, as
    numpy's argmax in lm-eval."""
    acc = max(range(len(scores)), key=lambda i: (scores[i], -i))
    normed = [s / max(n, 1) for s, n in zip(scores, lengths)]
    return acc, max(range(len(normed)), key=lambda i: (normed[i], -i))
