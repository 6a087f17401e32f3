"""Hydra multiruns (``python train.py -m ...``): W&B groups and run names, re-launching, the sweepers' value.

A multirun runs one job per point of the sweep, each in ``<sweep dir>/<job num>/`` (``hydra.sweep.dir``,
``hydra.sweep.subdir``). What this module adds on top of Hydra, all of it only in MULTIRUN mode (a single
run, a test composing a config, a DDP rank started by Lightning behave as before):

- **One W&B group per sweep.** ``${sweep_group:}`` (``logger.wandb.group``) is the sweep folder's name
  (:func:`sweep_group`, e.g. ``2026-12-02_16-00-00`` or ``ablation_pooling_loss``), so the jobs of a sweep,
  and the summary run of ``report.py``, sit together in the W&B UI; null in a single run.
- **Readable run names.** ``${sweep_run_name:DEFAULT}`` (``logger.wandb.name``) is the job's swept
  overrides, sorted by key, e.g. ``loss.symmetric=true,pooling=cls,seed=1`` (:func:`run_name`): the keys
  swept on the command line (``seed=1,2``) or listed in ``hydra.sweeper.params``, read back from the
  sweep's ``multirun.yaml``. The overrides shared by every job (``model=tiny``, ``data.root=...``) are the
  group's, not the run's. ``DEFAULT`` (``<task_name>-<data.name>``) outside a multirun.
- **A re-launched multirun skips complete jobs** (:func:`run_job`). Hydra rewrites a job's
  ``.hydra/overrides.yaml`` before the job starts, so the job records its own identity at its very end:
  ``<job dir>/job.json`` = ``{"overrides": [...], "optimized_metric": ..., "value": ...}``, written
  atomically after ``metrics.json``. Launching the same command with ``hydra.sweep.dir=<that folder>``
  again, a job whose folder holds ``metrics.json`` and a ``job.json`` of the same overrides is not trained:
  it logs ``job N: complete in <dir>, skipped`` and hands the sweeper the optimized metric of its
  ``metrics.json``. Every other job trains, after removing a ``metrics.json`` / ``job.json`` left in its
  folder (by a job of other overrides, or by an older embedlab), so that a folder looks complete only when
  its result belongs to the overrides Hydra wrote beside it. ``skip_complete=false`` trains every job again.
  The overrides compared are all of the job's, except those that only resume or force a run
  (:data:`IDENTITY_IGNORED`: a re-launch may add ``ckpt_path=last``, so that unfinished jobs resume from
  their last checkpoint, or ``skip_complete=false``). Config *files* edited between the launches are not
  detected: use a new sweep folder (or ``skip_complete=false``) then.
- **The value returned to sweepers** is ``metrics[optimized_metric]`` of :func:`embedlab.training.train`,
  whose ``val/*`` metrics are those of the validation its checkpoint selected (the best by ``monitor``),
  not of the last one.
- **A failing job does not end the sweep**: :func:`embedlab.cli.hydra_main` reports a job's user error as
  one line ``error: <message>`` and raises it as :class:`embedlab.cli.JobFailed`, an ordinary exception, so
  Hydra's launcher records the job as failed and runs the next ones (``SystemExit``, a single run's exit,
  would escape the launcher and end the whole multirun). Hydra's basic sweeper raises the first failure
  once its batch (by default: every job) is done, so the command still exits with status 1.

Importing this module imports no torch or Lightning: the resolvers run while configs are composed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from embedlab.atomic import atomic_write_text

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
METRICS_FILE = "metrics.json"
# override keys that do not change what a job computes: a re-launch may add or drop them
IDENTITY_IGNORED = frozenset({"skip_complete", "ckpt_path"})
# run-name fallback when the swept keys are unknown: keys that locate files or pick a logger, not a configuration
NAME_NOISE = frozenset({"data.root", "ckpt_path", "skip_complete", "logger", "launcher"})
NAME_NOISE_PREFIXES = ("paths.", "hydra.")
# the sweepers write a swept boolean back as Python's True / False; the names read as the YAML was typed
BOOLEANS = {"True": "true", "False": "false"}


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of every job of the multirun in ``sweep_dir`` (and of ``report.py``'s summary run):
    the folder's name, e.g. ``2026-12-02_16-00-00`` for Hydra's default ``logs/train/multiruns/<time>``."""
    return Path(sweep_dir).name


