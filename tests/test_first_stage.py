"""First-stage retrievers against references: a naive float64 BM25, a hand-computed reciprocal-rank fusion,
brute-force float64 cosine and the retrieval evaluator for dense retrieval; run files; the retriever configs."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedlab.data import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.evaluation.first_stage import (
    BM25Retriever,
    DenseRetriever,
    HybridRetriever,
    RunFileRetriever,
    reciprocal_rank_fusion,
)
from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.runs import top_k_run, write_trec_run
from embedlab.models import tiny_bi_encoder
from tests.conftest import compose_config, CONFIG_DIR

# corpus order is not id order; "dup_b" (position 4) and "dup_a" (position 6) are the same text
CORPUS = {
    "z1": "The cat sat on the mat. The cat is black.",
    "y2": "A dog chased the cat across the garden, and the dog barked.",
    "x3": "Quantum mechanics describes particles; particles behave like waves.",
    "w4": "Cats and dogs: a cat, a dog, another cat and a very long sentence about many other unrelated things here",
    "dup_b": "Solar panels convert sunlight into electricity.",
    "v5": "Electricity prices rose as demand for electricity grew in a cold winter.",
    "dup_a": "Solar panels convert sunlight into electricity.",
    "u6": "I x y",  # no token of two or more characters: an empty document
}
QUERIES = {
    "q_cat": "cat dog",
    "q_rep": "cat cat mat",  # a repeated query token counts twice
    "q_solar": "solar electricity",
    "q_none": "zebra unicorn",  # no indexed token: no candidate
    "q_mixed": "particles waves electricity cat",
}


def task() -> RetrievalTask:
    return RetrievalTask(corpus=dict(CORPUS), queries=dict(QUERIES), qrels={"q_cat": {"z1": 1}}, name="toy")


def tokens(text: str) -> list[str]:
    return re.findall(r"(?u)\b\w\w+\b", text.lower())  # bm25s' (scikit-learn's) pattern, no stopwords/stemming


def naive_bm25(corpus: dict[str, str], query: str, k1: float, b: float) -> dict[str, float]:
    """Lucene BM25 in float64, straight from the formula: every document holding at least one query token."""
    docs = {doc_id: tokens(text) for doc_id, text in corpus.items()}
    n = len(docs)
    avgdl = sum(len(t) for t in docs.values()) / n
    df = Counter(t for doc in docs.values() for t in set(doc))
    out = {}
    for doc_id, doc in docs.items():
        tf = Counter(doc)
        terms = [t for t in tokens(query) if tf[t] > 0]
        if not terms:
            continue
        out[doc_id] = sum(
            math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] / (tf[t] + k1 * (1 - b + b * len(doc) / avgdl))
            for t in terms
        )
    return out


@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (0.9, 0.4), (1.2, 1.0)])
def test_bm25_equals_naive_lucene_bm25(k1, b):
    retriever = BM25Retriever(k1=k1, b=b, stopwords=None, stemmer=None)
    position = {doc_id: i for i, doc_id in enumerate(CORPUS)}
    for top_k in (100, 3, 1):
        run = retriever.retrieve(task(), top_k, show_progress_bar=False)
        assert list(run) == list(QUERIES)
        for qid, query in QUERIES.items():
            ref = naive_bm25(CORPUS, query, k1, b)
            # reference ranking: score descending, ties by corpus position
            expected = sorted(ref, key=lambda d: (-ref[d], position[d]))[:top_k]
            assert list(run[qid]) == expected, (qid, top_k)
            for doc_id in expected:
                assert run[qid][doc_id] == pytest.approx(ref[doc_id], abs=1e-5, rel=1e-6)
    full = retriever.retrieve(task(), 100, show_progress_bar=False)
    assert full["q_none"] == {}  # nothing matches: no candidate, not 8 zero-score documents
    assert set(full["q_solar"]) == {"dup_b", "v5", "dup_a"}  # only documents holding a query token
    assert all(score > 0 for docs in full.values() for score in docs.values())
    # identical documents tie; the cut keeps the earlier corpus position, not the smaller id
    solar = retriever.retrieve(task(), 1, show_progress_bar=False)["q_solar"]
    assert full["q_solar"]["dup_b"] == full["q_solar"]["dup_a"] and list(solar) == ["dup_b"]


def test_bm25_stemming_and_stopwords():
    corpus = {"d1": "The runner keeps running", "d2": "Runs are counted here", "d3": "the the the"}
    t = RetrievalTask(corpus=corpus, queries={"q1": "run", "q2": "the"}, qrels={})
    plain = BM25Retriever(stemmer=None, stopwords=None).retrieve(t, 10, show_progress_bar=False)
    assert plain["q1"] == {}  # "run" is no token of the corpus
    assert list(plain["q2"]) == ["d3", "d1"]
    stemmed = BM25Retriever(stemmer="english", stopwords="en").retrieve(t, 10, show_progress_bar=False)
    assert set(stemmed["q1"]) == {"d1", "d2"}  # running / runs -> run (Snowball); runner stays runner
    assert stemmed["q2"] == {}  # "the" is a stopword
    custom = BM25Retriever(stemmer=None, stopwords=["counted", "here"]).retrieve(t, 10, show_progress_bar=False)
    assert list(custom["q2"]) == ["d3", "d1"]


def test_bm25_index_is_cached_per_corpus_object():
    retriever = BM25Retriever()
    t = task()
    retriever.retrieve(t, 5, show_progress_bar=False)
    index = retriever._index[2]
    retriever.retrieve(RetrievalTask(t.corpus, {"q": "cat"}, {}), 5, show_progress_bar=False)
    assert retriever._index[2] is index  # same corpus object: reused
    other = RetrievalTask({"a": "cat food"}, {"q": "cat"}, {})
    assert list(retriever.retrieve(other, 5, show_progress_bar=False)["q"]) == ["a"]
    assert retriever._index[2] is not index
    # a corpus without a single token of two or more characters: nothing to index, no candidate
    empty = RetrievalTask({"a": "x y"}, {"q": "x"}, {})
    assert BM25Retriever().retrieve(empty, 5, show_progress_bar=False) == {"q": {}}


def test_bm25_config_errors():
    with pytest.raises(ConfigError, match=r"^retriever.method must be one of lucene, robertson, atire, bm25l, "
                       r"bm25\+, got 'okapi'$"):
        BM25Retriever(method="okapi")
    with pytest.raises(ConfigError, match=r"^retriever.stemmer must be null or one of PyStemmer's languages "
                       r"\(arabic, .*english.*\), got 'klingon'$"):
        BM25Retriever(stemmer="klingon")
    with pytest.raises(ConfigError, match=r"^retriever.stopwords 'xx' is not a language bm25s knows"):
        BM25Retriever(stopwords="xx")
    with pytest.raises(ConfigError, match=r"^retriever.b must be in \[0, 1\], got 1.5$"):
        BM25Retriever(b=1.5)
    with pytest.raises(ConfigError, match=r"^top_k must be >= 1, got 0$"):
        BM25Retriever().retrieve(task(), 0)


# ----------------------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------------------
RUN_A = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 1.0}}
RUN_B = {"q1": {"c": 0.9, "d": 0.8, "a": 0.1}, "q2": {"y": 5.0}, "q3": {"p": 1.0, "q": 1.0}}


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion({"A": RUN_A, "B": RUN_B}, {"A": 1.0, "B": 0.5}, k=60)
    assert fused["q1"] == pytest.approx(
        {"a": 1 / 61 + 0.5 / 63, "b": 1 / 62, "c": 1 / 63 + 0.5 / 61, "d": 0.5 / 62}, abs=1e-15
    )
    assert fused["q2"] == pytest.approx({"x": 1 / 61, "y": 0.5 / 61}, abs=1e-15)
    # tied input scores rank by doc id descending (trec_eval): q first, p second
    assert fused["q3"] == pytest.approx({"q": 0.5 / 61, "p": 0.5 / 62}, abs=1e-15)
    equal = reciprocal_rank_fusion({"A": RUN_A, "B": RUN_B}, None, k=0)
    assert equal["q1"]["a"] == pytest.approx(1 / 1 + 1 / 3) and equal["q2"] == {"x": 1.0, "y": 1.0}
    with pytest.raises(ConfigError, match=r"^retriever.weights must give one weight per retriever \(A, B\), got A$"):
        reciprocal_rank_fusion({"A": RUN_A, "B": RUN_B}, {"A": 1.0})


class FixedRetriever:
    """A stand-in first stage: the top ``top_k`` of a fixed run; records the depths asked for."""

    def __init__(self, name, run):
        self.name, self.run, self.calls = name, run, []

    def models(self):
        return []

    def retrieve(self, task, top_k, show_progress_bar=True):
        self.calls.append(top_k)
        return top_k_run(self.run, top_k)


def test_hybrid_retriever_fuses_cuts_and_breaks_ties_by_doc_id():
    a, b = FixedRetriever("A", RUN_A), FixedRetriever("B", RUN_B)
    t = RetrievalTask({}, {"q1": "", "q2": "", "q4": ""}, {})
    hybrid = HybridRetriever({"A": a, "B": b}, weights={"A": 1.0, "B": 1.0})
    run = hybrid.retrieve(t, 2, show_progress_bar=False)
    assert a.calls == b.calls == [100]  # depth null: max(top_k, 100)
    # q1: a = 1/61 + 1/63 and c = 1/63 + 1/61 tie above b = d = 1/62; the tie goes by doc id descending: c, a
    assert list(run) == ["q1", "q2", "q4"]
    assert list(run["q1"]) == ["c", "a"] and run["q1"]["a"] == run["q1"]["c"]
    assert list(run["q2"]) == ["y", "x"]  # tie 1/61 each: y before x
    assert run["q4"] == {}  # in no run
    # depth 1: each retriever contributes its first document only
    run = HybridRetriever({"A": a, "B": b}, k=60, depth=1).retrieve(t, 5, show_progress_bar=False)
    assert a.calls[-1] == 1 and run["q1"] == pytest.approx({"a": 1 / 61, "c": 1 / 61})


# ----------------------------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_bi_encoder(seed=0)


def test_dense_retriever_equals_brute_force_cosine_and_the_evaluator(tiny):
    t = task()
    top_k = 3
    run = DenseRetriever(tiny, batch_size=3).retrieve(t, top_k, show_progress_bar=False)
    # reference: float64 cosine of every query with every document, stable sort (ties by corpus position)
    q = tiny.encode(list(t.queries.values()), kind="query").double()
    d = tiny.encode(list(t.corpus.values()), kind="document").double()
    scores = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(d, dim=1).T  # (Q, N)
    doc_ids = list(t.corpus)
    for row, qid in enumerate(t.queries):
        order = np.argsort(-scores[row].numpy(), kind="stable")[:top_k]
        assert list(run[qid]) == [doc_ids[j] for j in order]
        assert [run[qid][doc_ids[j]] for j in order] == pytest.approx(scores[row, order].tolist(), abs=1e-6)
    # the evaluator's search gives the same metrics from the same model
    evaluator = RetrievalEvaluator(t, k_values=(1, 3), top_k=top_k, batch_size=3)
    assert retrieval_metrics(run, t.qrels, k_values=(1, 3)) == {
        key: value for key, value in evaluator.evaluate(tiny, show_progress_bar=False).items() if "@" in key
    }
    dot = DenseRetriever(tiny, similarity="dot").retrieve(t, top_k, show_progress_bar=False)
    raw = q @ d.T
    assert dot["q_cat"] == pytest.approx({doc_ids[j]: raw[0, j].item() for j in raw[0].argsort(descending=True)[:3]})
    with pytest.raises(ConfigError, match=r"^retriever.search must be one of exact, faiss, got 'hnsw'$"):
        DenseRetriever(tiny, search="hnsw")


# ----------------------------------------------------------------------------------------------------------------
# run files
# ----------------------------------------------------------------------------------------------------------------
def test_run_file_retriever_with_missing_queries(tmp_path, caplog):
    t = task()
    path = write_trec_run({"q_cat": {"z1": 2.0, "y2": 3.0, "w4": 1.0}, "q_solar": {"v5": 0.5}}, tmp_path / "r.trec")
    retriever = RunFileRetriever(path)
    with caplog.at_level(logging.WARNING, logger="embedlab.evaluation.first_stage"):
        run = retriever.retrieve(t, 2, show_progress_bar=False)
        again = retriever.retrieve(t, 1, show_progress_bar=False)
    assert run == {"q_cat": {"y2": 3.0, "z1": 2.0}, "q_rep": {}, "q_solar": {"v5": 0.5}, "q_none": {}, "q_mixed": {}}
    assert again["q_cat"] == {"y2": 3.0}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"{path}: 3 of the task's 5 queries are not in the run file; they get no candidates"]


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def retriever_config(name: str, tmp_path, **values):
    """``retriever=<name>`` composed by evaluate.py's config with the tiny bi-encoder as ``model`` (``${model}``)."""
    overrides = ["model=tiny", f"retriever={name}"] + [f"retriever.{k}={v}" for k, v in values.items()]
    return compose_config("evaluate", overrides, tmp_path).retriever


