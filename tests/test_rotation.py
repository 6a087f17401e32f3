"""MatryoshkaRotation: an orthogonal rotation fitted on frozen embeddings and folded into the projection.

Checked against references: the start is the documents' PCA (an SVD), full-width similarities and the
full-width loss term do not move, the Matryoshka objective recomputed through the rotated model's forward
falls, validation scores equal the evaluation grid's on the rotated model, the saved folder loads in
sentence-transformers with the same embeddings, and train() tests the rotated model.
"""

from __future__ import annotations

import csv

import pytest
import torch

from embedlab.data.collate import collate_examples
from embedlab.data.records import Example, RetrievalTask, STSTask
from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator
from embedlab.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from embedlab.losses.base import EmbeddedBatch
from embedlab.models import BiEncoder, tiny_bi_encoder
from embedlab.models.dense import Dense
from embedlab.rotation import MatryoshkaRotation, apply_rotation
from embedlab.models.checkpoint import safe_load
from embedlab.training import train
from tests.conftest import TOPICS, compose_config

DIMS = [32, 8, 4]
EXAMPLES = [
    Example(
        query=f"what about {name}?", positive=text, negatives=[TOPICS[(i + 3) % len(TOPICS)][1]],
        query_id=f"q{i}", positive_id=f"d{i}", negative_ids=[f"d{(i + 3) % len(TOPICS)}"],
    )
    for i, (name, text) in enumerate(TOPICS)
]
TASK = RetrievalTask(
    corpus={f"d{i}": text for i, (_, text) in enumerate(TOPICS)},
    queries={f"q{i}": f"tell me about {name}" for i, (name, _) in enumerate(TOPICS)},
    qrels={f"q{i}": {f"d{i}": 1} for i in range(len(TOPICS))},
)


def _loss() -> MatryoshkaLoss:
    return MatryoshkaLoss(MultipleNegativesRankingLoss(scale=20.0), dims=DIMS)


def _objective(model, loss) -> dict[str, torch.Tensor]:
    """The Matryoshka loss of all examples in one batch, embedded through ``model``'s forward."""
    batch = collate_examples(EXAMPLES)
    b = len(EXAMPLES)
    with torch.no_grad():
        q = model.encode(batch["query"], "query")
        docs = model.encode(batch["positive"] + batch["negatives"], "document")
        return loss(EmbeddedBatch(query=q, positive=docs[:b], negatives=docs[b:].view(b, 1, -1),
                                  query_ids=batch["query_ids"], positive_ids=batch["positive_ids"],
                                  negative_ids=batch["negative_ids"], extras={"normalized": True}))


def test_start_is_pca_of_the_documents():
    model = tiny_bi_encoder(seed=3, projection_dim=32)
    result = MatryoshkaRotation(_loss(), epochs=0).fit(model, EXAMPLES)
    docs = list(dict.fromkeys(t for e in EXAMPLES for t in (e.positive, *e.negatives)))
    emb = model.encode(docs, "document").double()
    _, s, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    k = int((s > 1e-6 * s[0]).sum()) - 1  # axes with distinct, non-zero variance
    agreement = (result.rotation.double()[:k] * vh[:k]).sum(1).abs()  # signs are arbitrary
    torch.testing.assert_close(agreement, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-4)
    assert result.best_epoch == 0 and len(result.history) == 1
    identity = MatryoshkaRotation(_loss(), epochs=0, init="identity").fit(model, EXAMPLES).rotation
    torch.testing.assert_close(identity, torch.eye(32))


