"""The results table of a sweep: one row per configuration, mean ± std and n over its seeds, and a paired test
against a baseline row.

Rows group the complete jobs by the swept keys (every key whose value differs between jobs, except ``seed``) or
by the keys the user names. A cell is the mean and the sample standard deviation (``ddof=1``) of the metric over
the row's complete jobs, and ``n`` how many there were: incomplete and missing jobs are listed apart, never
averaged in. Against the baseline row, each metric gets the mean difference and
:func:`embedlab.evaluation.significance.paired_over_seeds` on the jobs' per-query files: runs are paired by seed
(both configurations trained with the same seed), the test pools those pairs over the test queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from embedlab.evaluation.per_query import PerQuery, unit_statistic
from embedlab.evaluation.significance import paired_over_seeds
from embedlab.report.sweep import Job, SweepError, parse_value

#: the key that repeats a configuration, never a row of its own
SEED_KEY = "seed"
#: metric-name fragments whose smaller value is the better one (times, sizes, losses)
LOWER_IS_BETTER = ("seconds", "bytes", "loss", "memory")
#: metrics reported when the user names none: the first present of each family
DEFAULT_METRICS = (("test/ndcg@10",), ("test/recall@100",), ("test/spearman_cosine", "test/spearman_dot", "test/spearman"))


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)


@dataclass
class Cell:
    mean: float
    std: float  # nan with one run
    n: int
    values: list[float]


@dataclass
class Comparison:
    """Row minus baseline for one metric, in points: ``mean``, 95 % interval ``lo``/``hi``, permutation ``p``,
    and what it was computed on (``seeds`` paired, ``units`` queries or pairs); ``error`` when it could not be."""

    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    p: float = math.nan
    seeds: int = 0
    units: int = 0
    error: str | None = None


@dataclass
class Row:
    values: dict[str, str]  # group key -> value
    jobs: list[Job]
    cells: dict[str, Cell] = field(default_factory=dict)
    versus: dict[str, Comparison] = field(default_factory=dict)
    is_baseline: bool = False

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all"


@dataclass
class Table:
    keys: list[str]
    metrics: list[str]
    rows: list[Row]
    not_complete: list[Job]
    baseline: Row | None = None

    def best(self, metric: str) -> list[Row]:
        """The rows with the best mean of ``metric`` (largest, or smallest for times/sizes/losses; ties all)."""
        scored = [r for r in self.rows if metric in r.cells and math.isfinite(r.cells[metric].mean)]
        if not scored:
            return []
        pick = min if lower_is_better(metric) else max
        top = pick(r.cells[metric].mean for r in scored)
        return [r for r in scored if r.cells[metric].mean == top]


def swept_keys(jobs: list[Job]) -> list[str]:
    """Keys whose value differs between jobs (in first-seen order), ``seed`` excluded."""
    keys: dict[str, set[str]] = {}
    for job in jobs:
        for k in job.overrides:
            keys.setdefault(k, set())
    for k in keys:
        keys[k] = {job.overrides.get(k, "") for job in jobs}
    return [k for k, values in keys.items() if len(values) > 1 and k != SEED_KEY]


def default_metrics(jobs: list[Job]) -> list[str]:
    present = set().union(*(job.metrics for job in jobs if job.status == "complete"))
    found = [next(m for m in family if m in present) for family in DEFAULT_METRICS if any(m in present for m in family)]
    if not found:
        found = sorted(m for m in present if m.startswith("test/") and not lower_is_better(m))[:3]
    return found


def parse_selection(spec: str, what: str) -> dict[str, str]:
    """``"loss=mnrl,pooling=cls"`` -> ``{"loss": "mnrl", "pooling": "cls"}``."""
    pairs = [part.strip() for part in spec.split(",") if part.strip()]
    bad = [p for p in pairs if "=" not in p]
    if not pairs or bad:
        raise SweepError(f"{what} {spec!r}: expected key=value[,key=value...]")
    return dict(p.split("=", 1) for p in pairs)


def build_table(
    jobs: list[Job], metrics: list[str] | None = None, by: list[str] | None = None, baseline: str | None = None,
    resamples: int = 10_000, seed: int = 0, units: set[str] | None = None,
) -> Table:
    """Group ``jobs`` into rows, compute the cells and, with ``baseline`` (``"key=value,..."``), the paired tests.

    ``units``: restrict everything to these query (or pair) ids: the cells are then recomputed from the jobs'
    per-query files instead of read from ``metrics.json`` (e.g. SciFact's test queries whose relevant documents
    are no training positives)."""
    complete = [j for j in jobs if j.status == "complete"]
    if not complete:
        raise SweepError(f"no complete job among {len(jobs)} (no metrics.json)")
    metrics = metrics or default_metrics(jobs)
    absent = [m for m in metrics if not any(m in j.metrics for j in complete)]
    if absent:
        known = sorted(set().union(*(j.metrics for j in complete)))
        raise SweepError(f"metric {absent[0]!r} is in no job's metrics.json (known: {', '.join(known)})")
    keys = list(by) if by else swept_keys(jobs)
    unknown = [k for k in keys if not any(k in j.overrides for j in jobs)]
    if unknown:
        raise SweepError(f"--by {unknown[0]!r}: no job overrides it (swept keys: {', '.join(swept_keys(jobs)) or 'none'})")
    rows: dict[tuple, Row] = {}
    for job in jobs:  # every job gets its row, so a configuration whose jobs all failed still shows (n = 0)
        values = {k: job.overrides.get(k, "") for k in keys}
        rows.setdefault(tuple(values.values()), Row(values, [])).jobs.append(job)
    table = Table(keys, metrics, list(rows.values()), [j for j in jobs if j.status != "complete"])
    for row in table.rows:
        for metric in metrics:
            values = [_value(j, metric, units) for j in row.jobs if j.status == "complete" and metric in j.metrics]
            if values:
                arr = np.array(values, dtype=np.float64)
                std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
                row.cells[metric] = Cell(float(arr.mean()), std, len(arr), values)
    if baseline:
        table.baseline = _find_row(table, parse_selection(baseline, "--baseline"))
        table.baseline.is_baseline = True
        for row in table.rows:
            if row is not table.baseline:
                row.versus = {m: compare(row, table.baseline, m, resamples, seed, units) for m in metrics}
    return table


def same_value(a: str, b: str) -> bool:
    """Override values compare as YAML reads them (:func:`~embedlab.report.sweep.parse_value`)."""
    return a == b or parse_value(a) == parse_value(b)


def _find_row(table: Table, selection: dict[str, str]) -> Row:
    extra = [k for k in selection if k not in table.keys]
    if extra:
        raise SweepError(f"--baseline key {extra[0]!r} is not a row key (rows are grouped by {', '.join(table.keys)})")
    matches = [r for r in table.rows if all(same_value(r.values[k], v) for k, v in selection.items())]
    if len(matches) != 1:
        rows = "; ".join(r.label for r in table.rows)
        raise SweepError(f"--baseline {selection} matches {len(matches)} rows, not 1 (rows: {rows})")
    return matches[0]


def _by_seed(row: Row) -> dict[str, Job]:
    complete = [j for j in row.jobs if j.status == "complete"]
    return {j.overrides.get(SEED_KEY, str(i)): j for i, j in enumerate(complete)}


def _value(job: Job, metric: str, units: set[str] | None) -> float:
    if units is None:
        return job.metrics[metric]
    try:
        return unit_statistic(restrict(job.per_query(metric), units), metric)
    except (FileNotFoundError, KeyError) as err:
        raise SweepError(f"--units needs per-query files: {str(err).strip(chr(39))}") from None


def restrict(per_query: PerQuery, units: set[str] | None) -> PerQuery:
    return per_query if units is None else {u: v for u, v in per_query.items() if u in units}


def compare(row: Row, baseline: Row, metric: str, resamples: int = 10_000, seed: int = 0, units: set[str] | None = None) -> Comparison:
    """``row`` minus ``baseline`` on ``metric``: jobs paired by seed, tested on their per-query files."""
    mine, theirs = _by_seed(row), _by_seed(baseline)
    seeds = [s for s in mine if s in theirs]
    if not seeds:
        return Comparison(error="no seed in common with the baseline")
    try:
        a = [restrict(mine[s].per_query(metric), units) for s in seeds]
        b = [restrict(theirs[s].per_query(metric), units) for s in seeds]
        stats = paired_over_seeds(a, b, metric, resamples=resamples, seed=seed)
    except (FileNotFoundError, KeyError, ValueError) as err:
        return Comparison(seeds=len(seeds), error=str(err).strip("'\""))
    return Comparison(stats["mean"], stats["lo"], stats["hi"], stats["p"], len(seeds), int(stats["units"]))
