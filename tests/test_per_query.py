"""Per-query files: every evaluation writes its units, and the units reproduce the metrics.

References: pytrec_eval per query (retrieval), scipy's spearmanr / pearsonr on the pairs (STS), and the
``metrics.json`` of the same run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from embedlab.data.errors import DataError
from embedlab.data.records import RetrievalTask, STSTask
from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator
from embedlab.evaluation.per_query import read_per_query, unit_statistic, write_per_query
from embedlab.evaluation.rerank import CrossEncoderSTSEvaluator, RerankEvaluator
from embedlab.training import train
from tests.conftest import compose_config, pytrec_per_query


def _task(n_queries: int = 7, n_docs: int = 30, seed: int = 0) -> tuple[RetrievalTask, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    corpus = {f"d{i}": f"doc {i}" for i in range(n_docs)}
    queries = {f"q{i}": f"query {i}" for i in range(n_queries)}
    qrels = {f"q{i}": {f"d{(3 * i + j) % n_docs}": 1 + j % 2 for j in range(1 + i % 3)} for i in range(n_queries)}
    emb = {"query": torch.randn(n_queries, 8, generator=g), "document": torch.randn(n_docs, 8, generator=g)}
    return RetrievalTask(corpus=corpus, queries=queries, qrels=qrels), emb


def test_retrieval_units_equal_pytrec_eval_and_average_to_the_metrics():
    task, emb = _task()
    evaluator = RetrievalEvaluator(task, k_values=(1, 5, 10), dims=[4], precisions=["float32", "int8"])
    metrics = evaluator.compute(emb, prefix="test/")
    units = evaluator.last_per_query
    reference = pytrec_per_query(evaluator.last_runs["run"], task.qrels, (1, 5, 10))
    assert list(units) == list(task.qrels)
    for qid, row in reference.items():
        for name, value in row.items():
            assert units[qid][f"test/{name}"] == pytest.approx(value, abs=1e-12), (qid, name)
    # every per-query field averages to its metric, the grid cells' included
    fields = [k for k in units["q0"]]
    assert "test/ndcg@10@dim4" in fields and "test/ndcg@10@dim4@int8" in fields
    for name in fields:
        assert unit_statistic(units, name) == pytest.approx(metrics[name], abs=1e-12), name


def test_rerank_units_cover_both_stages():
    task, emb = _task()

    class Fixed:  # a first stage returning a fixed ranking
        def retrieve(self, task, top_k, show_progress_bar=True):
            return {q: {d: float(-i) for i, d in enumerate(list(task.corpus)[:top_k])} for q in task.queries}

    evaluator = RerankEvaluator(task, first_stage=Fixed(), top_k=10, k_values=(1, 10))
    plan = evaluator.score_plan()
    scores = {"pairs": torch.linspace(1, 0, len(plan[0].pairs)).flip(0)}
    metrics = evaluator.compute(scores, prefix="test/")
    for name in ("test/ndcg@10", "test/first_stage/ndcg@10", "test/mrr@1", "test/first_stage/recall@10"):
        assert unit_statistic(evaluator.last_per_query, name) == pytest.approx(metrics[name], abs=1e-12)


@pytest.mark.parametrize("cross_encoder", [False, True])
def test_sts_units_reproduce_spearman_and_pearson(cross_encoder):
    g = torch.Generator().manual_seed(3)
    gold = [float(x) for x in torch.randint(0, 6, (40,), generator=g)]  # ties on purpose
    task = STSTask(sentences1=[f"a{i}" for i in range(40)], sentences2=[f"b{i}" for i in range(40)], scores=gold)
    if cross_encoder:
        evaluator = CrossEncoderSTSEvaluator(task)
        metrics = evaluator.compute({"pairs": torch.rand(40, generator=g)}, prefix="test/")
        names = {"spearman": "test/spearman", "pearson": "test/pearson"}
    else:
        evaluator = STSEvaluator(task)
        metrics = evaluator.compute({"sentences1": torch.randn(40, 6, generator=g), "sentences2": torch.randn(40, 6, generator=g)})
        names = {"spearman": "test/spearman_cosine", "pearson": "test/pearson_cosine"}
    units = evaluator.last_per_query
    pred = np.array([units[str(i)]["prediction"] for i in range(40)])
    assert [units[str(i)]["gold"] for i in range(40)] == gold
    assert unit_statistic(units, names["spearman"]) == pytest.approx(100 * spearmanr(gold, pred).statistic, abs=1e-9)
    assert unit_statistic(units, names["pearson"]) == pytest.approx(100 * pearsonr(gold, pred).statistic, abs=1e-9)
    assert unit_statistic(units, names["spearman"]) == pytest.approx(metrics[names["spearman"]], abs=1e-4)


def test_per_query_file_round_trip_and_exact_errors(tmp_path):
    units = {"q1": {"test/ndcg@10": 0.25, "test/recall@100": 1.0}, "q 2": {"test/ndcg@10": 1 / 3, "test/recall@100": 0.5}}
    path = write_per_query(units, tmp_path / "runs" / "test_per_query.jsonl")
    assert read_per_query(path) == units
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "test/ndcg@10": 0.5}\n{"test/ndcg@10": 0.5}\n')
    with pytest.raises(DataError, match=rf"^{bad} line 2: a per-query line needs an \"id\" field$"):
        read_per_query(bad)
    bad.write_text('{"id": "q1", "test/ndcg@10": "high"}\n')
    with pytest.raises(DataError, match=rf"^{bad} line 1: field 'test/ndcg@10' is not a number$"):
        read_per_query(bad)
    with pytest.raises(KeyError, match="no per-query 'test/map@10' for test/map@10"):
        unit_statistic(units, "test/map@10")


def test_train_writes_per_query_files_that_reproduce_metrics_json(tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", "trainer.max_epochs=2", "data.batch_size=4", "data.val_fraction=0.3",
                                   "trainer.accelerator=cpu", "logger=none", "save_model=false", f"data.root={tiny_data_root}"], tmp_path)
    metrics, _ = train(cfg)
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.glob("*_per_query.jsonl")) == [
        "test_per_query.jsonl", "val_epoch000_per_query.jsonl", "val_epoch001_per_query.jsonl"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    test_units = read_per_query(runs / "test_per_query.jsonl")
    for name in ("test/ndcg@10", "test/recall@100", "test/mrr@10"):
        assert unit_statistic(test_units, name) == pytest.approx(written[name], abs=1e-6)
    best = f"val_epoch{int(written['val/best_epoch']):03d}_per_query.jsonl"
    assert unit_statistic(read_per_query(runs / best), "val/ndcg@10") == pytest.approx(metrics["val/ndcg@10"], abs=1e-6)
