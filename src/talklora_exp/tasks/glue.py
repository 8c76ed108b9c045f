"""GLUE: local TSVs in the original layout (`<data_dir>/glue/<TASK>/{train,dev}.tsv`), else hub `nyu-mll/glue`.

The column layout of every task is in `GLUE_SPECS`; the metrics are in `metrics.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..choices import TWO_TOWER
from ..data import describe_search, find_local, iter_lines
from ..errors import UserError
from . import metrics as M
from .base import EvalResult, Split, Task, TaskData, split_and_cap


@dataclass(frozen=True)
class GlueSpec:
    dir: str  # folder name in the GLUE layout
    text_cols: tuple[str | int, ...]  # header names, or indices for header-less files
    label_col: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None = regression
    header: bool = True
    dev_files: dict[str, str] = field(default_factory=lambda: {"": "dev.tsv"})
    hub_text: tuple[str, ...] = ("sentence",)
    num_fields: int | None = None  # expected fields per row where fixed
    label_range: tuple[float, float] | None = None  # regression labels must lie in it


GLUE_SPECS: dict[str, GlueSpec] = {
    # CoLA has no header: source, label, original label, sentence.
    "cola": GlueSpec("CoLA", (3,), 1, ("0", "1"), header=False, num_fields=4),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", ("0", "1")),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), hub_text=("sentence1", "sentence2")),
    "stsb": GlueSpec(
        "STS-B", ("sentence1", "sentence2"), "score", None, hub_text=("sentence1", "sentence2"), label_range=(0.0, 5.0)
    ),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), hub_text=("question1", "question2")),
    "mnli": GlueSpec(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        dev_files={"matched_": "dev_matched.tsv", "mismatched_": "dev_mismatched.tsv"},
        hub_text=("premise", "hypothesis"),
    ),
    "qnli": GlueSpec(
        "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), hub_text=("question", "sentence")
    ),
    "rte": GlueSpec(
        "RTE",
        ("sentence1", "sentence2"),
        "label",
        ("entailment", "not_entailment"),
        hub_text=("sentence1", "sentence2"),
    ),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), hub_text=("sentence1", "sentence2")),
}
HUB_DEV_SPLITS = {"": "validation", "matched_": "validation_matched", "mismatched_": "validation_mismatched"}


@dataclass
class Example:
    text: tuple[str, ...]
    label: float | int


def read_glue_tsv(path: Path, spec: GlueSpec) -> list[Example]:
    """Parse one GLUE TSV strictly: wrong field counts and unknown labels name the file and line."""
    rows = iter_lines(path)
    if spec.header:
        first = next(rows, None)
        if first is None:
            raise UserError(f"{path}: file is empty; expected a header line and rows")
        header = first[1].split("\t")
        missing = [c for c in (*spec.text_cols, spec.label_col) if c not in header]
        if missing:
            raise UserError(f"{path}:1: header lacks column(s) {missing}; header is {header}")
        idx = {c: header.index(c) for c in (*spec.text_cols, spec.label_col)}
        width = len(header)
    else:
        idx = {c: c for c in (*spec.text_cols, spec.label_col)}
        width = spec.num_fields
    label_ids = {s: i for i, s in enumerate(spec.labels)} if spec.labels else None
    out: list[Example] = []
    for lineno, line in rows:
        if not line.strip():
            continue
        parts = line.split("\t")
        if width is not None and len(parts) < width:
            raise UserError(f"{path}:{lineno}: expected {width} tab-separated fields, got {len(parts)}")
        raw = parts[idx[spec.label_col]].strip()
        if label_ids is not None:
            if raw not in label_ids:
                raise UserError(f"{path}:{lineno}: label {raw!r} not in the task's label set {list(label_ids)}")
            label: float | int = label_ids[raw]
        else:
            try:
                label = float(raw)
            except ValueError:
                raise UserError(f"{path}:{lineno}: label {raw!r} is not a number (regression task)") from None
            lo, hi = spec.label_range or (float("-inf"), float("inf"))
            if not lo <= label <= hi:  # also rejects nan
                raise UserError(f"{path}:{lineno}: label {raw!r} outside the task's range [{lo:g}, {hi:g}]")
        out.append(Example(tuple(parts[idx[c]] for c in spec.text_cols), label))
    if not out:
        raise UserError(f"{path}: no data rows")
    return out


def load_local(
    task: str, spec: GlueSpec, data_dir: str | None
) -> tuple[list[Example], dict[str, list[Example]], str] | None:
    """(train, {dev prefix: dev}, folder) from the local TSVs under `data_dir`, or None where the task has no folder
    there; public because the analysis reads the same splits (the trivial predictor) without building a Task."""
    root = find_local(data_dir, "glue", spec.dir)
    if root is None:
        return None
    needed = ["train.tsv", *spec.dev_files.values()]
    missing = [f for f in needed if not (root / f).exists()]
    if missing:
        # A partial local copy (e.g. QNLI dev only) is reported, not silently mixed with the hub.
        raise _missing_error(task, data_dir, f"{root} lacks {missing} (has {sorted(p.name for p in root.iterdir())})")
    train = read_glue_tsv(root / "train.tsv", spec)
    devs = {pfx: read_glue_tsv(root / f, spec) for pfx, f in spec.dev_files.items()}
    return train, devs, str(root)


def _missing_error(task: str, data_dir: str | None, why: str) -> UserError:
    return UserError(
        f"GLUE task '{task}': no usable local data ({why}); {describe_search(data_dir, 'glue', GLUE_SPECS[task].dir)}; "
        f"hub dataset nyu-mll/glue is the fallback when online"
    )


def _load_hub(task: str, spec: GlueSpec, data_dir: str | None) -> tuple[list[Example], dict[str, list[Example]], str]:
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline, no cache, ...
        raise _missing_error(task, data_dir, f"not found locally, and the hub failed: {type(e).__name__}") from None

    def conv(split: str) -> list[Example]:
        return [Example(tuple(r[c] for c in spec.hub_text), r["label"]) for r in ds[split]]

    return conv("train"), {pfx: conv(HUB_DEV_SPLITS[pfx]) for pfx in spec.dev_files}, "hub:nyu-mll/glue"


class SiameseCollator:
    """Pads the first and the second sentences of B pairs to one length and stacks them: 2B rows (all first sentences,
    then all second ones) that the encoder reads independently; SiameseHead splits them back. Labels stay B."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in features[0] if not k.endswith("_b") and k != "labels"]
        rows = [{k: f[k] for k in keys} for f in features] + [{k: f[k + "_b"] for k in keys} for f in features]
        batch = dict(self.pad(rows))
        batch["labels"] = torch.stack([f["labels"] for f in features])
        return batch