def test_fit_lowers_the_objective_and_keeps_the_full_width():
    model = tiny_bi_encoder(seed=4, projection_dim=32)
    texts = [t for _, t in TOPICS]
    before_emb = model.encode(texts)
    loss = _loss()
    before = _objective(model, loss)
    result = MatryoshkaRotation(loss, epochs=30, batch_size=4, lr=1e-2).fit(model, EXAMPLES)
    r = result.rotation
    torch.testing.assert_close(r @ r.T, torch.eye(32), rtol=0, atol=1e-5)
    assert result.best_epoch == 30  # no validation: the last epoch
    apply_rotation(model, r)
    after_emb = model.encode(texts)
    torch.testing.assert_close(after_emb, before_emb @ r.T, rtol=0, atol=1e-5)  # folded: the model outputs R e
    torch.testing.assert_close(after_emb @ after_emb.T, before_emb @ before_emb.T, rtol=0, atol=1e-5)
    after = _objective(model, loss)
    torch.testing.assert_close(after["mnrl@dim32"], before["mnrl@dim32"], rtol=0, atol=1e-5)  # full width: unchanged
    assert after["loss"] < before["loss"] - 0.1  # the truncated dims got better
    assert after["mnrl@dim4"] < before["mnrl@dim4"]
    losses = [row["loss"] for row in result.history[1:]]
    assert losses[-1] < losses[0]


def test_selection_by_validation_matches_the_evaluation_grid():
    model = tiny_bi_encoder(seed=5, projection_dim=32)
    evaluator = RetrievalEvaluator(TASK, k_values=(10,), dims=DIMS)
    result = MatryoshkaRotation(_loss(), epochs=4, batch_size=4, lr=1e-2).fit(model, EXAMPLES, evaluator)
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3, 4]
    means = [sum(row[f"val/ndcg@10@dim{d}"] for d in DIMS) / len(DIMS) for row in result.history]
    assert result.best_epoch == max(range(5), key=lambda i: (means[i], -i))  # first best
    metrics = result.metrics()
    assert metrics["rotation/best_epoch"] == result.best_epoch
    apply_rotation(model, result.rotation)
    reference = evaluator.evaluate(model, prefix="val/", show_progress_bar=False)
    for d in DIMS:
        assert metrics[f"rotation/val/ndcg@10@dim{d}"] == pytest.approx(reference[f"val/ndcg@10@dim{d}"], abs=1e-6)


def test_rotation_added_to_a_model_without_projection_loads_in_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    model = tiny_bi_encoder(seed=6)
    assert model.dense is None
    texts = [t for _, t in TOPICS]
    before = model.encode(texts)
    r = MatryoshkaRotation(_loss(), epochs=2, batch_size=4, lr=1e-2).fit(model, EXAMPLES).rotation
    apply_rotation(model, r)
    assert model.dense is not None and model.dense.linear.bias is None
    torch.testing.assert_close(model.encode(texts), before @ r.T, rtol=0, atol=1e-5)
    model.save(tmp_path / "m")
    reloaded = BiEncoder.from_pretrained(str(tmp_path / "m")).encode(texts)
    st = torch.as_tensor(SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(texts))
    torch.testing.assert_close(reloaded, before @ r.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(st, reloaded, rtol=0, atol=1e-5)


def test_fold_keeps_a_projection_bias():
    model = tiny_bi_encoder(seed=7)
    model.dense = Dense(32, 32, bias=True)
    with torch.no_grad():
        model.dense.linear.bias.normal_()
    texts = [t for _, t in TOPICS]
    before = model.encode(texts)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    apply_rotation(model, q)
    torch.testing.assert_close(model.encode(texts), before @ q.T, rtol=0, atol=1e-5)


def test_errors():
    mnrl = MultipleNegativesRankingLoss()
    with pytest.raises(ValueError, match=r"post_fit.rotation.loss must be a Matryoshka loss \(with dims\), got MultipleNegativesRankingLoss"):
        MatryoshkaRotation(mnrl)
    with pytest.raises(ValueError, match=r"post_fit.rotation.init must be one of pca, identity, got 'random'"):
        MatryoshkaRotation(_loss(), init="random")
    with pytest.raises(ValueError, match=r"rotation needs epochs >= 0, batch_size >= 1 and lr > 0, got 1, 0 and 0.001"):
        MatryoshkaRotation(_loss(), epochs=1, batch_size=0)
    model = tiny_bi_encoder(seed=0)
    with pytest.raises(ValueError, match=r"rotation: no training examples to fit on"):
        MatryoshkaRotation(_loss()).fit(model, [])
    wide = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[64, 8])
    with pytest.raises(ValueError, match=r"rotation: matryoshka dims \[64\] exceed the model's embedding size 32"):
        MatryoshkaRotation(wide).fit(model, EXAMPLES)
    sts = STSEvaluator(STSTask(["a"], ["b"], [1.0]))
    with pytest.raises(ValueError, match=r"rotation selects its epoch by retrieval nDCG@10; the validation set is STSEvaluator"):
        MatryoshkaRotation(_loss()).fit(model, EXAMPLES, sts)
    no_ten = RetrievalEvaluator(TASK, k_values=(1, 5))
    with pytest.raises(ValueError, match=r"rotation selects its epoch by validation nDCG@10: eval.k_values must include 10, got \[1, 5\]"):
        MatryoshkaRotation(_loss()).fit(model, EXAMPLES, no_ten)
    with pytest.raises(ValueError, match=r"rotation of shape \(8, 8\) does not match the model's 32-d embeddings"):
        apply_rotation(model, torch.eye(8))
    model.dense = Dense(32, 32, activation_function="torch.nn.modules.activation.Tanh")
    with pytest.raises(ValueError, match=r"cannot fold a rotation into a projection followed by torch.nn.modules.activation.Tanh"):
        apply_rotation(model, torch.eye(32))


