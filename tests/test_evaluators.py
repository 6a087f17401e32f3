"""Evaluators end to end on hand-built embeddings: metrics equal pytrec_eval on a naive run, STS correlations equal
scipy, faiss search equals exact search, and build_evaluator's option checks (each message tested)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from embedlab.data.records import RetrievalTask, STSTask
from embedlab.errors import UserError
from embedlab.evaluation import evaluators as E
from embedlab.evaluation.evaluators import (
    EvalOptionError,
    RetrievalEvaluator,
    STSEvaluator,
    build_evaluator,
)
from tests.conftest import pytrec_per_query

K_VALUES = (1, 3, 10)
EVAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval" / "default.yaml"


def _pytrec_means(run, qrels, k_values=K_VALUES) -> dict[str, float]:
    """pytrec_eval's per-query numbers (embedlab names) averaged over the queries of qrels."""
    per_query = pytrec_per_query(run, qrels, k_values)
    assert set(per_query) == set(qrels)  # every query is in the run: pytrec_eval's mean is over all of them
    names = next(iter(per_query.values()))
    return {name: sum(row[name] for row in per_query.values()) / len(per_query) for name in names}


def _assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) >= set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(A, B) cosine similarities in float64 numpy."""
    a, b = a.double().numpy(), b.double().numpy()
    return (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]


def _top_run(scores: np.ndarray, query_ids, corpus_ids, k: int) -> dict[str, dict[str, float]]:
    """Naive full-matrix search: each query's k highest-scoring documents (numpy argsort, float64)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {q: {corpus_ids[j]: float(scores[i, j]) for j in order[i]} for i, q in enumerate(query_ids)}


# ------------------------------------------------------------------------------------------------------------
# retrieval through the evaluator
# ------------------------------------------------------------------------------------------------------------
def test_ignore_identical_ids_drops_the_query_itself():
    """Queries q0..q5 are also corpus documents, embedded identically: each retrieves itself first. With
    ignore_identical_ids that hit leaves the run, so the metrics equal pytrec_eval on the run without it."""
    gen = torch.Generator().manual_seed(0)
    corpus_ids = [f"q{i}" for i in range(6)] + [f"d{i}" for i in range(60)]
    corpus = torch.randn(len(corpus_ids), 16, generator=gen)
    query_ids = [f"q{i}" for i in range(6)]
    queries = corpus[:6].clone()
    cos = _cosine(queries, corpus)  # (6, 66)
    # relevant: the 1st, 2nd or 3rd nearest d* document of each query; q5 also judges itself relevant (BEIR keeps
    # such qrels; never retrievable with ignore_identical_ids)
    nearest = np.argsort(-cos[:, 6:], axis=1) + 6  # (6, 60) column numbers of the d* documents
    qrels = {q: {corpus_ids[nearest[i, i % 3]]: 1 + i % 2} for i, q in enumerate(query_ids)}
    qrels["q5"]["q5"] = 1
    task = RetrievalTask(corpus=dict.fromkeys(corpus_ids, ""), queries=dict.fromkeys(query_ids, ""), qrels=qrels)

    evaluator = RetrievalEvaluator(task, k_values=K_VALUES, top_k=10, ignore_identical_ids=True, corpus_chunk_size=17)
    got = evaluator.compute({"query": queries, "document": corpus}, prefix="")

    run = _top_run(cos, query_ids, corpus_ids, len(corpus_ids))
    assert all(next(iter(run[q])) == q for q in query_ids)  # each query's first hit is itself
    hand_built = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}
    _assert_metrics_equal(got, _pytrec_means(hand_built, qrels))
    # the option matters here: kept, the self-hits hold rank 1, a hit only for q5 (which judges itself relevant)
    kept = RetrievalEvaluator(task, k_values=K_VALUES, top_k=10).compute({"query": queries, "document": corpus}, "")
    _assert_metrics_equal(kept, _pytrec_means(run, qrels))
    assert kept["mrr@1"] == pytest.approx(1 / 6) and got["mrr@1"] != kept["mrr@1"]


