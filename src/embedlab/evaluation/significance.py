"""Is a difference between two systems larger than the test queries can resolve? Paired tests over queries.

Both systems are scored on the same queries, so the per-query differences ``a - b`` carry the comparison:
their mean, a bootstrap 95 % interval (queries resampled with replacement; Efron & Tibshirani 1993) and a
two-sided sign-flip permutation p-value (under the null the sign of each query's difference is arbitrary;
Smucker et al. 2007 compare these tests for IR); :func:`paired_over_seeds` pools several seeds' runs read from the
per-query files and handles correlation metrics (STS) by resampling pairs. Also the split of a BEIR test set into queries whose relevant
documents were training positives ("seen") and the rest ("unseen"): on SciFact most relevant test documents are
also training positives, which flatters anything trained on its train split.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np

from embedlab.evaluation.per_query import PerQuery, correlation, correlation_kind, unit_columns


def paired_stats(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Mean of ``100 * (a - b)`` (metric points), its bootstrap 95 % interval ``lo``/``hi``, the sign-flip
    permutation ``p`` and the standard error ``se``; ``a``, ``b``: (Q,) per-query values of the same queries.

    With few queries (``2**Q <= resamples``) ``p`` is exact: every one of the ``2**Q`` sign patterns is counted."""
    rng = np.random.default_rng(0) if rng is None else rng
    diff = 100 * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))  # (Q,)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[idx].mean(axis=1)
    observed = abs(diff.mean()) - 1e-12
    if 2 ** len(diff) <= resamples:
        signs = np.array(list(itertools.product([-1.0, 1.0], repeat=len(diff))))  # (2**Q, Q)
        p = float((np.abs((signs * diff).mean(axis=1)) >= observed).mean())
    else:
        signs = rng.choice([-1.0, 1.0], size=(resamples, len(diff)))
        p = float((1 + (np.abs((signs * diff).mean(axis=1)) >= observed).sum()) / (1 + resamples))
    return {
        "mean": float(diff.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
        "p": p, "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
    }


def paired_over_seeds(
    a: Sequence[PerQuery], b: Sequence[PerQuery], metric: str, resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Paired test of ``metric`` between two configurations run with the same seeds, pooled over the seeds.

    ``a[i]`` and ``b[i]`` are the per-query units (:mod:`embedlab.evaluation.per_query`) of the two configurations'
    runs with the i-th common seed; within a seed they are paired by unit id. The difference is the mean over
    seeds of ``metric(a[i]) - metric(b[i])``, in points (x100 for a mean of per-query values in [0, 1];
    correlations are already in percent). The bootstrap interval resamples units with replacement, the
    permutation test swaps the two configurations' values of a unit. When every seed has the same units (a test
    set) a unit is resampled or swapped in all seeds at once, since a query that is hard for one seed's model is
    hard for all of them; for a mean metric that is :func:`paired_stats` on the seed-averaged per-query values.
    When the units differ by seed (a validation split drawn by the seed) each seed is resampled on its own
    (stratified) and the seeds' differences averaged. Returns ``mean, lo, hi, p, se`` (``se`` from the bootstrap
    unless :func:`paired_stats` gives it) and ``units`` (distinct unit ids), ``seeds``.
    """
    if not a or len(a) != len(b):
        raise ValueError(f"paired_over_seeds needs the same number (> 0) of runs on each side, got {len(a)} and {len(b)}")
    per_seed = [[u for u in ai if u in bi] for ai, bi in zip(a, b)]
    if not all(per_seed):
        raise ValueError(f"{metric}: the two configurations share no per-query unit in seed {[bool(i) for i in per_seed].index(False)}")
    rng = np.random.default_rng(seed)
    kind = correlation_kind(metric)
    joint = all(set(ids) == set(per_seed[0]) for ids in per_seed)
    if joint:
        per_seed = [per_seed[0]] * len(a)  # one unit order for every seed
    cols_a = [unit_columns(units, metric, ids) for units, ids in zip(a, per_seed)]
    cols_b = [unit_columns(units, metric, ids) for units, ids in zip(b, per_seed)]
    if joint and kind is None:
        mean_a = np.mean([c["value"] for c in cols_a], axis=0)  # (U,)
        mean_b = np.mean([c["value"] for c in cols_b], axis=0)
        stats = paired_stats(mean_a, mean_b, resamples, rng)
    else:
        stats = _paired_draws(kind, cols_a, cols_b, joint, resamples, rng)
    return {**stats, "units": float(len(set().union(*per_seed))), "seeds": float(len(a))}


def _paired_draws(kind: str | None, cols_a: list[dict[str, np.ndarray]], cols_b: list[dict[str, np.ndarray]], joint: bool,
                  resamples: int, rng: np.random.Generator, chunk: int = 500) -> dict[str, float]:
    """Bootstrap and swap-permutation draws of the seed-averaged difference (see :func:`paired_over_seeds`)."""
    field = "prediction" if kind else "value"

    def diff(s: int, idx: np.ndarray | None = None, swap: np.ndarray | None = None) -> np.ndarray:
        # seed s's difference a - b in points; idx (r, n) resamples units, swap (r, n) exchanges a and b: -> (r,)
        x, y = cols_a[s][field], cols_b[s][field]  # (n,)
        gold = cols_a[s]["gold"] if kind else None
        if idx is not None:
            x, y = x[idx], y[idx]
            gold = gold[idx] if kind else None
        if swap is not None:
            x, y = np.where(swap, y, x), np.where(swap, x, y)
        if kind:
            return correlation(kind, gold, x) - correlation(kind, gold, y)
        return 100 * (x - y).mean(axis=-1)

    seeds = range(len(cols_a))
    observed = float(np.mean([diff(s) for s in seeds]))
    boot, null = [], []
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        sizes = [len(cols_a[s][field]) for s in seeds]
        shared_idx = rng.integers(0, sizes[0], size=(r, sizes[0])) if joint else None
        shared_swap = rng.random((r, sizes[0])) < 0.5 if joint else None
        idx = [shared_idx if joint else rng.integers(0, n, size=(r, n)) for n in sizes]
        swap = [shared_swap if joint else rng.random((r, n)) < 0.5 for n in sizes]
        boot.append(np.mean([diff(s, idx=idx[s]) for s in seeds], axis=0))
        null.append(np.abs(np.mean([diff(s, swap=swap[s]) for s in seeds], axis=0)))
    boot_all, null_all = np.concatenate(boot), np.concatenate(null)
    return {
        "mean": observed, "lo": float(np.percentile(boot_all, 2.5)), "hi": float(np.percentile(boot_all, 97.5)),
        "p": float((1 + (null_all >= abs(observed) - 1e-12).sum()) / (1 + resamples)),
        "se": float(boot_all.std(ddof=1)),
    }


def train_overlap_subsets(test_qrels: Mapping[str, Mapping[str, int]], train_qrels: Mapping[str, Mapping[str, int]]) -> dict[str, np.ndarray]:
    """``{"all", "seen", "unseen"}`` -> (Q,) boolean masks over ``test_qrels``' queries (in its order): ``seen``
    when at least one relevant test document is also relevant to a training query, ``unseen`` when none is."""
    train_positives = {d for judged in train_qrels.values() for d, rel in judged.items() if rel > 0}
    seen = np.array([any(rel > 0 and d in train_positives for d, rel in test_qrels[q].items()) for q in test_qrels], dtype=bool)
    return {"all": np.ones_like(seen), "seen": seen, "unseen": ~seen}
