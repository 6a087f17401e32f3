"""Cross-encoder training and two-stage evaluation end to end on tiny data: train.py with module=cross_encoder
(retrieval and STS), the module's test metrics against the same evaluator run through ``predict`` on the saved
folder (and through sentence-transformers), run files, evaluate.py's first stages and reranking, exact errors."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from embedlab.data.collate import collate_examples
from embedlab.errors import ConfigError
from embedlab.evaluating import evaluate
from embedlab.evaluation.evaluators import EvalOptionError
from embedlab.evaluation.first_stage import BM25Retriever
from embedlab.evaluation.rerank import CrossEncoderSTSEvaluator, RerankEvaluator
from embedlab.evaluation.runs import read_run
from embedlab.models import CrossEncoder
from embedlab.models.errors import ModelLoadError
from embedlab.training import train
from tests.conftest import compose_config, make_examples

FAST = [
    "model=cross_encoder_tiny", "module=cross_encoder", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu", "logger=csv", "rerank.top_k=6", "module.val_top_k=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def reranker_run(tmp_path_factory, tiny_data_root):
    out = tmp_path_factory.mktemp("ce_run")
    cfg = compose_config(
        "train",
        FAST + ["loss=listwise", "data.batch_size=3", "data.val_fraction=0.3", "data.train.random_negatives=2", f"data.root={tiny_data_root}"],
        out,
    )
    metrics, objects = train(cfg)
    return out, metrics, objects


def test_reranker_training_writes_metrics_runs_and_model(reranker_run, tiny_data_root):
    out, metrics, objects = reranker_run
    written = json.loads((out / "metrics.json").read_text())
    for key in ("train/loss", "train/listwise_ce", "val/ndcg@10", "test/ndcg@10", "test/first_stage/ndcg@10",
                "test/rerank/seconds_per_query", "test/first_stage/seconds_per_query"):  # fmt: skip
        assert key in written, key
    # the test step's metrics == the same evaluator run through predict() on the saved folder
    model = CrossEncoder.from_pretrained(str(out / "model"), require_head=True)
    task = objects["datamodule"].test_task
    again = RerankEvaluator(task, BM25Retriever(), top_k=6, k_values=[1, 3, 5, 10, 100]).evaluate(model, show_progress_bar=False)
    for key, value in again.items():
        if not key.endswith("seconds_per_query"):
            assert written[key] == pytest.approx(value, abs=1e-6), key
    # run files: the final ranking and the first stage's, readable against the task
    final = read_run(out / "runs" / "test_run.trec", task)
    first = read_run(out / "runs" / "test_first_stage.trec", task)
    assert set(final) == set(task.queries) and all(set(final[q]) == set(first[q]) for q in final)
    assert sorted((out / "runs").glob("val_epoch*_run.trec"))  # every validation writes its run too


def test_saved_reranker_scores_equal_sentence_transformers(reranker_run):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    out, _, _ = reranker_run
    pairs = [(f"what do we know about topic {i}?", "A long document " * (i * 9 + 1)) for i in range(12)]
    ours = CrossEncoder.from_pretrained(str(out / "model")).predict(pairs, batch_size=5)
    theirs = torch.as_tensor(STCrossEncoder(str(out / "model"), device="cpu").predict(pairs, batch_size=5))
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_score_batch_groups_candidates_positive_first():
    """The module's (B, 1 + n) logits == one forward per (query, candidate) pair; labels 1 for the positive."""
    from embedlab.lightning import CrossEncoderModule
    from embedlab.losses import ListwiseSoftmaxLoss
    from embedlab.models import tiny_cross_encoder

    module = CrossEncoderModule(tiny_cross_encoder(seed=3), ListwiseSoftmaxLoss(), optimizer=torch.optim.SGD).eval()
    batch = collate_examples(make_examples(3, negatives=True))
    scored = module.score_batch(batch)
    with torch.no_grad():
        for i in range(3):
            for j, doc in enumerate([batch["positive"][i], batch["negatives"][i]]):
                single = module.model(module.model.tokenize([batch["query"][i]], [doc]))[0, 0]
                assert float(scored.scores[i, j]) == pytest.approx(float(single), abs=1e-5)
    assert scored.labels.tolist() == [[1.0, 0.0]] * 3


