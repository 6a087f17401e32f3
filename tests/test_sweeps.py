"""Hydra multiruns: W&B group and run names, re-launched sweeps skip complete jobs, the best validation value
goes to the sweeper, a failing job does not end the sweep.

In process, a composed config is made into one job of a multirun by writing the fields Hydra sets for each job
(``hydra.mode``, ``hydra.sweep.dir``, ``hydra.job.num``, ``hydra.overrides.task``) and the sweep's
``multirun.yaml``; the real ``train.py -m`` runs twice on the tiny model as ``__main__`` of this process (as
Hydra's basic launcher runs its jobs in the launching process), and, marked slow, as a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from embedlab.cli import FULL_ERROR_ENV, hydra_main
from embedlab.outputs import write_metrics
from embedlab.sweeps import JOB_FILE, identity, multirun_job, override_key, run_job, run_name, sweep_group, swept_keys
from tests.conftest import PROJECT_ROOT, compose_config

FAST = ["model=tiny", "data.batch_size=4", "data.val_fraction=0.3", "trainer.accelerator=cpu", "save_model=false"]


@pytest.fixture(autouse=True)
def no_hydra_job():
    """Tests here set Hydra's running config; leave none behind for the next test."""
    yield
    HydraConfig.instance().cfg = None


def enter_job(cfg: DictConfig, sweep_dir: Path, num: int, task: list[str], sweep: list[str] | None = None) -> DictConfig:
    """Make ``cfg`` (composed with its ``hydra`` node) job ``num`` of a multirun in ``sweep_dir`` whose command
    line overrides were ``sweep`` (written to ``multirun.yaml`` as Hydra's sweeper does; ``None``: no file)
    and whose own overrides are ``task``; returns ``cfg`` without ``hydra``, with ``paths.output_dir`` the job's."""
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.job.num = num
        cfg.hydra.overrides.task = task
        cfg.paths.output_dir = str(sweep_dir / str(num))
    if sweep is not None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save({"hydra": {"mode": "MULTIRUN", "overrides": {"task": sweep}}}, sweep_dir / "multirun.yaml")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_run_names_and_group(tmp_path):
    assert sweep_group("logs/train/multiruns/2026-12-02_16-00-00") == "2026-12-02_16-00-00"
    assert sweep_group(Path("/x/ablation_pooling_loss/")) == "ablation_pooling_loss"
    assert [override_key(o) for o in ("++trainer.max_steps=2", "+a.b=[1,2]", "~foo", "loss@loss.loss=cosent")] == [
        "trainer.max_steps", "a.b", "foo", "loss@loss.loss"]  # fmt: skip
    # swept: the sweeper's params (a key may carry a prefix) and the command line's sweeps, from multirun.yaml
    OmegaConf.save({"hydra": {"overrides": {"task": ["model=tiny", "seed=range(1,3)", "+x=a,b", "data.root=/d"]}}}, tmp_path / "multirun.yaml")
    hydra_cfg = OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": {"++loss.symmetric": "false,true"}}})
    assert swept_keys(hydra_cfg) == {"loss.symmetric", "seed", "x"}
    assert swept_keys(OmegaConf.create({"sweep": {"dir": str(tmp_path / "nope")}, "sweeper": {"params": None}})) == set()
    job = ["model=tiny", "data.root=/tmp/d", "seed=1", "pooling=cls", "++loss.symmetric=True", "logger=none"]
    # the swept keys name the run, sorted by key, prefixes dropped, booleans as typed in YAML
    assert run_name(job, swept={"seed", "pooling", "loss.symmetric"}) == "loss.symmetric=true,pooling=cls,seed=1"
    # swept keys unknown: every override but file locations and logger choice
    assert run_name(job) == "loss.symmetric=true,model=tiny,pooling=cls,seed=1"
    assert run_name(["data.root=/d", "ckpt_path=last"]) == ""
    # a re-launch may add or drop what only resumes or forces a run
    assert identity(["seed=1", "ckpt_path=last", "skip_complete=false", "+x=2"]) == ["seed=1", "+x=2"]