@pytest.mark.parametrize("name", ["dense", "bm25", "hybrid", "run"])
def test_every_retriever_config_instantiates_and_retrieves(name, tmp_path, tiny):
    t = task()
    values = {"path": str(write_trec_run({"q_cat": {"z1": 1.0}}, tmp_path / "r.trec"))} if name == "run" else {}
    retriever = instantiate(retriever_config(name, tmp_path, **values))
    expected_type = {"dense": DenseRetriever, "bm25": BM25Retriever, "hybrid": HybridRetriever,
                     "run": RunFileRetriever}[name]  # fmt: skip
    assert type(retriever) is expected_type and retriever.name == name
    assert len(retriever.models()) == (1 if name in ("dense", "hybrid") else 0)
    run = retriever.retrieve(t, 2, show_progress_bar=False)
    assert list(run) == list(t.queries) and all(len(docs) <= 2 for docs in run.values())
    if name == "bm25":
        assert (retriever.k1, retriever.b, retriever.method, retriever.stopwords, retriever.stemmer) == (
            1.5, 0.75, "lucene", "en", "english"
        )
        assert run == BM25Retriever().retrieve(t, 2, show_progress_bar=False)  # the file says the defaults
    if name == "hybrid":
        assert set(retriever.retrievers) == {"dense", "bm25"} and retriever.weights == {"dense": 1.0, "bm25": 1.0}
        assert (retriever.k, retriever.depth) == (60, None)
        assert isinstance(retriever.retrievers["bm25"], BM25Retriever)
        assert retriever.models() == [retriever.retrievers["dense"].model]  # what an entry point moves to a device
    if name == "dense":
        # the entry point passes its own model object instead of the ${model} config
        given = instantiate(OmegaConf.load(CONFIG_DIR / "retriever" / "dense.yaml"), model=tiny)
        assert given.model is tiny
        assert given.retrieve(t, 2, show_progress_bar=False) == DenseRetriever(tiny).retrieve(
            t, 2, show_progress_bar=False
        )
