"""The jobs of a sweep folder: which ran to the end, which did not, which never started.

A Hydra multirun (``python train.py -m ...``) writes ``<sweep dir>/multirun.yaml`` (the sweep's config, with the
swept parameters) and one folder per job, ``<sweep dir>/<job num>/``, holding ``.hydra/overrides.yaml`` (that job's
overrides) and, once ``train()`` returns, ``metrics.json`` (written atomically, last). So a job is

- **complete**: ``metrics.json`` is there;
- **incomplete**: its folder exists without ``metrics.json`` (it failed, was killed, or still runs);
- **missing**: the sweep's parameters call for it but no folder holds its overrides (deleted, or never launched).

The expected jobs are the sweep's cartesian product, expanded exactly as Hydra's basic sweeper does from the
``hydra.sweeper.params`` and command-line overrides recorded in ``multirun.yaml``. A folder of runs without a
``multirun.yaml`` (runs collected by hand) has no expected set: every run folder found is a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from embedlab.errors import UserError
from embedlab.evaluation.per_query import PerQuery, per_query_path, read_per_query
from embedlab.sweeps import BOOLEANS, identity, override_key


class SweepError(UserError):
    """A sweep folder that cannot be read as one (no job in it, an unreadable ``multirun.yaml``)."""


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def parse_value(value: str):
    """An override value as YAML reads it, so that Hydra's ``False`` (how it records a swept ``false``) equals
    ``false``, and ``0.5`` equals ``.5``."""
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, (bool, int, float, str, type(None))) else value


def job_identity(overrides: list[str]) -> frozenset:
    """What makes two override lists the same job: their ``(key, parsed value)`` pairs, in any order, without
    the keys a re-launch may add (``ckpt_path``, ``skip_complete``: :data:`embedlab.sweeps.IDENTITY_IGNORED`)."""
    return frozenset((override_key(o), parse_value(override_value(o))) for o in identity(overrides))


@dataclass
class Job:
    """One job of a sweep: its overrides (``{key: value}``, values as written on the command line), its folder
    (``None`` when missing), its status and, when complete, its ``metrics.json``."""

    name: str
    overrides: dict[str, str]
    path: Path | None
    status: str  # complete | incomplete | missing; an Optuna trial: failed | pruned | running
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""  # why it is not complete (an Optuna trial's failure)
    # per-query files already read (a row is compared on several metrics, the baseline against every row)
    _units: dict[Path, PerQuery] = field(default_factory=dict, repr=False, compare=False)

    def label(self, keys: list[str] | None = None) -> str:
        keys = list(self.overrides) if keys is None else keys
        return ", ".join(f"{k}={self.overrides.get(k, '')}" for k in keys)

    def per_query(self, metric: str) -> PerQuery:
        """The per-query units ``metric`` was computed from: ``test/...`` from ``test_per_query.jsonl``;
        ``val/...`` from the validation the run selected (``val/best_epoch``, else the last one).

        Raises:
            FileNotFoundError: the job wrote no per-query file for that stage.
        """
        if self.path is None:
            raise FileNotFoundError(f"job {self.name} is missing")
        stage = metric.split("/", 1)[0]
        folders = [self.path / "runs", self.path]  # train() writes under runs/, evaluate.py beside metrics.json
        if stage == "val":
            epoch = self.metrics.get("val/best_epoch")
            if epoch is not None:
                stems = [f"val_epoch{int(epoch):03d}"]
            else:
                found = sorted(p.name for f in folders for p in f.glob("val_epoch*_per_query.jsonl"))
                stems = [found[-1].removesuffix("_per_query.jsonl")] if found else []
        else:
            stems = [stage]
        for stem in stems:
            for folder in folders:
                path = per_query_path(folder, stem)
                if path not in self._units and path.is_file():
                    self._units[path] = read_per_query(path)
                if path in self._units:
                    return self._units[path]
        raise FileNotFoundError(f"job {self.name}: no per-query file for {metric} in {self.path / 'runs'}")


def _job_folders(sweep_dir: Path) -> list[Path]:
    """Folders under ``sweep_dir`` that hold a Hydra job (``.hydra/overrides.yaml``), in job-number order."""
    found = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    found = [p for p in found if p != sweep_dir]

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir)
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel.parts)

    return sorted(found, key=order)


def _multirun_config(sweep_dir: Path):
    """``<sweep_dir>/multirun.yaml`` (the sweep's config as Hydra saved it), or ``None`` when there is none."""
    path = sweep_dir / "multirun.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def expected_overrides(cfg) -> list[list[str]] | None:
    """Each job's override list as Hydra's basic sweeper expands the sweep's ``multirun.yaml`` config ``cfg``
    (``None``: no such file, or a sweeper other than the basic one, e.g. Optuna, whose jobs are its trials)."""
    if cfg is None:
        return None
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or ""
    if not sweeper.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _read_metrics(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as err:
        raise SweepError(f"{path}: not a metrics.json of numbers ({err})") from None


def is_optuna_search(sweep_dir: Path, cfg=None) -> bool:
    """Whether ``sweep_dir`` holds an Optuna search (``hparams_search=optuna``); ``cfg``: its ``multirun.yaml``
    config when already read."""
    from hydra_plugins.embedlab_optuna.study import SWEEPER_TARGET

    cfg = _multirun_config(sweep_dir) if cfg is None else cfg
    return cfg is not None and OmegaConf.select(cfg, "hydra.sweeper._target_", default=None) == SWEEPER_TARGET


def optuna_jobs(sweep_dir: Path) -> list[Job]:
    """An Optuna search's trials as jobs (``hparams_search=optuna``): trial ``n`` ran in ``<sweep dir>/n`` with the
    overrides its ``overrides`` attribute holds; a trial without ``metrics.json`` takes its state from the study."""
    from hydra_plugins.embedlab_optuna.study import load_sweep_study

    jobs = []
    for trial in load_sweep_study(sweep_dir).trials:
        folder = sweep_dir / str(trial.number)
        job = _job(str(trial.number), list(trial.user_attrs.get("overrides", [])), folder if folder.is_dir() else None)
        job.overrides = {"trial": str(trial.number), **job.overrides}  # one row per trial, numbered as the study
        if job.status != "complete":
            job.status = {"FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running"}.get(trial.state.name, job.status)
            job.note = str(trial.user_attrs.get("failure", ""))
        jobs.append(job)
    return jobs


def load_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job of the sweep in ``sweep_dir`` (see the module docstring), expected order first, then any
    folder the expansion does not account for; an Optuna search's trials in trial order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such folder")
    cfg = _multirun_config(sweep_dir)
    if is_optuna_search(sweep_dir, cfg):
        return optuna_jobs(sweep_dir)
    found = {}
    for folder in _job_folders(sweep_dir):
        overrides = [str(o) for o in (OmegaConf.load(folder / ".hydra" / "overrides.yaml") or [])]
        found[job_identity(overrides)] = (folder, overrides)
    expected = expected_overrides(cfg)
    if expected is None and not found:
        raise SweepError(f"{sweep_dir}: no job folder (<job>/.hydra/overrides.yaml) and no multirun.yaml")
    jobs = []
    for number, overrides in enumerate(expected or []):
        folder, ran = found.pop(job_identity(overrides), (None, overrides))
        jobs.append(_job(folder.name if folder else str(number), ran, folder))
    for folder, overrides in found.values():
        jobs.append(_job(str(folder.relative_to(sweep_dir)), overrides, folder))
    return jobs


def _job(name: str, overrides: list[str], folder: Path | None) -> Job:
    # values as the user typed them: Hydra records a swept `false` as `False`
    values = {override_key(o): BOOLEANS.get(override_value(o), override_value(o)) for o in identity(overrides)}
    if folder is None:
        return Job(name, values, None, "missing")
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        return Job(name, values, folder, "incomplete")
    return Job(name, values, folder, "complete", _read_metrics(metrics_file))
