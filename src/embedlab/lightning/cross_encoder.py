"""The cross-encoder LightningModule: score each query's candidate group, hand the scores to a score loss.

A training batch (:func:`embedlab.data.collate.collate_examples`) holds B queries, each with its positive and
``n`` negatives (mined and/or random), or B scored pairs (STS: ``n = 0`` and a gold score). The module reads every
(query, candidate) pair through the cross-encoder once, reshapes the logits to ``(B, 1 + n)`` (column 0: the
positive) with labels ``(B, 1 + n)`` (1 / 0, or the gold score for scored pairs) and any teacher scores, and
calls the loss (:mod:`embedlab.losses.ranking`) on that :class:`~embedlab.losses.ranking.ScoredCandidates`.
Each named term is logged as ``train/<term>``.

Evaluation is the module's own (:class:`~embedlab.lightning.base.EmbedlabModule`): a retrieval task is reranked
(:class:`~embedlab.evaluation.rerank.RerankEvaluator`: ``first_stage``'s top ``top_k`` of every validation
query, retrieved once, scored by the model at every validation), an STS task is scored pair by pair
(:class:`~embedlab.evaluation.rerank.CrossEncoderSTSEvaluator`). Under DDP, Lightning shards the scoring batches;
the (index, score) rows of every rank are gathered and the metrics computed once on rank 0.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader

from embedlab import distributed
from embedlab.data.collate import identity_collate
from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.evaluators import build_evaluator
from embedlab.evaluation.rerank import RERANK_EVALUATORS, ScoreBatches
from embedlab.lightning.base import EmbedlabModule
from embedlab.losses.ranking import ScoredCandidates


class CrossEncoderModule(EmbedlabModule):
    """Train a :class:`~embedlab.models.CrossEncoder` with a score loss (``loss=bce|listwise|ranknet|...``).

    Args:
        model: the cross-encoder (one logit per pair).
        loss: a score loss (``consumes = "scores"``) taking a :class:`ScoredCandidates`.
        optimizer: partial optimizer (``_partial_: true``), completed with the parameters here.
        scheduler: partial ``(optimizer, num_training_steps) -> LR scheduler`` or ``None``; stepped per step.
        lr_multipliers: ``{parameter-name prefix: factor}`` on the optimizer's lr, e.g. ``{model.model.classifier: 10}``.
        head_lr_multiplier: factor on the lr of the scoring head (:meth:`CrossEncoder.head_parameter_prefixes`):
            a head started on an encoder folder begins from random weights and, at a backbone's fine-tuning lr,
            barely moves in a short run (every score stays equal and a listwise loss stays at log(group size)).
        first_stage: the retriever whose candidates a retrieval validation/test reranks (``retriever`` group).
        val_top_k: candidates reranked per validation query (``None``: ``evaluation.top_k``, as the test): validation
            runs at every epoch, so a shallower list keeps it cheap.
        evaluation: the evaluator options (``top_k``, ``k_values``, ``batch_size``; ``rerank`` group).
    """

    def __init__(
        self,
        model,
        loss: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
        head_lr_multiplier: float = 1.0,
        first_stage=None,
        val_top_k: int | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(evaluation)
        if getattr(loss, "consumes", None) != "scores":
            raise ConfigError(
                f"module=cross_encoder needs a score loss (loss=bce|listwise|ranknet|lambdaloss|margin_mse), got "
                f"{type(loss).__name__}, an embedding loss for bi-encoders"
            )
        if model.num_labels != 1:
            raise ConfigError(f"module=cross_encoder trains one score per pair: model.num_labels must be 1, got {model.num_labels}")
        self.model = model.train()  # from_pretrained leaves HF models in eval mode: dropout off
        self.loss = loss
        self.first_stage = first_stage
        self.val_top_k = val_top_k
        # the scoring head (classifier and the pooler it reads) at head_lr_multiplier x lr; explicit prefixes win
        head = {f"model.{p}": float(head_lr_multiplier) for p in model.head_parameter_prefixes()} if head_lr_multiplier != 1 else {}
        self.configure_optimization(optimizer, scheduler, {**head, **dict(lr_multipliers or {})})
        self._eval_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._eval_started: float | None = None

    # ------------------------------------------------------------------ training
    def score_batch(self, batch: dict) -> ScoredCandidates:
        """Logits ``(B, 1 + n)`` of every query's candidates (positive first), with labels and teacher scores."""
        b, n = len(batch["query"]), batch["num_negatives"]
        negatives = batch["negatives"] or []
        queries = [q for q in batch["query"] for _ in range(1 + n)]
        documents = [d for i in range(b) for d in [batch["positive"][i], *negatives[i * n : (i + 1) * n]]]
        features = {k: v.to(self.device) for k, v in self.model.tokenize(queries, documents).items()}
        scores = self.model(features)[:, 0].view(b, 1 + n)  # (B, 1 + n)
        labels = torch.zeros_like(scores)
        # scored pairs carry their gold score in [0, 1]; grouped data a relevant positive and irrelevant negatives
        labels[:, 0] = batch["scores"].to(scores) if batch["scores"] is not None else 1.0
        teacher = batch.get("teacher_scores")
        return ScoredCandidates(
            scores=scores,
            labels=labels,
            teacher_scores=None if teacher is None else teacher.to(scores),
            extras={"dataset": batch.get("dataset")},
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss(self.score_batch(batch))
        self.log_train_terms(terms, len(batch["query"]))
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation
    def build_evaluator(self, task, stage: str = "test"):
        options = dict(self.evaluation_options)
        if isinstance(task, RetrievalTask):
            options["first_stage"] = self.first_stage
            if stage == "val" and self.val_top_k is not None:
                options["top_k"] = self.val_top_k
        return build_evaluator(task, registry=RERANK_EVALUATORS, **options)

    def evaluation_dataloader(self, evaluator) -> DataLoader:
        """The evaluator's pairs in scoring batches ({key, index, queries, documents}), longest first; the first
        stage runs here, once per task, before any batch is scored."""
        evaluator.prepare(show_progress_bar=False)
        batches = ScoreBatches(evaluator.score_plan(), evaluator.batch_size)
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=identity_collate, num_workers=0)

    def _eval_step(self, batch: dict) -> None:
        features = {k: v.to(self.device) for k, v in self.model.tokenize(batch["queries"], batch["documents"]).items()}
        scores = self.model.activate(self.model(features)[:, 0]).float()  # (b,) as predict() returns them
        self._eval_outputs.setdefault(batch["key"], []).append((batch["index"].cpu(), scores.cpu()))

    def on_validation_epoch_start(self) -> None:
        self._eval_started = time.perf_counter()

    def on_test_epoch_start(self) -> None:
        self._eval_started = time.perf_counter()

    def _finish_eval(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, {}
        seconds = time.perf_counter() - self._eval_started if self._eval_started is not None else None
        evaluator = self.evaluators.get(stage)
        # every decision before the gather must be the same on all ranks (a rank may hold no batch at all)
        if self.trainer.sanity_checking or evaluator is None:
            return
        if distributed.world_size() == 1 and not outputs:
            return
        sizes = {req.key: len(req.pairs) for req in evaluator.score_plan()}
        scores = self.collect_eval_rows(stage, outputs, sizes, torch.zeros(0))
        if scores is None:
            return
        metrics = None
        if self.trainer.is_global_zero:
            computed = evaluator.compute(scores, prefix=f"{stage}/", rerank_seconds=seconds)
            metrics = {name: float(value) for name, value in computed.items()}
            self.write_eval_files(stage, evaluator)
        metrics = distributed.broadcast_object(metrics, src=0)
        self.log_evaluation(stage, metrics)
