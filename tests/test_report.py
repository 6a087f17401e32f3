"""report.py: a sweep folder's table equals what a hand computation from the jobs' files gives.

References: numpy means / sample stds of the jobs' ``metrics.json``; the paired test by direct computation on
the per-query files (the exact sign-flip enumeration, a plain bootstrap loop, scipy's spearmanr); a real tiny
multirun of ``train.py``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from embedlab.report import SweepError, build_report, build_table, load_jobs
from embedlab.report.cli import main as report_main
from embedlab.report.cli import read_units
from embedlab.report.render import to_csv, to_latex, to_markdown
from tests.conftest import PROJECT_ROOT

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def make_sweep(root: Path, params: dict[str, str], units, fixed=("model=tiny",), metric="test/ndcg@10") -> Path:
    """A multirun folder as Hydra and train() leave it: ``multirun.yaml``, and per job ``.hydra/overrides.yaml``,
    ``metrics.json`` and ``runs/test_per_query.jsonl``; ``units(job overrides) -> {unit id: fields}``."""
    cfg = {"hydra": {"sweeper": {"_target_": BASIC, "params": params}, "overrides": {"task": list(fixed)}}}
    root.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), root / "multirun.yaml")
    grid = [[f"{k}={v}" for v in values.split(",")] for k, values in params.items()]
    for n, combo in enumerate(itertools.product(*grid)):
        job = root / str(n)
        (job / ".hydra").mkdir(parents=True)
        overrides = [*combo, *fixed]
        OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
        rows = units(dict(o.split("=", 1) for o in combo))
        lines = "".join(json.dumps({"id": uid, **fields}) + "\n" for uid, fields in rows.items())
        (job / "runs").mkdir()
        (job / "runs" / "test_per_query.jsonl").write_text(lines)
        if "gold" in next(iter(rows.values())):
            gold, pred = zip(*[(r["gold"], r["prediction"]) for r in rows.values()])
            value = 100 * spearmanr(gold, pred).statistic
        else:
            value = float(np.mean([r[metric] for r in rows.values()]))
        (job / "metrics.json").write_text(json.dumps({metric: value, "test/search_seconds": 0.1}))
    return root


def random_units(n_queries: int = 5):
    def units(job: dict[str, str]) -> dict[str, dict[str, float]]:
        rng = np.random.default_rng(zlib.crc32(repr(sorted(job.items())).encode()))
        shift = 0.15 if job.get("pooling") == "cls" else 0.0
        return {f"q{i}": {"test/ndcg@10": float(np.clip(rng.uniform(0, 0.8) + shift, 0, 1))} for i in range(n_queries)}
    return units


PARAMS = {"pooling": "mean,cls", "loss.symmetric": "false,true", "seed": "1,2"}


def _job_metric(sweep: Path, job: str, metric: str = "test/ndcg@10") -> float:
    return json.loads((sweep / job / "metrics.json").read_text())[metric]


def _per_query(sweep: Path, job: str, metric: str = "test/ndcg@10") -> np.ndarray:
    lines = (sweep / job / "runs" / "test_per_query.jsonl").read_text().splitlines()
    return np.array([json.loads(line)[metric] for line in lines])


def test_rows_means_stds_n_and_paired_test_equal_a_hand_computation(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", PARAMS, random_units())
    # jobs are numbered in Hydra's order: pooling x symmetric x seed
    jobs = {(p, s, seed): str(n) for n, (p, s, seed) in enumerate(itertools.product(["mean", "cls"], ["false", "true"], ["1", "2"]))}
    table = build_table(load_jobs(sweep), metrics=["test/ndcg@10"], baseline="pooling=mean,loss.symmetric=false", resamples=4000)
    assert table.keys == ["pooling", "loss.symmetric"]
    assert [r.label for r in table.rows] == [
        "pooling=mean, loss.symmetric=false", "pooling=mean, loss.symmetric=true",
        "pooling=cls, loss.symmetric=false", "pooling=cls, loss.symmetric=true"]
    for row in table.rows:
        values = [_job_metric(sweep, jobs[(row.values["pooling"], row.values["loss.symmetric"], seed)]) for seed in "12"]
        cell = row.cells["test/ndcg@10"]
        assert cell.n == 2
        assert cell.mean == pytest.approx(np.mean(values), abs=1e-12)
        assert cell.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)

    row = table.rows[2]  # cls, false vs mean, false: per seed, paired by query
    diff = 100 * np.mean([_per_query(sweep, jobs[("cls", "false", s)]) - _per_query(sweep, jobs[("mean", "false", s)]) for s in "12"], axis=0)
    c = row.versus["test/ndcg@10"]
    assert (c.seeds, c.units) == (2, 5)
    assert c.mean == pytest.approx(diff.mean(), abs=1e-9)
    # the mean difference over queries is the difference of the rows' means
    assert c.mean == pytest.approx(100 * (row.cells["test/ndcg@10"].mean - table.baseline.cells["test/ndcg@10"].mean), abs=1e-9)
    flips = [abs((np.array(s) * diff).mean()) for s in itertools.product([-1.0, 1.0], repeat=len(diff))]
    assert c.p == pytest.approx(np.mean([f >= abs(diff.mean()) - 1e-12 for f in flips]), abs=1e-12)
    # the bootstrap: the same draws (build_table's default seed 0) of queries, averaged in a plain loop
    idx = np.random.default_rng(0).integers(0, 5, size=(4000, 5))
    means = np.array([np.mean([diff[i] for i in draw]) for draw in idx])
    assert (c.lo, c.hi) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    assert (c.lo, c.hi) == pytest.approx((np.percentile(diff[idx].mean(axis=1), 2.5), np.percentile(diff[idx].mean(axis=1), 97.5)))


def test_deleted_and_unfinished_jobs_are_listed_not_averaged(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", PARAMS, random_units())
    shutil.rmtree(sweep / "7")  # cls, true, seed 2
    (sweep / "4" / "metrics.json").unlink()  # cls, false, seed 1: killed before the end
    table = build_table(load_jobs(sweep), metrics=["test/ndcg@10"], baseline="pooling=mean,loss.symmetric=false")
    by_label = {r.label: r for r in table.rows}
    assert by_label["pooling=cls, loss.symmetric=true"].cells["test/ndcg@10"].n == 1
    assert by_label["pooling=cls, loss.symmetric=true"].cells["test/ndcg@10"].mean == pytest.approx(_job_metric(sweep, "6"))
    assert by_label["pooling=cls, loss.symmetric=false"].cells["test/ndcg@10"].n == 1
    # the pairing keeps the seeds both rows completed
    assert by_label["pooling=cls, loss.symmetric=true"].versus["test/ndcg@10"].seeds == 1
    assert [(j.name, j.status) for j in table.not_complete] == [("4", "incomplete"), ("7", "missing")]
    md = to_markdown(table)
    assert "- job 7 (pooling=cls, loss.symmetric=true, seed=2, model=tiny): missing (no job folder)" in md
    assert "- job 4 (pooling=cls, loss.symmetric=false, seed=1, model=tiny): incomplete (no metrics.json)" in md


def test_correlation_metrics_are_tested_by_resampling_pairs(tmp_path):
    def units(job):
        rng = np.random.default_rng(int(job["seed"]) + (10 if job["pooling"] == "cls" else 0))
        gold = np.arange(30) % 6  # the same pairs (and ties) in every job
        noise = 1.0 if job["pooling"] == "cls" else 3.0
        return {str(i): {"gold": float(g), "prediction": float(g + rng.normal(0, noise))} for i, g in enumerate(gold)}

    sweep = make_sweep(tmp_path / "sweep", {"pooling": "mean,cls", "seed": "1,2,3"}, units, metric="test/spearman_cosine")
    table = build_table(load_jobs(sweep), metrics=["test/spearman_cosine"], baseline="pooling=mean", resamples=2000)
    cls = table.rows[1]
    want = np.mean([_job_metric(sweep, str(3 + s), "test/spearman_cosine") - _job_metric(sweep, str(s), "test/spearman_cosine") for s in range(3)])
    c = cls.versus["test/spearman_cosine"]
    assert c.mean == pytest.approx(want, abs=1e-9)
    assert c.lo < c.mean < c.hi and (c.seeds, c.units) == (3, 30)
    assert c.p < 0.05  # far less noise: a clear gain


def test_formats_mark_the_best_and_hold_the_same_numbers(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", PARAMS, random_units())
    table = build_table(load_jobs(sweep), metrics=["test/ndcg@10"], baseline="pooling=mean,loss.symmetric=false")
    best = max(table.rows, key=lambda r: r.cells["test/ndcg@10"].mean)
    md = to_markdown(table)
    assert f"**{best.cells['test/ndcg@10'].mean:.4f}** ± {best.cells['test/ndcg@10'].std:.4f}" in md
    tex = to_latex(table, "pooling x loss")
    assert r"\toprule" in tex and r"\bottomrule" in tex and rf"\textbf{{{best.cells['test/ndcg@10'].mean:.4f}}} $\pm$" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [(r["pooling"], r["loss.symmetric"]) for r in rows] == [(r.values["pooling"], r.values["loss.symmetric"]) for r in table.rows]
    for r, row in zip(rows, table.rows):
        assert float(r["mean"]) == row.cells["test/ndcg@10"].mean and int(r["n"]) == 2
        assert r["note"] == ("baseline" if row.is_baseline else "")
        if not row.is_baseline:
            assert float(r["p"]) == row.versus["test/ndcg@10"].p


def test_user_errors_name_the_fix(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep", PARAMS, random_units())
    jobs = load_jobs(sweep)
    with pytest.raises(SweepError, match=r"^metric 'test/ndcg@5' is in no job's metrics.json \(known: test/ndcg@10, test/search_seconds\)$"):
        build_table(jobs, metrics=["test/ndcg@5"])
    with pytest.raises(SweepError, match=r"^--baseline \{'pooling': 'max'\} matches 0 rows, not 1 \(rows: pooling=mean, loss.symmetric=false; "):
        build_table(jobs, baseline="pooling=max")
    with pytest.raises(SweepError, match=r"^--baseline key 'lr' is not a row key \(rows are grouped by pooling, loss.symmetric\)$"):
        build_table(jobs, baseline="lr=1")
    with pytest.raises(SweepError, match=r"^--by 'lr': no job overrides it \(swept keys: pooling, loss.symmetric\)$"):
        build_table(jobs, by=["lr"])
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "nope"), "--no-wandb"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such folder"


def test_by_collapses_rows_and_default_metrics(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", PARAMS, random_units())
    table = build_table(load_jobs(sweep), by=["pooling"])
    assert table.metrics == ["test/ndcg@10"]  # the default metrics present in the jobs
    assert [(r.label, r.cells["test/ndcg@10"].n) for r in table.rows] == [("pooling=mean", 4), ("pooling=cls", 4)]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_data_root) -> Path:
    """A real 2 x 2 x 2-seed multirun of train.py on the tiny model (8 jobs, ~15 s)."""
    sweep = tmp_path_factory.mktemp("multirun") / "sweep"
    cmd = [sys.executable, "train.py", "-m", "model=tiny", f"data.root={tiny_data_root}", "++trainer.max_steps=2",
           "trainer.max_epochs=1", "logger=none", "save_model=false", "data.batch_size=4", "data.val_fraction=0.3",
           "trainer.accelerator=cpu", "pooling=mean,cls", "loss.symmetric=false,true", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_report_of_a_real_tiny_sweep(tiny_sweep, tmp_path):
    from tests.wandb_records import logged_run

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep)
    shutil.rmtree(sweep / "5")  # pooling=cls, loss.symmetric=false, seed=2
    files = build_report(sweep, metrics=["test/ndcg@10", "val/ndcg@10"], baseline="pooling=mean,loss.symmetric=false", out_dir=tmp_path / "out")
    metrics = {n: json.loads((sweep / n / "metrics.json").read_text()) for n in "0123467"}
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    groups = {("mean", "false"): "01", ("mean", "true"): "23", ("cls", "false"): "4", ("cls", "true"): "67"}
    for (pooling, symmetric), names in groups.items():
        for metric in ("test/ndcg@10", "val/ndcg@10"):
            (r,) = [r for r in rows if (r["pooling"], r["loss.symmetric"], r["metric"]) == (pooling, symmetric, metric)]
            values = [metrics[n][metric] for n in names]
            assert int(r["n"]) == len(values)
            assert float(r["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            if len(values) > 1:
                assert float(r["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    # cls / symmetric vs the baseline: paired by seed on the per-query files, test and selected validation
    (r,) = [r for r in rows if (r["pooling"], r["loss.symmetric"], r["metric"]) == ("cls", "true", "test/ndcg@10")]
    diff = 100 * np.mean([_per_query(sweep, a) - _per_query(sweep, b) for a, b in (("6", "0"), ("7", "1"))], axis=0)
    assert float(r["diff"]) == pytest.approx(diff.mean(), abs=1e-9)
    flips = [abs((np.array(s) * diff).mean()) for s in itertools.product([-1.0, 1.0], repeat=len(diff))]
    assert float(r["p"]) == pytest.approx(np.mean([f >= abs(diff.mean()) - 1e-12 for f in flips]), abs=1e-12)
    assert "- job 5 (" in files["md"].read_text() and "missing (no job folder)" in files["md"].read_text()
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = logged_run(files["wandb"])
    assert run["config"]["sweep_dir"] == str(sweep)
    assert run["summary"]["pooling=cls, loss.symmetric=true/test/ndcg@10/mean"] == pytest.approx(np.mean([metrics["6"]["test/ndcg@10"], metrics["7"]["test/ndcg@10"]]))
    assert run["summary"]["report/jobs_left_out"] == 1


def test_units_restrict_cells_and_tests_to_a_query_subset(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", {"pooling": "mean,cls", "seed": "1,2"}, random_units())
    ids = tmp_path / "unseen.txt"
    ids.write_text("# queries without a training positive\nq0\nq3\n\n")
    files = build_report(sweep, baseline="pooling=mean", out_dir=tmp_path / "out", wandb=False,
                         units=read_units(str(ids)))
    rows = {r["pooling"]: r for r in csv.DictReader(io.StringIO(files["csv"].read_text()))}
    subset = {n: _per_query(sweep, n)[[0, 3]] for n in "0123"}
    assert float(rows["mean"]["mean"]) == pytest.approx(np.mean([subset["0"].mean(), subset["1"].mean()]), abs=1e-12)
    assert float(rows["cls"]["diff"]) == pytest.approx(100 * np.mean([subset["2"] - subset["0"], subset["3"] - subset["1"]]), abs=1e-9)
    assert int(rows["cls"]["units"]) == 2


def test_an_optuna_search_reads_as_one_row_per_trial(tmp_path):
    import optuna

    sweep = tmp_path / "search"
    sweep.mkdir()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    target = "hydra_plugins.embedlab_optuna.sweeper.EmbedlabOptunaSweeper"
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"_target_": target, "storage": storage, "study_name": "s"}}}), sweep / "multirun.yaml")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    lrs = [1e-5, 3e-5, 1e-4]
    for n, lr in enumerate(lrs):
        trial = study.ask({"module.optimizer.lr": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True)})
        overrides = [f"module.optimizer.lr={lr}", "model=tiny"]
        trial.set_user_attr("overrides", overrides)
        job = sweep / str(trial.number)
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
        if n == 1:
            trial.set_user_attr("failure", "ValueError: Invalid learning rate")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        value = 0.3 + n / 10
        (job / "metrics.json").write_text(json.dumps({"val/ndcg@10": value, "test/ndcg@10": value - 0.05}))
        (job / "job.json").write_text(json.dumps({"overrides": overrides, "optimized_metric": "val/ndcg@10", "value": value}))
        study.tell(trial, value)
    files = build_report(sweep, out_dir=tmp_path / "out", wandb=False)
    md = files["md"].read_text()
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert [(r["trial"], r["module.optimizer.lr"], r["metric"], float(r["mean"])) for r in rows if r["n"] == "1"] == [
        ("0", "1e-05", "val/ndcg@10", pytest.approx(0.3)), ("0", "1e-05", "test/ndcg@10", pytest.approx(0.25)),
        ("2", "0.0001", "val/ndcg@10", pytest.approx(0.5)), ("2", "0.0001", "test/ndcg@10", pytest.approx(0.45))]
    assert "| 2 | 0.0001 | **0.5000** | 1 |" in md  # the best trial's value, marked
    assert "- job 1 (trial=1, module.optimizer.lr=3e-05, model=tiny): failed: ValueError: Invalid learning rate" in md


def test_seeds_with_different_queries_are_paired_within_each_seed(tmp_path):
    """A validation split drawn by the seed: each seed's runs share their queries, other seeds hold others. The
    difference is the mean over seeds of each seed's paired difference (= the difference of the rows' means)."""
    def units(job):
        rng = np.random.default_rng(zlib.crc32(repr(sorted(job.items())).encode()))
        first = 3 * int(job["seed"])  # seed 1: q3..q7, seed 2: q6..q10
        return {f"q{i}": {"test/ndcg@10": float(rng.uniform(0, 1))} for i in range(first, first + 5)}

    sweep = make_sweep(tmp_path / "sweep", {"pooling": "mean,cls", "seed": "1,2"}, units)
    table = build_table(load_jobs(sweep), baseline="pooling=mean", resamples=3000)
    c = table.rows[1].versus["test/ndcg@10"]
    per_seed = [_per_query(sweep, str(2 + s)) - _per_query(sweep, str(s)) for s in (0, 1)]
    assert c.mean == pytest.approx(100 * np.mean([d.mean() for d in per_seed]), abs=1e-9)
    assert c.mean == pytest.approx(100 * (table.rows[1].cells["test/ndcg@10"].mean - table.rows[0].cells["test/ndcg@10"].mean), abs=1e-9)
    assert c.units == 8 and c.seeds == 2
    assert c.lo < c.mean < c.hi and 0 < c.p <= 1
