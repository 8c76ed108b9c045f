"""Tables from hand-made run dirs (means, bold, significance, left-out runs, byte-stable output) and sweep dry runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from talklora_exp.analysis.__main__ import main as analysis_main
from talklora_exp.analysis.tables import paired_test
from talklora_exp.cli import group_options


def write_run(
    root: Path,
    task: str,
    method: str,
    seed: int,
    value: float,
    status: str = "completed",
    routing: bool = True,
    group_hash: str = "g1",
    params: int | None = None,
):
    d = root / f"{task}-{method}-{seed}-{group_hash}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("seed: 1\n")
    main = {"cola": "matthews_correlation", "stsb": "pearson"}.get(task, "accuracy")
    m = {"status": status, "task": task, "task_family": "glue", "method": method, "model": "minilm", "seed": seed,
         "budget": {"name": "lora_r16"}, "adapter_params": params or {"lora": 147456, "moelora": 129024, "talklora": 154416}[method],
         "eval": {main: value}, "main_metric": main, "group_hash": group_hash, "report_split": "dev",
         "selection": {"protocol": "val_from_train", "split": "val", "metric": "accuracy", "step": 10, "value": value}}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(m))
    if routing and method != "lora":
        layer = {"load": [0.25, 0.25, 0.3, 0.2], "load_entropy": 0.99, "cv": 0.1, "max_min_ratio": 1.5, "gini": 0.05, "sensitivity": 0.2 + seed / 100,
                 "token_entropy": 0.9, "top1_share": 0.3}  # fmt: skip
        (d / "routing.json").write_text(json.dumps({"layers": {"l0": layer, "l1": layer}, "aggregate": layer}))
    log = [{"step": 3, "routing_train": {"load_entropy": 0.5 + seed / 10, "cv": 0.6}},
           {"step": 5, "val": {"loss": 0.7, main: value - 0.1}, "eval": {main: value - 0.05}},
           {"step": 10, "val": {"loss": 0.5, main: value}, "eval": {main: value}, "routing": {"load_entropy": 0.9, "cv": 0.2}}]  # fmt: skip
    (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    # TalkLoRA − baseline differs from seed to seed (a paired t-test has no p-value when every seed gives the same
    # difference), while each method's mean ± std stays round
    vals = {"lora": [0.81, 0.80, 0.79], "moelora": [0.78, 0.80, 0.79], "talklora": [0.85, 0.86, 0.84]}
    for m, vs in vals.items():
        for s, v in enumerate(vs, start=1):
            write_run(root, "rte", m, s, v)
            write_run(root, "cola", m, s, v - 0.3)
    write_run(root, "rte", "talklora", 4, 0.99, status="failed")
    (root / "crashed").mkdir()
    (root / "crashed" / "config.yaml").write_text("seed: 9\n")
    return root


def test_glue_table_means_bold_and_significance(runs: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert analysis_main([str(runs), "--out", str(out), "--no-plots"]) == 0
    md = (out / "tables" / "glue.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    # columns: CoLA then RTE (GLUE order), then Avg; TalkLoRA best everywhere and significant vs both baselines
    assert "| Method | Adapter params | CoLA | RTE | Avg |" in md
    assert "| **55.00 ± 1.00**†‡ | **85.00 ± 1.00**†‡ |" in lines["TalkLoRA"]
    assert "checkpoint selection: val_from_train (val accuracy)" in md and "Reported split: dev" in md
    assert "| 50.00 ± 1.00 | 80.00 ± 1.00 |" in lines["LoRA"] and "147.5K" in lines["LoRA"]
    assert "99" not in md  # the failed seed-4 run is never averaged in
    left = (out / "tables" / "left_out.md").read_text()
    assert "status=failed" in left and "crashed" in left and "no metrics.json" in left
    tex = (out / "tables" / "glue.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{85.00 $\pm$ 1.00}$^\dagger$$^\ddagger$" in tex
    csv = (out / "tables" / "glue.csv").read_text()
    assert csv.splitlines()[0] == "Method,Adapter params,CoLA,RTE,Avg"
    routing = (out / "tables" / "routing.md").read_text()
    assert "| RTE | TalkLoRA | 3 | 0.990 | 0.100 | 1.500 | 0.050 | 0.220 |" in routing
    sig = (out / "tables" / "glue_significance.md").read_text()
    assert "| minilm | lora_r16 | RTE | TalkLoRA − LoRA | +5.00 |" in sig


def test_third_baseline_mark_reaches_latex_and_the_legend_keys_only_rows_present(runs: Path, tmp_path: Path):
    """`make tables` compares TalkLoRA with five baselines in results/baselines: TeamLoRA is the third (§), and a
    baseline with no runs yet (HiRA, DoRA while their sweep lands) gets no key in the note."""
    for s, v in enumerate([0.71, 0.70, 0.69], start=1):
        write_run(runs, "rte", "teamlora", s, v, params=129216)
        write_run(runs, "cola", "teamlora", s, v - 0.3, params=129216)
    out = tmp_path / "out"
    argv = [str(runs), "--out", str(out), "--no-plots", "--baselines", "lora,moelora,teamlora,hira,dora"]
    assert analysis_main(argv) == 0
    md = (out / "tables" / "glue.md").read_text()
    assert "| **85.00 ± 1.00**†‡§ |" in md  # TalkLoRA's RTE: better than LoRA, MoELoRA and TeamLoRA
    assert "§ TeamLoRA: TalkLoRA significantly better" in md and "HiRA" not in md and "DoRA" not in md
    tex = (out / "tables" / "glue.tex").read_text()
    assert r"\textbf{85.00 $\pm$ 1.00}$^\dagger$$^\ddagger$$^\S$" in tex and "§" not in tex


def test_routing_over_training_reads_train_snapshots_and_evals(runs: Path):
    from talklora_exp.analysis.collect import collect
    from talklora_exp.analysis.plots import routing_over_training

    got = {}
    real = routing_over_training.__globals__["_plt"]

    class Capture:  # records every line drawn instead of only trusting that a file appeared
        def __getattr__(self, k):
            return getattr(real(), k)

    import matplotlib.axes

    orig = matplotlib.axes.Axes.plot

    def plot(self, x, y, *a, **k):
        got.setdefault(k.get("label"), []).append((list(x), list(y)))
        return orig(self, x, y, *a, **k)

    matplotlib.axes.Axes.plot = plot
    try:
        runs_, _ = collect([runs])
        routing_over_training(runs_, runs / "figs")
    finally:
        matplotlib.axes.Axes.plot = orig
    # TalkLoRA's load-entropy line on a task: the train snapshot at step 3 (mean over seeds 1-3) and the eval at 10
    ent = [xy for xy in got["TalkLoRA"] if xy[0] == [3, 10]]
    assert ent and ent[0][1] == pytest.approx([0.7, 0.9])


def test_loss_curves_average_training_loss_per_validation_window(tmp_path: Path, monkeypatch):
    """Training loss is drawn at each validation step as the mean of the steps logged since the previous one:
    seed 1 logs 1.0, 0.8 before validation at step 2 and 0.6, 0.4 before step 4 -> (0.9, 0.5); seed 2 logs 0.8, 0.6
    and 0.4, 0.2 -> (0.7, 0.3); mean over seeds (0.8, 0.4). Validation loss: (0.7, 0.9) and (0.5, 0.7) -> (0.6, 0.8)."""
    import matplotlib.axes

    from talklora_exp.analysis.collect import collect
    from talklora_exp.analysis.plots import loss_curves

    root = tmp_path / "results"
    for seed, (tr, va) in {1: ([1.0, 0.8, 0.6, 0.4], [0.7, 0.9]), 2: ([0.8, 0.6, 0.4, 0.2], [0.5, 0.7])}.items():
        write_run(root, "rte", "lora", seed, 0.6)
        log = [{"step": 1, "loss": tr[0], "lr": 1e-3}, {"step": 2, "loss": tr[1], "lr": 1e-3},
               {"step": 2, "val": {"loss": va[0], "accuracy": 0.5}},
               {"step": 3, "loss": tr[2], "lr": 1e-3}, {"step": 4, "loss": tr[3], "lr": 1e-3},
               {"step": 4, "val": {"loss": va[1], "accuracy": 0.6}}, {"step": 4, "report": {"accuracy": 0.6}}]  # fmt: skip
        (root / f"rte-lora-{seed}-g1" / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    got: dict[int, list] = {}
    orig = matplotlib.axes.Axes.plot

    def plot(self, x, y, *a, **k):
        got.setdefault(id(self), []).append((list(x), list(y)))
        return orig(self, x, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    runs, _ = collect([root])
    assert [p.name for p in loss_curves(runs, tmp_path / "figs")] == ["loss_curves.png", "loss_curves.pdf"]
    (train,), (val,) = got.values()  # one line per axes: training loss above, validation loss below
    assert train[0] == [2, 4] and train[1] == pytest.approx([0.8, 0.4])
    assert val[0] == [2, 4] and val[1] == pytest.approx([0.6, 0.8])


def test_a_one_point_curve_is_drawn_as_a_marker(tmp_path: Path, monkeypatch):
    """The zero-shot row has one validation loss, at step 0: a line of one point draws nothing, so it gets a marker;
    a method with several points stays a plain line."""
    import matplotlib.axes

    from talklora_exp.analysis.collect import collect
    from talklora_exp.analysis.plots import loss_curves

    root = tmp_path / "results"
    write_run(root, "rte", "none", 1, 0.5, routing=False, params=1)
    (root / "rte-none-1-g1" / "train_log.jsonl").write_text(json.dumps({"step": 0, "val": {"loss": 2.6}}) + "\n")
    write_run(root, "rte", "lora", 1, 0.6)
    log = [
        {"step": 1, "loss": 1.0},
        {"step": 1, "val": {"loss": 0.9}},
        {"step": 2, "loss": 0.8},
        {"step": 2, "val": {"loss": 0.7}},
    ]
    (root / "rte-lora-1-g1" / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    got: list[tuple[list, dict]] = []
    orig = matplotlib.axes.Axes.plot

    def plot(self, x, y, *a, **k):
        got.append((list(x), k))
        return orig(self, x, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    runs, _ = collect([root])
    loss_curves(runs, tmp_path / "figs")
    by_label = {(k["label"], len(x)): k for x, k in got}
    assert by_label[("Zero-shot (no training)", 1)]["marker"] == "o"
    assert "marker" not in by_label[("LoRA", 2)]


def test_tables_regenerate_byte_for_byte(runs: Path, tmp_path: Path):
    analysis_main([str(runs), "--out", str(tmp_path / "a")])
    analysis_main([str(runs), "--out", str(tmp_path / "b")])
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert fa and fa == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in fa:
        if f.suffix != ".pdf":
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert {f.name for f in fa} >= {"expert_load_heatmap.png", "expert_load_heatmap.pdf", "sensitivity_by_layer.png", "score_vs_params.png",
                                    "routing_over_training.png", "learning_curves.png", "loss_curves.png"}  # fmt: skip


def test_paired_test_hand_computed():
    diff, p, n = paired_test({1: 0.8, 2: 0.9, 3: 0.7}, {1: 0.7, 2: 0.7, 3: 0.6})
    assert n == 3 and diff == pytest.approx(0.4 / 3)
    # d = (0.1, 0.2, 0.1): mean 0.1333, sd 0.0577, t = 4.0, df 2 -> p = 0.0572
    assert p == pytest.approx(0.0572, abs=1e-3)
    assert paired_test({1: 0.5}, {1: 0.4})[1] is None
    # the same difference in every seed (0.672 - 0.688 twice, as counts over 250 examples give): no variance, no test
    assert paired_test({1: 0.672, 2: 0.660}, {1: 0.688, 2: 0.676}) == (pytest.approx(-0.016), None, 2)


def test_missing_dir_is_an_error(tmp_path, capsys):
    assert analysis_main([str(tmp_path / "nope")]) == 2
    assert "run dir(s) not found" in capsys.readouterr().err


def _dry(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "talklora_exp", "-m", *args, "+dry_run=true"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip


def test_every_experiment_preset_runs_through_hydra():
    """lightning-hydra-template style: Hydra itself expands experiment=glob(*); each preset composes, validates and
    solves its budget on the real layer shapes (paper models from model.arch, offline)."""
    r = _dry("experiment=glob(*)")
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    n = len(group_options("experiment"))
    assert r.stdout.strip().splitlines()[-1] == f"{n} jobs, {n} OK"
    assert not list((ROOT / "results" / "sweeps").glob("*dry*"))  # a dry run writes nothing into the project


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_every_preset_grid_dry_runs(preset, capsys):
    """Each preset's grid, expanded by Hydra's sweeper (in-process: the same code path as the CLI), at its first seed:
    seeds change nothing a dry run checks, and Hydra composes every job twice (~0.4 s each), so the 240-job paper
    grid alone took 90 s of the suite. A command-line `seed=` wins over the preset's sweeper list, as it does for users."""
    from talklora_exp.cli import CONF_DIR, dry_run

    params = OmegaConf.select(OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml"), "hydra.sweeper.params") or {}
    # (a preset without a sweep, such as quickstart, dry-runs as one job)
    seeds = str(params.get("seed", "")).split(",")
    rows, code = dry_run([f"experiment={preset}"] + ([f"seed={seeds[0].strip()}"] if "seed" in params else []))
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    expected = 1
    for k, v in params.items():
        expected *= 1 if k == "seed" else len(str(v).split(","))
    assert code == 0 and len(rows) == expected and out[-1] == f"{expected} jobs, {expected} OK", (
        out[-3:],
        cap.err[-2000:],
    )
    assert all(r["rank"] > 0 and r["adapter_params"] > 0 and r["memory"]["total_gb"] > 0 for r in rows)
    assert len({tuple(r["overrides"]) for r in rows}) == expected


def test_dry_run_memory_counts_both_rows_of_a_siamese_pair(capsys):
    """Siamese encodes each sentence of a pair as its own row: twice the tokens per step of a cross pair."""
    from talklora_exp.cli import dry_run

    (cross,), _ = dry_run(["experiment=glue_lr_grid", "task=glue/rte", "trainer.lr=1e-3"])
    (siamese,), _ = dry_run(["experiment=glue_pair_grid", "trainer.lr=1e-3"])
    assert cross["memory"]["tokens_per_step"] == 32 * 128
    assert siamese["memory"]["tokens_per_step"] == 2 * 32 * 128
    assert siamese["memory"]["activations_gb"] == 2 * cross["memory"]["activations_gb"]


def test_dry_run_keeps_hydra_syntax_intact():
    """glob() over nested task options, range(), and list values with commas expand exactly as -m runs them."""
    r = _dry("task=glob(glue/m*)", "method=lora", "seed=range(1,3)", "model.target_modules=[query,value]")
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = [x.split(" rank ")[0].split() for x in r.stdout.strip().splitlines()[:-1]]
    assert sorted(tuple(j[:3]) for j in jobs) == [
        ("task=glue/mnli", "method=lora", "seed=1"), ("task=glue/mnli", "method=lora", "seed=2"),
        ("task=glue/mrpc", "method=lora", "seed=1"), ("task=glue/mrpc", "method=lora", "seed=2")]  # fmt: skip
    assert all(j[3] == "model.target_modules=[query,value]" for j in jobs)
    assert r.stdout.strip().splitlines()[-1] == "4 jobs, 4 OK"
    r = _dry("task=glob(glue/zz*)")
    assert r.returncode == 2 and "matches no option" in r.stderr


def test_paper_preset_is_upstreams_train_sh():
    from talklora_exp.cli import dry_run

    rows, code = dry_run(["experiment=commonsense_table_paper"])
    by = {(r["method"], r["overrides"][1]): r for r in rows}
    # rank 32 for all three (no budget solving); the paper's parameter counts on LLaMA3-8B q,k,v,up,down
    assert code == 0 and {r["rank"] for r in rows} == {32} and {o[1] for o in by} == {"seed=36", "seed=37", "seed=38"}
    assert by[("lora", "seed=36")]["adapter_params"] == 56_623_104
    assert by[("talklora", "seed=36")]["adapter_params"] == 32_307_712


def test_commonsense_all_run_expands_into_task_columns(tmp_path: Path):
    d = tmp_path / "r" / "all"
    d.mkdir(parents=True)
    ev = {"boolq/accuracy": 0.6, "piqa/accuracy": 0.5, "accuracy": 0.55}
    m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": "talklora", "model": "smollm2-135m", "seed": 1,
         "budget": {"name": "none"}, "adapter_params": 10, "eval": ev, "main_metric": "accuracy"}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(m))
    analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"])
    md = (tmp_path / "o" / "tables" / "commonsense.md").read_text()
    assert "| Method | Adapter params | BoolQ | PIQA | Avg |" in md and "| **60.00** | **50.00** | **55.00** |" in md


