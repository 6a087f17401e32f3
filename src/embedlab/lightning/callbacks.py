"""Lightning callbacks that act on the model (not on logging or checkpoints)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from embedlab.errors import ConfigError
from embedlab.evaluation.reduction import fit_pca

log = logging.getLogger(__name__)


class PCAProjectionInit(L.Callback):
    """Set the model's projection (``model.projection_dim``) to the principal axes of the training texts.

    Before the first training step, the training examples' unique queries and positives (at most
    ``max_texts``, in data order, queries first) are embedded *without* the projection, a PCA is fitted on
    them, and the projection's rows become the top ``projection_dim`` axes (largest variance first). With
    a square projection this is a rotation: cosine similarities at the full width do not change, while the
    leading dims now carry the most variance, so Matryoshka truncation starts out as PCA truncation instead
    of an arbitrary cut (the Matryoshka loss then trains the backbone and the rotation together).

    Only rank 0 computes; the weight is broadcast to the other ranks. A resumed run (``ckpt_path``) keeps
    the checkpoint's projection.

    Args:
        max_texts: texts embedded for the fit (the projection width at least).
        batch_size: encoding batch size.
    """

    def __init__(self, max_texts: int = 20_000, batch_size: int = 64) -> None:
        if max_texts < 2:
            raise ConfigError(f"max_texts must be at least 2, got {max_texts}")
        self.max_texts = int(max_texts)
        self.batch_size = int(batch_size)
        self.explained_variance_ratio: torch.Tensor | None = None  # (projection_dim,) after the fit

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        if getattr(model, "dense", None) is None:
            raise ConfigError(
                "PCAProjectionInit needs a model with a projection layer: set model.projection_dim "
                "(e.g. model.projection_dim=384 for a rotation of a 384-d model)"
            )
        if model.dense.out_features > model.dense.in_features:
            raise ConfigError(
                f"PCAProjectionInit: model.projection_dim={model.dense.out_features} exceeds the pooled width "
                f"{model.dense.in_features}; a PCA has at most {model.dense.in_features} axes"
            )
        if trainer.ckpt_path:
            log.info("PCAProjectionInit: resuming from %s, keeping its projection", trainer.ckpt_path)
            return
        weight = self.fit(model, trainer.datamodule.train_examples) if trainer.is_global_zero else None
        weight = trainer.strategy.broadcast(weight, src=0)
        with torch.no_grad():
            model.dense.linear.weight.copy_(weight.to(model.dense.linear.weight))
            if model.dense.linear.bias is not None:
                model.dense.linear.bias.zero_()

    def fit(self, model, examples) -> torch.Tensor:
        """``(projection_dim, hidden)`` float32: the top principal axes of ``examples``' texts, embedded
        without the projection."""
        queries = list(dict.fromkeys(e.query for e in examples))
        documents = list(dict.fromkeys(e.positive for e in examples))
        queries = queries[: self.max_texts]
        documents = documents[: max(0, self.max_texts - len(queries))]
        if len(queries) + len(documents) < 2:
            raise ConfigError("PCAProjectionInit: fewer than 2 training texts to fit a PCA on")
        dense, model.dense = model.dense, None  # embed the pooled (normalized) vectors the projection will see
        try:
            emb = torch.cat(
                [
                    model.encode(queries, "query", batch_size=self.batch_size, show_progress_bar=True, desc="PCA init: queries"),
                    model.encode(documents, "document", batch_size=self.batch_size, show_progress_bar=True, desc="PCA init: documents"),
                ]
            )  # (N, H)
        finally:
            model.dense = dense
        pca = fit_pca(emb, dense.out_features)
        self.explained_variance_ratio = pca.explained_variance_ratio
        kept = pca.explained_variance_ratio.cumsum(0)  # (out,) share of the variance in the leading k axes
        shares = ", ".join(f"{k}: {100 * float(kept[k - 1]):.1f}%" for k in (32, 64, 128, 256, pca.dim) if k <= pca.dim)
        log.info("PCAProjectionInit: fitted on %d texts; variance kept by the leading axes: %s", emb.shape[0], shares)
        return pca.components  # (out, H), orthonormal rows
