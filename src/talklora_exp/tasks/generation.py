"""Generation tasks on causal LMs: Alpaca-style prompts (LLM-Adapters), response-only loss, batched generation.

`CommonsenseTask` (LLM-Adapters JSON: instruction / input / output / answer) and `Gsm8kTask` (question / answer with
`#### <number>`) share prompting, label masking, collation and the generation loop; they differ in data files and in
answer extraction (`extract_commonsense`, `extract_last_number`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import engines
from ..data import describe_search, find_local, iter_lines
from ..errors import UserError
from . import options as opt
from .base import EvalResult, Split, Task, TaskData, split_and_cap
from .options import render_prompt

IGNORE = -100

# LLM-Adapters' answer vocabularies (commonsense_evaluate.py): the first match in the generated text wins.
ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
COMMONSENSE_TASKS = list(ANSWER_PATTERNS)
ANSWER_OPTIONS: dict[str, list[str]] = {t: p.split("|") for t, p in ANSWER_PATTERNS.items()}
TRAIN_170K = "commonsense_170k.json"


def extract_commonsense(task: str, text: str, case_sensitive: bool = True) -> str:
    """First valid option word in the generation, as upstream (case-sensitive substring match by default)."""
    found = re.findall(ANSWER_PATTERNS[task], text.strip() if case_sensitive else text.strip().lower())
    return found[0] if found else ""


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _norm_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return ""
    return str(int(v)) if v == int(v) else repr(v)


def extract_last_number(text: str) -> str:
    """GSM8K prediction: the last number in the text, commas removed, 12.0 -> 12."""
    found = _NUM.findall(text)
    return _norm_number(found[-1]) if found else ""


def gsm8k_gold(answer: str) -> str:
    if "####" not in answer:
        raise ValueError("no '####' in answer")
    return _norm_number(answer.split("####")[-1].strip())


def read_json_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    """A JSON list (LLM-Adapters) or JSON-lines file (GSM8K); missing fields name the file and record."""
    text = path.read_bytes()
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}; files must be UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        where = [f"record {i}" for i in range(len(recs))]
    else:
        recs, where = [], []
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            where.append(f"line {lineno}")
    for rec, w in zip(recs, where):
        if not isinstance(rec, dict) or any(k not in rec for k in required):
            raise UserError(f"{path} {w}: needs fields {list(required)}")
        bad = [k for k in (*required, "input") if k in rec and not isinstance(rec[k], str)]
        if bad:  # a null (or a number) where text belongs would fail deep inside tokenization
            raise UserError(f"{path} {w}: field {bad[0]!r} is {rec[bad[0]]!r}; it must be a string")
    if not recs:
        raise UserError(f"{path}: no records")
    return recs


def cut_generation(text: str, eos: str | None, pad: str | None, cut_at: list[str]) -> str:
    """Upstream's post-processing of decoded text: cut at the first EOS, drop pad text, then cut at each marker in
    `cut_at` ("Q:", "R:"). The EOS cut comes first so a tokenizer whose pad token *is* its EOS (SmolLM2) still stops
    at the end of the answer (upstream removes pad text first, which would erase that EOS)."""
    if eos and eos in text:
        text = text[: text.index(eos)]
    if pad:
        text = text.replace(pad, "")
    for marker in cut_at:
        if marker in text:
            text = text[: text.index(marker)]
    return text


def truncate(ids: list[int], max_len: int, side: str) -> list[int]:
    if len(ids) <= max_len:
        return ids
    return ids[-max_len:] if side == "left" else ids[:max_len]


def check_answers(path: Path, task: str, recs: list[dict]) -> list[dict]:
    """Every gold answer must be one of the task's options, or no prediction could ever match it."""
    allowed = ANSWER_OPTIONS[task]
    for i, r in enumerate(recs):
        if r["answer"] not in allowed:
            raise UserError(f"{path} record {i}: answer {r['answer']!r} is not one of {task}'s options {allowed}")
    return recs


