"""What every task provides to the shared trainer: tokenized splits, a collator, a per-example loss and evaluate().

Three named splits: `train`; `val`, held out of the training data (`task.val_size` examples, `task.val_seed`) and used
only for checkpoint selection; and the reported split(s) in `evals` (GLUE dev, the generation test sets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

from ..errors import UserError

T = TypeVar("T")


@dataclass
class EvalResult:
    """What `Task.evaluate` returns: the metrics, and what the run dir records beside them."""

    metrics: dict[str, float]
    predictions: list[dict] | None = None  # per-example rows (generation tasks: predictions.jsonl)
    counts: dict[str, int] | None = None  # examples scored per split, gathered across processes, duplicates dropped


class Split(Dataset):
    """A list of tokenized feature dicts; `lengths` feeds the length-grouped sampler."""

    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]

    @property
    def lengths(self) -> list[int]:
        return [max(len(f["input_ids"]), len(f.get("input_ids_b", ()))) for f in self.features]


@dataclass
class TaskData:
    train: Split
    evals: dict[str, Split]  # the reported split(s): metric-name prefix -> split ("" for a single set)
    info: dict[str, Any] = field(default_factory=dict)
    val: Split | None = None  # held out of train, training format (validation loss)
    val_evals: dict[str, Split] | None = None  # the same examples in evaluate() format (validation metric)


def holdout(items: list[T], val_size: int, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `random.Random(seed)` and keep the last `val_size` items apart: upstream's split
    (`random.seed(58); random.shuffle(data); train, val = data[:-120], data[-120:]`), exactly."""
    if val_size <= 0:
        return list(items), []
    if val_size >= len(items):
        raise UserError(f"task.val_size={val_size} leaves no training data ({len(items)} training examples)")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:-val_size], shuffled[-val_size:]


def split_and_cap(
    train: list[T],
    evals: dict[str, list[T]],
    val_size: int,
    val_seed: int,
    max_train: int | None,
    max_eval: int | None,
) -> tuple[list[T], list[T], dict[str, list[T]]]:
    """(train, val, evals) as every run sees them: `val_size` held out of train by `holdout`, then train capped at
    `max_train` and val and each eval split at `max_eval`. One function, so the analysis (the trivial predictor) scores
    exactly the examples a run scored."""
    train, val = holdout(train, val_size, val_seed)
    train = train[:max_train] if max_train else train
    val = val[:max_eval] if max_eval else val
    return train, val, {k: (v[:max_eval] if max_eval else v) for k, v in evals.items()}


class Task:
    """Base class; subclasses set `kind` ("seq_cls" or "causal") and implement load() and evaluate()."""

    kind: str = "seq_cls"
    num_labels: int = 0
    is_regression: bool = False
    report_split: str = "dev"  # what `evals` holds; "test" splits may never be evaluated before the end

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.name: str = cfg.name
        self.main_metric: str = cfg.main_metric

    def set_pair_encoding(self, mode: str) -> None:
        """`model.pair_encoding`: only GLUE sentence-pair tasks can be read another way than `cross`."""
        if mode != "cross":
            raise UserError(f"model.pair_encoding={mode!r} applies to GLUE sentence-pair tasks, not {self.name}")

    def collator(self, tokenizer: Any) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

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
        raise NotImplementedError

    def example_losses(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed loss and its weight (tokens for LMs, 1 for classifiers), so the validation loss is an
        exact mean over the split whatever the batching and the number of processes."""
        raise NotImplementedError

    def evaluate(
        self,
        model: Any,
        loaders: dict[str, Any],
        accelerator: Any,
        on_batch: Any = None,
        progress: bool = False,
        selecting: bool = False,
    ) -> EvalResult:
        """Metrics over every eval split; `on_batch(batch)` runs before each forward (routing statistics use it to
        see the padding mask); `progress` asks for a progress bar where evaluation is long; `selecting`: the call
        scores validation for checkpoint selection, so only the selecting metric is needed."""
        raise NotImplementedError