def test_train_tests_the_rotated_best_model(tmp_path, tiny_data_root):
    """post_fit=matryoshka_rotation in train(): the rotation is fitted on the best checkpoint, the saved and tested model
    is that checkpoint rotated, full-width test scores equal the unrotated checkpoint's, and the history and
    rotation/ metrics are written and logged."""
    overrides = [
        "model=tiny", "model.projection_dim=32", "post_fit=matryoshka_rotation", "post_fit.rotation.loss.dims=[32,8]",
        "post_fit.rotation.epochs=3", "post_fit.rotation.batch_size=4", "trainer.max_epochs=1", "data.batch_size=4",
        "data.val_fraction=0.34", f"data.root={tiny_data_root}", "logger=csv", "trainer.accelerator=cpu",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    metrics, objects = train(cfg)
    assert {"rotation/best_epoch", "rotation/val/ndcg@10@dim32", "rotation/val/ndcg@10@dim8"} <= set(metrics)
    with (tmp_path / "rotation_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    best = rows[int(metrics["rotation/best_epoch"])]
    assert float(best["val/ndcg@10@dim8"]) == pytest.approx(metrics["rotation/val/ndcg@10@dim8"])

    rotated = objects["module"].model
    plain = tiny_bi_encoder(seed=cfg.seed, projection_dim=32)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in safe_load(objects["best_checkpoint"])["state_dict"].items()})
    unrotated = objects["module"].test_evaluator.evaluate(plain, show_progress_bar=False)
    assert metrics["test/ndcg@10"] == pytest.approx(unrotated["test/ndcg@10"], abs=1e-6)  # full width: unchanged
    texts = [t for _, t in TOPICS]
    r = rotated.dense.linear.weight.detach() @ torch.linalg.pinv(plain.dense.linear.weight.detach())
    torch.testing.assert_close(r @ r.T, torch.eye(32), rtol=0, atol=1e-4)  # saved = checkpoint rotated
    saved = BiEncoder.from_pretrained(str(tmp_path / "model")).encode(texts)
    torch.testing.assert_close(saved, rotated.encode(texts), rtol=0, atol=1e-5)

    logged = {}
    for path in tmp_path.glob("csv/**/metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                logged.update({k: v for k, v in row.items() if v})
    assert float(logged["rotation/best_epoch"]) == metrics["rotation/best_epoch"]