def test_commonsense_majority_answer_row_from_the_scored_examples(tmp_path: Path, monkeypatch):
    """The majority answer is counted on the examples the run scored: BoolQ's first 4 of 6 test answers are
    true, true, false, true (3/4 = 75.00; all six would give 4/6); PIQA's first 4 are 2 and 2 (50.00). Average 62.50.
    The run's curves go to figures/commonsense, once per run (not once per set), and GLUE's folder gets none."""
    monkeypatch.delenv("TALKLORA_DATA_DIR", raising=False)
    cs = tmp_path / "data" / "commonsense"
    answers = {"boolq": ["true", "true", "false", "true", "false", "true"],
               "piqa": ["solution1", "solution2", "solution2", "solution1", "solution1", "solution1"]}  # fmt: skip
    for t, golds in answers.items():
        (cs / t).mkdir(parents=True)
        rows = [{"instruction": f"q{i}", "input": "", "output": f"the correct answer is {a}", "answer": a}
                for i, a in enumerate(golds)]  # fmt: skip
        (cs / t / "test.json").write_text(json.dumps(rows))
    for seed in (1, 2):
        d = tmp_path / "r" / f"all-{seed}"
        d.mkdir(parents=True)
        ev = {"boolq/accuracy": 0.6 + seed / 100, "piqa/accuracy": 0.5, "accuracy": 0.55 + seed / 200}
        m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": "lora", "model": "smollm2-135m",
             "seed": seed, "budget": {"name": "lora_r16"}, "adapter_params": 10, "eval": ev, "main_metric": "accuracy",
             "data": {"root": str(cs), "n_eval": {"boolq/": 4, "piqa/": 4}}}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps(m))
        log = [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.8, "val": {"loss": 0.9}}]
        (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    from talklora_exp.analysis.collect import collect
    from talklora_exp.analysis.trivial import trivial_scores

    runs, _ = collect([tmp_path / "r"])
    assert trivial_scores(runs) == {("boolq", "eval"): 0.75, ("piqa", "eval"): 0.5}
    assert analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "tables" / "commonsense.md").read_text()
    assert "| _Majority answer_ | 0 | 75.00 | 50.00 | 62.50 |" in md
    assert "Majority answer: always giving each set's most frequent gold answer" in md
    assert (tmp_path / "o" / "figures" / "commonsense" / "loss_curves.png").exists()
    assert not (tmp_path / "o" / "figures" / "loss_curves.png").exists()


