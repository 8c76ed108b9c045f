"""Docs for the shipped lm-eval tasks: each LLM-Adapters record turned into its scored requests by the same code as
this project's own option scorer (`talklora_exp.tasks.options.requests`), so the two scorers see identical text."""

from __future__ import annotations

from typing import Any


def load(subset: str, answer_format: str, prompt_style: str, **_: Any) -> Any:
    """lm-eval's `custom_dataset`: `$TALKLORA_DATA_DIR/commonsense/<subset>/test.json` as a DatasetDict with a `test`
    split of docs {context(s), choices, gold}."""
    import datasets
    from omegaconf import OmegaConf

    from talklora_exp.cli import CONF_DIR
    from talklora_exp.data import describe_search, find_local
    from talklora_exp.errors import UserError
    from talklora_exp.tasks.generation import check_answers, read_json_records
    from talklora_exp.tasks.options import requests

    root = find_local(None, "commonsense", subset)
    if root is None:
        raise UserError(f"lm-eval task {subset}: no data; {describe_search(None, 'commonsense', subset)}")
    path = root / "test.json"
    recs = check_answers(path, subset, read_json_records(path, ("instruction", "output", "answer")))
    templates = OmegaConf.load(CONF_DIR / "generation_task_base.yaml").prompt
    docs = []
    for i, r in enumerate(recs):
        ch = requests(subset, r, answer_format, prompt_style, templates)
        multi = len(set(ch.contexts)) > 1  # WinoGrande: one context per option, one shared continuation
        strip = len(ch.delim)
        docs.append({
            "id": f"{subset}-{i}",
            "context": "" if multi else ch.contexts[0],
            "contexts": ch.contexts if multi else [],
            "choices": [c[strip:] for c in ch.continuations] if not multi else [],
            "target": ch.continuations[0][strip:] if multi else "",
            "gold": ch.gold,
        })  # fmt: skip
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc: dict) -> Any:
    """The context; for one-context-per-option docs lm-eval wants the gold index here (its WinoGrande layout)."""
    return doc["gold"] if doc["contexts"] else doc["context"]


def doc_to_choice(doc: dict) -> list[str]:
    return doc["contexts"] or doc["choices"]


def doc_to_target(doc: dict) -> Any:
    return doc["target"] if doc["contexts"] else doc["gold"]
