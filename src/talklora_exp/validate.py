"""Every non-method config value checked once, up front, before anything is built or written: types, ranges and
choices, each failure one line naming the key, the value and what is allowed. (Method keys are checked by the method's peft
config, through methods/config.py; data values by the task readers, which name file:line.)"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import choices as C
from .errors import UserError

_MISSING = object()

# key: (kind, allowed). kinds: int / float / bool / choice / str; "?" suffix = null allowed.
RULES: dict[str, tuple[str, Any]] = {
    "seed": ("int", (0, 2**32 - 1)),  # numpy's seed range, which accelerate's set_seed also seeds
    "overwrite": ("bool", None),
    "trainer.epochs": ("int?", (1, None)),
    "trainer.max_steps": ("int?", (1, None)),
    "trainer.batch_size": ("int", (1, None)),
    "trainer.eval_batch_size": ("int", (1, None)),
    "trainer.grad_accum": ("int", (1, None)),
    "trainer.lr": ("float", (0.0, None, "open")),
    "trainer.weight_decay": ("float", (0.0, None)),
    "trainer.warmup_steps": ("int?", (0, None)),
    "trainer.warmup_ratio": ("float", (0.0, 1.0)),
    "trainer.max_grad_norm": ("float?", (0.0, None)),
    "trainer.eval_every": ("int?", (1, None)),
    "trainer.log_every": ("int", (1, None)),
    "trainer.max_train_samples": ("int?", (1, None)),
    "trainer.max_eval_samples": ("int?", (1, None)),
    "trainer.group_by_length": ("bool", None),
    "trainer.mixed_precision": ("choice", C.MIXED_PRECISION),
    "trainer.cpu": ("bool", None),
    "trainer.num_workers": ("int", (0, None)),
    "trainer.progress": ("bool", None),
    "trainer.routing_stats_every": ("int?", (1, None)),
    "trainer.checkpoint_every": ("int?", (1, None)),
    "trainer.resume": ("choice", C.RESUME),
    "trainer.deterministic": ("bool", None),
    "trainer.select": ("choice", C.SELECT_PROTOCOLS),
    "trainer.select_metric": ("choice", C.SELECT_METRICS),
    "trainer.dev_curve": ("bool", None),
    "trainer.gradient_checkpointing": ("bool", None),
    "trainer.strategy": ("choice", C.STRATEGIES),
    "trainer.compile": ("bool", None),
    "model.max_length": ("int", (1, None)),
    "model.dtype": ("choice", C.MODEL_DTYPES),
    "model.pooling": ("choice", C.POOLING),
    "model.pair_encoding": ("choice", C.PAIR_ENCODINGS),
    "model.num_layers": ("int?", (1, None)),
    "model.quantization": ("choice", C.QUANTIZATIONS),
    "task.val_size": ("int", (0, None)),
    "task.val_seed": ("int", (0, 2**32 - 1)),
    "task.prompt_max_length": ("int", (1, None)),
    "task.response_max_length": ("int", (1, None)),
    "task.prompt_truncation": ("choice", C.PROMPT_TRUNCATION),
    "task.train_bos": ("bool", None),
    "task.train_eos": ("bool", None),
    "task.test_bos": ("bool", None),
    "task.train_on_prompt": ("bool", None),
    "task.case_sensitive_extraction": ("bool", None),
    "task.answer_format": ("choice", C.ANSWER_FORMATS),
    "task.prompt_style": ("choice", C.PROMPT_STYLES),
    "eval.scoring": ("choice", C.SCORINGS),
    "eval.max_new_tokens": ("int", (1, None)),
    "eval.num_beams": ("int", (1, None)),
    "eval.do_sample": ("bool", None),
    "eval.temperature": ("float", (0.0, None, "open")),
    "eval.top_p": ("float", (0.0, 1.0, "open")),
    "eval.top_k": ("int", (0, None)),
    "budget.tolerance": ("float", (0.0, None, "open")),
    "budget.lora_rank": ("int", (1, None)),
    "budget.params": ("int", (1, None)),
    "budget.type": ("choice", C.BUDGET_TYPES),
    "logger.mode": ("choice", C.LOGGER_MODES),
}


SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
# config values that become path components (the conversion cache's dir names)
NAME_KEYS = ("model.name", "model.gguf_file")


def safe_name(field: str, value: Any) -> str:
    """A config value that becomes a path component: letters, digits, `._-`, and not `.`/`..`."""
    v = str(value)
    if not SAFE_NAME.fullmatch(v) or v in (".", ".."):
        raise UserError(
            f"{field}={value!r}: it names a file or directory, so only letters, digits and . _ - are allowed"
        )
    return v


def _range_text(lo: Any, hi: Any, open_lo: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if open_lo else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if open_lo else '>='} {lo}"
    return ""


def check_value(key: str, value: Any, kind: str, allowed: Any) -> str | None:
    """The error line for one value, or None when it is fine."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and (optional or kind == "choice" and None in allowed):
        return None
    if kind == "choice":
        return None if value in allowed else f"{key}={value!r}; allowed: {list(allowed)}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"{key}={value!r}; allowed: true or false"
    if kind in ("int", "float"):
        ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        lo, hi, *flags = allowed
        rng = _range_text(lo, hi, "open" in flags)
        what = (
            ("an integer" if kind == "int" else "a number")
            + (f" {rng}" if rng else "")
            + (" or null" if optional else "")
        )
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            return f"{key}={value!r} must be {what}"
        if lo is not None and (value < lo or ("open" in flags and value == lo)):
            return f"{key}={value!r} must be {what}"
        if hi is not None and value > hi:
            return f"{key}={value!r} must be {what}"
    return None