def test_zero_shot_row_is_one_evaluation_not_a_short_mean(tmp_path: Path):
    """method=none is evaluated once (no training, so no seeds to run): its row shows that one value, without the
    (n=1) mark that flags a method missing seeds, while a trained method missing a seed still gets it."""
    runs = {("lora", 1): 0.60, ("lora", 2): 0.62, ("talklora", 1): 0.70, ("talklora", 2): 0.72, ("moelora", 1): 0.50,
            ("none", 1): 0.10}  # fmt: skip
    for (method, seed), acc in runs.items():
        d = tmp_path / "r" / f"{method}-{seed}"
        d.mkdir(parents=True)
        m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": method, "model": "m",
             "seed": seed, "budget": {"name": "b"}, "adapter_params": 0 if method == "none" else 10,
             "eval": {"boolq/accuracy": acc, "accuracy": acc}, "main_metric": "accuracy"}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps(m))
    assert analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    md = (tmp_path / "o" / "tables" / "commonsense.md").read_text()
    assert "| Zero-shot (no training) | 0.0K | 10.00 | 10.00 |" in md
    assert "| MoELoRA | 0.0K | 50.00 (n=1) | 50.00 (n=1) |" in md
    assert "Zero-shot: the base model evaluated once" in md and "(n=k): mean over only k seeds" in md


