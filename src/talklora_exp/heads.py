"""Task heads of the GLUE encoders, beyond the model's own classifier: mean pooling (`model.pooling=mean`), the
two-tower sentence-pair heads (`model.pair_encoding=siamese|cosine`) and the cosine head's closed-form fit on train.
`models.load_model` applies them; they never touch the adapters."""

from __future__ import annotations

import math
from typing import Any

import torch

from .choices import PAIR_ENCODINGS, POOLING
from .errors import UserError


class MeanPooler(torch.nn.Module):
    """`model.pooling=mean`: the pooler's dense + activation applied to the mean of the non-padding token states
    instead of the first ([CLS]) token. Sentence-embedding models such as all-MiniLM-L6-v2 were trained to be read
    this way; their [CLS] state never was. The attention mask reaches it through a pre-hook on the encoder."""

    def __init__(self, pooler: torch.nn.Module):
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if m is None or m.shape != hidden.shape[:2]:
            m = torch.ones(hidden.shape[:2], device=hidden.device)
        m = m.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.activation(self.dense(mean))


def apply_pooling(model: Any, mode: str) -> Any:
    """Sequence classifiers: `cls` keeps the model's own pooler, `mean` swaps in MeanPooler (same trained weights)."""
    if mode == "cls":
        return model
    if mode != "mean":
        raise UserError(f"model.pooling={mode!r}; allowed: {list(POOLING)}")
    enc = model.base_model
    pooler = getattr(enc, "pooler", None)
    if pooler is None or not hasattr(pooler, "dense"):
        raise UserError(f"model.pooling=mean: {type(model).__name__} has no pooler with a dense layer to reuse")
    enc.pooler = MeanPooler(pooler)

    def keep_mask(module: Any, args: tuple, kwargs: dict) -> None:
        # every MeanPooler under the pooler slot: a method that trains the head by copy (peft's modules_to_save wraps
        # the pooler and runs its copy) must get the mask too, or its mean runs over the padding
        for m in enc.pooler.modules():
            if isinstance(m, MeanPooler):
                m.mask = kwargs.get("attention_mask")

    enc.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model


class SiameseHead(torch.nn.Module):
    """`model.pair_encoding=siamese`: the two sentences of a pair are encoded separately (the collator stacks all first
    sentences above all second ones, 2B rows) and the classifier reads [u, v, |u-v|, u*v] of their pooled vectors
    (Sentence-BERT's pair features plus the product). all-MiniLM-L6-v2 was trained as such a bi-encoder; read as a
    cross-encoder it sees two sentences in one input, which it never did in training."""

    def __init__(self, hidden: int, num_labels: int, init_std: float):
        super().__init__()
        self.out = torch.nn.Linear(4 * hidden, num_labels)
        torch.nn.init.normal_(self.out.weight, std=init_std)  # as transformers initialises a fresh classifier
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n = pooled.shape[0] // 2
        u, v = pooled[:n], pooled[n:]
        return self.out(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))


class CosineHead(torch.nn.Module):
    """`model.pair_encoding=cosine`: each sentence encoded alone (as for siamese), mean-pooled without the pooler's
    dense + tanh, and a Linear(1, num_labels) reads the cosine of the two embeddings. This is the readout
    all-MiniLM-L6-v2 was trained for (its contrastive loss compares cosines), so the frozen model already separates
    pairs with it; `fit_cosine_head` fits its weights on the training split before fine-tuning (a linear probe,
    then fine-tuning: Kumar et al. 2022, LP-FT), so the adapters start from that readout instead of a random head."""

    def __init__(self, num_labels: int, init_std: float):
        super().__init__()
        self.out = torch.nn.Linear(1, num_labels)
        torch.nn.init.normal_(self.out.weight, std=init_std)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n = pooled.shape[0] // 2
        cos = torch.nn.functional.cosine_similarity(pooled[:n], pooled[n:], dim=-1, eps=1e-8)
        return self.out(cos.unsqueeze(-1))