def test_cross_encoder_module_refuses_an_embedding_loss():
    from embedlab.lightning import CrossEncoderModule
    from embedlab.losses import MultipleNegativesRankingLoss
    from embedlab.models import tiny_cross_encoder

    with pytest.raises(ConfigError, match=r"^module=cross_encoder needs a score loss \(loss=bce\|listwise\|ranknet\|lambdaloss\|margin_mse\), got MultipleNegativesRankingLoss"):
        CrossEncoderModule(tiny_cross_encoder(), MultipleNegativesRankingLoss(), optimizer=torch.optim.SGD)


def test_sts_cross_encoder_training_and_evaluate(tmp_path, tiny_data_root):
    cfg = compose_config(
        "train", [o for o in FAST if not o.startswith("rerank.")] + ["experiment=cross_encoder_stsb", "model=cross_encoder_tiny", "trainer.max_epochs=1", f"data.root={tiny_data_root}"],
        tmp_path / "run",
    )
    metrics, objects = train(cfg)
    assert "val/spearman" in metrics and "test/spearman" in metrics and "train/bce" in metrics
    assert len(objects["datamodule"].train_examples) == 48  # 24 pairs, both orders
    # evaluate.py scoring the saved folder's STS pairs gives the module's test metrics
    ev = compose_config(
        "evaluate", ["data=stsb", f"data.root={tiny_data_root}", f"rerank.model={tmp_path / 'run' / 'model'}", "logger=none", "progress_bar=false"],
        tmp_path / "eval",
    )
    again, objs = evaluate(ev)
    assert isinstance(objs["evaluator"], CrossEncoderSTSEvaluator)
    # Lightning keeps logged values as float32 tensors: equal to float32 rounding of a value near 35
    assert again["test/spearman"] == pytest.approx(metrics["test/spearman"], abs=1e-5)
    assert again["test/pearson"] == pytest.approx(metrics["test/pearson"], abs=1e-5)


