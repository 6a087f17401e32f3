"""Paired tests over queries against exact computations: the sign-flip p-value against the enumeration of all
2^Q sign patterns, the bootstrap interval against the normal approximation, the seen/unseen split by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from embedlab.evaluation.significance import paired_stats, train_overlap_subsets


def test_sign_flip_p_value_equals_the_exact_enumeration():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, 10), rng.uniform(0, 1, 10)
    diff = 100 * (a - b)
    observed = abs(diff.mean())
    flips = [abs((np.array(s) * diff).mean()) for s in itertools.product([-1.0, 1.0], repeat=10)]
    exact = np.mean([f >= observed - 1e-12 for f in flips])
    stats = paired_stats(a, b, resamples=100_000, rng=np.random.default_rng(0))
    assert stats["mean"] == pytest.approx(diff.mean())
    assert stats["p"] == pytest.approx(exact, abs=0.01)


def test_bootstrap_interval_is_close_to_the_normal_interval_on_many_queries():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, 400)
    b = a - rng.normal(0.02, 0.1, 400)
    stats = paired_stats(a, b, resamples=20_000, rng=np.random.default_rng(0))
    diff = 100 * (a - b)
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert stats["se"] == pytest.approx(se)
    assert stats["lo"] == pytest.approx(diff.mean() - 1.96 * se, abs=0.1 * se)
    assert stats["hi"] == pytest.approx(diff.mean() + 1.96 * se, abs=0.1 * se)
    assert stats["p"] < 0.01


def test_seen_and_unseen_queries():
    train = {"t1": {"d1": 1, "d9": 0}, "t2": {"d2": 1}}
    test = {"a": {"d1": 1}, "b": {"d3": 1, "d2": 1}, "c": {"d9": 1}, "d": {"d4": 1}}
    masks = train_overlap_subsets(test, train)
    # d9 is judged in train but not relevant there: query c is unseen
    assert masks["seen"].tolist() == [True, True, False, False]
    assert masks["unseen"].tolist() == [False, False, True, True] and masks["all"].all()
