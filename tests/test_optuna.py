"""hparams_search=optuna: embedlab's Optuna sweeper (src/hydra_plugins/embedlab_optuna).

In process, with a stand-in launcher and a real SQLite study: the search space from Hydra's override grammar, the
trial <-> job bookkeeping, failed / interrupted trials, resume, direction. In a subprocess (slow): a real
`train.py -m hparams_search=optuna` search on the tiny model, stopped after 4 trials and resumed to 8.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from embedlab.errors import ConfigError, UserError
from hydra_plugins.embedlab_optuna._search import search_space, study_direction
from hydra_plugins.embedlab_optuna.study import SWEEPER_TARGET, load_sweep_study, sweep_study_location
from hydra_plugins.embedlab_optuna.sweeper import EmbedlabOptunaSweeper
from tests.conftest import CONFIG_DIR, PROJECT_ROOT

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_search_space_follows_hydras_override_grammar():
    space = search_space(
        [
            "module.optimizer.lr=tag(log, interval(1e-5, 1e-4))",
            "loss.scale=interval(10, 50)",
            "data.batch_size=choice(16, 32)",
            "trainer.max_steps=range(10, 40, 10)",
            "++trainer.accumulate_grad_batches=int(interval(1, 4))",
            "model.query_prompt=choice('query: ', plain)",
            "module.scheduler.warmup_ratio=range(0.0, 0.3, 0.1)",
            "model=tiny",
            "loss.scale=20",  # the command line after params: fixes a searched key
            "pooling=mean,cls",  # ... or adds one
        ]
    )
    d = space.distributions
    assert d["module.optimizer.lr"] == FloatDistribution(1e-5, 1e-4, log=True)
    assert d["data.batch_size"] == CategoricalDistribution([16, 32])
    # Hydra's range stops before `stop`, Optuna's high is inclusive: 10, 20, 30
    assert d["trainer.max_steps"] == IntDistribution(10, 30, step=10)
    assert d["trainer.accumulate_grad_batches"] == IntDistribution(1, 4)
    assert d["module.scheduler.warmup_ratio"] == CategoricalDistribution([0.0, 0.1, 0.2])
    assert d["pooling"] == CategoricalDistribution(["mean", "cls"])
    assert "loss.scale" not in d
    params = {
        "module.optimizer.lr": 3e-05, "data.batch_size": 32, "trainer.max_steps": 20, "trainer.accumulate_grad_batches": 2,
        "model.query_prompt": "query: ", "module.scheduler.warmup_ratio": 0.1, "pooling": "cls",
    }  # fmt: skip
    overrides = space.overrides(params)
    assert overrides == [
        "module.optimizer.lr=3e-05", "data.batch_size=32", "trainer.max_steps=20", "++trainer.accumulate_grad_batches=2",
        "model.query_prompt=query\\:\\ ", "module.scheduler.warmup_ratio=0.1", "model=tiny", "loss.scale=20", "pooling=cls",
    ]  # fmt: skip
    # each parses back to the trial's value (the string's special characters escaped)
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert all(parsed[name] == value for name, value in params.items())
    assert study_direction("max") == "maximize" and study_direction("minimize") == "minimize"
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.direction must be max, min, maximize or minimize, got 'up'$"):
        study_direction("up")
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.params: a=tag\(log, interval\(0, 1\)\): "):
        search_space(["a=tag(log, interval(0, 1))"])


class StandInLauncher:
    """Records the jobs it is given; a job's value comes from ``outcome(job number, overrides)``: a number or None
    (returned), an Exception (the job raised it: status FAILED), or ``raise_`` -> the exception the launcher raises."""

    def __init__(self, outcome):
        self.outcome, self.jobs = outcome, {}

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            self.jobs[num] = list(overrides)
            value = self.outcome(num, dict(o.split("=", 1) for o in overrides))
            if isinstance(value, BaseException) and getattr(value, "from_launcher", False):
                raise value
            ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED if isinstance(value, Exception) else JobStatus.COMPLETED)
            ret.return_value = value
            returns.append(ret)
        return returns


def launcher_error(ex: BaseException) -> BaseException:
    ex.from_launcher = True
    return ex


def sweeper_for(sweep_dir, tiny_data_root, overrides, outcome) -> tuple[EmbedlabOptunaSweeper, StandInLauncher, list[str]]:
    """The sweeper as Hydra builds it for `train.py -m hparams_search=optuna ...` (config composed, plugin
    instantiated, real config loader), its launcher replaced; returns it with the command line's task overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        command_line = ["hparams_search=optuna", "model=tiny", f"data.root={tiny_data_root}", f"hydra.sweep.dir={sweep_dir}"]
        cfg = compose("train", overrides=command_line + overrides, return_hydra_config=True)
        loader = GlobalHydra.instance().hydra.config_loader
    sweeper = Plugins.instance().instantiate_sweeper(
        config=cfg, hydra_context=HydraContext(config_loader=loader, callbacks=None), task_function=lambda c: None
    )
    # (Hydra's plugin scan executes the module again: a class of the same name, not the object imported here)
    assert type(sweeper).__module__ + "." + type(sweeper).__name__ == SWEEPER_TARGET
    sweeper.launcher = StandInLauncher(outcome)
    return sweeper, sweeper.launcher, OmegaConf.to_container(cfg.hydra.overrides.task)


