"""The rerank evaluator against pytrec_eval on hand-built runs: only the first stage's candidates are reranked
(a relevant document it missed stays missed), first-stage metrics beside the final ones, exact option errors;
the cross-encoder STS evaluator against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from embedlab.data.records import RetrievalTask, STSTask
from embedlab.evaluation.evaluators import EvalOptionError, build_evaluator
from embedlab.evaluation.rerank import RERANK_EVALUATORS, CrossEncoderSTSEvaluator, RerankEvaluator, ScoreBatches
from tests.conftest import pytrec_per_query

K = (1, 3, 5)


class FixedRun:
    """A first stage that returns a fixed run (best first), cut at top_k, and counts its calls."""

    name = "fixed"

    def __init__(self, run):
        self.run = run
        self.calls = 0

    def retrieve(self, task, top_k, show_progress_bar=True):
        self.calls += 1
        return {q: dict(sorted(docs.items(), key=lambda x: -x[1])[:top_k]) for q, docs in self.run.items()}


class TableScorer:
    """A 'cross-encoder' whose score of (query, document) is looked up in a table (text pairs -> score)."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def predict(self, pairs, batch_size=32, show_progress_bar=False, desc=""):
        self.seen.extend(pairs)
        return torch.tensor([self.table[p] for p in pairs], dtype=torch.float32)


def _task():
    corpus = {f"d{i}": f"document {i}" for i in range(8)}
    queries = {"q0": "query zero", "q1": "query one"}
    qrels = {"q0": {"d0": 2, "d5": 1}, "q1": {"d3": 1}}
    return RetrievalTask(corpus=corpus, queries=queries, qrels=qrels)


def _means(run, qrels):
    per_query = pytrec_per_query(run, qrels, K)
    names = next(iter(per_query.values()))
    return {f"test/{n}": sum(row[n] for row in per_query.values()) / len(qrels) for n in names}


