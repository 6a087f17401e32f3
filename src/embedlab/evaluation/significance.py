"""Is a difference between two systems larger than the test queries can resolve? Paired tests over queries.

Both systems are scored on the same queries, so the per-query differences ``a - b`` carry the comparison:
their mean, a bootstrap 95 % interval (queries resampled with replacement; Efron & Tibshirani 1993) and a
two-sided sign-flip permutation p-value (under the null the sign of each query's difference is arbitrary;
Smucker et al. 2007 compare these tests for IR). Also the split of a BEIR test set into queries whose relevant
documents were training positives ("seen") and the rest ("unseen"): on SciFact most relevant test documents are
also training positives, which flatters anything trained on its train split.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def paired_stats(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Mean of ``100 * (a - b)`` (metric points), its bootstrap 95 % interval ``lo``/``hi``, the sign-flip
    permutation ``p`` and the standard error ``se``; ``a``, ``b``: (Q,) per-query values of the same queries."""
    rng = np.random.default_rng(0) if rng is None else rng
    diff = 100 * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))  # (Q,)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[idx].mean(axis=1)
    signs = rng.choice([-1.0, 1.0], size=(resamples, len(diff)))
    null = np.abs((signs * diff).mean(axis=1))
    return {
        "mean": float(diff.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
        "p": float((1 + (null >= abs(diff.mean()) - 1e-12).sum()) / (1 + resamples)),
        "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
    }


def train_overlap_subsets(test_qrels: Mapping[str, Mapping[str, int]], train_qrels: Mapping[str, Mapping[str, int]]) -> dict[str, np.ndarray]:
    """``{"all", "seen", "unseen"}`` -> (Q,) boolean masks over ``test_qrels``' queries (in its order): ``seen``
    when at least one relevant test document is also relevant to a training query, ``unseen`` when none is."""
    train_positives = {d for judged in train_qrels.values() for d, rel in judged.items() if rel > 0}
    seen = np.array([any(rel > 0 and d in train_positives for d, rel in test_qrels[q].items()) for q in test_qrels], dtype=bool)
    return {"all": np.ones_like(seen), "seen": seen, "unseen": ~seen}
