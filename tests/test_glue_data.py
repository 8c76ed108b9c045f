from pathlib import Path

import pytest
from conftest import compose_cfg, write_tsv

from talklora_exp.errors import UserError
from talklora_exp.tasks import build_task
from talklora_exp.tasks.glue import GLUE_SPECS, load_local, read_glue_tsv

ALL = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@pytest.mark.parametrize("task", ALL)
def test_loader_on_written_files(glue_dir: Path, task: str):
    train, devs, source = load_local(task, GLUE_SPECS[task], str(glue_dir))
    assert len(train) == 32 and source.endswith(GLUE_SPECS[task].dir)
    assert set(devs) == ({"matched_", "mismatched_"} if task == "mnli" else {""})
    assert all(len(v) == 16 for v in devs.values())
    ex = train[0]
    assert ex.text[0] == "a great and wonderful film"
    # pair tasks read both columns (the fixture writes a different second sentence, so reading one twice fails)
    assert ex.text[1:] == (() if task in ("cola", "sst2") else ("2nd: a great and wonderful film",))
    if task == "stsb":
        assert ex.label == pytest.approx(4.5)
    elif task == "mnli":
        assert ex.label == 0 and train[1].label == 1 and train[2].label == 2
    elif task in ("qnli", "rte"):
        assert ex.label == 0 and train[1].label == 1  # entailment=0, not_entailment=1 (HF glue ids)
    else:
        assert ex.label == 1 and train[1].label == 0


def test_every_task_config_maps_to_a_spec():
    for t in ALL:
        cfg = compose_cfg([f"task=glue/{t}"])
        task = build_task(cfg.task)
        assert task.name == t and task.main_metric


def test_malformed_row_names_file_and_line(tmp_path: Path):
    p = write_tsv(
        tmp_path / "train.tsv",
        ["index", "sentence1", "sentence2", "label"],
        [["0", "a", "b", "entailment"], ["1", "only two"]],
    )
    with pytest.raises(UserError, match=r"train\.tsv:3: expected 4 tab-separated fields, got 2"):
        read_glue_tsv(p, GLUE_SPECS["rte"])


def test_bad_label_and_bad_float(tmp_path: Path):
    p = write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [["fine", "1"], ["odd", "7"]])
    with pytest.raises(UserError, match=r"dev\.tsv:3: label '7' not in the task's label set \['0', '1'\]"):
        read_glue_tsv(p, GLUE_SPECS["sst2"])
    h = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    p = write_tsv(tmp_path / "sts.tsv", h, [["0", "g", "f", "y", "0", "s", "s", "a", "b", "high"]])
    with pytest.raises(UserError, match=r"sts\.tsv:2: label 'high' is not a number"):
        read_glue_tsv(p, GLUE_SPECS["stsb"])


def test_non_utf8_and_empty(tmp_path: Path):
    p = tmp_path / "train.tsv"
    p.write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(UserError, match=r"train\.tsv:2: not valid UTF-8"):
        read_glue_tsv(p, GLUE_SPECS["sst2"])
    p.write_bytes(b"")
    with pytest.raises(UserError, match="file is empty"):
        read_glue_tsv(p, GLUE_SPECS["sst2"])


def test_missing_data_names_dirs_searched(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TALKLORA_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = build_task(compose_cfg(["task=glue/rte"]).task)
    with pytest.raises(UserError) as e:
        task.load(None, str(tmp_path / "empty"), 32, None, None)
    msg = str(e.value)
    assert "\n" not in msg and "TALKLORA_DATA_DIR" in msg and str(tmp_path / "empty" / "glue" / "RTE") in msg


def test_partial_local_copy_is_reported(tmp_path: Path):
    write_tsv(
        tmp_path / "glue" / "QNLI" / "dev.tsv",
        ["index", "question", "sentence", "label"],
        [["0", "q", "s", "entailment"]],
    )
    with pytest.raises(UserError, match=r"lacks \['train.tsv'\]"):
        load_local("qnli", GLUE_SPECS["qnli"], str(tmp_path))


# Row counts from ../shared/data/SOURCES.md (header excluded).
SHARED_COUNTS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "rte": (2490, 277),
    "wnli": (635, 71),
}


@pytest.mark.parametrize("task", sorted(SHARED_COUNTS))
def test_real_shared_glue(shared_data: Path, task: str):
    train, devs, _ = load_local(task, GLUE_SPECS[task], str(shared_data))
    assert (len(train), len(devs[""])) == SHARED_COUNTS[task]


def test_hub_loader_maps_columns_and_splits(monkeypatch):
    """The hub path (nyu-mll/glue) without the network: a fake load_dataset with the hub's column names."""
    import datasets

    from talklora_exp.tasks.glue import _load_hub

    calls = []

    def fake(name, task):
        calls.append((name, task))
        row = {"premise": "p", "hypothesis": "h", "label": 2}
        return {"train": [row] * 3, "validation_matched": [row], "validation_mismatched": [row, row]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    train, devs, source = _load_hub("mnli", GLUE_SPECS["mnli"], None)
    assert calls == [("nyu-mll/glue", "mnli")] and source == "hub:nyu-mll/glue"
    assert [e.text for e in train] == [("p", "h")] * 3 and train[0].label == 2
    assert {k: len(v) for k, v in devs.items()} == {"matched_": 1, "mismatched_": 2}


def test_regression_label_out_of_range(tmp_path: Path):
    h = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    p = write_tsv(tmp_path / "sts.tsv", h, [["0", "g", "f", "y", "0", "s", "s", "a", "b", "5.5"]])
    with pytest.raises(UserError, match=r"sts\.tsv:2: label '5\.5' outside the task's range \[0, 5\]"):
        read_glue_tsv(p, GLUE_SPECS["stsb"])