def test_rerank_metrics_equal_pytrec_on_the_reranked_candidates_only():
    task = _task()
    # the first stage misses d5 (relevant to q0) within its top 4; d3 is 4th for q1
    first = {"q0": {"d1": 0.9, "d2": 0.8, "d0": 0.7, "d4": 0.6, "d5": 0.5}, "q1": {"d6": 0.9, "d7": 0.8, "d1": 0.7, "d3": 0.6}}
    # the reranker loves the relevant documents, d5 most of all: it cannot bring d5 back
    table = {}
    for q, docs in first.items():
        for d in docs:
            rel = task.qrels[q].get(d, 0)
            table[(task.queries[q], task.corpus[d])] = 10.0 + rel if rel else -float(d[1:])
    scorer = TableScorer(table)
    evaluator = RerankEvaluator(task, FixedRun(first), top_k=4, k_values=K, batch_size=3)
    metrics = evaluator.evaluate(scorer, prefix="test/", show_progress_bar=False)

    reranked = {
        "q0": {"d0": 12.0, "d1": -1.0, "d2": -2.0, "d4": -4.0},
        "q1": {"d3": 11.0, "d6": -6.0, "d7": -7.0, "d1": -1.0},
    }
    first_top4 = {q: dict(sorted(d.items(), key=lambda x: -x[1])[:4]) for q, d in first.items()}
    expected = _means(reranked, task.qrels)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    for name, value in _means(first_top4, task.qrels).items():
        assert metrics[name.replace("test/", "test/first_stage/")] == pytest.approx(value, abs=1e-9), name
    # d5 was never scored, and recall@5 of q0 stays 1/2 after reranking
    assert (task.queries["q0"], task.corpus["d5"]) not in scorer.seen and len(scorer.seen) == 8
    assert metrics["test/recall@5"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["test/ndcg@1"] == 1.0 and metrics["test/first_stage/ndcg@1"] == 0.0
    assert metrics["test/rerank/candidates_per_query"] == 4.0
    assert metrics["test/rerank/seconds_per_query"] >= 0 and metrics["test/first_stage/seconds_per_query"] >= 0
    assert evaluator.last_runs["run"] == reranked and evaluator.last_runs["first_stage"] == first_top4


def test_first_stage_runs_once_and_no_reranker_reports_the_first_stage():
    task = _task()
    stage = FixedRun({"q0": {"d0": 1.0, "d1": 0.5}, "q1": {"d3": 0.2}})
    evaluator = RerankEvaluator(task, stage, top_k=10, k_values=K)
    metrics = evaluator.evaluate(None, show_progress_bar=False)
    evaluator.score_plan()
    evaluator.compute({"pairs": torch.tensor([0.0, 1.0, 0.0])})
    assert stage.calls == 1
    assert metrics["test/ndcg@3"] == metrics["test/first_stage/ndcg@3"]
    assert metrics["test/ndcg@3"] == pytest.approx(_means(stage.run, task.qrels)["test/ndcg@3"], abs=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_top_k_must_be_a_positive_integer(bad):
    with pytest.raises(EvalOptionError, match=rf"^rerank.top_k must be an integer >= 1, got {bad!r}$"):
        RerankEvaluator(_task(), FixedRun({}), top_k=bad)


def test_build_evaluator_for_cross_encoders_checks_options():
    task = _task()
    evaluator = build_evaluator(task, registry=RERANK_EVALUATORS, first_stage=FixedRun({}), top_k=5, batch_size=4)
    assert isinstance(evaluator, RerankEvaluator) and evaluator.top_k == 5
    sts = STSTask(["a", "b", "c"], ["x", "y", "z"], [0.1, 0.5, 0.9])
    assert isinstance(build_evaluator(sts, registry=RERANK_EVALUATORS, batch_size=4), CrossEncoderSTSEvaluator)
    with pytest.raises(EvalOptionError, match=r"^eval.top_k does not apply to an STS task"):
        build_evaluator(sts, registry=RERANK_EVALUATORS, top_k=5)
    with pytest.raises(EvalOptionError, match=r"^reranking needs a first stage"):
        build_evaluator(task, registry=RERANK_EVALUATORS)


def test_cross_encoder_sts_evaluator_equals_scipy():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 1, 40).tolist()
    predicted = (np.array(gold) + rng.normal(0, 0.3, 40)).tolist()
    task = STSTask([f"a{i}" for i in range(40)], [f"b{i}" for i in range(40)], gold)
    scorer = TableScorer({(f"a{i}", f"b{i}"): predicted[i] for i in range(40)})
    metrics = CrossEncoderSTSEvaluator(task, batch_size=7).evaluate(scorer, prefix="val/", show_progress_bar=False)
    predicted32 = np.array(predicted, dtype=np.float32).astype(np.float64)  # the scorer returns float32
    assert metrics["val/spearman"] == pytest.approx(spearmanr(predicted32, gold).statistic * 100, abs=1e-5)
    assert metrics["val/pearson"] == pytest.approx(pearsonr(predicted32, gold).statistic * 100, abs=1e-5)


def test_score_batches_cover_every_pair_once_longest_first():
    from embedlab.evaluation.rerank import ScoreRequest

    pairs = [("q" * (i % 5 + 1), "d" * (i * 7 % 11 + 1)) for i in range(23)]
    batches = ScoreBatches([ScoreRequest("pairs", pairs)], batch_size=4)
    seen = torch.cat([b["index"] for b in batches.batches])
    assert sorted(seen.tolist()) == list(range(23)) and len(batches) == 6
    lengths = [len(pairs[i][0]) + len(pairs[i][1]) for i in seen.tolist()]
    assert lengths == sorted(lengths, reverse=True)
    for b in batches.batches:
        assert [(q, d) for q, d in zip(b["queries"], b["documents"])] == [pairs[i] for i in b["index"].tolist()]
