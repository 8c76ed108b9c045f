"""What every task provides to the shared trainer: tokenized splits, a collator and an evaluate()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset


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
        return [len(f["input_ids"]) for f in self.features]


@dataclass
class TaskData:
    train: Split
    evals: dict[str, Split]  # metric-name prefix -> split ("" for a single dev set)
    info: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class; subclasses set `kind` ("seq_cls" or "causal") and implement load() and evaluate()."""

    kind: str = "seq_cls"
    num_labels: int = 0
    is_regression: bool = False

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.name: str = cfg.name
        self.main_metric: str = cfg.main_metric

    def collator(self, tokenizer: Any) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def load(
        self, tokenizer: Any, data_dir: str | None, max_length: int, max_train: int | None, max_eval: int | None
    ) -> TaskData:
        raise NotImplementedError

    def evaluate(self, model: Any, loaders: dict[str, Any], accelerator: Any, on_batch: Any = None) -> dict[str, float]:
        """Metrics over every eval split; `on_batch(batch)` runs before each forward (routing statistics use it to
        see the padding mask). Tasks may leave per-example rows in `self.last_predictions`."""
        raise NotImplementedError
