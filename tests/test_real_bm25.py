"""BM25 on real SciFact through evaluate.py against bm25s used directly (slow: needs the shared data folder).

The reference is bm25s's own pipeline written out here (tokenize with English stopwords and a Snowball stemmer,
index, retrieve the top 100), scored by pytrec_eval: evaluate.py's ``retriever=bm25`` must give the same
nDCG@10 and Recall@100, and its run file must hold the same documents.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedlab.data.readers import load_beir
from embedlab.evaluating import evaluate
from embedlab.evaluation.runs import read_run
from tests.conftest import compose_config, pytrec_per_query

pytestmark = pytest.mark.slow


def test_evaluate_bm25_equals_bm25s_on_scifact(shared_dir, tmp_path):
    import bm25s
    import Stemmer

    task = load_beir(shared_dir / "data" / "scifact", split="test")
    doc_ids, query_ids = list(task.corpus), list(task.queries)
    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    index.index(bm25s.tokenize([task.corpus[d] for d in doc_ids], stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([task.queries[q] for q in query_ids], stopwords="en", stemmer=stemmer, show_progress=False)
    found, scores = index.retrieve(tokens, k=100, show_progress=False)
    reference = {
        q: {doc_ids[j]: float(s) for j, s in zip(found[i], scores[i]) if s > 0} for i, q in enumerate(query_ids)
    }
    per_query = pytrec_per_query(reference, task.qrels, (10, 100))
    expected = {m: np.mean([row[m] for row in per_query.values()]) for m in ("ndcg@10", "recall@100")}

    cfg = compose_config("evaluate", [f"data.root={shared_dir / 'data'}", "retriever=bm25", "logger=none", "progress_bar=false"], tmp_path)
    metrics, _ = evaluate(cfg)
    assert metrics["test/ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
    assert metrics["test/recall@100"] == pytest.approx(expected["recall@100"], abs=1e-4)
    assert metrics["test/ndcg@10"] > 0.68  # stemmed BM25 on SciFact: bm25s publishes 0.687
    run = read_run(tmp_path / "test_run.trec", task)
    assert set(run) == {q for q, d in reference.items() if d}
    for q, docs in run.items():
        # the same documents, up to which of several equal scores at the 100th place made the cut
        cut = min(reference[q].values())
        assert all(abs(s - cut) < 1e-4 for d, s in docs.items() if d not in reference[q]), q
        assert all(abs(s - cut) < 1e-4 for d, s in reference[q].items() if d not in docs), q
