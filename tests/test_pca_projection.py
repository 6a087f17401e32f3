"""PCAProjectionInit: the projection becomes the training texts' principal axes (checked against an SVD), a
square one is a rotation (full-width similarities unchanged), and train() applies it before the first step."""

from __future__ import annotations

import pytest
import torch

from embedlab.data.records import Example
from embedlab.lightning.callbacks import PCAProjectionInit
from embedlab.models import tiny_bi_encoder
from embedlab.training import train
from tests.conftest import TOPICS, compose_config

EXAMPLES = [Example(query=f"what about {name}?", positive=text) for name, text in TOPICS] + [
    Example(query=f"tell me about {name}", positive=text) for name, text in TOPICS[:4]  # repeated positives
]


def _texts_embedded(model) -> torch.Tensor:
    """The texts the callback fits on (unique queries, then unique positives), without the projection."""
    queries = list(dict.fromkeys(e.query for e in EXAMPLES))
    docs = list(dict.fromkeys(e.positive for e in EXAMPLES))
    dense, model.dense = model.dense, None
    try:
        return torch.cat([model.encode(queries, "query"), model.encode(docs, "document")]).double()
    finally:
        model.dense = dense


@pytest.mark.parametrize("out", [32, 8])
def test_fit_gives_principal_axes(out):
    model = tiny_bi_encoder(seed=5, projection_dim=out)
    weight = PCAProjectionInit().fit(model, EXAMPLES)  # (out, 32)
    assert weight.shape == (out, 32)
    torch.testing.assert_close(weight.double() @ weight.double().T, torch.eye(out, dtype=torch.float64), rtol=0, atol=1e-5)
    # reference: right singular vectors of the centred data (signs are arbitrary: compare |cosine| of each axis)
    emb = _texts_embedded(model)
    _, s, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    k = min(out, int((s > 1e-6 * s[0]).sum()) - 1)  # axes with distinct, non-zero variance
    agreement = (weight.double()[:k] * vh[:k]).sum(1).abs()
    torch.testing.assert_close(agreement, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-4)


def test_square_projection_is_a_rotation():
    """After the init, full-width cosine similarities equal those of the model without projection."""
    model = tiny_bi_encoder(seed=6, projection_dim=32)
    texts = [t for _, t in TOPICS]
    before = model.encode(texts)
    with torch.no_grad():
        model.dense.linear.weight.copy_(PCAProjectionInit().fit(model, EXAMPLES))
    after = model.encode(texts)
    assert not torch.allclose(after, before, atol=1e-3)  # the vectors moved ...
    torch.testing.assert_close(after @ after.T, before @ before.T, rtol=0, atol=1e-5)  # ... the geometry did not


def test_errors():
    with pytest.raises(ValueError, match=r"max_texts must be at least 2, got 1"):
        PCAProjectionInit(max_texts=1)

    class _Trainer:
        ckpt_path = None

    class _Module:
        model = tiny_bi_encoder(seed=0)

    with pytest.raises(ValueError, match=r"PCAProjectionInit needs a model with a projection layer: set model.projection_dim"):
        PCAProjectionInit().on_fit_start(_Trainer(), _Module())

    class _Wide:
        model = tiny_bi_encoder(seed=0, projection_dim=48)

    with pytest.raises(ValueError, match=r"model.projection_dim=48 exceeds the pooled width 32; a PCA has at most 32 axes"):
        PCAProjectionInit().on_fit_start(_Trainer(), _Wide())


def test_train_sets_projection_before_training(tmp_path, tiny_data_root):
    """callbacks=pca_projection in a real run (lr 0, so the weights stay where the init put them): the saved
    model's projection equals a fit on the same training examples with the initial model."""
    overrides = [
        "model=tiny", "model.projection_dim=32", "callbacks=pca_projection", "loss=matryoshka", "loss.dims=[32,8]",
        "module.optimizer.lr=0", "trainer.max_epochs=1", "data.batch_size=4", "data.val_fraction=0",
        f"data.root={tiny_data_root}", "logger=none", "trainer.accelerator=cpu",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    _, objects = train(cfg)
    examples = objects["datamodule"].train_examples
    expected = PCAProjectionInit().fit(tiny_bi_encoder(seed=cfg.seed, projection_dim=32), examples)
    torch.testing.assert_close(objects["module"].model.dense.linear.weight.detach(), expected, rtol=0, atol=1e-5)
    assert (tmp_path / "model" / "2_Dense" / "model.safetensors").is_file()