def test_wandb_group_and_name_single_run_and_multirun(tmp_path, tiny_data_root):
    overrides = ["model=tiny", "logger=wandb", f"data.root={tiny_data_root}"]
    single = compose_config("train", overrides, tmp_path / "run")
    assert multirun_job() is None  # a composed config: Hydra's mode is unset, i.e. a single run
    assert single.logger.wandb.group is None and single.logger.wandb.name == "train-scifact"

    # job 1 of `train.py -m seed=1,2 ...` with `hydra.sweeper.params: {pooling: mean,cls}` (as experiment configs do)
    sweep = tmp_path / "ablation"
    cfg = compose_config("train", overrides, tmp_path, keep_hydra=True)
    with read_write(cfg.hydra):
        cfg.hydra.sweeper.params = {"pooling": "mean,cls"}
    task = [*overrides, "pooling=cls", "seed=1"]
    cfg = enter_job(cfg, sweep, 1, task, sweep=[*overrides, "seed=1,2"])
    assert multirun_job().job.num == 1
    assert cfg.logger.wandb.group == "ablation" and cfg.logger.wandb.name == "pooling=cls,seed=1"
    logger = instantiate(cfg.logger.wandb)  # offline; wandb.init runs only on first use
    assert logger._wandb_init["group"] == "ablation" and logger._wandb_init["name"] == "pooling=cls,seed=1"

    # no multirun.yaml (another sweeper): the job's overrides but file locations and the logger
    cfg = enter_job(compose_config("train", overrides, tmp_path, keep_hydra=True), tmp_path / "other", 0, task)
    assert cfg.logger.wandb.name == "model=tiny,pooling=cls,seed=1" and cfg.logger.wandb.group == "other"


def fake_train(calls: list, value: float = 0.5):
    """A ``train`` that records its calls, checks no stale result is in the folder, writes ``metrics.json``."""

    def train(cfg):
        out = Path(cfg.paths.output_dir)
        calls.append((out / "metrics.json").exists() or (out / JOB_FILE).exists())
        metrics = {"val/ndcg@10": value, "test/ndcg@10": value / 2}
        write_metrics(metrics, out)
        return metrics, {"trainer": None}

    return train


def test_run_job_skips_complete_jobs_of_a_multirun(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="embedlab.sweeps")
    base = ["model=tiny", "seed=3"]
    sweep = tmp_path / "sweep"

    def job(task, num=0, **cfg_values):
        cfg = enter_job(compose_config("train", base, tmp_path, keep_hydra=True), sweep, num, task, sweep=["seed=3,4"])
        cfg.update(cfg_values)
        return cfg

    # a single run: train() and its value, no job.json
    calls = []
    single = compose_config("train", base, tmp_path / "single")
    assert run_job(single, fake_train(calls, 0.25)) == 0.25 and calls == [False]
    assert not (tmp_path / "single" / JOB_FILE).exists()

    calls = []
    assert run_job(job(base), fake_train(calls, 0.5)) == 0.5
    job_dir = sweep / "0"
    assert json.loads((job_dir / JOB_FILE).read_text()) == {"overrides": base, "optimized_metric": "val/ndcg@10", "value": 0.5}
    # re-launched: skipped, the stored value goes to the sweeper, also when the re-launch resumes (ckpt_path=last)
    caplog.clear()
    assert run_job(job(base), fake_train(calls, 0.9)) == 0.5
    assert run_job(job([*base, "ckpt_path=last"]), fake_train(calls, 0.9)) == 0.5
    assert calls == [False]
    assert [r.getMessage() for r in caplog.records] == [f"job 0: complete in {job_dir}, skipped"] * 2
    # skip_complete=false trains again, with the stale result removed first
    assert run_job(job([*base, "skip_complete=false"], skip_complete=False), fake_train(calls, 0.7)) == 0.7
    assert calls == [False, False]
    # another job's overrides in this folder (the sweep was edited): a warning, its result removed, trained
    caplog.clear()
    assert run_job(job(["model=tiny", "seed=4"]), fake_train(calls, 0.6)) == 0.6
    assert calls == [False, False, False] and "holds a result of other overrides ['model=tiny', 'seed=3']" in caplog.text
    # a metrics.json without job.json (a job killed between the two, an older embedlab) is not trusted
    (job_dir / JOB_FILE).unlink()
    assert run_job(job(["model=tiny", "seed=4"]), fake_train(calls, 0.6)) == 0.6 and len(calls) == 4
    assert "unknown overrides (no job.json)" in caplog.text


