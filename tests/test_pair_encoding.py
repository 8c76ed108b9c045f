"""model.pair_encoding: siamese (each sentence of a GLUE pair encoded alone, the head reading [u, v, |u-v|, u*v]) and
cosine (the same two towers, a Linear(1, labels) head on their cosine, fitted on train before fine-tuning)."""

import json
import math

import pytest
import torch
from conftest import compose_cfg

from talklora_exp import identity
from talklora_exp.errors import UserError
from talklora_exp.heads import CosineHead, SiameseHead, fit_cosine_head
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


def test_cosine_head_by_hand():
    head = CosineHead(num_labels=2, init_std=0.02)
    with torch.no_grad():
        head.out.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        head.out.bias.copy_(torch.tensor([0.5, 0.0]))
    pooled = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, -3.0]])  # u0, u1, then v0, v1
    # pair 0: cos((1,0),(1,1)) = 1/sqrt(2) -> [2/sqrt(2) + .5, -1/sqrt(2)]; pair 1: cos((0,2),(0,-3)) = -1 -> [-1.5, 1]
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(head(pooled), torch.tensor([[2 * r + 0.5, -r], [-1.5, 1.0]]))


class _Pooled(torch.nn.Module):
    """A stand-in encoder whose 'input' is already the 2B pooled rows: fit_cosine_head only needs model(**batch)."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.classifier = CosineHead(num_labels, 0.02)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


def test_fit_cosine_head_classification_is_the_maximum_likelihood_fit():
    """Cosines 0 and 1, four pairs each, 1 of 4 and 3 of 4 in class 1: the saturated logistic fit has class 1's logit
    log(1/3) at cos 0 and log(3) at cos 1, so weight 2 log 3 and bias -log 3 against class 0's fixed 0."""
    far, near = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]]  # (u, v): cos 0, cos 1
    pairs = [far] * 4 + [near] * 4
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    batch = {"pooled": torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs]), "labels": labels}
    model = _Pooled(2)
    fit = fit_cosine_head(model, [batch], regression=False)
    w, b = model.classifier.out.weight.detach(), model.classifier.out.bias.detach()
    torch.testing.assert_close(w, torch.tensor([[0.0], [2 * math.log(3)]]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, torch.tensor([0.0, -math.log(3)]), atol=1e-4, rtol=1e-4)
    assert fit["n_train"] == 8 and fit["train_score"] == 0.75 and model.training  # mode restored


def test_fit_cosine_head_regression_is_least_squares():
    """Labels exactly 3 cos + 1 over cosines 0, 1/sqrt(2), 1 and -1: the fit recovers weight 3, bias 1."""
    u = [[1.0, 0.0]] * 4
    v = [[0.0, 1.0], [1.0, 1.0], [5.0, 0.0], [-2.0, 0.0]]
    cos = torch.tensor([0.0, 1 / math.sqrt(2), 1.0, -1.0])
    model = _Pooled(1).eval()
    batches = [{"pooled": torch.tensor(u[:2] + v[:2]), "labels": 3 * cos[:2] + 1},
               {"pooled": torch.tensor(u[2:] + v[2:]), "labels": 3 * cos[2:] + 1}]  # fmt: skip
    fit_cosine_head(model, batches, regression=True)
    assert model.classifier.out.weight.item() == pytest.approx(3.0, abs=1e-5)
    assert model.classifier.out.bias.item() == pytest.approx(1.0, abs=1e-5)
    assert not model.training


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
        (["task=glue/rte", "model.pair_encoding=bi"],
         r"model.pair_encoding='bi'; allowed: \['cross', 'siamese', 'cosine'\]"),
        (["task=glue/sst2", "model.pair_encoding=cosine"], r"cosine needs a sentence-pair task; glue/sst2 has one"),
        (["task=glue/rte", "model.pair_encoding=cosine", "model.pooling=cls"],
         r"pair_encoding=cosine reads mean-pooled sentence embeddings, but model.pooling=.cls.; set model.pooling=mean"),
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
    task, tok, model = b.task, b.tokenizer, b.model
    data = task.load(tok, str(glue_dir), 32, None, None, val_size=8)
    ex = [data.train[i] for i in range(3)]
    assert tok.decode(ex[0]["input_ids_b"], skip_special_tokens=True).startswith("2nd :")  # sentence2 is the b side
    batch = task.collator(tok)(ex)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == (3,)
    model.eval()
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        inner = model.get_base_model()  # under the PeftModel; the trained pooler and head are peft's copies
        enc = inner.base_model

        def trained(mod: torch.nn.Module) -> torch.nn.Module:
            return mod.modules_to_save["default"] if hasattr(mod, "modules_to_save") else mod

        def pooled(ids: list[int]) -> torch.Tensor:
            h = enc(input_ids=torch.tensor([ids])).last_hidden_state[0]  # one sentence, no padding
            pooler = trained(enc.pooler)
            return pooler.activation(pooler.dense(h.mean(0)))

        head = trained(inner.classifier).out
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


@pytest.mark.slow
def test_cosine_logits_read_each_sentence_embedding_and_the_fit_lands_in_the_run(glue_dir, tmp_path):
    """The batched forward equals the head on the cosine of each sentence's plain mean-pooled states (no pooler dense,
    no padding); a run fits the head on its training pairs before step 1, records the fit, and its saved head and
    adapter reproduce the reported dev numbers."""
    from talklora_exp.evaluate import evaluate_run
    from talklora_exp.run import build, run

    over = ["task=glue/rte", "model.pair_encoding=cosine", "method=lora", f"paths.data_dir={glue_dir}",
            "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4", "model.max_length=32",
            "trainer.progress=false", "task.val_size=8", "trainer.lr=2e-3", "trainer.checkpoint_every=null"]  # fmt: skip
    b = build(compose_cfg(over))
    task, tok, model = b.task, b.tokenizer, b.model
    assert not any("pooler" in n for n, _ in model.named_parameters())  # the dense + tanh is gone, not just frozen
    data = task.load(tok, str(glue_dir), 32, None, None, val_size=8)
    ex = [data.train[i] for i in range(3)]
    batch = task.collator(tok)(ex)
    model.eval()
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        enc = next(m for m in model.modules() if type(m).__name__ == "BertModel")  # under peft's wrappers
        for i, f in enumerate(ex):
            u = enc(input_ids=torch.tensor([f["input_ids"]])).last_hidden_state[0].mean(0)
            v = enc(input_ids=torch.tensor([f["input_ids_b"]])).last_hidden_state[0].mean(0)
            cos = torch.nn.functional.cosine_similarity(u, v, dim=0)
            torch.testing.assert_close(got[i], model.classifier(torch.stack([u, v])).squeeze(0), rtol=1e-5, atol=1e-5)
        # the fit lands in the head the forward pass reads (peft keeps a frozen original beside its trainable copy)
        fit = fit_cosine_head(model, [task.collator(tok)([data.train[i] for i in range(len(data.train))])], False)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        want = torch.tensor(fit["weight"]) * cos + torch.tensor(fit["bias"])  # the last pair's cosine
        torch.testing.assert_close(logits[-1], want, rtol=1e-4, atol=1e-4)

    m = run(compose_cfg(over), tmp_path / "run")
    assert (
        m["status"] == "completed"
        and m["head_fit"]["n_train"] == m["data"]["n_train"]
        and m["eval_runtime_s"] >= m["head_fit"]["seconds"] >= 0  # counted as evaluation
    )
    first = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "head_fit": m["head_fit"]}
    again, _ = evaluate_run(tmp_path / "run", [])
    assert again == pytest.approx(m["eval"])


@pytest.mark.parametrize("method", ["lora", "dora", "moelora", "talklora"])
def test_mean_pooling_ignores_padding_under_every_method(method):
    """A padded batch gives each example the logits it gets alone, for every method, whether it trains the head in
    place or through peft's modules_to_save copy (whose pooler once never saw the mask: LoRA and DoRA averaged over
    padding). Tiny random BERT, so no download."""
    from transformers import BertConfig, BertForSequenceClassification

    from talklora_exp.heads import apply_pooling
    from talklora_exp.methods import build_method

    torch.manual_seed(0)
    conf = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = apply_pooling(BertForSequenceClassification(conf), "mean")
    model = build_method(compose_cfg([f"method={method}"]).method).inject(
        model, ["query", "value"], ["classifier", "pooler"], "seq_cls"
    )
    model.eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0, 0], [2, 5, 6, 8, 11, 12, 3]])
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = model(input_ids=ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-6)
