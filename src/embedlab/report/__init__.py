"""Paper tables from sweep folders, with nothing re-run.

- :mod:`~embedlab.report.sweep`: the jobs of a sweep folder (complete, incomplete, missing);
- :mod:`~embedlab.report.table`: rows of configurations, mean ± std and n over seeds, paired tests vs a baseline;
- :mod:`~embedlab.report.render`: Markdown, LaTeX, CSV, PNG and the W&B summary run;
- :mod:`~embedlab.report.cli`: ``python report.py SWEEP_DIR``.
"""

from __future__ import annotations

from pathlib import Path

from embedlab.report.sweep import Job, SweepError, is_optuna_search, load_jobs
from embedlab.report.table import Table, build_table, default_metrics
from embedlab.sweeps import read_record

__all__ = ["Job", "SweepError", "Table", "build_report", "build_table", "load_jobs"]


def _wandb_project(jobs: list[Job]) -> str:
    """The project the jobs logged to (``logger.wandb.project`` of a job's saved config), else ``embedlab``."""
    from omegaconf import OmegaConf

    for job in jobs:
        if job.path is not None and (job.path / ".hydra" / "config.yaml").is_file():
            project = OmegaConf.select(OmegaConf.load(job.path / ".hydra" / "config.yaml"), "logger.wandb.project", default=None)
            if isinstance(project, str) and "${" not in project:
                return project
    return "embedlab"


def _optimized_metrics(jobs: list[Job]) -> list[str]:
    """The metric the sweep optimized, as a complete job's ``job.json`` (:func:`embedlab.sweeps.read_record`) says."""
    for job in jobs:
        record = read_record(job.path) if job.status == "complete" and job.path is not None else None
        metric = (record or {}).get("optimized_metric")
        if metric in job.metrics:
            return [metric]
    return []


def build_report(
    sweep_dir: str | Path, metrics: list[str] | None = None, by: list[str] | None = None, baseline: str | None = None,
    out_dir: str | Path | None = None, title: str = "", resamples: int = 10_000, seed: int = 0, wandb: bool = True,
    wandb_project: str | None = None, units: set[str] | None = None,
) -> dict[str, Path]:
    """Read the sweep in ``sweep_dir``, write ``report.{md,tex,csv,png}`` to ``out_dir`` (default
    ``<sweep_dir>/report``) and, with ``wandb``, the summary run in the sweep's W&B group; ``units``: see
    :func:`~embedlab.report.table.build_table`."""
    from embedlab.report.render import log_to_wandb, write_all

    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    if metrics is None and is_optuna_search(sweep_dir):
        # a search: the value it optimized first (job.json of embedlab.sweeps), then the default test metrics
        metrics = list(dict.fromkeys([*_optimized_metrics(jobs), *default_metrics(jobs)]))
    table = build_table(jobs, metrics=metrics, by=by, baseline=baseline, resamples=resamples, seed=seed, units=units)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    files = write_all(table, out, title or f"{sweep_dir.name}: {len(jobs)} jobs")
    if wandb:
        from embedlab.sweeps import sweep_group

        config = {"sweep_dir": str(sweep_dir), "metrics": table.metrics, "rows": table.keys, "baseline": baseline,
                  "units": len(units) if units else "all"}
        files["wandb"] = Path(log_to_wandb(table, files, sweep_group(sweep_dir), wandb_project or _wandb_project(jobs), out, config))
    return files