def validate_config(cfg: DictConfig) -> None:
    """Raise UserError for the first bad value (interpolations resolved; absent keys skipped)."""
    for key, (kind, allowed) in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        except Exception as e:  # an interpolation that cannot resolve
            raise UserError(f"{key}: {str(e).splitlines()[0]}") from None
        if value is _MISSING:
            continue
        err = check_value(key, value, kind, allowed)
        if err:
            raise UserError(err)
    for key in NAME_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            safe_name(key, value)
    _check_scoring(cfg)
    if OmegaConf.select(cfg, "model.pair_encoding") == "cosine" and OmegaConf.select(cfg, "model.pooling") != "mean":
        raise UserError(f"model.pair_encoding=cosine reads mean-pooled sentence embeddings, but model.pooling="
                        f"{OmegaConf.select(cfg, 'model.pooling')!r}; set model.pooling=mean")  # fmt: skip


def _check_scoring(cfg: DictConfig) -> None:
    """Generation tasks: the answer format, prompt style, scoring and main metric must fit together."""
    fam = OmegaConf.select(cfg, "task.family")
    if fam not in ("commonsense", "gsm8k"):
        return
    fmt = OmegaConf.select(cfg, "task.answer_format", default="label")
    style = OmegaConf.select(cfg, "task.prompt_style", default="alpaca")
    scoring = OmegaConf.select(cfg, "eval.scoring", default="generate")
    main = OmegaConf.select(cfg, "task.main_metric")
    if fam == "gsm8k" and (scoring, fmt, style) != ("generate", "label", "alpaca"):
        raise UserError("gsm8k has no options to score: it needs eval.scoring=generate, task.answer_format=label, "
                        "task.prompt_style=alpaca")  # fmt: skip
    if scoring != "options" and (fmt, style) != ("label", "alpaca"):
        raise UserError(f"eval.scoring={scoring}: generation is scored by extracting upstream's option label, which "
                        f"needs task.answer_format=label and task.prompt_style=alpaca (here {fmt}, {style}); use "
                        "eval.scoring=options")  # fmt: skip
    made = {"generate": ["accuracy"], "options": list(C.OPTION_METRICS), "both": ["accuracy", *C.OPTION_METRICS]}
    if fam == "commonsense" and main not in made[scoring]:
        raise UserError(f"task.main_metric={main!r} is not reported with eval.scoring={scoring}; allowed: "
                        f"{made[scoring]}")  # fmt: skip
