"""Shared fixtures: config composition, small GLUE TSVs written by the tests, the real data dir, and isolation: every
cache and output a test can touch lives in a temporary directory, and tests not marked slow cannot load a model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = Path(os.environ.get("TALKLORA_DATA_DIR", ROOT.parent / "shared" / "data"))

POS = [
    "a great and wonderful film",
    "truly good , i loved it",
    "excellent acting and a fine story",
    "wonderful , great fun",
]
NEG = ["a bad and awful film", "truly terrible , i hated it", "poor acting and a dull story", "awful , boring mess"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """The GGUF conversion cache, wandb's dirs and the hub go to a temp dir (subprocesses inherit the environment),
    so no test writes into the checkout and the conversion path runs in every session."""
    root = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("TALKLORA_CACHE_DIR", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                             "WANDB_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}  # fmt: skip
    os.environ.update(TALKLORA_CACHE_DIR=str(root / "talklora"), WANDB_DIR=str(root / "wandb"),
                      WANDB_CACHE_DIR=str(root / "wandb-cache"), WANDB_CONFIG_DIR=str(root / "wandb-config"),
                      WANDB_DATA_DIR=str(root / "wandb-data"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _fast_tests_load_no_model(request, monkeypatch):
    """`make test-fast` (-m "not slow") must load no model: a test that does without the slow marker fails here."""
    if request.node.get_closest_marker("slow"):
        return
    from transformers import PreTrainedModel

    def refuse(*a, **k):
        raise AssertionError("this test loads a pretrained model: mark it @pytest.mark.slow")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pairs(n: int):
    for i in range(n):
        yield (POS if i % 2 == 0 else NEG)[(i // 2) % 4], i % 2 == 0


def make_glue_dir(root: Path, n: int = 32) -> Path:
    """Small files in the exact GLUE layout for all 9 tasks (labels tied to the text, so models can learn them)."""
    g = root / "glue"
    for split in ("train", "dev"):
        m = n if split == "train" else n // 2
        ps = list(_pairs(m))
        write_tsv(g / "CoLA" / f"{split}.tsv", None, [["src", "1" if p else "0", "", t] for t, p in ps])
        write_tsv(g / "SST-2" / f"{split}.tsv", ["sentence", "label"], [[t, "1" if p else "0"] for t, p in ps])
        write_tsv(g / "MRPC" / f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                  [["1" if p else "0", str(i), str(i + 1), t, "2nd: " + t] for i, (t, p) in enumerate(ps)])  # fmt: skip
        write_tsv(g / "STS-B" / f"{split}.tsv",
                  ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
                  [[str(i), "g", "f", "y", "0", "s", "s", t, "2nd: " + t, f"{(4.5 if p else 0.5) + (i % 3) * 0.1:.3f}"] for i, (t, p) in enumerate(ps)])  # fmt: skip
        write_tsv(g / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                  [[str(i), "1", "2", t, "2nd: " + t, "1" if p else "0"] for i, (t, p) in enumerate(ps)])  # fmt: skip
        for task in ("QNLI", "RTE", "WNLI"):
            cols = (
                ["index", "question", "sentence", "label"]
                if task == "QNLI"
                else ["index", "sentence1", "sentence2", "label"]
            )
            lab = (
                (lambda p: "entailment" if p else "not_entailment") if task != "WNLI" else (lambda p: "1" if p else "0")
            )
            write_tsv(
                g / task / f"{split}.tsv", cols, [[str(i), t, "2nd: " + t, lab(p)] for i, (t, p) in enumerate(ps)]
            )
    mnli_h = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "s1b",
        "s2b",
        "s1p",
        "s2p",
        "sentence1",
        "sentence2",
        "label1",
        "gold_label",
    ]
    labels = ["entailment", "neutral", "contradiction"]
    for f, m in (("train.tsv", n), ("dev_matched.tsv", n // 2), ("dev_mismatched.tsv", n // 2)):
        write_tsv(g / "MNLI" / f, mnli_h, [[str(i), "0", "0", "g", "", "", "", "", t, "2nd: " + t, labels[i % 3], labels[i % 3]] for i, (t, _) in enumerate(_pairs(m))])  # fmt: skip
    return root


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    return make_glue_dir(tmp_path / "data")


@pytest.fixture
def shared_data() -> Path:
    """The real data. CI sets TALKLORA_REQUIRE_DATA=1: there, missing data fails the test instead of skipping it."""
    if not (SHARED / "glue").exists():
        if os.environ.get("TALKLORA_REQUIRE_DATA") == "1":
            pytest.fail(f"TALKLORA_REQUIRE_DATA=1 but the shared data is missing at {SHARED}")
        pytest.skip("shared GLUE data not present")
    return SHARED