def test_significantly_worse_is_marked_too(tmp_path: Path):
    root = tmp_path / "r"
    for s, (a, b) in enumerate([(0.80, 0.70), (0.82, 0.71), (0.81, 0.69)], start=1):
        write_run(root, "rte", "lora", s, a)
        write_run(root, "rte", "talklora", s, b)
    analysis_main([str(root), "--out", str(tmp_path / "o"), "--no-plots"])
    md = (tmp_path / "o" / "tables" / "glue.md").read_text()
    assert "| 70.00 ± 1.00↓† |" in md and "| **81.00 ± 1.00** |" in md


def test_a_cell_with_fewer_seeds_says_so(tmp_path: Path):
    """A sweep still running (TalkLoRA's seed 3 missing): its mean is over 2 seeds and the cell says n=2; full cells
    and tables without a short cell carry no mark."""
    root = tmp_path / "r"
    for s, v in enumerate([0.80, 0.81, 0.79], start=1):
        write_run(root, "rte", "lora", s, v)
    for s, v in enumerate([0.85, 0.87], start=1):  # paired with LoRA: p = 0.06, no mark
        write_run(root, "rte", "talklora", s, v)
    analysis_main([str(root), "--out", str(tmp_path / "o"), "--no-plots"])
    md = (tmp_path / "o" / "tables" / "glue.md").read_text()
    assert "| TalkLoRA | 154.4K | **86.00 ± 1.41** (n=2) | **86.00 ± 1.41** (n=2) |" in md
    assert "| LoRA | 147.5K | 80.00 ± 1.00 | 80.00 ± 1.00 |" in md
    assert "(n=k): mean over only k seeds" in md
    write_run(root, "rte", "talklora", 3, 0.84)
    analysis_main([str(root), "--out", str(tmp_path / "o2"), "--no-plots"])
    assert "(n=" not in (tmp_path / "o2" / "tables" / "glue.md").read_text()