def test_dot_similarity_on_unnormalized_embeddings():
    """similarity=dot ranks by raw inner products: metrics equal pytrec_eval on a naive full-matrix dot run, and
    differ from cosine on the same embeddings (norms vary 50x)."""
    gen = torch.Generator().manual_seed(1)
    corpus = torch.nn.functional.normalize(torch.randn(200, 12, generator=gen), dim=1)
    corpus = corpus * torch.logspace(-1, 0.7, 200).view(-1, 1)[torch.randperm(200, generator=gen)]  # norms 0.1 .. 5
    queries = torch.randn(25, 12, generator=gen) * 2
    query_ids, corpus_ids = [f"q{i}" for i in range(25)], [f"d{i}" for i in range(200)]
    dot, cos = queries.double().numpy() @ corpus.double().numpy().T, _cosine(queries, corpus)  # (Q, N) each
    # judged: each query's best cosine document (grade 2) and its 4th best dot-product document (grade 1)
    qrels = {
        q: {corpus_ids[int(np.argmax(cos[i]))]: 2, corpus_ids[int(np.argsort(-dot[i])[3])]: 1}
        for i, q in enumerate(query_ids)
    }
    task = RetrievalTask(corpus=dict.fromkeys(corpus_ids, ""), queries=dict.fromkeys(query_ids, ""), qrels=qrels)
    embeddings = {"query": queries, "document": corpus}

    got = RetrievalEvaluator(task, k_values=K_VALUES, top_k=10, similarity="dot", query_chunk_size=7,
                             corpus_chunk_size=30).compute(embeddings, prefix="")
    _assert_metrics_equal(got, _pytrec_means(_top_run(dot, query_ids, corpus_ids, 10), qrels))
    as_cosine = RetrievalEvaluator(task, k_values=K_VALUES, top_k=10, similarity="cos").compute(embeddings, prefix="")
    _assert_metrics_equal(as_cosine, _pytrec_means(_top_run(cos, query_ids, corpus_ids, 10), qrels))
    assert abs(got["ndcg@10"] - as_cosine["ndcg@10"]) > 0.05


def test_faiss_search_option_equals_exact_search():
    """eval.search=faiss: every metric, grid cells included, equals eval.search=exact on tie-free random data."""
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(2)
    corpus = torch.randn(300, 16, generator=gen)
    targets = torch.randint(0, 300, (40,), generator=gen)
    queries = corpus[targets] + 0.9 * torch.randn(40, 16, generator=gen)
    task = RetrievalTask(
        corpus={f"d{i}": "" for i in range(300)}, queries={f"q{i}": "" for i in range(40)},
        qrels={f"q{i}": {f"d{int(t)}": 1} for i, t in enumerate(targets)},
    )
    options = dict(k_values=K_VALUES, top_k=10, corpus_chunk_size=70, dims=(16, 8), precisions=("float32", "float16"))
    exact = build_evaluator(task, search="exact", **options).compute({"query": queries, "document": corpus}, "")
    via_faiss = build_evaluator(task, search="faiss", **options).compute({"query": queries, "document": corpus}, "")
    assert 0 < exact["ndcg@10"] < 1
    for name, value in exact.items():
        if "seconds" not in name:
            assert via_faiss[name] == pytest.approx(value, abs=1e-12), name