def apply_pair_encoding(model: Any, mode: str) -> Any:
    """`cross` (GLUE's usual input, both sentences in one sequence) keeps the model; `siamese` swaps in SiameseHead;
    `cosine` swaps in CosineHead and makes the pooler a plain mean (no dense, no dropout before the cosine)."""
    if mode == "cross":
        return model
    if mode not in PAIR_ENCODINGS:
        raise UserError(f"model.pair_encoding={mode!r}; allowed: {list(PAIR_ENCODINGS)}")
    clf = getattr(model, "classifier", None)
    if not isinstance(clf, torch.nn.Linear) or getattr(model.base_model, "pooler", None) is None:
        raise UserError(f"model.pair_encoding={mode} needs a BERT-style pooler + linear classifier; "
                        f"{type(model).__name__} has none (use pair_encoding=cross)")  # fmt: skip
    std = float(model.config.initializer_range)
    if mode == "siamese":
        model.classifier = SiameseHead(clf.in_features, clf.out_features, std)
    else:
        pooler = model.base_model.pooler
        if not isinstance(pooler, MeanPooler):
            raise UserError("model.pair_encoding=cosine reads mean-pooled sentence embeddings; set model.pooling=mean")
        pooler.dense = torch.nn.Identity()  # the plain mean: the embedding the model was trained on
        pooler.activation = torch.nn.Identity()
        if isinstance(getattr(model, "dropout", None), torch.nn.Dropout):
            model.dropout = torch.nn.Identity()  # dropout on the embedding would only add noise to a 1-feature head
        model.classifier = CosineHead(clf.out_features, std)
    model.classifier.to(clf.weight.device, clf.weight.dtype)
    return model


@torch.no_grad()
def fit_cosine_head(model: Any, loader: Any, regression: bool, device: torch.device | None = None) -> dict[str, Any]:
    """The linear probe of LP-FT for `pair_encoding=cosine`: the cosine of every training pair under the model as
    built (adapters at their initial, identity-preserving state), then a logistic regression (classification) or
    least squares (regression) of the labels on it, written into CosineHead.out. Fitted on the training split only;
    deterministic, so every process fits the same numbers. Returns the fit, for the run's log."""
    from sklearn.linear_model import LinearRegression, LogisticRegression

    heads = [m for m in model.modules() if isinstance(m, CosineHead)]  # peft keeps a frozen original beside the copy
    if not heads:
        raise TypeError(f"fit_cosine_head needs a model with a CosineHead, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    feats: dict[int, list[torch.Tensor]] = {}
    labels = []
    grabs = [h.out.register_forward_pre_hook(lambda m, args, i=i: feats.setdefault(i, []).append(args[0].float().cpu()))
             for i, h in enumerate(heads)]  # fmt: skip
    try:
        for batch in loader:
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            labels.append(batch.pop("labels").cpu())
            model(**batch)
    finally:
        for g in grabs:
            g.remove()
        model.train(was_training)
    (used, rows), *more = feats.items()
    if more:
        raise RuntimeError("fit_cosine_head: more than one CosineHead ran in one forward pass")
    head = heads[used]  # the one the forward pass reads (peft's trainable copy)
    x, y = torch.cat(rows).double().numpy(), torch.cat(labels).numpy()
    if regression:
        lr = LinearRegression().fit(x, y)
        weight, bias = torch.tensor([[lr.coef_[0]]]), torch.tensor([lr.intercept_])
    else:
        lr = LogisticRegression(C=math.inf, max_iter=1000).fit(x, y)  # one feature, thousands of pairs: plain MLE
        coef, icpt = torch.tensor(lr.coef_), torch.tensor(lr.intercept_)
        if coef.shape[0] == 1:  # binary: sklearn gives class 1's logit against class 0's (fixed at 0)
            coef, icpt = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(icpt), icpt])
        weight, bias = coef, icpt
    head.out.weight.copy_(weight.to(head.out.weight.dtype))
    head.out.bias.copy_(bias.to(head.out.bias.dtype))
    return {"n_train": len(y), "weight": [round(float(v), 6) for v in weight.flatten()],
            "bias": [round(float(v), 6) for v in bias.flatten()], "train_score": round(float(lr.score(x, y)), 6)}  # fmt: skip