def test_a_different_config_in_a_cell_is_left_out_not_averaged(runs: Path, tmp_path: Path):
    write_run(runs, "rte", "lora", 4, 0.10, group_hash="edited")  # e.g. the preset's lr was edited in between
    analysis_main([str(runs), "--out", str(tmp_path / "o"), "--no-plots"])
    md = (tmp_path / "o" / "tables" / "glue.md").read_text()
    assert "| 80.00 ± 1.00 |" in md.split("| LoRA |")[1].splitlines()[0]  # still the three g1 seeds
    left = (tmp_path / "o" / "tables" / "left_out.md").read_text()
    assert "rte-lora-4-edited" in left and "config differs from the 3 other run(s) of its cell" in left


def test_cells_group_by_the_recorded_config_under_todays_identity_rules(runs: Path, tmp_path: Path):
    """A run recorded with a key that has since stopped counting (identity.NOT_RESULTS: here the GLUE presets'
    lookup table) stays in its cell although metrics.json holds the old group hash; a real difference is left out."""
    from talklora_exp.identity import group_hash

    cfg = {"seed": 1, "method.name": "lora", "trainer.lr": 0.001}
    for d in sorted(runs.glob("rte-lora-*")):
        (d / "identity.json").write_text(json.dumps({"config": {**cfg, "seed": int(d.name.split("-")[2])}}))
    write_run(runs, "rte", "lora", 4, 0.80, group_hash="recorded-with-the-table")
    old = {**cfg, "seed": 4, "glue_choice.lr.rte": 0.002}
    (runs / "rte-lora-4-recorded-with-the-table" / "identity.json").write_text(json.dumps({"config": old}))
    write_run(runs, "rte", "lora", 5, 0.10, group_hash="edited")
    (runs / "rte-lora-5-edited" / "identity.json").write_text(json.dumps({"config": {**cfg, "trainer.lr": 0.01}}))
    assert group_hash(old) == group_hash(cfg)
    analysis_main([str(runs), "--out", str(tmp_path / "o"), "--no-plots"])
    left = (tmp_path / "o" / "tables" / "left_out.md").read_text()
    assert "rte-lora-5-edited" in left and "rte-lora-4-recorded-with-the-table" not in left
    lora_row = (tmp_path / "o" / "tables" / "glue.md").read_text().split("| LoRA |")[1].splitlines()[0]
    assert "| 80.00 ± 0.82 |" in lora_row  # four seeds: the one recorded with the table is averaged in


def test_any_method_appears_in_every_table_and_figure(runs: Path, tmp_path: Path, monkeypatch):
    """A method the analysis has never heard of ("toylora") gets a row, a significance comparison when named as a
    baseline, and a line/panel in every figure (no hard-coded method lists)."""
    from talklora_exp.analysis import plots

    for s, v in enumerate([0.70, 0.72, 0.71], start=1):
        write_run(runs, "rte", "toylora", s, v, params=1000)
        write_run(runs, "cola", "toylora", s, v - 0.3, params=1000)
    drawn = []
    real_label = plots.label
    monkeypatch.setattr(plots, "label", lambda m: drawn.append(m) or real_label(m))
    out = tmp_path / "o"
    assert analysis_main([str(runs), "--out", str(out), "--baselines", "lora,moelora,toylora"]) == 0
    md = (out / "tables" / "glue.md").read_text()
    assert "| toylora | 1.0K |" in md and "§ toylora" in md
    assert "**85.00 ± 1.00**†‡§" in md  # TalkLoRA significantly better than the toy baseline too
    assert "TalkLoRA − toylora" in (out / "tables" / "glue_significance.md").read_text()
    assert "| RTE | toylora | 3 |" in (out / "tables" / "routing.md").read_text()
    figs = {
        "learning_curves",
        "loss_curves",
        "expert_load_heatmap",
        "routing_over_training",
        "sensitivity_by_layer",
        "score_vs_params",
    }
    assert {p.stem for p in (out / "figures").glob("*.png")} == figs
    assert drawn.count("toylora") >= len(figs)  # labelled in each figure


