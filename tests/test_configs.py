"""Every config group member composes; every method and GLUE task smoke-runs on the real MiniLM (tiny sizes)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose_cfg
from omegaconf import OmegaConf

from talklora_exp.cli import check_group_overrides, group_options

GROUPS = ["model", "method", "task", "budget", "trainer", "logger", "paths", "experiment"]
TINY = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.max_train_samples=24",
        "trainer.max_eval_samples=16", "model.max_length=32", "trainer.progress=false", "trainer.log_every=1", "task.val_size=8"]  # fmt: skip


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_member_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.resolve(cfg)
    for key in ("seed", "trainer.max_steps", "trainer.epochs", "trainer.max_train_samples", "trainer.max_eval_samples",
                "trainer.eval_every"):  # fmt: skip
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert cfg.model.name and cfg.method.name and cfg.task.name and cfg.budget.name


def test_defaults_and_hub_models_share_the_loader():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.task.name, cfg.method.name) == ("minilm", "sst2", "lora")
    for m in ("roberta-base", "roberta-large", "deberta-v3-base"):
        assert (CONF / "model" / f"{m}.yaml").exists()
        assert not compose_cfg([f"model={m}"]).model.pretrained.startswith("pkg:")


def test_unknown_group_choice_is_one_line():
    from talklora_exp.methods import METHODS

    assert check_group_overrides(["method=foo"]) == f"unknown method 'foo'; valid: {', '.join(sorted(METHODS))}"
    assert group_options("method") == sorted(METHODS)  # one config file per registered method
    assert check_group_overrides(["task=glob(glue/m*)"]) is None  # Hydra syntax, parsed by Hydra's parser
    assert "glue/sst2" in check_group_overrides(["task=glue/nope"])
    assert check_group_overrides(["-m", "method=lora,talklora", "task=glue/rte"]) is None


def _cli(args, tmp_path, env_extra=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "talklora_exp", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_cli_bad_choices_exit_nonzero_with_one_line(tmp_path):
    for args, needle in ((["method=foo"], "valid: " + ", ".join(group_options("method"))), (["model=gpt9"], "valid: deberta-v3-base"),
                         (["task=glue/xyz"], "glue/cola, glue/mnli")):  # fmt: skip
        r = _cli(args, tmp_path)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_data_is_clear(tmp_path):
    r = _cli(["task=glue/rte", f"paths.data_dir={tmp_path}/none", f"hydra.run.dir={tmp_path}/run"], tmp_path,
             {"TALKLORA_DATA_DIR": str(tmp_path / "alsonone")})  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: GLUE task 'rte'") and "TALKLORA_DATA_DIR" in line and str(tmp_path / "none") in line
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())  # recorded as failed, never as completed
    assert m["status"] == "failed" and "GLUE task 'rte'" in m["error"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in group_options("method") if m != "none"])  # none: test_generation
def test_smoke_every_method(glue_dir, tmp_path, method):
    from talklora_exp.run import run

    cfg = compose_cfg([f"method={method}", "task=glue/sst2", f"paths.data_dir={glue_dir}", *TINY])
    m = run(cfg, tmp_path / "run")
    assert m["status"] == "completed" and "accuracy" in m["eval"] and m["adapter_params"] > 0
    from talklora_exp.methods import METHODS

    assert (tmp_path / "run" / "routing.json").exists() == METHODS[method].routed


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
def test_smoke_every_glue_task(glue_dir, tmp_path, task):
    from talklora_exp.run import run

    cfg = compose_cfg(["method=talklora", f"task=glue/{task}", f"paths.data_dir={glue_dir}", *TINY])
    m = run(cfg, tmp_path / "run")
    expected = {"cola": {"matthews_correlation"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"},
                "stsb": {"pearson", "spearman"}, "mnli": {"matched_accuracy", "mismatched_accuracy"}}.get(task, {"accuracy"})  # fmt: skip
    assert set(m["eval"]) == expected
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"


def test_unknown_override_key_is_one_line(tmp_path):
    from talklora_exp.cli import check_override_keys

    msg = check_override_keys(["trainer.bogus=1"])
    assert msg.startswith("unknown override key 'trainer.bogus' (trainer has: batch_size") and "\n" not in msg
    near = check_override_keys(["trainer.lrr=1e-3"])
    assert near.startswith("unknown override key 'trainer.lrr'; did you mean trainer.lr?")  # the nearest valid name
    assert check_override_keys(["experiment=glue_table", "glue_schedule.train_cap.sst2=10"]) is None  # a preset's key
    r = _cli(["trainer.bogus=1", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


BAD = [
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be an integer >= 1"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1 must be an integer >= 1 or null"),
    (["trainer.lr=-0.1"], "trainer.lr=-0.1 must be a number > 0.0"),
    (["trainer.lr=abc"], "trainer.lr='abc' must be a number > 0.0"),
    (["trainer.warmup_ratio=2"], "trainer.warmup_ratio=2 must be a number in [0.0, 1.0]"),
    (["trainer.group_by_length=maybe"], "trainer.group_by_length='maybe'; allowed: true or false"),
    (["trainer.select=best_test"], "trainer.select='best_test'; allowed: ['val_from_train', 'best_dev', 'last']"),
    (["trainer.resume=yes"], "trainer.resume='yes'; allowed: [None, 'auto']"),
    (["eval.top_p=0"], "eval.top_p=0 must be a number in (0.0, 1.0]"),
    (["task.val_size=-3"], "task.val_size=-3 must be an integer >= 0"),
    (["model.max_length=0"], "model.max_length=0 must be an integer >= 1"),
    (["budget=lora_r16", "budget.type=weird"], "budget.type='weird'; allowed: ['none', 'relative', 'absolute']"),
    (["method=talklora", "method.dropout=1.5"], "method.dropout=1.5; allowed: a probability in [0, 1)"),
    (["method=talklora", "method.top_k=9"], "method.top_k=9; allowed: null (None) or an integer in [1, 4]"),
    (["method=talklora", "method.router_input=y"], "method.router_input='y'; allowed: ['x', 'h', 'talked']"),
    (["method=talklora", "method.talk=loud"], "method.talk='loud'; allowed: ['learned', 'identity', 'off']"),
    (["method=talklora", "method.rank=3.5"], "method.rank=3.5; allowed: an integer"),
    (["method=lora", "method.alpha=0"], "method.alpha=0.0; allowed: a positive number, or null for 2 x rank"),
    (["method=talklora", "+method.bogus=1"], "method=talklora: unknown key(s) ['bogus']"),
]
NEEDS_MODEL = [  # checked against the real layer shapes: the model is loaded
    (["method=talklora", "method.rank=30"], "method.rank=30 is not divisible by method.num_experts=4"),
    (["model.target_modules=[nothing]"], "match no linear layer; this model's linear layer names"),
    (["method=moelora", "budget=lora_r8"], "budget lora_r8: no rank (multiple of 4)"),
]


@pytest.mark.parametrize("over,needle", BAD + [pytest.param(*c, marks=pytest.mark.slow) for c in NEEDS_MODEL])
def test_bad_settings_fail_without_completed_result(glue_dir, tmp_path, over, needle):
    from talklora_exp.errors import UserError
    from talklora_exp.run import run

    with pytest.raises(UserError, match=re.escape(needle)):
        run(compose_cfg([f"paths.data_dir={glue_dir}", *TINY, *over]), tmp_path / "r")
    m = tmp_path / "r" / "metrics.json"
    assert not m.exists() or json.loads(m.read_text())["status"] != "completed"


def test_bad_value_on_the_cli_is_one_line_and_writes_nothing(tmp_path):
    r = _cli(["trainer.lr=abc", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: trainer.lr='abc' must be a number > 0.0"
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_help_names_the_app_and_hides_base_configs(tmp_path):
    r = _cli(["--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("talklora_exp is powered by Hydra")
    assert "task_base" not in r.stdout and "task/commonsense: ARC-Challenge, ARC-Easy, all, boolq" in r.stdout


def test_fp16_on_cpu_is_refused():
    from talklora_exp.errors import UserError
    from talklora_exp.trainer import resolve_mixed_precision

    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16", cpu=True)
    assert resolve_mixed_precision("auto", cpu=True) == "no"


def test_glue_table_uses_the_committed_grid_choice():
    """The table's lr, pair encoding, epochs and SST-2 subsample are copied by hand from choose_lr's choice.json; once
    that file is committed, every table task must compose to exactly it (a stale copy would train the table on a
    setting the grid did not choose). Until then the preset must say its values are provisional."""
    choice_file = ROOT / "results" / "repro" / "glue_lr_grid" / "choice.json"
    preset = (CONF / "glue_table_choice.yaml").read_text()
    if not choice_file.exists():
        assert "PROVISIONAL" in preset
        return
    assert "PROVISIONAL" not in preset
    choice = json.loads(choice_file.read_text())
    assert set(choice) == {"cola", "sst2", "mrpc", "stsb", "rte"}
    for task, c in choice.items():
        cfg = compose_cfg(["experiment=glue_table", f"task=glue/{task}"])
        got = {"lr": cfg.trainer.lr, "pair_encoding": cfg.model.pair_encoding, "epochs": cfg.trainer.epochs,
               "train_cap": cfg.trainer.max_train_samples}  # fmt: skip
        assert got == c, task


def test_readme_results_match_the_committed_tables():
    """The GLUE table rows in README.md and results/README.md are copied from results/tables/glue.md (made by `make
    tables` from the committed runs), results/README.md's baselines rows from results/baselines, and its compute
    totals from compute.md and the grids' choice.md; a re-run of make tables that changes a number must fail here
    until the READMEs say the same."""
    tables = ROOT / "results" / "tables"
    if not (tables / "glue.md").exists():
        pytest.skip("no committed tables yet")
    readme = (ROOT / "README.md").read_text()
    results_readme = (ROOT / "results" / "README.md").read_text()  # the reproduction's full account

    def method_rows(md: Path, labels: tuple[str, ...]) -> list[str]:
        return [ln for ln in md.read_text().splitlines() if ln.startswith(tuple(f"| {x} |" for x in labels))]

    rows = method_rows(tables / "glue.md", ("LoRA", "MoELoRA", "TalkLoRA"))
    assert rows  # every method row the table has (a cell of a re-running method is absent, and marked (n=k) if partial)
    for row in rows:
        assert row in readme and row in results_readme, row
    baselines = ROOT / "results" / "baselines" / "tables" / "glue.md"  # the other baselines' table, while it lands too
    if baselines.exists():
        extra = method_rows(baselines, ("DoRA", "HiRA", "TeamLoRA"))
        assert extra
        for row in extra:
            assert row in results_readme, row
    readme = results_readme  # the compute totals below

    def all_row(md: str) -> list[str]:
        """compute_table's totals row: Task, Method, Runs, eval recorded, resumed, train h, eval h, total h."""
        line = next(ln for ln in md.splitlines() if ln.startswith("| **all** |"))
        return [c.strip() for c in line.strip().strip("|").split("|")]

    total = all_row((tables / "compute.md").read_text())
    grids = all_row((ROOT / "results" / "repro" / "glue_lr_grid" / "choice.md").read_text())
    assert (
        f"| table (step 5), as landed | {total[2]} | {total[7]} ({total[5]} training, {total[6]} evaluation) |"
        in readme
    )
    assert f"| grids (steps 1–3, 2b) | {grids[2]} | {grids[7]} " in readme
    assert f"**{float(total[7]) + float(grids[7]):.1f}**" in readme