# ------------------------------------------------------------------------------------------------------------
# STS
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("similarity", "key"), [("cos", "cosine"), ("dot", "dot")])
def test_sts_correlations_equal_scipy_with_ties(similarity, key):
    """Gold scores in steps of 0.5 and duplicated pairs (tied predictions): Spearman with mean ranks for ties,
    as scipy computes it in float64 (torchmetrics ranks in float32: 1e-6), Pearson to float64 round-off."""
    from scipy.stats import pearsonr, spearmanr

    gen = torch.Generator().manual_seed(3)
    n = 400
    left = torch.randn(n, 8, generator=gen)
    right = left + torch.randn(n, 8, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    right = right * torch.rand(n, 1, generator=gen) * 2  # unequal norms: cosine != dot
    left[200:260], right[200:260] = left[:60], right[:60]  # 60 duplicated pairs: tied similarities
    gold = (torch.randint(0, 11, (n,), generator=gen) / 2).tolist()  # 0, 0.5, ..., 5: ties everywhere
    task = STSTask(sentences1=[""] * n, sentences2=[""] * n, scores=gold)

    got = STSEvaluator(task, similarity=similarity).compute({"sentences1": left, "sentences2": right}, prefix="val/")

    a, b = left.double().numpy(), right.double().numpy()
    predicted = (a * b).sum(1)
    if similarity == "cos":
        predicted = predicted / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert len(np.unique(predicted)) <= n - 60 and len(np.unique(gold)) == 11
    assert set(got) == {f"val/spearman_{key}", f"val/pearson_{key}"}
    assert got[f"val/spearman_{key}"] / 100 == pytest.approx(spearmanr(predicted, gold).statistic, abs=1e-6)
    assert got[f"val/pearson_{key}"] / 100 == pytest.approx(pearsonr(predicted, gold).statistic, abs=1e-12)


# ------------------------------------------------------------------------------------------------------------
# build_evaluator: options checked against the evaluator classes' signatures
# ------------------------------------------------------------------------------------------------------------
RETRIEVAL = RetrievalTask(corpus={"d1": "a", "d2": "b"}, queries={"q1": "a"}, qrels={"q1": {"d1": 1}})
STS = STSTask(sentences1=["a", "b"], sentences2=["a", "c"], scores=[5.0, 1.0])


def test_unknown_option_message():
    known = (
        "batch_size, corpus_chunk_size, dims, ignore_identical_ids, k_values, pca, precisions, query_chunk_size, "
        "rescore_multiplier, rescore_with, search, similarity, top_k"
    )
    for task in (RETRIEVAL, STS):
        with pytest.raises(EvalOptionError, match=re.escape(f"unknown eval option 'foo' (known: {known})")) as err:
            build_evaluator(task, foo=1)
        assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_other_evaluators_option_set_away_from_its_default_message():
    message = (
        "eval.dims does not apply to an STS task (a retrieval option; STS options: similarity, batch_size): "
        "drop eval.dims=[64]"
    )
    with pytest.raises(EvalOptionError, match=re.escape(message)):
        build_evaluator(STS, dims=[64], batch_size=8)
    with pytest.raises(EvalOptionError, match=re.escape("eval.top_k does not apply to an STS task")):
        build_evaluator(STS, top_k=5)


def test_shared_eval_config_builds_both_evaluators():
    """The shared eval config holds retrieval defaults: an STS task drops them silently (lists equal to tuple
    defaults too), a retrieval task takes them all."""
    options = OmegaConf.to_container(OmegaConf.load(EVAL_CONFIG), resolve=True)
    options["similarity"] = "dot"  # what callers resolve `similarity: null` to: the model's similarity
    sts = build_evaluator(STS, **options)
    assert type(sts) is STSEvaluator and (sts.similarity, sts.batch_size) == ("dot", options["batch_size"])
    retrieval = build_evaluator(RETRIEVAL, **options)
    assert type(retrieval) is RetrievalEvaluator and retrieval.similarity == "dot"
    assert retrieval.k_values == tuple(options["k_values"])
    assert retrieval.corpus_chunk_size == options["corpus_chunk_size"]


def test_a_new_evaluator_registers_by_joining_EVALUATORS(monkeypatch):
    class PairTask:
        pass

    class PairEvaluator:
        task_kind = "pair"
        task_label = "a pair task"

        def __init__(self, task, margin: float = 0.5, batch_size: int = 64) -> None:
            self.margin, self.batch_size = margin, batch_size

    monkeypatch.setitem(E.EVALUATORS, PairTask, PairEvaluator)
    assert build_evaluator(PairTask(), margin=0.1, dims=None, k_values=[1, 3, 5, 10, 100]).margin == 0.1
    assert type(build_evaluator(RETRIEVAL, margin=0.5)) is RetrievalEvaluator  # at its default: dropped
    message = "eval.margin does not apply to a retrieval task (a pair option;"
    with pytest.raises(EvalOptionError, match=re.escape(message)):
        build_evaluator(RETRIEVAL, margin=0.2)


def test_option_value_messages():
    with pytest.raises(EvalOptionError, match=re.escape(
        "eval.similarity is null (the model's similarity): resolve it to the model's 'cos' or 'dot' before building"
    )):
        build_evaluator(STS, similarity=None)
    with pytest.raises(EvalOptionError, match=re.escape("eval.similarity must be one of cos, dot, got 'l2'")):
        build_evaluator(RETRIEVAL, similarity="l2")
    with pytest.raises(EvalOptionError, match=re.escape("eval.search must be one of exact, faiss, got 'hnsw'")):
        build_evaluator(RETRIEVAL, search="hnsw")
    message = "no evaluator for task type dict; known: ['RetrievalTask', 'STSTask']"
    with pytest.raises(TypeError, match=re.escape(message)):
        build_evaluator({})