class GenerationTask(Task):
    """Upstream's sequence layout (`dataset/format_inputs.py`, template_type 4): the prompt (no BOS) cut to
    `task.prompt_max_length`, then the stripped response cut to `task.response_max_length` (no EOS), loss on the
    response only. Test prompts get BOS when the tokenizer has one. Each of these is a `task.*` flag."""

    kind = "causal"
    report_split = "test"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.templates = cfg.prompt
        self.train_on_prompt = bool(cfg.get("train_on_prompt", False))
        self.prompt_max = int(cfg.prompt_max_length)
        self.response_max = int(cfg.response_max_length)
        self.prompt_side = str(cfg.prompt_truncation)
        self.train_bos, self.train_eos, self.test_bos = bool(cfg.train_bos), bool(cfg.train_eos), bool(cfg.test_bos)
        self.answer_format = str(cfg.get("answer_format", "label"))  # label (upstream) | text (cloze)
        self.prompt_style = str(cfg.get("prompt_style", "alpaca"))  # alpaca (upstream) | lm_eval
        self.gen = None  # set by run.py from cfg.eval

    @property
    def upstream_format(self) -> bool:
        """Upstream's sequences (Alpaca prompt, label response): trained and decoded exactly as upstream does."""
        return self.answer_format == "label" and self.prompt_style == "alpaca"

    @property
    def scoring(self) -> str:
        """`eval.scoring`: generate (decode and extract, upstream), options (option likelihood) or both."""
        return str(self.gen.get("scoring", "generate")) if self.gen is not None else "generate"

    def choices(self, rec: dict) -> opt.Choices:
        """The record's scored options (tasks.options.requests); a record that does not parse names itself."""
        task = rec.get("task", self.name)
        try:
            return opt.requests(task, rec, self.answer_format, self.prompt_style, self.templates)
        except opt.ParseError as e:
            raise UserError(f"{task} record {rec.get('id')}: cannot read its options ({e})") from None

    # -- data -----------------------------------------------------------------------------------------------------
    def records(self, data_dir: str | None) -> tuple[list[dict], dict[str, list[dict]], dict[str, Any]]:
        """(train records, {eval prefix: records}, info); records have instruction, input, output, answer, id."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Any, rec: dict, bos: bool) -> list[int]:
        prompt = render_prompt(self.templates, rec["instruction"], rec.get("input", ""))
        ids = truncate(tokenizer(prompt, add_special_tokens=False)["input_ids"], self.prompt_max, self.prompt_side)
        return ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + ids

    def encode_train(self, tokenizer: Any, rec: dict) -> dict:
        """prompt + response; labels are -100 on exactly the prompt tokens (unless train_on_prompt). Another format
        or prompt style trains on the gold choice's context and continuation, split as option scoring splits them."""
        if self.upstream_format:
            p_ids = self.prompt_ids(tokenizer, rec, self.train_bos)
            r_ids = tokenizer(rec["output"].strip(), add_special_tokens=False)["input_ids"][: self.response_max]
        else:
            ch = self.choices(rec)
            p_ids, r_ids = opt.encode_pair(tokenizer, ch.contexts[ch.gold], ch.continuations[ch.gold])
            p_ids, r_ids = truncate(p_ids, self.prompt_max, self.prompt_side), r_ids[: self.response_max]
            if self.train_bos and tokenizer.bos_token_id is not None:
                p_ids = [tokenizer.bos_token_id, *p_ids]
        if self.train_eos:
            r_ids = r_ids + [tokenizer.eos_token_id]
        ids = p_ids + r_ids
        labels = list(ids) if self.train_on_prompt else [IGNORE] * len(p_ids) + r_ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def encode_eval(self, tokenizer: Any, rec: dict, max_length: int) -> dict:
        """What evaluation needs of a record: the decoding prompt (scoring generate/both) and each option's scored
        row (options/both)."""
        out = dict(rec)
        if self.scoring != "options":
            out["prompt"] = render_prompt(self.templates, rec["instruction"], rec.get("input", ""))
            out["prompt_ids"] = self.prompt_ids(tokenizer, rec, self.test_bos)
        if self.scoring != "generate":
            ch = self.choices(rec)
            out["choice_rows"] = opt.encode_choices(tokenizer, ch, max_length)
            out["gold_index"], out["option_labels"] = ch.gold, ch.labels
            out["norm_len"] = [len(c) - len(ch.delim) for c in ch.continuations]
        return out

    def load(
        self,
        tokenizer: Any,
        data_dir: str | None,
        max_length: int,
        max_train: int | None,
        max_eval: int | None,
        val_size: int = 0,
        val_seed: int = 58,
    ) -> TaskData:
        train, evals, info = self.records(data_dir)
        train, val, evals = split_and_cap(train, evals, val_size, val_seed, max_train, max_eval)
        feats = [self.encode_train(tokenizer, r) for r in train]
        # A response that tokenizes to nothing leaves no supervised token (all -100): its loss would be NaN.
        kept = [f for f in feats if any(t != IGNORE for t in f["labels"])]
        if not kept:
            raise UserError(f"no training example has a response token (task.response_max_length={self.response_max})")
        dropped, feats = len(feats) - len(kept), kept
        info = {
            **info,
            "n_train": len(feats),
            "n_val": len(val),
            "dropped_no_target": dropped,
            "n_eval": {k or "test": len(v) for k, v in evals.items()},
        }
        val_data = None
        if val:
            val_data = {"": Split([self.encode_eval(tokenizer, r, max_length) for r in val])}
        return TaskData(
            train=Split(feats),
            evals={k: Split([self.encode_eval(tokenizer, r, max_length) for r in v]) for k, v in evals.items()},
            info=info,
            val=Split([self.encode_train(tokenizer, r) for r in val]) if val else None,
            val_evals=val_data,
        )

    def collator(self, tokenizer: Any) -> Any:
        pad = tokenizer.pad_token_id

        def collate(batch: list[dict]) -> dict:
            if "labels" not in batch[0]:  # eval records (see encode_eval)
                out: dict[str, Any] = {"records": [{k: v for k, v in b.items() if k not in ("prompt_ids", "choice_rows")}
                                                   for b in batch]}  # fmt: skip
                if "prompt_ids" in batch[0]:  # prompts left-padded for generation
                    n = max(len(b["prompt_ids"]) for b in batch)
                    out["input_ids"] = torch.tensor(
                        [[pad] * (n - len(b["prompt_ids"])) + b["prompt_ids"] for b in batch]
                    )
                    out["attention_mask"] = torch.tensor(
                        [[0] * (n - len(b["prompt_ids"])) + [1] * len(b["prompt_ids"]) for b in batch]
                    )
                if "choice_rows" in batch[0]:  # every option of every record, one right-padded row each
                    out["options"] = opt.collate_rows(batch, pad)
                return out
            n = max(len(b["input_ids"]) for b in batch)
            out = {
                "input_ids": torch.tensor([b["input_ids"] + [pad] * (n - len(b["input_ids"])) for b in batch]),
                "attention_mask": torch.tensor(
                    [b["attention_mask"] + [0] * (n - len(b["attention_mask"])) for b in batch]
                ),
                "labels": torch.tensor([b["labels"] + [IGNORE] * (n - len(b["labels"])) for b in batch]),
            }
            return out

        return collate

    def example_losses(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over each example's supervised tokens, and their count."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)
        return tok.sum(1), (labels != IGNORE).sum(1).to(tok.dtype)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def extract(self, prefix: str, text: str) -> str:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        model: Any,
        loaders: dict[str, Any],
        accelerator: Any,
        on_batch: Any = None,
        progress: bool = False,
        selecting: bool = False,
    ) -> EvalResult:
        """Accuracy per eval set by `eval.scoring`: `accuracy` from batched generation on left-padded prompts
        (decoding from `eval`), `acc` / `acc_norm` from option likelihood; predictions kept. `selecting`: only what
        the selecting metric (`task.main_metric`) needs (validation never decodes for an option metric).
        `progress`: a bar with rate and ETA over all sets (decoding a test set takes the better part of an hour on CPU)."""
        model.eval()
        do_gen = self.scoring != "options" and not (selecting and self.main_metric in ("acc", "acc_norm"))
        do_opt = self.scoring != "generate" and not (selecting and self.main_metric == "accuracy")
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        preds_all: list[dict] = []
        bar = tqdm(total=sum(len(dl) for dl in loaders.values()), desc="evaluate", unit="batch", dynamic_ncols=True,
                   disable=not (progress and accelerator.is_main_process))  # fmt: skip
        for prefix, loader in loaders.items():
            rows: list[dict] = []
            bar.set_postfix_str(prefix.rstrip("/") or self.name)
            for batch in loader:
                bar.update(1)
                recs = batch["records"]
                out = [{"id": r["id"], "task": r.get("task", self.name), "gold": r["answer"]} for r in recs]
                if do_gen:
                    for row, r, t in zip(out, recs, self._generate(model, batch, accelerator, on_batch)):
                        pred = self.extract(prefix, t)
                        row.update(prompt=r["prompt"], generated=t, extracted=pred, correct=pred == r["answer"])
                if do_opt:
                    for row, r, scores in zip(out, recs, self._score_options(model, batch, on_batch)):
                        pick, pick_norm = opt.pick(scores, r["norm_len"])
                        labels = r["option_labels"]
                        row.update(ll=scores, ll_pick=labels[pick], ll_pick_norm=labels[pick_norm],
                                   acc=pick == r["gold_index"], acc_norm=pick_norm == r["gold_index"])  # fmt: skip
                # per batch, while the loader still knows how many of its last batch's rows are padding repeats
                rows += accelerator.gather_for_metrics(out, use_gather_object=True)
            n = max(len(rows), 1)
            if do_gen:
                metrics[f"{prefix}accuracy"] = sum(r["correct"] for r in rows) / n
            if do_opt:
                metrics[f"{prefix}acc"] = sum(r["acc"] for r in rows) / n
                metrics[f"{prefix}acc_norm"] = sum(r["acc_norm"] for r in rows) / n
            counts[prefix or "test"] = len(rows)
            preds_all += rows
        bar.close()
        if len(loaders) > 1:  # commonsense/all: the paper's average over tasks, per metric
            for m in ("accuracy", "acc", "acc_norm"):
                per = [v for k, v in metrics.items() if k.endswith(f"/{m}")]
                if per:
                    metrics[m] = sum(per) / len(per)
        return EvalResult(metrics, preds_all, counts)

    def _generate(self, model: Any, batch: dict, accelerator: Any, on_batch: Any) -> list[str]:
        """Decoded continuations of the batch's prompts, cut as upstream cuts them."""
        tok, g = self.tokenizer, self.gen
        kw = dict(max_new_tokens=int(g.max_new_tokens), num_beams=int(g.num_beams), do_sample=bool(g.do_sample),
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        if g.do_sample or int(g.num_beams) > 1:
            kw.update(temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k))
        enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if on_batch is not None:
            on_batch({"attention_mask": enc["attention_mask"]})
        gen_model = accelerator.unwrap_model(model)
        if accelerator.num_processes > 1 and engines.is_sharded_model(gen_model):
            kw["synced_gpus"] = True  # sharded weights: every process runs each decode step, or the gathers hang
        out = gen_model.generate(**enc, **kw)
        raw = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
        return [cut_generation(t, tok.eos_token, tok.pad_token, list(g.get("cut_at") or [])) for t in raw]

    def _score_options(self, model: Any, batch: dict, on_batch: Any) -> list[list[float]]:
        """Each record's option log-likelihoods (tasks.options), all options of the batch in one forward."""
        o = batch["options"]
        if on_batch is not None:
            on_batch({"attention_mask": o["attention_mask"]})
        logits = model(input_ids=o["input_ids"], attention_mask=o["attention_mask"]).logits
        flat = [s for s, _ in opt.continuation_logprobs(logits, o["cont"])]
        out, i = [], 0
        for k in o["n_choices"]:
            out.append(flat[i : i + k])
            i += k
        return out


