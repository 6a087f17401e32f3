"""The bi-encoder LightningModule: training steps, evaluation steps, optimizers, logging.

Model components (``embedlab.models``) and losses (``embedlab.losses``) are plain modules; this class only
wires them: embed a batch once into an :class:`EmbeddedBatch`, hand it to the loss, log each named term
as ``train/<term>``; during validation/test, embed the evaluator's texts step by step and compute the
metrics once at epoch end (``val/ndcg@10``, ``test/spearman_cosine``, ...).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch

from embedlab.evaluation.grid import report_grid
from embedlab.losses.base import EmbeddedBatch
from embedlab.models.bi_encoder import BiEncoder


class BiEncoderModule(L.LightningModule):
    """Train a :class:`BiEncoder` with any embedding loss.

    Args:
        model: the bi-encoder.
        loss: a loss taking an :class:`EmbeddedBatch` and returning ``{"loss": ..., <term>: ...}``.
        optimizer: partial optimizer (``_partial_: true``), completed with the parameters here.
        scheduler: partial ``(optimizer, num_training_steps) -> LR scheduler`` or ``None``; stepped per step.

    ``model_cfg`` (set by ``train``) is the model's config; it is stored in checkpoints under
    ``"embedlab_model_cfg"`` so ``evaluate.py model.path=x.ckpt`` can rebuild the model.
    """

    def __init__(
        self,
        model: BiEncoder,
        loss: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained leaves HF models in eval mode: dropout off
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model_cfg: dict | None = None
        self._eval_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ training
    def embed(self, texts: list[str], kind: str) -> torch.Tensor:
        features = self.model.tokenize(texts, kind)
        return self.model({k: v.to(self.device) for k, v in features.items()})

    def embed_batch(self, batch: dict) -> EmbeddedBatch:
        """Embed a collated training batch (queries with query settings, candidates with document settings)."""
        b = len(batch["query"])
        query = self.embed(batch["query"], "query")  # (B, D)
        candidates = batch["positive"] + (batch["negatives"] or [])
        docs = self.embed(candidates, "document")  # (B + B*n, D)
        n = batch["num_negatives"]
        negatives = docs[b:].view(b, n, -1) if n else None  # (B, n, D)
        scores = batch["scores"].to(self.device) if batch["scores"] is not None else None
        return EmbeddedBatch(
            query=query,
            positive=docs[:b],
            negatives=negatives,
            scores=scores,
            query_ids=batch["query_ids"],
            positive_ids=batch["positive_ids"],
            negative_ids=batch["negative_ids"],
            extras={"normalized": self.model.normalize is not None, "dataset": batch.get("dataset")},
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss(self.embed_batch(batch))
        bs = len(batch["query"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict) -> None:
        emb = self.embed(batch["texts"], batch["kind"]).float()
        self._eval_outputs.setdefault(batch["key"], []).append((batch["index"].cpu(), emb.cpu()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, {}
        if self.trainer.sanity_checking or not outputs:
            return
        datamodule = self.trainer.datamodule
        evaluator = datamodule.val_evaluator if stage == "val" else datamodule.test_evaluator
        embeddings = {}
        for req in evaluator.encode_plan():
            rows = outputs.get(req.key, [])
            out = torch.zeros(len(req.texts), self.model.embedding_dim)
            seen = torch.zeros(len(req.texts), dtype=torch.bool)
            for index, emb in rows:
                out[index] = emb
                seen[index] = True
            if not bool(seen.all()):
                # limit_val_batches / fast_dev_run cut the epoch short: score what was embedded is meaningless
                return
            embeddings[req.key] = out
        metrics = evaluator.compute(embeddings, prefix=f"{stage}/")
        for name, value in metrics.items():
            self.log(name, float(value), prog_bar=name.endswith("ndcg@10") or name.endswith("spearman_cosine"))
        if evaluator.last_grid and self.trainer.is_global_zero:
            stem = f"{stage}_grid" if stage == "test" else f"{stage}_grid_epoch{self.current_epoch:03d}"
            report_grid(evaluator.last_grid, self.trainer.default_root_dir, stem, self.trainer.loggers)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["embedlab_model_cfg"] = self.model_cfg

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, num_training_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