def test_evaluate_bm25_alone_and_reranked(reranker_run, tmp_path, tiny_data_root):
    out, metrics, _ = reranker_run
    base = [f"data.root={tiny_data_root}", "logger=none", "progress_bar=false"]
    bm25, _ = evaluate(compose_config("evaluate", base + ["retriever=bm25"], tmp_path / "bm25"))
    assert bm25["test/ndcg@10"] == bm25["test/first_stage/ndcg@10"] and "test/rerank/seconds_per_query" not in bm25
    assert (tmp_path / "bm25" / "test_run.trec").is_file()
    two, _ = evaluate(compose_config("evaluate", base + ["retriever=bm25", f"rerank.model={out / 'model'}", "rerank.top_k=6"], tmp_path / "two"))
    assert two["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    assert two["test/first_stage/ndcg@10"] == pytest.approx(metrics["test/first_stage/ndcg@10"], abs=1e-7)  # float32 log


def test_evaluate_dense_first_stage_is_the_bi_encoder(tmp_path, tiny_data_root, reranker_run):
    """retriever=dense with the bi-encoder `model`: its first-stage metrics == the one-stage evaluation."""
    out, _, _ = reranker_run
    base = [f"data.root={tiny_data_root}", "logger=none", "progress_bar=false", "model=tiny"]
    one, _ = evaluate(compose_config("evaluate", base, tmp_path / "one"))
    two, _ = evaluate(compose_config("evaluate", base + [f"rerank.model={out / 'model'}", "rerank.top_k=100"], tmp_path / "two"))
    for key in ("ndcg@10", "recall@100", "map@100"):
        assert two[f"test/first_stage/{key}"] == pytest.approx(one[f"test/{key}"], abs=1e-6), key
    # reranking the whole (24-document) candidate list cannot change recall@100
    assert two["test/recall@100"] == pytest.approx(two["test/first_stage/recall@100"])


def test_rerank_model_that_is_a_bi_encoder_folder_fails_exactly(tmp_path, tiny_data_root):
    from embedlab.models import tiny_bi_encoder

    folder = tiny_bi_encoder().save(tmp_path / "bi")
    cfg = compose_config("evaluate", [f"data.root={tiny_data_root}", "logger=none", "model=tiny", f"rerank.model={folder}"], tmp_path / "e")
    with pytest.raises(ModelLoadError, match=rf"^{folder} is not a cross-encoder"):
        evaluate(cfg)


def test_rerank_top_k_zero_fails_exactly(tmp_path, tiny_data_root):
    cfg = compose_config("evaluate", [f"data.root={tiny_data_root}", "logger=none", "retriever=bm25", "rerank.top_k=0"], tmp_path)
    with pytest.raises(EvalOptionError, match=r"^rerank.top_k must be an integer >= 1, got 0$"):
        evaluate(cfg)


def test_head_lr_multiplier_gives_the_new_head_a_larger_step():
    """The classifier and the pooler it reads get head_lr_multiplier x lr, the backbone the base lr (the group
    without an ``lr``); an explicit lr_multipliers prefix wins over the head factor."""
    from embedlab.lightning import CrossEncoderModule
    from embedlab.losses import ListwiseSoftmaxLoss
    from embedlab.models import tiny_cross_encoder

    def groups(**kwargs) -> list[tuple]:
        optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)
        module = CrossEncoderModule(tiny_cross_encoder(), ListwiseSoftmaxLoss(), optimizer=optimizer, **kwargs)
        names = {id(p): n.removeprefix("model.model.") for n, p in module.named_parameters()}
        if not isinstance(module._param_groups()[0], dict):  # no multiplier: plain parameter list, one group
            return [(1e-4, sorted(names.values()))]
        return sorted((g.get("lr", 1e-4), sorted(names[id(p)] for p in g["params"])) for g in module._param_groups())

    got = groups(head_lr_multiplier=50)
    assert [(pytest.approx(lr), names[:2] if lr < 1e-3 else names) for lr, names in got] == [
        (pytest.approx(1e-4), ["bert.embeddings.LayerNorm.bias", "bert.embeddings.LayerNorm.weight"]),
        (pytest.approx(5e-3), ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]),
        (pytest.approx(5e-3), ["classifier.bias", "classifier.weight"]),
    ]
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in got[0][1])
    explicit = groups(head_lr_multiplier=50, lr_multipliers={"model.model.classifier": 2})
    assert [lr for lr, _ in explicit] == [pytest.approx(1e-4), pytest.approx(2e-4), pytest.approx(5e-3)]
    assert explicit[1][1] == ["classifier.bias", "classifier.weight"]
    assert len(groups()) == 1  # 1.0: one group at the base lr


def test_bi_encoder_module_refuses_a_score_loss():
    from embedlab.lightning import BiEncoderModule
    from embedlab.losses import BinaryCrossEntropyLoss
    from embedlab.models import tiny_bi_encoder

    with pytest.raises(ConfigError, match=r"^loss BinaryCrossEntropyLoss scores \(query, document\) pairs: it trains cross-encoders"):
        BiEncoderModule(tiny_bi_encoder(), BinaryCrossEntropyLoss(), optimizer=torch.optim.SGD)


def test_run_file_of_a_bi_encoder_leaves_out_the_query_itself():
    """ignore_identical_ids: the run written is the one scored (query's own id dropped, top_k documents)."""
    from embedlab.data.records import RetrievalTask
    from embedlab.evaluation.evaluators import RetrievalEvaluator

    texts = {f"t{i}": f"text {i}" for i in range(6)}
    task = RetrievalTask(corpus=dict(texts), queries={"t0": "text 0", "t1": "text 1"}, qrels={"t0": {"t2": 1}, "t1": {"t3": 1}})
    evaluator = RetrievalEvaluator(task, k_values=[1, 3], top_k=3, ignore_identical_ids=True)
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(6, 8, generator=g)
    evaluator.compute({"query": docs[:2].clone(), "document": docs})  # each query is its own best match
    run = evaluator.last_runs["run"]
    assert all(q not in ranked and len(ranked) == 3 for q, ranked in run.items())