def test_unreadable_metrics_is_left_out_with_its_reason(runs: Path, tmp_path: Path):
    bad = runs / "garbled"
    bad.mkdir()
    (bad / "metrics.json").write_text('{"status": "compl')
    assert analysis_main([str(runs), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    left = (tmp_path / "o" / "tables" / "left_out.md").read_text()
    assert "garbled | unreadable metrics.json (" in left


def _grid_run(root: Path, task: str, pair: str | None, lr: float, val: float, dev: float, metric: str = "accuracy",
              step: int = 7, epochs: int = 10, cap: int | None = None, n_train: int = 10, extra: dict | None = None):  # fmt: skip
    d = root / f"{task}-{pair}-{lr}-{epochs}-{cap}"
    d.mkdir(parents=True)
    cfg = {"trainer.lr": lr, "seed": 0, "trainer.batch_size": 4, "trainer.epochs": epochs,
           "trainer.max_train_samples": cap, **({"model.pair_encoding": pair} if pair else {}), **(extra or {})}  # fmt: skip
    (d / "identity.json").write_text(json.dumps({"config_hash": f"{task}{pair}{lr}", "config": cfg}))
    (d / "metrics.json").write_text(json.dumps({
        "status": "completed", "task": task, "task_family": "glue", "method": "lora", "model": "minilm",
        "budget": {"name": "lora_r16"}, "main_metric": metric, "eval": {metric: dev}, "group_hash": f"{task}{pair}{lr}",
        "data": {"n_train": n_train}, "num_processes": 1, "train_runtime_s": 60,  # 10: 3 steps per epoch at batch 4
        "selection": {"protocol": "val_from_train", "split": "val", "metric": metric, "value": val, "step": step}}))  # fmt: skip
    log = [{"step": s_, "val": {metric: v_}, "eval": {metric: dev}} for s_, v_ in ((step, val), (step + 1, val - 0.01))]
    (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))


def test_choose_lr_picks_on_validation_across_grids_never_dev(tmp_path: Path):
    """Every lr of a cell is compared (not one config per cell), pair encodings from a second grid compete, dev never
    decides (the best-dev setting has a worse val), and a run made before pair_encoding existed counts as cross."""
    from talklora_exp.analysis.choose_lr import main as choose_main

    cross, pairs = tmp_path / "cross", tmp_path / "pairs"
    _grid_run(cross, "rte", None, 5e-4, val=0.52, dev=0.70)
    _grid_run(cross, "rte", None, 1e-3, val=0.54, dev=0.50)
    _grid_run(pairs, "rte", "siamese", 5e-4, val=0.60, dev=0.55)
    _grid_run(pairs, "rte", "siamese", 1e-3, val=0.58, dev=0.69)
    _grid_run(cross, "mrpc", "cross", 1e-3, val=0.80, dev=0.80)
    _grid_run(cross, "mrpc", "cross", 2e-3, val=0.83, dev=0.79, step=13, epochs=8)  # 13 steps: 4.33 epochs -> 9 > 8
    _grid_run(pairs, "mrpc", "siamese", 2e-3, val=0.83, dev=0.90)  # a tie on val goes to cross
    peft_lora = {"method.name": "lora", "model.pooling": "mean", "model.kind": "encoder",
                 "model.head_modules": ["classifier", "pooler"]}  # fmt: skip
    _grid_run(cross, "cola", None, 1e-3, val=0.40, dev=0.40, step=2, metric="mcc", extra=peft_lora)  # pre-fix run
    _grid_run(cross, "cola", None, 2e-3, val=0.30, dev=0.30, step=2, metric="mcc",  # made after the fix
              extra={**peft_lora, "fix.mean_pool_mask_under_peft": True})  # fmt: skip
    assert choose_main([str(cross), str(pairs), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "choice.json").read_text())
    assert got == {"cola": {"lr": 1e-3, "pair_encoding": "cross", "epochs": 3, "train_cap": None},  # the floor
                   "mrpc": {"lr": 2e-3, "pair_encoding": "cross", "epochs": 8, "train_cap": None},  # the grid's cap
                   "rte": {"lr": 5e-4, "pair_encoding": "siamese", "epochs": 5, "train_cap": None}}  # ceil(2 x 2.33)  # fmt: skip
    md = (tmp_path / "out" / "choice.md").read_text()
    assert "| rte | siamese | 0.0005 | all | 0.6000 | 7 (2.33 of 10) | 5 | 0.5500 |" in md
    assert "cross lr 0.001 10ep: 0.5400" in md
    assert "made before a result-changing fix (identity.RESULT_FIXES): 1 of 9 before `mean_pool_mask_under_peft`" in md
    assert (tmp_path / "out" / "grid_curves.png").stat().st_size > 0  # every setting's curves, chosen one thick


def test_compute_table_sums_process_hours_of_every_completed_run(tmp_path: Path):
    """Training plus recorded evaluation time, times processes; runs of a second config in one cell count too (a grid
    spent that compute), an interrupted run does not, and a run without eval_runtime_s counts its training only."""
    runs = tmp_path / "r"
    times = {("rte", "lora", 1, "g1"): (3600, 360, 1), ("rte", "lora", 1, "g2"): (1800, 180, 2),
             ("rte", "talklora", 1, "g1"): (7200, None, 1)}  # fmt: skip
    for (task, method, seed, g), (train, ev, procs) in times.items():
        write_run(runs, task, method, seed, 0.6, group_hash=g)
        f = runs / f"{task}-{method}-{seed}-{g}" / "metrics.json"
        m = json.loads(f.read_text())
        m.update(train_runtime_s=train, num_processes=procs, **({"eval_runtime_s": ev} if ev is not None else {}))
        m.update(resumed_from_step=200 if g == "g2" else None)  # g2 was continued from its step-200 checkpoint
        f.write_text(json.dumps(m))
    write_run(runs, "rte", "moelora", 1, 0.6, status="interrupted")
    assert analysis_main([str(runs), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    md = (tmp_path / "o" / "tables" / "compute.md").read_text()
    assert "| RTE | LoRA | 2 | 2 | 1 | 2.00 | 0.20 | 2.20 |" in md  # 1 h + 0.5 h x 2 processes; 0.1 + 0.05 x 2
    assert "| RTE | TalkLoRA | 1 | 0 | 0 | 2.00 | 0.00 | 2.00 |" in md
    assert "| **all** |  | 3 | 2 | 1 | 4.00 | 0.20 | 4.20 |" in md and "MoELoRA" not in md


def test_choose_lr_compares_schedules_and_a_tie_goes_to_the_cheaper(tmp_path: Path):
    """A longer schedule or a larger train subsample is one more setting, chosen only on validation; on a tie the one
    that costs fewer epochs x examples wins, and its train cap reaches choice.json."""
    from talklora_exp.analysis.choose_lr import main as choose_main

    short, long_ = tmp_path / "short", tmp_path / "long"
    _grid_run(short, "sst2", None, 2e-3, val=0.86, dev=0.84, epochs=3, cap=8, n_train=8)
    _grid_run(long_, "sst2", None, 2e-3, val=0.86, dev=0.90, epochs=3, cap=16, n_train=16)  # tie: costlier, loses
    _grid_run(short, "cola", None, 2e-3, val=0.24, dev=0.30, epochs=5, step=14, n_train=10)
    _grid_run(long_, "cola", None, 2e-3, val=0.30, dev=0.20, epochs=10, step=21, n_train=10)  # 7 epochs -> 10
    assert choose_main([str(short), str(long_), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    got = json.loads((tmp_path / "o" / "choice.json").read_text())
    assert got == {"cola": {"lr": 2e-3, "pair_encoding": "cross", "epochs": 10, "train_cap": None},
                   "sst2": {"lr": 2e-3, "pair_encoding": "cross", "epochs": 3, "train_cap": 8}}  # fmt: skip
    md = (tmp_path / "o" / "choice.md").read_text()
    assert "cross lr 0.002 5ep: 0.2400, cross lr 0.002 10ep: 0.3000" in md and "cap 16: 0.8600" in md
    assert "### Compute of the grids" in md and "| **all** |  | 4 |" in md  # every grid run's compute is stated


def test_trivial_predictor_row_and_line_from_the_runs_data(tmp_path: Path, monkeypatch):
    """The majority-class reference comes from the split itself: train (10 rows) is 3/10 entailment, but the 4 rows
    Random(58) holds out for validation (rows 5, 8, 3, 9) are 3/4 entailment, so validation's best constant scores
    0.75 while dev (2/5 entailment) gives 0.60. CoLA's constant is MCC 0; STS-B (Pearson) gets none."""
    from talklora_exp.analysis.collect import collect
    from talklora_exp.analysis.plots import learning_curves
    from talklora_exp.analysis.trivial import trivial_scores

    monkeypatch.delenv("TALKLORA_DATA_DIR", raising=False)
    rte = tmp_path / "data" / "glue" / "RTE"
    rte.mkdir(parents=True)

    def tsv(entailed: list[bool]) -> str:
        labels = ["entailment" if e else "not_entailment" for e in entailed]
        return "index\tsentence1\tsentence2\tlabel\n" + "".join(
            f"{i}\ta {i}\tb {i}\t{x}\n" for i, x in enumerate(labels)
        )

    (rte / "train.tsv").write_text(tsv([i in (3, 5, 8) for i in range(10)]))
    (rte / "dev.tsv").write_text(tsv([i < 2 for i in range(5)]))
    root = tmp_path / "results"
    for task in ("rte", "cola", "stsb"):
        write_run(root, task, "lora", 1, 0.7)
    d = root / "rte-lora-1-g1"
    m = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**m, "data": {"source": str(rte), "n_train": 6, "n_val": 4}}))
    (d / "identity.json").write_text(json.dumps({"config": {"task.val_size": 4, "task.val_seed": 58}}))
    runs, _ = collect([root])
    assert trivial_scores(runs) == {
        ("rte", "eval"): 0.6,
        ("rte", "val"): 0.75,
        ("cola", "eval"): 0.0,
        ("cola", "val"): 0.0,
    }
    assert analysis_main([str(root), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = (tmp_path / "out" / "tables" / "glue.md").read_text()
    assert "| _Majority class / constant_ | 0 | 0.00 | – | 60.00 | – |" in md  # CoLA, STS-B, RTE, Avg

    import matplotlib.axes

    drawn, orig = [], matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "axhline",
        lambda self, y, *a, **k: drawn.append((self.get_title(), y)) or orig(self, y, *a, **k),
    )
    learning_curves(runs, tmp_path / "figs", trivial_scores(runs))
    assert sorted(y for _, y in drawn) == [0.0, 0.0, 0.6, 0.75]  # CoLA dev and val, RTE dev and val; none for STS-B


def test_convergence_table_hand_computed(tmp_path: Path):
    """Two seeds with hand-made curves: where the chosen step falls, first -> chosen on validation and dev, best dev,
    dev's band within a run, and how often the chosen step is also the best dev step."""
    root = tmp_path / "runs"
    curves = {1: ([0.5, 0.7, 0.6], [0.55, 0.65, 0.70], 20), 2: ([0.6, 0.65, 0.8], [0.6, 0.62, 0.66], 30)}
    for seed, (val, dev, chosen) in curves.items():
        write_run(root, "mrpc", "talklora", seed, dev[chosen // 10 - 1])
        d = root / f"mrpc-talklora-{seed}-g1"
        m = json.loads((d / "metrics.json").read_text())
        m.update(total_steps=50, selection={**m["selection"], "step": chosen})
        (d / "metrics.json").write_text(json.dumps(m))
        log = [{"step": 10 * (i + 1), "val": {"loss": 0.5, "accuracy": v}, "eval": {"accuracy": e}}
               for i, (v, e) in enumerate(zip(val, dev, strict=True))]  # fmt: skip
        (d / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    out = tmp_path / "out"
    assert analysis_main([str(root), "--out", str(out), "--no-plots"]) == 0
    md = (out / "tables" / "convergence.md").read_text()
    assert (
        "| MRPC | TalkLoRA | 2 | 3 | 0.50 (0.40–0.60) | 55.00 → 75.00 | 57.50 → 65.50 | 68.00 | 6.0–15.0 | 1 of 2 |"
        in md
    )


def test_answer_share_table_hand_computed(tmp_path: Path):
    """Seed 1 answers A,A,A,B on 4 ARC-e questions (75%), seed 2 A,B,B,B (75%): mean 75.0; gold A,B,C,D: 25.0."""
    golds = ["answer1", "answer2", "answer3", "answer4"]
    for seed, said in ((1, ["answer1"] * 3 + ["answer2"]), (2, ["answer1"] + ["answer2"] * 3)):
        d = tmp_path / "r" / f"s{seed}"
        d.mkdir(parents=True)
        m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": "lora", "model": "m",
             "seed": seed, "budget": {"name": "none"}, "adapter_params": 1, "main_metric": "accuracy",
             "eval": {"ARC-Easy/accuracy": 0.25, "accuracy": 0.25}}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps(m))
        rows = [
            {"id": f"ARC-Easy-{i}", "task": "ARC-Easy", "extracted": s, "gold": g}
            for i, (s, g) in enumerate(zip(said, golds))
        ]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"])
    md = (tmp_path / "o" / "tables" / "commonsense_answers.md").read_text()
    assert "| LoRA | 2 | 75.0 |" in md and "| _Gold answers_ | – | 25.0 |" in md


def test_option_scored_runs_get_their_metric_tables_and_the_zero_shot_comparison(tmp_path: Path):
    """Runs whose main metric is acc_norm: the headline table says so and reads acc_norm, a second table reads acc,
    and the zero-shot comparison is computed by hand: per-seed averages 0.75 / 0.50 against zero-shot 0.25 (one-sample
    t: mean 0.625, sd 0.1768, t = 0.375 / 0.125 = 3.0, df 1, p = 0.2048); per example (4 examples), the seeds' mean
    correctness [1, .5, 0, 1] minus zero-shot's [0, 0, 0, 1]: +1, +0.5, 0, 0; of the 4 sign patterns of (1, 0.5), 2
    reach |mean| 0.375, so the exact p is 0.5 (the permutation estimate is within 0.01 of it)."""
    from talklora_exp.analysis.tables import sign_flip_p

    zero = [0, 0, 0, 1]  # zero-shot's acc_norm per example
    corr = {1: [1, 1, 0, 1], 2: [1, 0, 0, 1]}
    for method, seed, an, a in (("none", 1, 0.25, 0.40), ("lora", 1, 0.75, 0.45), ("lora", 2, 0.50, 0.55)):
        d = tmp_path / "r" / f"{method}-{seed}"
        d.mkdir(parents=True)
        ev = {"boolq/acc_norm": an, "boolq/acc": a, "acc_norm": an, "acc": a}
        m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": method, "model": "m",
             "seed": seed, "budget": {"name": "b"}, "adapter_params": 0 if method == "none" else 10, "eval": ev,
             "main_metric": "acc_norm"}  # fmt: skip
        if method == "none":  # what a zero-shot run records: no steps, validation scored once at step 0
            m.update(
                total_steps=0, selection={"protocol": "none", "split": None, "metric": None, "step": 0, "value": None}
            )
            (d / "train_log.jsonl").write_text(json.dumps({"step": 0, "val": {"loss": 2.0, "acc_norm": 0.3}}) + "\n")
        (d / "metrics.json").write_text(json.dumps(m))
        c = zero if method == "none" else corr[seed]
        rows = [{"id": f"boolq-{i}", "task": "boolq", "gold": "true", "acc_norm": bool(x), "acc": False,
                 "ll_pick_norm": "true" if x else "false", "ll_pick": "false"} for i, x in enumerate(c)]  # fmt: skip
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    t = tmp_path / "o" / "tables"
    head = (t / "commonsense.md").read_text()
    assert head.startswith("### Commonsense reasoning, option likelihood: acc_norm")
    assert "| LoRA | 0.0K | **62.50 ± 17.68** | **62.50 ± 17.68** |" in head
    assert "| LoRA | 0.0K | **50.00 ± 7.07** |" in (t / "commonsense_acc.md").read_text()
    zs = (t / "commonsense_vs_zero_shot.md").read_text()
    assert "| LoRA | 2 | 62.50 ± 17.68 | 25.00 | +37.50 | 0.205 |" in zs and zs.count("| 4 |") == 1
    p = float(zs.split("| 0.205 | ")[1].split(" |")[0])
    assert abs(p - 0.5) < 0.01 and sign_flip_p(__import__("numpy").zeros(3)) == 1.0


def test_method_pairs_table_hand_computed(tmp_path: Path):
    """LoRA's per-seed averages 0.75 / 0.50, TalkLoRA's 0.50 / 0.50: per-seed differences −0.25, 0 (mean −12.50,
    sd 17.68); paired t = −0.125 / (0.1768 / √2) = −1.0 with df 1, so p = 0.5 exactly. Per example, the seeds' mean
    correctness [1, .5, 0, 1] (LoRA) and [.5, .5, 0, 1] (TalkLoRA) differ by −.5 on one example only: every sign
    pattern reaches |mean| 0.125, so p = 1. A method with no seed in common with another gets no row."""
    corr = {("lora", 1): [1, 1, 0, 1], ("lora", 2): [1, 0, 0, 1],
            ("talklora", 1): [1, 0, 0, 1], ("talklora", 2): [0, 1, 0, 1], ("moelora", 3): [1, 1, 1, 1]}  # fmt: skip
    for (method, seed), c in corr.items():
        d = tmp_path / "r" / f"{method}-{seed}"
        d.mkdir(parents=True)
        avg = sum(c) / 4
        m = {"status": "completed", "task": "all", "task_family": "commonsense", "method": method, "model": "m",
             "seed": seed, "budget": {"name": "b"}, "adapter_params": 10, "main_metric": "acc_norm",
             "eval": {"boolq/acc_norm": avg, "boolq/acc": avg, "acc_norm": avg, "acc": avg}}  # fmt: skip
        (d / "metrics.json").write_text(json.dumps(m))
        rows = [{"id": f"boolq-{i}", "task": "boolq", "gold": "true", "acc_norm": bool(x), "acc": bool(x),
                 "ll_pick_norm": "true" if x else "false", "ll_pick": "true" if x else "false"}
                for i, x in enumerate(c)]  # fmt: skip
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert analysis_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    md = (tmp_path / "o" / "tables" / "commonsense_pairs.md").read_text()
    assert "| TalkLoRA − LoRA | 1,2 | -12.50 | 17.68 | 0.500 | 1.0000 | 4 |" in md
    assert "MoELoRA" not in md.split("\n\n")[1]  # seed 3 only: nothing to pair with
