"""Matryoshka ordering of a trained bi-encoder by an orthogonal rotation fitted on its frozen embeddings.

A Matryoshka fine-tune (:class:`embedlab.losses.MatryoshkaLoss`) trains the backbone for every prefix at once,
and on SciFact that costs the full width 0.5 to 1.7 points against a plain fine-tune of the same budget
(``benchmarks/results/matryoshka_scifact_runs.md``). This stage takes the other route: keep the plain
model, and learn only *which directions the leading dims hold*.

With ``e`` the model's output and ``R`` a ``(D, D)`` orthogonal matrix, the new output is ``R e``. Every dot
product and norm at the full width is unchanged (``(R a) . (R b) = a . b``), so the full-width scores are the
plain model's, exactly. The prefixes ``(R e)[:d]`` are trained with the Matryoshka loss on the training
examples' cached embeddings: the backbone runs once (an encoding pass), then each epoch costs a few matrix
products. ``R`` is parametrized orthogonal (``torch.nn.utils.parametrizations.orthogonal``), starts at the
PCA axes of the encoded documents (or the identity), and the epoch with the best validation score is kept.
Finally ``R`` is folded into the model's projection (``W <- R W``, ``b <- R b``; a square projection is added
when the model has none), so the saved folder is an ordinary sentence-transformers model.

The idea is that of Matryoshka-Adaptor (Yoon et al. 2024, "Matryoshka-Adaptor: Unsupervised and Supervised
Tuning for Smaller Embedding Dimensions"), restricted to a rotation so the full width cannot change.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from embedlab.atomic import atomic_write_text
from embedlab.data.collate import collate_examples
from embedlab.data.records import Example
from embedlab.errors import ConfigError
from embedlab.evaluation.evaluators import RetrievalEvaluator, encode_plan
from embedlab.evaluation.reduction import fit_pca, truncate
from embedlab.losses.base import EmbeddedBatch
from embedlab.models.dense import IDENTITY, Dense

log = logging.getLogger(__name__)

INITS = ("pca", "identity")


@dataclass
class RotationResult:
    """What :meth:`MatryoshkaRotation.fit` found.

    Attributes:
        rotation: ``(D, D)`` orthogonal matrix (rows = the new axes, leading first); ``R e`` is the new embedding.
        best_epoch: the epoch kept (0 = the initial rotation, before any step).
        seconds: wall time of the stage (encoding pass + fit + validation).
        history: one dict per epoch (0 = initial): ``epoch``, ``loss`` (mean training loss of the epoch, NaN for
            epoch 0) and ``val/ndcg@10@dim<d>`` for every Matryoshka dim (when there is a validation set).
    """

    rotation: torch.Tensor
    best_epoch: int
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self, prefix: str = "rotation/") -> dict[str, float]:
        """The kept epoch's validation scores and its index, flat, e.g. ``rotation/val/ndcg@10@dim64``."""
        best = self.history[self.best_epoch]
        out = {f"{prefix}{k}": float(v) for k, v in best.items() if k.startswith("val/")}
        out[f"{prefix}best_epoch"] = float(self.best_epoch)
        out[f"{prefix}seconds"] = float(self.seconds)
        return out


