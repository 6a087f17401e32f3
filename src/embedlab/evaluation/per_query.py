"""Per-query results: what every evaluation writes beside its metrics, so a significance test needs no re-encoding.

A metric in ``metrics.json`` is a statistic over *units*: the queries of a retrieval task, the sentence pairs of
an STS task. An evaluator keeps each unit's values of its last evaluation in ``last_per_query``
(``{unit id: {field: value}}``), and the run writes them as JSON Lines, one unit per line::

    {"id": "1", "test/ndcg@10": 0.63, "test/recall@100": 1.0, ...}       retrieval: the metric's own keys
    {"id": "17", "gold": 3.8, "prediction": 0.912}                        STS: gold score and model similarity

under ``<run dir>/runs/test_per_query.jsonl`` (``val_epoch003_per_query.jsonl`` for a validation). A metric is
recomputed from the units by :func:`unit_statistic`: the mean of its field over units (retrieval: exactly the
mean that ``metrics.json`` holds), or, for ``.../spearman*`` and ``.../pearson*``, the correlation (in percent)
between ``gold`` and ``prediction`` over the pairs. :mod:`embedlab.evaluation.significance` resamples units to
compare two systems.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Mapping

import numpy as np

from embedlab.atomic import atomic_write_text
from embedlab.data.errors import DataError
from embedlab.data.readers.tables import iter_jsonl

#: ``{unit id: {field: value}}``
PerQuery = dict[str, dict[str, float]]

#: metric-name stems computed from ``gold`` / ``prediction`` over units rather than averaged
CORRELATIONS = ("spearman", "pearson")


def per_query_path(folder: str | PathLike[str], stem: str) -> Path:
    """``<folder>/<stem>_per_query.jsonl`` (``stem``: ``test``, ``val_epoch003``)."""
    return Path(folder) / f"{stem}_per_query.jsonl"


def write_per_query(units: Mapping[str, Mapping[str, float]], path: str | PathLike[str]) -> Path:
    """Write ``units`` as JSON Lines (``{"id": ..., field: value, ...}`` per unit), atomically."""
    lines = [json.dumps({"id": str(uid), **{k: float(v) for k, v in fields.items()}}) for uid, fields in units.items()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_per_query(path: str | PathLike[str]) -> PerQuery:
    """Read a per-query file; a line without an ``id`` or with a non-numeric value is an error naming the line."""
    units: PerQuery = {}
    path = Path(path)
    for number, obj in iter_jsonl(path):
        if "id" not in obj:
            raise DataError(f"{path} line {number}: a per-query line needs an \"id\" field")
        uid = str(obj.pop("id"))
        bad = [k for k, v in obj.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise DataError(f"{path} line {number}: field {bad[0]!r} is not a number")
        units[uid] = {k: float(v) for k, v in obj.items()}
    return units


def correlation_kind(metric: str) -> str | None:
    """``"spearman"`` / ``"pearson"`` when ``metric`` (``test/spearman_cosine``) is a correlation, else ``None``."""
    stem = metric.rsplit("/", 1)[-1]
    return next((kind for kind in CORRELATIONS if stem.startswith(kind)), None)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank, as Spearman needs)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def correlation(kind: str, gold: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Pearson or Spearman correlation in percent along the last axis: (..., P) -> (...)."""
    if kind == "spearman":
        gold, prediction = _ranks(gold), _ranks(prediction)
    g = gold - gold.mean(axis=-1, keepdims=True)
    p = prediction - prediction.mean(axis=-1, keepdims=True)
    return 100 * (g * p).sum(axis=-1) / np.sqrt((g * g).sum(axis=-1) * (p * p).sum(axis=-1))


def unit_columns(units: PerQuery, metric: str, ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """The (U,) columns ``metric`` is computed from, in ``ids`` order (default: the file's): ``{"value": ...}``
    for a mean, ``{"gold": ..., "prediction": ...}`` for a correlation.

    Raises:
        KeyError: ``metric`` has no per-query values here (e.g. a timing, or another stage's metric).
    """
    ids = list(units) if ids is None else ids
    fields = ("gold", "prediction") if correlation_kind(metric) else (metric,)
    first = units[ids[0]] if ids else {}
    missing = [f for f in fields if f not in first]
    if missing:
        raise KeyError(f"no per-query {missing[0]!r} for {metric}")
    columns = {f: np.array([units[u][f] for u in ids], dtype=np.float64) for f in fields}
    return columns if correlation_kind(metric) else {"value": columns[metric]}


def unit_statistic(units: PerQuery, metric: str) -> float:
    """``metric`` recomputed from the units: the mean of its values, or the correlation of the pairs."""
    columns = unit_columns(units, metric)
    kind = correlation_kind(metric)
    if kind:
        return float(correlation(kind, columns["gold"], columns["prediction"]))
    return float(columns["value"].mean())