def trial_summary(study):
    return [(t.number, t.state, t.value, t.params, t.user_attrs.get("overrides")) for t in study.trials]


def test_failed_trials_resume_and_direction(tmp_path, tiny_data_root):
    """A stopped search resumes from its SQLite file: finished trials kept, a RUNNING one failed and not counted, only
    the missing trials launched (as jobs numbered by trial); failed jobs are FAIL and the search goes on."""

    def outcome(num, overrides):
        if num == 1:
            return ValueError("Invalid weight_decay value: -1.0")  # the job raised
        if num == 2:
            return None  # the job returned no value (no validation metric)
        if num == 3:
            return launcher_error(RuntimeError("executor died"))
        if num == 5:
            return math.nan
        if num == 6:
            return optuna.TrialPruned("pruned after validation 1")  # raised by the pruning callback in the job
        return -abs(math.log10(float(overrides["module.optimizer.lr"])) + 4.5)  # best at lr ~ 3e-5

    sweep = tmp_path / "search"
    sweeper, launcher, task = sweeper_for(sweep, tiny_data_root, ["hydra.sweeper.n_trials=4"], outcome)
    study = sweeper.sweep(task)
    assert sorted(launcher.jobs) == [0, 1, 2, 3]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 3
    failures = [t.user_attrs["failure"] for t in study.trials[1:]]
    assert failures == [
        "the job failed: ValueError: Invalid weight_decay value: -1.0",
        "the job returned no value (is optimized_metric among its validation metrics?)",
        "the launcher failed: RuntimeError: executor died",
    ]
    for trial in study.trials:  # the job's overrides: the trial's values, then the command line
        assert launcher.jobs[trial.number] == trial.user_attrs["overrides"]
        assert trial.user_attrs["overrides"][:4] == [f"{k}={v}" for k, v in trial.params.items()]
        assert trial.user_attrs["overrides"][4:] == task
    first = trial_summary(study)

    # where report.py finds the study: multirun.yaml holds its storage URL and name as values
    storage, name = sweep_study_location(sweep)
    assert (storage, name) == (f"sqlite:///{sweep / 'optuna.db'}", "search")
    # a search killed mid-trial leaves it RUNNING in the storage
    optuna.load_study(study_name=name, storage=storage).ask()

    sweeper, launcher, task = sweeper_for(sweep, tiny_data_root, ["hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=2"], outcome)
    study = sweeper.sweep(task)
    assert trial_summary(study)[:4] == first
    assert study.trials[4].state == TrialState.FAIL and study.trials[4].user_attrs["interrupted"] is True
    # 8 trials ran to an end (complete, failed or pruned): 4 new ones, launched two at a time as jobs 5-8
    assert sorted(launcher.jobs) == [5, 6, 7, 8] and len(study.trials) == 9
    assert study.trials[5].state == TrialState.FAIL and study.trials[5].user_attrs["failure"] == "the job returned nan"
    assert study.trials[6].state == TrialState.PRUNED
    assert all(t.state == TrialState.COMPLETE for t in study.trials[7:])
    # a resumed TPE does not replay its first draws (trial 4 was asked with no params)
    assert len({t.params["module.optimizer.lr"] for t in study.trials if t.number != 4}) == 8
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert (results.best_trial, results.best_value, results.direction) == (best.number, best.value, "maximize")
    assert dict(results.states) == {"COMPLETE": 3, "FAIL": 5, "PRUNED": 1}
    assert trial_summary(load_sweep_study(sweep)) == trial_summary(study)

    # Ctrl-C during a job: the search stops, the trial is FAIL and interrupted, a re-launch runs it again
    def interrupted(num, overrides):
        return launcher_error(KeyboardInterrupt()) if num == 9 else outcome(num, overrides)

    sweeper, launcher, task = sweeper_for(sweep, tiny_data_root, ["hydra.sweeper.n_trials=9"], interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweeper.sweep(task)
    sweeper, launcher, task = sweeper_for(sweep, tiny_data_root, ["hydra.sweeper.n_trials=9"], outcome)
    study = sweeper.sweep(task)
    assert study.trials[9].user_attrs["interrupted"] is True and sorted(launcher.jobs) == [10]

    # the direction is monitor_mode's; a study cannot change it
    mismatch = (
        r"^hydra.sweeper.direction is minimize but study 'search' in sqlite:///.* was created to maximize: "
        r"use another hydra.sweep.dir or hydra.sweeper.study_name$"
    )
    with pytest.raises(ConfigError, match=mismatch):
        sweeper_for(sweep, tiny_data_root, ["monitor_mode=min"], outcome)[0].sweep([])
    minimizing = tmp_path / "min"
    sweeper, launcher, task = sweeper_for(
        minimizing, tiny_data_root, ["monitor_mode=min", "hydra.sweeper.n_trials=2"], lambda num, o: float(o["module.optimizer.lr"])
    )
    study = sweeper.sweep(task)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_value == min(t.params["module.optimizer.lr"] for t in study.trials)
    assert OmegaConf.load(minimizing / "optimization_results.yaml").direction == "minimize"


def test_a_composition_error_fails_only_its_trial(tmp_path, tiny_data_root):
    """A choice that is not a config option: its trials fail before launch, the others run."""
    sweeper, launcher, task = sweeper_for(tmp_path / "s", tiny_data_root, ["hydra.sweeper.n_trials=4"], lambda num, o: 0.5)
    study = sweeper.sweep(task + ["pooling=choice(mean, nope)"])
    bad = [t for t in study.trials if t.params["pooling"] == "nope"]
    assert bad and len(bad) < 4 and sorted(launcher.jobs) == sorted(t.number for t in study.trials if t not in bad)
    assert all(t.state == TrialState.FAIL for t in bad)
    assert bad[0].user_attrs["failure"].startswith("the overrides do not compose: In 'train': Could not find 'pooling/nope'")
    # no trial completed: the search ends with an error (exit status 1) naming the last failure
    sweeper, launcher, task = sweeper_for(tmp_path / "t", tiny_data_root, ["hydra.sweeper.n_trials=2"], lambda num, o: None)
    with pytest.raises(UserError, match=r"^no trial of study 't' completed \(2 failed or pruned\); trial 1: the job returned no value"):
        sweeper.sweep(task)


@pytest.mark.slow
def test_train_search_on_the_tiny_model_resumes_from_sqlite(tmp_path, tiny_data_root):
    """`train.py -m hparams_search=optuna` on the tiny model: 4 trials, a trial left RUNNING, re-launched to 8 trials.
    weight_decay=choice(0.01,-1.0) makes some jobs raise (AdamW rejects -1): FAIL, and the search goes on."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "hparams_search=optuna", "model=tiny", f"data.root={tiny_data_root}", "logger=none",
        "++trainer.max_steps=2", "test=false", "save_model=false", "callbacks.model_checkpoint_steps=null",
        "module.optimizer.weight_decay=choice(0.01,-1.0)", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip

    def search(n_trials: int) -> str:
        proc = subprocess.run(cmd + [f"hydra.sweeper.n_trials={n_trials}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    search(4)
    first = trial_summary(load_sweep_study(sweep))
    storage, name = sweep_study_location(sweep)
    optuna.load_study(study_name=name, storage=storage).ask()  # trial 4: RUNNING, as a killed search leaves it
    logs = search(8)
    study = load_sweep_study(sweep)
    assert trial_summary(study)[:4] == first and len(study.trials) == 9
    assert study.trials[4].state == TrialState.FAIL and study.trials[4].user_attrs["interrupted"] is True
    # only the 4 missing trials ran, as jobs 5-8
    assert logs.count("Launching 1 jobs locally") == 4 and all(f"#{n} : " in logs for n in range(5, 9))
    ran = [t for t in study.trials if t.number != 4]
    for trial in ran:
        job = sweep / str(trial.number)
        if trial.params["module.optimizer.weight_decay"] < 0:
            assert trial.state == TrialState.FAIL and "Invalid weight_decay value: -1.0" in trial.user_attrs["failure"]
            assert not (job / "metrics.json").exists()
        else:
            assert trial.state == TrialState.COMPLETE and 0.0 <= trial.value <= 1.0
            metrics = OmegaConf.load(job / "metrics.json")
            assert metrics["val/ndcg@10"] == trial.value
            assert OmegaConf.load(job / ".hydra" / "overrides.yaml") == trial.user_attrs["overrides"]
            # the pruning callback found its trial: one intermediate value per validation
            assert trial.intermediate_values
    assert {t.state for t in ran} == {TrialState.COMPLETE, TrialState.FAIL}
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_trial == load_sweep_study(sweep).best_trial.number

    # report.py lists every trial: complete ones as rows with their value, the others with their state and reason
    from embedlab.report import build_report

    files = build_report(sweep, wandb=False)
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(files["csv"].read_text())) if r["metric"] == "val/ndcg@10"}
    study = load_sweep_study(sweep)
    assert {t.number for t in study.trials if t.state == TrialState.COMPLETE} == {int(n) for n, r in rows.items() if r["n"] == "1"}
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert float(rows[str(t.number)]["mean"]) == t.value
        else:
            assert f"- job {t.number} (trial={t.number}" in files["md"].read_text()


def test_pruning_callback_reports_validations_and_prunes(tmp_path):
    """The callback of hparams_search=optuna: reports `monitor` after each validation to the job's trial (found from
    the sweep dir's multirun.yaml and the trial number); MedianPruner stops a trial behind the median."""
    from types import SimpleNamespace

    import torch

    from hydra_plugins.embedlab_optuna._pruning import OptunaPruning

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(5):  # finished trials at 0.5 after each of 2 validations
        trial = study.ask()
        trial.report(0.5, 0)
        trial.report(0.5, 1)
        study.tell(trial, 0.5)
    running = study.ask()
    sweeper = {"_target_": SWEEPER_TARGET, "storage": storage, "study_name": "s"}
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": sweeper}}), tmp_path / "multirun.yaml")
    callback = OptunaPruning("val/ndcg@10", optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1), tmp_path, running.number)
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, callback_metrics={"val/ndcg@10": torch.tensor(0.25)},
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )  # fmt: skip
    callback.on_validation_end(trainer, None)  # validation 0: below the median, but in the warm-up
    with pytest.raises(optuna.TrialPruned, match=r"^pruned after validation 1: val/ndcg@10=0.25$"):
        callback.on_validation_end(trainer, None)
    assert study.trials[running.number].intermediate_values == {0: 0.25, 1: 0.25}
    # outside an embedlab_optuna multirun (no Hydra job here) it does nothing
    OptunaPruning("val/ndcg@10", optuna.pruners.MedianPruner()).on_validation_end(trainer, None)