class MatryoshkaRotation:
    """Fit an orthogonal rotation of a trained model's embeddings with a Matryoshka loss; fold it into the model.

    Args:
        loss: a :class:`embedlab.losses.MatryoshkaLoss` (its ``dims``, ``weights`` and inner loss are used as in
            training; the inner loss must take (query, positive[, negatives]) batches, e.g. mnrl).
        epochs: passes over the training examples (cheap: embeddings are cached).
        batch_size: examples per step; in-batch negatives as in training.
        lr: Adam learning rate on the rotation's parametrization.
        init: ``"pca"`` (principal axes of the encoded documents, largest variance first) or ``"identity"``.
        encode_batch_size: batch size of the one encoding pass.
        seed: shuffling order.

    Selection: after every epoch the validation set (if any) is scored at every Matryoshka dim; the epoch with
    the highest mean ``nDCG@10`` over the dims is kept (epoch 0, the initial rotation, included, so the stage
    never returns something validation scores worse than its start). Without validation the last epoch is kept.
    """

    def __init__(
        self,
        loss: nn.Module,
        epochs: int = 20,
        batch_size: int = 32,
        lr: float = 1e-3,
        init: str = "pca",
        encode_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        dims = getattr(loss, "dims", None)
        if not dims:
            raise ConfigError(
                f"post_fit.rotation.loss must be a Matryoshka loss (with dims), got {type(loss).__name__}: "
                "set post_fit.rotation.loss._target_=embedlab.losses.MatryoshkaLoss"
            )
        if init not in INITS:
            raise ConfigError(f"post_fit.rotation.init must be one of {', '.join(INITS)}, got {init!r}")
        if epochs < 0 or batch_size < 1 or not lr > 0:
            raise ConfigError(
                f"rotation needs epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size} and {lr}"
            )
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.init = init
        self.encode_batch_size = int(encode_batch_size)
        self.seed = int(seed)

    # ------------------------------------------------------------------ the post-fit stage
    def run(self, module, datamodule, trainer) -> dict[str, float]:
        """Post-fit stage (``post_fit=matryoshka_rotation``): fit on ``datamodule``'s training examples and the
        module's validation evaluator, fold the rotation into ``module.model``, write ``rotation_history.csv``
        (rank 0); returns the ``rotation/...`` metrics.

        Every rank fits the same rotation (same data, same seed), so DDP ranks stay identical without a broadcast.
        """
        result = self.fit(module.model, datamodule.train_examples, module.val_evaluator)
        apply_rotation(module.model, result.rotation)
        if trainer.is_global_zero:
            _write_history(result.history, Path(trainer.default_root_dir) / "rotation_history.csv")
        return result.metrics()

    # ------------------------------------------------------------------ fitting
    def fit(self, model, examples: Sequence[Example], val_evaluator: RetrievalEvaluator | None = None) -> RotationResult:
        """Encode ``examples`` (and the validation set) once with ``model``; fit and select the rotation."""
        if not examples:
            raise ConfigError("rotation: no training examples to fit on")
        if val_evaluator is not None and not isinstance(val_evaluator, RetrievalEvaluator):
            raise ConfigError(
                f"rotation selects its epoch by retrieval nDCG@10; the validation set is {type(val_evaluator).__name__}: "
                "use a retrieval (BEIR) validation set, or none"
            )
        if val_evaluator is not None and 10 not in val_evaluator.k_values:
            raise ConfigError(
                f"rotation selects its epoch by validation nDCG@10: eval.k_values must include 10, got {list(val_evaluator.k_values)}"
            )
        too_big = [d for d in self.dims if d > model.embedding_dim]
        if too_big:
            raise ConfigError(f"rotation: matryoshka dims {too_big} exceed the model's embedding size {model.embedding_dim}")
        started = time.perf_counter()
        queries = list(dict.fromkeys(e.query for e in examples))
        documents = list(dict.fromkeys(t for e in examples for t in (e.positive, *e.negatives)))
        q_row = {t: i for i, t in enumerate(queries)}
        d_row = {t: i for i, t in enumerate(documents)}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                q_emb = model.encode(queries, "query", batch_size=self.encode_batch_size, show_progress_bar=True, desc="rotation: queries")
                d_emb = model.encode(documents, "document", batch_size=self.encode_batch_size, show_progress_bar=True, desc="rotation: documents")
                val = None
                if val_evaluator is not None:
                    val = encode_plan(model, val_evaluator.encode_plan(), self.encode_batch_size, show_progress_bar=True)
        finally:
            model.train(was_training)
        q_emb, d_emb = q_emb.float().cpu(), d_emb.float().cpu()  # (Q, D), (N, D)
        normalized = getattr(model, "normalize", None) is not None

        dim = q_emb.shape[1]
        start = fit_pca(d_emb, dim).components if self.init == "pca" else torch.eye(dim)  # (D, D) orthonormal rows
        rotation = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            rotation.weight.copy_(start)
        # registering the parametrization keeps the current (orthogonal) weight as the starting point
        nn.utils.parametrizations.orthogonal(rotation)
        optimizer = torch.optim.Adam(rotation.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)

        def weight() -> torch.Tensor:
            return rotation.weight.detach().clone()

        history = [{"epoch": 0.0, "loss": math.nan, **self._validate(weight(), val, val_evaluator)}]
        best_epoch, best_score, best_weight = 0, self._score(history[0]), weight()
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(len(examples), generator=generator).tolist()
            total, steps = 0.0, 0
            for begin in range(0, len(order), self.batch_size):
                chunk = [examples[i] for i in order[begin : begin + self.batch_size]]
                batch = collate_examples(chunk)
                q = rotation(q_emb[[q_row[t] for t in batch["query"]]])  # (B, D)
                docs = rotation(d_emb[[d_row[t] for t in batch["positive"] + (batch["negatives"] or [])]])  # (B + B*n, D)
                embedded = EmbeddedBatch.from_collated(batch, q, docs, normalized)
                loss = self.loss(embedded)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + float(loss.detach()), steps + 1
            row = {"epoch": float(epoch), "loss": total / steps, **self._validate(weight(), val, val_evaluator)}
            history.append(row)
            score = self._score(row)
            log.info("rotation epoch %d: loss %.4f, %s", epoch, row["loss"], _describe(row))
            if val is None or score > best_score:
                best_epoch, best_score, best_weight = epoch, score, weight()
        log.info("rotation: keeping epoch %d of %d (%s)", best_epoch, self.epochs, _describe(history[best_epoch]))
        return RotationResult(rotation=best_weight, best_epoch=best_epoch, seconds=time.perf_counter() - started, history=history)

    def _validate(self, weight: torch.Tensor, val: dict | None, evaluator: RetrievalEvaluator | None) -> dict[str, float]:
        if val is None or evaluator is None:
            return {}
        queries, documents = val["query"].float().cpu() @ weight.T, val["document"].float().cpu() @ weight.T
        return {
            f"val/ndcg@10@dim{d}": evaluator.search_metrics(truncate(queries, d), truncate(documents, d), prefix="")["ndcg@10"]
            for d in self.dims
        }

    def _score(self, row: dict[str, float]) -> float:
        values = [row[f"val/ndcg@10@dim{d}"] for d in self.dims if f"val/ndcg@10@dim{d}" in row]
        return sum(values) / len(values) if values else -math.inf


def _describe(row: dict[str, float]) -> str:
    return ", ".join(f"{k.split('@dim')[-1]}d {v:.4f}" for k, v in row.items() if k.startswith("val/")) or "no validation"


def _write_history(rows: list[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def apply_rotation(model, rotation: torch.Tensor) -> None:
    """Make ``model`` output ``R e`` instead of ``e``: fold ``R`` into its projection, or add a square one.

    The model's normalization (if any) comes after the projection; a rotation keeps norms, so
    ``normalize(R (W h + b)) = R normalize(W h + b)`` and the folded model's output is exactly ``R e``.
    """
    rotation = rotation.detach().float().cpu()
    dim = model.embedding_dim
    if rotation.shape != (dim, dim):
        raise ValueError(f"rotation of shape {tuple(rotation.shape)} does not match the model's {dim}-d embeddings")
    dense = getattr(model, "dense", None)
    if dense is not None and dense.activation_name != IDENTITY:
        raise ValueError(
            f"cannot fold a rotation into a projection followed by {dense.activation_name}: "
            "only a linear (Identity-activated) projection commutes with it"
        )
    if dense is None:
        dense = Dense(dim, dim).to(next(model.parameters()).device)
        model.dense = dense
    linear = dense.linear
    with torch.no_grad():
        linear.weight.copy_((rotation.to(linear.weight) @ linear.weight))  # (D, D) @ (D, H)
        if linear.bias is not None:
            linear.bias.copy_(rotation.to(linear.bias) @ linear.bias)
