"""embedlab.evaluation.metrics against pytrec_eval (trec_eval), the reference BEIR and MTEB report."""

from __future__ import annotations

import math
import random

import pytest

from embedlab.evaluation.metrics import METRICS, per_query_metrics, rank_documents, retrieval_metrics
from tests.conftest import K_VALUES, pytrec_per_query

pytrec_eval = pytest.importorskip("pytrec_eval")



def _random_case(seed: int = 0, n_queries: int = 80, n_docs: int = 150):
    """Seeded run/qrels exercising the trec_eval corner cases (asserted in the test that uses it)."""
    rng = random.Random(seed)
    # ids whose string order differs from numeric order ("d9" > "d10"), so doc-id tie-breaking matters
    docs = [f"d{i}" for i in range(n_docs)]
    run, qrels = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        n_ret = rng.choice([0, 1, 2, 4, 7, 15, 40])  # often shorter than the largest cutoffs
        retrieved = rng.sample(docs, n_ret)
        # few distinct scores -> many exact ties; some near-ties that only collapse in float32
        run[qid] = {
            d: rng.choice([0.1, 0.5, 0.5, 0.9, 1.0, 1.0 + 1e-9, 1.0 + 1e-5, rng.random()]) for d in retrieved
        }
        judged = rng.sample(docs, rng.randint(1, 12))
        # judge a few retrieved docs so hits actually happen
        judged += [d for d in retrieved if rng.random() < 0.4 and d not in judged]
        qrels[qid] = {d: rng.choice([0, 0, 1, 1, 2]) for d in judged}
    qrels["q_all_zero"] = {"d1": 0, "d2": 0}
    run["q_all_zero"] = {"d1": 1.0, "d2": 0.5, "d3": 0.2}
    qrels["q_unretrieved"] = {"d5": 2, "d6": 1}
    run["q_unretrieved"] = {"d7": 1.0, "d8": 1.0}
    qrels["q_absent_from_run"] = {"d9": 1}
    run["q_absent_from_qrels"] = {"d9": 1.0}
    run["q_empty_run"] = {}
    qrels["q_empty_run"] = {"d3": 1}
    return run, qrels


def test_random_case_covers_corner_cases():
    run, qrels = _random_case()
    relevant = {q: {d for d, r in j.items() if r >= 1} for q, j in qrels.items()}
    shared = [q for q in qrels if q in run]
    assert any(2 in j.values() for j in qrels.values())  # graded relevance
    assert any(len(set(s.values())) < len(s) for s in run.values())  # exact score ties
    assert any(relevant[q] and not relevant[q] & set(run[q]) for q in shared)  # relevant docs never retrieved
    assert any(relevant[q] - set(run[q]) and relevant[q] & set(run[q]) for q in shared)  # partly retrieved
    assert any(not relevant[q] for q in shared)  # no relevant doc at all
    assert any(len(run[q]) < max(K_VALUES) for q in shared)  # k larger than the run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_matches_pytrec_eval(seed):
    run, qrels = _random_case(seed)
    expected = pytrec_per_query(run, qrels)
    got = per_query_metrics(run, qrels, K_VALUES, missing_queries="skip")
    assert set(got) == set(expected)
    for qid, row in expected.items():
        for name, value in row.items():
            assert got[qid][name] == pytest.approx(value, abs=1e-6), (qid, name)


def test_mean_matches_pytrec_eval_with_prefix():
    run, qrels = _random_case(3)
    expected = pytrec_per_query(run, qrels)
    got = retrieval_metrics(run, qrels, K_VALUES, prefix="val/", missing_queries="skip")
    names = [f"{m}@{k}" for m in METRICS for k in K_VALUES]
    assert list(got) == [f"val/{n}" for n in names]
    for name in names:
        mean = sum(row[name] for row in expected.values()) / len(expected)
        assert got[f"val/{name}"] == pytest.approx(mean, abs=1e-6), name


