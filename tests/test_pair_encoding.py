"""model.pair_encoding=siamese: each sentence of a GLUE pair encoded alone, the head reading [u, v, |u-v|, u*v]."""

import json

import pytest
import torch
from conftest import compose_cfg

from talklora_exp import identity
from talklora_exp.errors import UserError
from talklora_exp.models import SiameseHead
from talklora_exp.tasks.glue import SiameseCollator


def test_siamese_head_by_hand():
    head = SiameseHead(hidden=2, num_labels=1, init_std=0.02)
    with torch.no_grad():
        head.out.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]))
        head.out.bias.fill_(0.5)
    pooled = torch.tensor([[1.0, -1.0], [0.0, 2.0], [3.0, 1.0], [-2.0, 2.0]])  # u0, u1, then v0, v1
    # pair 0: u=(1,-1) v=(3,1): |u-v|=(2,2) u*v=(3,-1) -> 1-2 + 9+4 + 10+12 + 21-8 + .5
    # pair 1: u=(0,2) v=(-2,2): |u-v|=(2,0) u*v=(0,4) -> 0+4 + -6+8 + 10+0 + 0+32 + .5
    assert head(pooled).squeeze(-1).tolist() == [47.5, 48.5]
    assert torch.all(head.out.bias == 0.5)


def test_siamese_collator_stacks_first_sentences_then_second(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"]) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    feats = [
        {"input_ids": [5, 6], "attention_mask": [1, 1], "input_ids_b": [7, 8, 9], "attention_mask_b": [1, 1, 1],
         "labels": torch.tensor(1)},
        {"input_ids": [10], "attention_mask": [1], "input_ids_b": [11, 12], "attention_mask_b": [1, 1],
         "labels": torch.tensor(0)},
    ]  # fmt: skip
    out = SiameseCollator(tok)(feats)
    assert out["input_ids"].tolist() == [[5, 6, 0], [10, 0, 0], [7, 8, 9], [11, 12, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [1, 0]


def test_a_new_key_at_its_old_behaviour_keeps_old_run_identities():
    cfg = compose_cfg(["task=glue/rte"])
    with_key = identity.identity(cfg)
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg.model["pair_encoding"]
    without = identity.identity(cfg)
    assert with_key["config_hash"] == without["config_hash"]  # runs made before the key existed still match
    siamese = identity.identity(compose_cfg(["task=glue/rte", "model.pair_encoding=siamese"]))
    assert siamese["config_hash"] != with_key["config_hash"]
    assert siamese["config"]["model.pair_encoding"] == "siamese"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task=glue/sst2", "model.pair_encoding=siamese"], r"needs a sentence-pair task; glue/sst2 has one sentence"),
        (["task=glue/rte", "model.pair_encoding=bi"], r"model.pair_encoding='bi'; allowed: \['cross', 'siamese'\]"),
        (["model=smollm2-135m", "task=commonsense/boolq", "+model.pair_encoding=siamese"],
         r"applies to GLUE sentence-pair tasks, not boolq"),
    ],
)  # fmt: skip
def test_pair_encoding_errors(overrides, match):
    from talklora_exp.run import build

    with pytest.raises(UserError, match=match):
        build(compose_cfg(overrides))


@pytest.mark.slow
def test_siamese_logits_are_each_sentence_encoded_alone(glue_dir, tmp_path):
    """The batched 2B-row forward equals encoding each sentence by itself (no padding), mean-pooling it through the
    pooler and applying the head by hand: catches a swapped or mis-padded pair and a mask that misses the pooler."""
    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.run import build, run

    over = ["task=glue/rte", "model.pair_encoding=siamese", "method=talklora", f"paths.data_dir={glue_dir}",
            "trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=4", "model.max_length=32",
            "trainer.progress=false", "task.val_size=8", "trainer.lr=2e-3", "trainer.checkpoint_every=null",
            "trainer.log_every=1"]  # fmt: skip
    b = build(compose_cfg(over))
    task, tok, model = b["task"], b["tokenizer"], b["model"]
    data = task.load(tok, str(glue_dir), 32, None, None, val_size=8)
    ex = [data.train[i] for i in range(3)]
    assert tok.decode(ex[0]["input_ids_b"], skip_special_tokens=True).startswith("2nd :")  # sentence2 is the b side
    batch = task.collator(tok)(ex)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == (3,)
    model.eval()
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        enc = model.base_model

        def pooled(ids: list[int]) -> torch.Tensor:
            h = enc(input_ids=torch.tensor([ids])).last_hidden_state[0]  # one sentence, no padding
            return enc.pooler.activation(enc.pooler.dense(h.mean(0)))

        head = model.classifier.out
        for i, f in enumerate(ex):
            u, v = pooled(f["input_ids"]), pooled(f["input_ids_b"])
            want = head(torch.cat([u, v, (u - v).abs(), u * v]))
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)

    m = run(compose_cfg(over), tmp_path / "run")
    assert m["status"] == "completed" and m["selection"]["split"] == "val"
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r.get("samples", 0) for r in log) == 6 * 4  # examples, not the 2 rows each
    again, _ = evaluate_run(tmp_path / "run", [])  # the saved head and adapter reload into the same model
    assert again == pytest.approx(m["eval"])


def test_a_record_that_spells_out_the_old_behaviour_is_the_same_run():
    """Runs recorded while the key sat in the yaml but not yet in ADDED_WITH_DEFAULT hashed it in: still the same run
    (and their checkpoints resume); any real difference still is not."""
    new = identity.identity(compose_cfg(["task=glue/rte"]))
    spelled = {"config_hash": "recorded-before", "config": {**new["config"], "model.pair_encoding": "cross"}}
    assert identity.same_config(spelled, new)
    other = {"config_hash": "x", "config": {**new["config"], "model.pair_encoding": "cross", "trainer.lr": 9.0}}
    assert not identity.same_config(other, new) and not identity.same_config(None, new)
    assert not identity.same_config({"config_hash": "x", "config": {}}, new)