class GlueTask(Task):
    """Sequence classification / regression on one GLUE task."""

    kind = "seq_cls"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.name not in GLUE_SPECS:
            raise UserError(f"task.name={cfg.name!r} is not a GLUE task; valid: {sorted(GLUE_SPECS)}")
        self.spec = GLUE_SPECS[cfg.name]
        self.metric_names = M.GLUE_METRICS[cfg.name]
        self.num_labels = len(self.spec.labels) if self.spec.labels else 1
        self.pair_encoding = "cross"  # set from model.pair_encoding by run.build (how the model reads a pair)

    def set_pair_encoding(self, mode: str) -> None:
        if mode in TWO_TOWER and len(self.spec.text_cols) != 2:
            raise UserError(f"model.pair_encoding={mode} needs a sentence-pair task; glue/{self.name} has one sentence "
                            "(use pair_encoding=cross)")  # fmt: skip
        self.pair_encoding = mode

    @property
    def two_tower(self) -> bool:
        """Each sentence of a pair encoded as its own row (siamese, cosine)."""
        return self.pair_encoding in TWO_TOWER

    def collator(self, tokenizer: Any) -> Any:
        return SiameseCollator(tokenizer) if self.two_tower else super().collator(tokenizer)

    @property
    def is_regression(self) -> bool:
        return self.spec.labels is None

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
        loaded = load_local(self.name, self.spec, data_dir) or _load_hub(self.name, self.spec, data_dir)
        train, devs, source = loaded
        train, val, devs = split_and_cap(train, devs, val_size, val_seed, max_train, max_eval)

        def encode(exs: list[Example]) -> Split:
            if self.two_tower:  # each sentence on its own: first-sentence fields, then "<field>_b"
                a = tokenizer([e.text[0] for e in exs], truncation=True, max_length=max_length)
                b = tokenizer([e.text[1] for e in exs], truncation=True, max_length=max_length)
                feats = [{**{k: a[k][i] for k in a}, **{k + "_b": b[k][i] for k in b}} for i in range(len(exs))]
            else:
                enc = tokenizer(*zip(*[e.text for e in exs]), truncation=True, max_length=max_length)
                feats = [{k: enc[k][i] for k in enc} for i in range(len(exs))]
            dtype = torch.float32 if self.is_regression else torch.long
            for f, e in zip(feats, exs):
                f["labels"] = torch.tensor(e.label, dtype=dtype)
            return Split(feats)

        val_split = encode(val) if val else None
        return TaskData(
            train=encode(train),
            evals={k: encode(v) for k, v in devs.items()},
            info={
                "source": source,
                "n_train": len(train),
                "n_val": len(val),
                "n_eval": {k or "dev": len(v) for k, v in devs.items()},
            },  # fmt: skip
            val=val_split,
            val_evals={"": val_split} if val_split is not None else None,
        )

    def example_losses(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (classification) or squared error (STS-B) per example, weight 1 each."""
        loss = self._losses(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        return loss, torch.ones_like(loss)

    def _losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.is_regression:
            return (logits.squeeze(-1) - y.float()) ** 2
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    # The validation loss and metrics come from one forward pass over the same split (validate() in the trainer would
    # otherwise run it twice); the numbers are the same as example_losses' and evaluate()'s, bit for bit.
    loss_with_metrics = True

    @torch.no_grad()
    def evaluate(
        self,
        model: Any,
        loaders: dict[str, Any],
        accelerator: Any,
        on_batch: Any = None,
        with_loss: bool = False,
        progress: bool = False,
        selecting: bool = False,
    ) -> EvalResult:
        """Metrics per split; `with_loss` adds `<prefix>loss`, the exact mean of example_losses over the split.
        (`progress` and `selecting` are accepted and unused: a GLUE dev set takes seconds, and its metrics are one
        computation.)"""
        model.eval()
        out: dict[str, float] = {}
        counts: dict[str, int] = {}
        for prefix, loader in loaders.items():
            preds, labels = [], []
            tot = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for batch in loader:
                if on_batch is not None:
                    on_batch(batch)
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                if with_loss:
                    tot += accelerator.gather_for_metrics(self._losses(logits, batch["labels"])).double().sum()
                p = logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)
                p, y = accelerator.gather_for_metrics((p, batch["labels"]))
                preds.append(p.cpu())
                labels.append(y.cpu())
            p_all, y_all = torch.cat(preds).numpy(), torch.cat(labels).numpy()
            counts[prefix or "dev"] = len(y_all)  # gathered across processes, duplicates dropped
            if with_loss:
                out[f"{prefix}loss"] = float(tot / max(len(y_all), 1))
            out.update(M.compute(self.metric_names, p_all, y_all, prefix))
        return EvalResult(out, counts=counts)