def multirun_job() -> DictConfig | None:
    """The running job's Hydra config (``hydra.*``: ``job.num``, ``sweep.dir``, ``overrides.task``) when it is a
    job of a multirun; ``None`` in a single run, or where no Hydra app runs (a config composed in a test)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.get("mode") == RunMode.MULTIRUN else None


def override_key(override: str) -> str:
    """The key an override string sets, without Hydra's ``+`` / ``++`` / ``~`` prefix:
    ``++trainer.max_steps=2`` -> ``trainer.max_steps``, ``loss@loss.loss=cosent`` -> ``loss@loss.loss``."""
    return override.split("=", 1)[0].lstrip("~+")


def swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """The keys a multirun sweeps: those of ``hydra.sweeper.params`` and the command-line overrides with
    several values (``seed=1,2``, ``range(...)``, ``glob(...)``), read back from ``<sweep dir>/multirun.yaml``
    (the sweep's own config, saved by the sweeper before the first job; the job's config holds only its own
    values). Empty when neither can be read."""
    keys: set[str] = set()
    params = OmegaConf.select(hydra_cfg, "sweeper.params")
    if isinstance(params, DictConfig):
        keys.update(override_key(str(k)) for k in params)  # a key may carry a prefix: `+extra: 1,2`
    saved = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception as ex:  # no such file (another sweeper), an override only the full config loader parses
        log.debug("swept keys of %s: %s", saved, ex)
        return keys
    keys.update(override_key(o.input_line) for o in parsed if o.is_sweep_override())
    return keys


def run_name(overrides: Iterable[str], swept: Iterable[str] = ()) -> str:
    """A job's name from its overrides: the swept ones (``swept``: keys as :func:`override_key` gives them),
    sorted by key and joined by ``,`` like Hydra's ``job.override_dirname``; without ``swept``, every override
    but those naming files or loggers (:data:`NAME_NOISE`). Prefixes are dropped (``++a.b=1`` reads ``a.b=1``),
    booleans are lower case.

    >>> run_name(["model=tiny", "seed=1", "pooling=cls", "loss.symmetric=True"], swept={"seed", "pooling", "loss.symmetric"})
    'loss.symmetric=true,pooling=cls,seed=1'
    >>> run_name(["data.root=/tmp/d", "++trainer.max_steps=2", "model=tiny"])
    'model=tiny,trainer.max_steps=2'
    """
    swept = set(swept)
    items = []
    for override in overrides:
        key = override_key(override)
        keep = key in swept if swept else key not in NAME_NOISE and not key.startswith(NAME_NOISE_PREFIXES)
        if keep and "=" in override:
            value = override.split("=", 1)[1]
            items.append((key, BOOLEANS.get(value, value)))
    return ",".join(f"{key}={value}" for key, value in sorted(items))


def group_resolver() -> str | None:
    """``${sweep_group:}``: :func:`sweep_group` of the running multirun, null otherwise."""
    job = multirun_job()
    return sweep_group(str(job.sweep.dir)) if job is not None else None


def run_name_resolver(default: str) -> str:
    """``${sweep_run_name:DEFAULT}``: :func:`run_name` of the running multirun job, ``DEFAULT`` otherwise
    (or when the job has no override to name it by)."""
    job = multirun_job()
    if job is None:
        return default
    return run_name(job.overrides.task, swept_keys(job)) or default


def identity(overrides: Sequence[str]) -> list[str]:
    """The overrides that make a job what it is: all of them, in Hydra's order, but :data:`IDENTITY_IGNORED`."""
    return [str(o) for o in overrides if override_key(str(o)) not in IDENTITY_IGNORED]


def read_record(job_dir: Path) -> dict | None:
    """``<job_dir>/job.json`` when it is readable, else ``None``."""
    try:
        record = json.loads((job_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(job_dir: Path, overrides: list[str], metric: str, value: float | None) -> Path:
    """Write ``<job_dir>/job.json`` atomically: the job's identity and what its sweeper got."""
    text = json.dumps({"overrides": overrides, "optimized_metric": metric, "value": value}, indent=2) + "\n"
    path = job_dir / JOB_FILE
    atomic_write_text(path, text)
    return path


def is_complete(job_dir: Path, overrides: list[str]) -> bool:
    """Whether ``job_dir`` holds the complete result of a job of these overrides (see :func:`identity`)."""
    record = read_record(job_dir)
    return record is not None and record.get("overrides") == overrides and (job_dir / METRICS_FILE).is_file()


def stored_value(job_dir: Path, metric: str) -> float | None:
    """``metric`` of ``<job_dir>/metrics.json`` (``None`` when the run did not report it)."""
    return json.loads((job_dir / METRICS_FILE).read_text()).get(metric)


def run_job(cfg: DictConfig, train: Callable[[DictConfig], tuple[dict[str, float], dict[str, Any]]]) -> float | None:
    """Run one job of ``train.py``: ``train(cfg)``, returning ``metrics[cfg.optimized_metric]`` to Hydra.

    In a multirun, a job whose folder already holds its complete result is skipped (``skip_complete``, on by
    default) and returns the stored value; a job that trains first removes a stale result from its folder
    and records ``job.json`` when it succeeds (see the module docstring).
    """
    job = multirun_job()
    if job is None:
        metrics, _ = train(cfg)
        return metrics.get(cfg.optimized_metric)

    job_dir = Path(cfg.paths.output_dir)
    overrides = identity(job.overrides.task)
    if is_complete(job_dir, overrides):
        if cfg.get("skip_complete", True):
            log.info("job %s: complete in %s, skipped", job.job.num, job_dir)
            return stored_value(job_dir, cfg.optimized_metric)
        log.info("job %s: complete in %s, training again (skip_complete=false)", job.job.num, job_dir)
    elif (job_dir / METRICS_FILE).exists():
        previous = (read_record(job_dir) or {}).get("overrides")
        log.warning(
            "job %s: %s holds a result of %s; training this job's overrides %s in its place", job.job.num, job_dir,
            f"other overrides {previous}" if previous is not None else "unknown overrides (no job.json)", overrides,
        )
    # until this run succeeds, the folder must not look complete (report.py takes metrics.json as done)
    for name in (JOB_FILE, METRICS_FILE):
        (job_dir / name).unlink(missing_ok=True)

    metrics, objects = train(cfg)
    value = metrics.get(cfg.optimized_metric)
    trainer = objects.get("trainer")
    if trainer is None or trainer.is_global_zero:  # DDP under a SLURM launcher: every rank runs this job
        write_record(job_dir, overrides, str(cfg.optimized_metric), value)
    return value