def test_tie_breaking_follows_trec_eval():
    # equal scores rank by doc id descending as strings: "b" > "a", "9" > "10", "a" > "B"
    scores = {"10": 1.0, "9": 1.0, "2": 1.0, "a": 1.0, "B": 1.0, "aa": 1.0, "z": 0.5}
    assert rank_documents(scores) == ["aa", "a", "B", "9", "2", "10", "z"]
    # doubles that differ below float32 resolution tie as in trec_eval (it stores `float sim`)
    near = {"a": 1.0, "b": 1.0 - 1e-9, "c": 1.0 - 1e-6}
    assert rank_documents(near) == ["b", "a", "c"]
    assert rank_documents(scores, top_k=2) == ["aa", "a"]
    for ranked in (scores, near):
        for doc in ranked:
            reference = pytrec_eval.RelevanceEvaluator({"q": {doc: 1}}, {"recip_rank"}).evaluate({"q": ranked})
            assert 1.0 / reference["q"]["recip_rank"] == rank_documents(ranked).index(doc) + 1


def _hand_case():
    qrels = {
        "q1": {"a": 1, "x": 0},  # relevant doc retrieved at rank 2
        "q2": {"b": 2},  # absent from the run
        "q3": {"c": 0},  # no relevant doc; retrieved docs all non-relevant
    }
    run = {"q1": {"x": 0.9, "a": 0.8, "y": 0.1}, "q3": {"c": 1.0}, "q_extra": {"a": 1.0}}
    # q1 by hand, cutoffs 1 and 3
    q1 = {
        "ndcg@1": 0.0, "ndcg@3": 1.0 / math.log2(3),
        "map@1": 0.0, "map@3": 0.5,
        "mrr@1": 0.0, "mrr@3": 0.5,
        "recall@1": 0.0, "recall@3": 1.0,
        "precision@1": 0.0, "precision@3": 1.0 / 3,
    }  # fmt: skip
    return run, qrels, q1


def test_missing_queries_zero_by_hand():
    run, qrels, q1 = _hand_case()
    got = retrieval_metrics(run, qrels, (1, 3), prefix="", missing_queries="zero")
    # q1, q2 (absent -> 0) and q3 (nothing relevant -> 0) are averaged; q_extra is not in qrels
    assert got == pytest.approx({name: value / 3 for name, value in q1.items()}, abs=1e-12)
    per_query = per_query_metrics(run, qrels, (1, 3))
    assert list(per_query) == ["q1", "q2", "q3"]
    assert set(per_query["q2"].values()) == {0.0}
    # default mode is "zero"
    assert retrieval_metrics(run, qrels, (1, 3), prefix="") == got


def test_missing_queries_skip_is_pytrec_eval():
    run, qrels, q1 = _hand_case()
    got = retrieval_metrics(run, qrels, (1, 3), prefix="", missing_queries="skip")
    assert got == pytest.approx({name: value / 2 for name, value in q1.items()}, abs=1e-12)
    assert set(pytrec_per_query(run, qrels, (1, 3))) == {"q1", "q3"}


def test_ignore_identical_ids():
    qrels = {"q1": {"d1": 1, "q1": 1}, "q2": {"d2": 1}}
    run = {"q1": {"q1": 2.0, "d1": 1.0, "d9": 0.5}, "q2": {"d2": 1.0, "q2": 3.0}}
    cleaned = {"q1": {"d1": 1.0, "d9": 0.5}, "q2": {"d2": 1.0}}
    got = per_query_metrics(run, qrels, (1, 2), ignore_identical_ids=True)
    expected = pytrec_per_query(cleaned, qrels, (1, 2))
    for qid in expected:
        assert got[qid] == pytest.approx(expected[qid], abs=1e-9)
    assert got["q2"]["mrr@1"] == 1.0
    assert per_query_metrics(run, qrels, (1, 2))["q2"]["mrr@1"] == 0.0


def test_errors():
    run, qrels, _ = _hand_case()
    with pytest.raises(ValueError, match="missing_queries must be one of 'zero', 'skip', got 'drop'"):
        retrieval_metrics(run, qrels, missing_queries="drop")
    with pytest.raises(ValueError, match="no query to evaluate"):
        retrieval_metrics({"q9": {"a": 1.0}}, qrels, missing_queries="skip")
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metrics(run, qrels, k_values=(0, 5))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics({"q1": {"a": float("nan")}}, qrels)