def test_sweeper_gets_the_best_validation_value_not_the_last(tmp_path, tiny_data_root, monkeypatch):
    """Two epochs whose validations are scripted to 0.9 then 0.4: the job returns (and records) 0.9."""
    from embedlab.lightning.base import EmbedlabModule
    from embedlab.training import train

    scripted = {0: 0.9, 1: 0.4}
    log_evaluation = EmbedlabModule.log_evaluation

    def scripted_log_evaluation(self, stage, metrics):
        if stage == "val" and not self.trainer.sanity_checking:
            metrics = {**metrics, "val/ndcg@10": scripted[self.current_epoch]}
        log_evaluation(self, stage, metrics)

    monkeypatch.setattr(EmbedlabModule, "log_evaluation", scripted_log_evaluation)
    overrides = [*FAST, "logger=none", "test=false", "trainer.max_epochs=2", "callbacks.early_stopping=null", f"data.root={tiny_data_root}"]
    sweep = tmp_path / "sweep"
    cfg = enter_job(compose_config("train", overrides, tmp_path, keep_hydra=True), sweep, 0, overrides, sweep=overrides)
    seen = {}

    def keep_history(cfg):
        metrics, objects = train(cfg)
        seen["history"] = [r["val/ndcg@10"] for r in objects["module"].validation_history]
        return metrics, objects

    assert run_job(cfg, keep_history) == pytest.approx(0.9)
    assert seen["history"] == pytest.approx([0.9, 0.4])  # the last validation is worse than the returned one
    assert json.loads((sweep / "0" / JOB_FILE).read_text())["value"] == pytest.approx(0.9)
    assert json.loads((sweep / "0" / "metrics.json").read_text())["val/best_epoch"] == 0


@pytest.fixture
def sweep_app(tmp_path, monkeypatch):
    """A ``@hydra_main`` app whose jobs fail as ``mode`` says; ``run(*overrides)`` runs ``app.py -m ...`` in this
    process -> (exit code or None, stderr lines, [(mode, HYDRA_FULL_ERROR seen by the job)])."""
    (tmp_path / "app.yaml").write_text(
        "defaults:\n  - override hydra/job_logging: none\n  - override hydra/hydra_logging: none\n  - _self_\n"
        f"mode: ok\nvalue: ???\nhydra:\n  sweep:\n    dir: {tmp_path / 'sweep'}\n"
    )
    seen = []

    def task(cfg):
        seen.append((cfg.mode, os.environ.get(FULL_ERROR_ENV)))
        if cfg.mode == "missing":
            return cfg.value
        return 1.0

    main = hydra_main(config_name="app", config_path=str(tmp_path))(task)

    def run(capsys, *overrides):
        monkeypatch.setattr(sys, "argv", ["app.py", "-m", *overrides])
        capsys.readouterr()
        code = None
        try:
            main()
        except SystemExit as ex:
            code = ex.code
        return code, capsys.readouterr().err.splitlines(), seen

    return run


def test_failing_job_does_not_end_the_sweep(sweep_app, capsys, monkeypatch):
    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    code, err, seen = sweep_app(capsys, "mode=missing,ok,missing")
    # every job ran; each failure printed its line when it happened; the sweep then exits 1 on the first one
    assert seen == [("missing", None), ("ok", None), ("missing", None)]
    assert code == 1 and "Traceback" not in "\n".join(err)
    assert err == ["error: Missing mandatory value: value"] * 2 + [
        "Error executing job with overrides: ['mode=missing']", "error: Missing mandatory value: value"]  # fmt: skip
    assert FULL_ERROR_ENV not in os.environ
    assert sweep_app(capsys, "mode=ok,ok")[:2] == (None, [])


def run_train_in_process(argv: list[str], capsys, monkeypatch) -> tuple[int | None, list[str]]:
    """``python train.py -m <argv>`` as ``__main__`` in this process (Hydra's basic launcher runs the jobs in
    the launching process too), Hydra's logging off: (exit code or None, stderr lines)."""
    import runpy

    monkeypatch.delenv(FULL_ERROR_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "hydra/job_logging=none", "hydra/hydra_logging=none", *argv])
    capsys.readouterr()
    code = None
    try:
        runpy.run_path(str(PROJECT_ROOT / "train.py"), run_name="__main__")
    except SystemExit as ex:
        code = ex.code
    return code, capsys.readouterr().err.splitlines()