class CommonsenseTask(GenerationTask):
    """LLM-Adapters commonsense sets; task.name is one of COMMONSENSE_TASKS or 'all'."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.eval_tasks = COMMONSENSE_TASKS if cfg.name == "all" else [cfg.name]
        if cfg.name != "all" and cfg.name not in ANSWER_PATTERNS:
            raise UserError(f"task.name={cfg.name!r}; valid commonsense tasks: {COMMONSENSE_TASKS + ['all']}")
        self.case_sensitive = bool(cfg.get("case_sensitive_extraction", True))

    def extract(self, prefix: str, text: str) -> str:
        task = prefix.rstrip("/") if prefix else self.name
        return extract_commonsense(task, text, self.case_sensitive)

    def records(self, data_dir: str | None):
        req = ("instruction", "output", "answer")
        root = find_local(data_dir, "commonsense")  # one data dir for the whole dataset, never mixed across dirs
        if root is None:
            raise UserError(f"commonsense: no data folder; {describe_search(data_dir, 'commonsense')}")
        own = root / self.name / "train.json"
        if self.name != "all" and own.exists():  # upstream's single-task mode: the set's own train file
            train = [{**r, "id": f"{self.name}-train-{i}", "task": self.name}
                     for i, r in enumerate(check_answers(own, self.name, read_json_records(own, req)))]  # fmt: skip
            source = f"{self.name}/train.json (the set's own train file)"
        elif (root / TRAIN_170K).exists():
            train = [{**r, "id": f"170k-{i}"} for i, r in enumerate(read_json_records(root / TRAIN_170K, req))]
            source = str(root / TRAIN_170K)
        else:
            files = [root / t / "train.json" for t in COMMONSENSE_TASKS if (root / t / "train.json").exists()]
            if not files:
                raise UserError(f"commonsense: no training data in {root} ({TRAIN_170K} or <task>/train.json)")
            train = [{**r, "id": f"{p.parent.name}-train-{i}", "task": p.parent.name} for p in files
                     for i, r in enumerate(check_answers(p, p.parent.name, read_json_records(p, req)))]  # fmt: skip
            source = "per-task train files: " + ", ".join(p.parent.name for p in files)
        if self.name != "all" and not own.exists():  # a set without its own train file (HellaSwag here)
            source = f"combined ({self.name} has no train file): {source}"
        evals = {}
        for t in self.eval_tasks:
            p = root / t / "test.json"
            if not p.exists():
                raise UserError(f"commonsense/{t}: {p} not found")
            recs = check_answers(p, t, read_json_records(p, req))
            evals[f"{t}/" if self.name == "all" else ""] = [
                {**r, "id": f"{t}-{i}", "task": t} for i, r in enumerate(recs)
            ]
        return train, evals, {"source": source, "train_source": source, "root": str(root)}


class Gsm8kTask(GenerationTask):
    """GSM8K: train on the worked solutions, score exact match of the last generated number vs the number after ####."""

    def extract(self, prefix: str, text: str) -> str:
        return extract_last_number(text)

    def records(self, data_dir: str | None):
        out = {}
        root = find_local(data_dir, "gsm8k")  # one data dir for the whole dataset
        if root is None:
            raise UserError(f"gsm8k: no data folder; {describe_search(data_dir, 'gsm8k')}")
        for split in ("train", "test"):
            p = root / f"{split}.jsonl"
            if not p.exists():
                raise UserError(f"gsm8k: {p} not found")
            recs = read_json_records(p, ("question", "answer"))
            rows = []
            for i, r in enumerate(recs):
                try:
                    gold = gsm8k_gold(r["answer"])
                except ValueError:
                    raise UserError(f"{p} record {i + 1}: answer has no '#### <number>' line") from None
                rows.append(
                    {
                        "id": f"gsm8k-{split}-{i}",
                        "instruction": r["question"],
                        "input": "",
                        "output": r["answer"],
                        "answer": gold,
                    }
                )
            out[split] = rows
        return (
            out["train"],
            {"": out["test"]},
            {"source": str(root), "train_source": "gsm8k/train.jsonl"},
        )