def test_relaunched_multirun_trains_only_the_missing_and_failed_jobs(tmp_path, tiny_data_root, capsys, monkeypatch, caplog):
    """`train.py -m data.root=<tiny>,<missing>,<copy>` on the tiny model: job 1 fails (no data), the others
    finish. Job 2's folder is deleted and the same command launched again: job 0 is skipped (its metrics.json
    untouched), job 2 trains again, job 1 fails again."""
    import embedlab.training

    trained = []
    real_train = embedlab.training.train

    def counting_train(cfg):
        trained.append(int(Path(cfg.paths.output_dir).name))
        return real_train(cfg)

    monkeypatch.setattr(embedlab.training, "train", counting_train)
    caplog.set_level(logging.INFO, logger="embedlab.sweeps")
    copy = shutil.copytree(tiny_data_root, tmp_path / "copy")
    sweep = tmp_path / "sweep"
    argv = ["model=tiny", "++trainer.max_steps=2", "logger=none", "test=false", "save_model=false", "callbacks.progress_bar=null",
            f"hydra.sweep.dir={sweep}", f"data.root={tiny_data_root},{tmp_path / 'missing'},{copy}"]  # fmt: skip
    missing = (f"error: {tmp_path / 'missing'}/scifact: BEIR dataset folder not found (a BEIR folder holds corpus.jsonl, "
               "queries.jsonl and qrels/<split>.tsv; embedlab.data.readers.beir_download(name, root) fetches one)")  # fmt: skip

    code, err = run_train_in_process(argv, capsys, monkeypatch)
    # the failed job 1 did not stop job 2; the sweep ends with status 1 and the failure's line last
    assert trained == [0, 1, 2] and code == 1 and err[-1] == missing and err.count(missing) == 2, err
    for num, root in ((0, tiny_data_root), (2, copy)):
        record = json.loads((sweep / str(num) / JOB_FILE).read_text())
        assert f"data.root={root}" in record["overrides"]
        assert record["value"] == json.loads((sweep / str(num) / "metrics.json").read_text())["val/ndcg@10"]
    assert not (sweep / "1" / "metrics.json").exists() and not (sweep / "1" / JOB_FILE).exists()

    # the W&B group and name of job 0: Hydra's own config of that job (.hydra/hydra.yaml) entered again
    job0 = OmegaConf.load(sweep / "0" / ".hydra" / "hydra.yaml").hydra
    assert job0.mode == "MULTIRUN"
    cfg = compose_config("train", ["model=tiny", "logger=wandb", f"data.root={tiny_data_root}"], tmp_path, keep_hydra=True)
    cfg = enter_job(cfg, Path(job0.sweep.dir), job0.job.num, list(job0.overrides.task))
    assert (cfg.logger.wandb.group, cfg.logger.wandb.name) == ("sweep", f"data.root={tiny_data_root}")
    HydraConfig.instance().cfg = None

    done = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(sweep / "2")
    trained.clear()
    caplog.clear()
    code, err = run_train_in_process(argv, capsys, monkeypatch)
    assert trained == [1, 2] and code == 1 and err.count(missing) == 2, err
    assert [r.getMessage() for r in caplog.records if r.name == "embedlab.sweeps"] == [f"job 0: complete in {sweep / '0'}, skipped"]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == done
    assert (sweep / "2" / "metrics.json").is_file() and (sweep / "2" / JOB_FILE).is_file()


@pytest.mark.slow
def test_relaunched_multirun_after_deleting_a_job_in_a_subprocess(tmp_path, tiny_data_root):
    """The real command twice (~20 s): `train.py -m ... seed=1,2`, job 1's folder deleted, the same command again:
    job 0 logs its skip line and keeps its metrics.json, job 1 is trained again."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "model=tiny", f"data.root={tiny_data_root}", "++trainer.max_steps=2", "logger=none",
           "test=false", "save_model=false", f"hydra.sweep.dir={sweep}", "seed=1,2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != FULL_ERROR_ENV}
    first = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert all((sweep / n / "metrics.json").is_file() and (sweep / n / JOB_FILE).is_file() for n in ("0", "1"))
    done = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(sweep / "1")
    second = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    skips = [line for line in second.stdout.splitlines() if line.endswith(", skipped")]
    assert len(skips) == 1 and skips[0].endswith(f"job 0: complete in {sweep / '0'}, skipped"), second.stdout
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == done
    assert json.loads((sweep / "1" / JOB_FILE).read_text())["overrides"][-1] == "seed=2"
