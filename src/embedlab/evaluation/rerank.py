"""Cross-encoder evaluators: rerank a first stage's candidates, or score STS pairs.

Same split as the bi-encoder evaluators (:mod:`embedlab.evaluation.evaluators`): an evaluator says which
(query, document) pairs it needs scored (``score_plan``) and turns the scores into metrics (``compute``), so the
cross-encoder LightningModule scores the plan as ordinary validation/test steps (devices, progress bars, DDP
sharding by Lightning) and ``evaluate(model)`` does both in one call (evaluate.py, benchmarks).

:class:`RerankEvaluator` is the two-stage measurement: the first stage (any retriever of
:mod:`embedlab.evaluation.first_stage`: dense, BM25, hybrid, a run file) retrieves ``top_k`` candidates per query
once; the cross-encoder scores exactly those; metrics are reported for the reranked list (``test/ndcg@10``) and
for the first stage (``test/first_stage/ndcg@10``), with the seconds per query of each stage. The candidates are
only what the first stage returned: a relevant document it missed stays missed (some reranking evaluators add the
known positives to the candidates, which reports a number no deployed system can reach).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from embedlab.data.collate import length_sorted_batches
from embedlab.data.records import RetrievalTask, STSTask
from embedlab.evaluation.evaluators import EvalOptionError, sts_units
from embedlab.evaluation.metrics import correlations, retrieval_metrics_and_units
from embedlab.evaluation.per_query import PerQuery
from embedlab.evaluation.runs import Run, drop_identical_ids, top_k_run

#: metric-name segment of the first stage's metrics (``test/first_stage/ndcg@10``)
FIRST_STAGE = "first_stage"


@dataclass
class ScoreRequest:
    """One list of (query text, document text) pairs to score; ``key`` names the result."""

    key: str
    pairs: Sequence[tuple[str, str]]


class ScoreBatches(Dataset):
    """Pre-built batches of pairs to score (one item = one batch), longest pairs first so each batch pads little.

    Each item: ``{"key", "index": (b,) positions in the request, "queries", "documents"}``.
    """

    def __init__(self, requests: Sequence[ScoreRequest], batch_size: int) -> None:
        if batch_size < 1:
            raise EvalOptionError(f"batch_size must be >= 1, got {batch_size}")
        self.batches = []
        for req in requests:
            for idx in length_sorted_batches([len(q) + len(d) for q, d in req.pairs], batch_size):
                self.batches.append({
                    "key": req.key,
                    "index": torch.tensor(idx),
                    "queries": [req.pairs[i][0] for i in idx],
                    "documents": [req.pairs[i][1] for i in idx],
                })

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


class RerankEvaluator:
    """Retrieval metrics of a first stage's top ``top_k``, reranked by a cross-encoder, and of the first stage alone.

    Args:
        task: corpus, queries and graded qrels.
        first_stage: a retriever (``retrieve(task, top_k, show_progress_bar) -> {qid: {docid: score}}``).
        top_k: candidates per query taken from the first stage and scored (``rerank.top_k``).
        k_values: cutoffs for every metric.
        batch_size: pairs per scoring batch.
        ignore_identical_ids: drop a candidate whose id equals the query id (BEIR's option).

    After :meth:`compute`, ``last_runs`` holds ``{"run": reranked, "first_stage": first stage top_k}``: the runs a
    caller writes as TREC files (:func:`embedlab.evaluation.runs.write_trec_run`); ``last_per_query`` each query's
    values of both lists (``test/ndcg@10``, ``test/first_stage/ndcg@10``; :mod:`embedlab.evaluation.per_query`).
    """

    task_kind = "retrieval"
    task_label = "a retrieval task"

    def __init__(
        self,
        task: RetrievalTask,
        first_stage=None,
        top_k: int = 100,
        k_values: Sequence[int] = (1, 3, 5, 10, 100),
        batch_size: int = 32,
        ignore_identical_ids: bool = False,
    ) -> None:
        if first_stage is None:
            raise EvalOptionError("reranking needs a first stage (retriever=dense|bm25|hybrid|run)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise EvalOptionError(f"rerank.top_k must be an integer >= 1, got {top_k!r}")
        self.task = task
        self.first_stage = first_stage
        self.top_k = top_k
        self.k_values = tuple(int(k) for k in k_values)
        self.batch_size = batch_size
        self.ignore_identical_ids = ignore_identical_ids
        self.first_run: Run | None = None
        self.first_stage_seconds = 0.0
        self.candidates: list[tuple[str, str]] = []
        self.last_runs: dict[str, Run] = {}
        self.last_per_query: PerQuery = {}
        self.last_grid: list = []

    def prepare(self, show_progress_bar: bool = True) -> None:
        """Run the first stage once (the candidates of every later :meth:`score_plan` / :meth:`compute`)."""
        if self.first_run is not None:
            return
        start = time.perf_counter()
        run = self.first_stage.retrieve(self.task, self.top_k, show_progress_bar=show_progress_bar)
        self.first_stage_seconds = time.perf_counter() - start
        self.first_run = top_k_run(drop_identical_ids(run) if self.ignore_identical_ids else run, self.top_k)
        # fixed order: query order of the task, then the first stage's ranking (top_k_run keeps it)
        self.candidates = [(q, d) for q in self.task.queries for d in self.first_run.get(q, {})]

    def score_plan(self) -> list[ScoreRequest]:
        self.prepare()
        queries, corpus = self.task.queries, self.task.corpus
        return [ScoreRequest("pairs", [(queries[q], corpus[d]) for q, d in self.candidates])]

    def compute(
        self, scores: dict[str, torch.Tensor] | None, prefix: str = "test/", rerank_seconds: float | None = None
    ) -> dict[str, float]:
        """Metrics of the reranked list (``scores["pairs"]``: (P,) one score per candidate in ``score_plan`` order;
        ``None``: no reranker, the first stage's list is the final one) and of the first stage."""
        self.prepare()
        n_queries = max(len(self.task.queries), 1)
        first, first_units = retrieval_metrics_and_units(
            self.first_run, self.task.qrels, k_values=self.k_values, prefix=f"{prefix}{FIRST_STAGE}/"
        )
        first[f"{prefix}{FIRST_STAGE}/seconds_per_query"] = self.first_stage_seconds / n_queries
        if scores is None:
            final = self.first_run
        else:
            values = scores["pairs"].detach().double().cpu().reshape(-1)  # (P,)
            if len(values) != len(self.candidates):
                raise ValueError(f"expected {len(self.candidates)} scores (one per candidate), got {len(values)}")
            final = {q: {} for q in self.first_run}
            for (q, d), s in zip(self.candidates, values.tolist()):
                final[q][d] = s
        metrics, units = retrieval_metrics_and_units(final, self.task.qrels, k_values=self.k_values, prefix=prefix)
        metrics.update(first)
        self.last_per_query = {q: {**values, **first_units[q]} for q, values in units.items()}
        if rerank_seconds is not None:
            metrics[f"{prefix}rerank/seconds_per_query"] = rerank_seconds / n_queries
        metrics[f"{prefix}rerank/candidates_per_query"] = len(self.candidates) / n_queries
        self.last_runs = {"run": final, FIRST_STAGE: self.first_run}
        return metrics

    def evaluate(self, model=None, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        """First stage, then ``model.predict`` on its candidates (``model=None``: the first stage alone)."""
        self.prepare(show_progress_bar)
        if model is None:
            return self.compute(None, prefix)
        start = time.perf_counter()
        scores = predict_plan(model, self.score_plan(), self.batch_size, show_progress_bar)
        return self.compute(scores, prefix, rerank_seconds=time.perf_counter() - start)


class CrossEncoderSTSEvaluator:
    """Spearman and Pearson correlations (in percent) between the cross-encoder's score of each pair and its gold
    score: ``{prefix}spearman`` / ``{prefix}pearson`` (sentence-transformers' ``CrossEncoderCorrelationEvaluator``).
    Scores are the model's activated outputs (sigmoid for one logit), as ``CrossEncoder.predict`` returns them;
    Spearman does not depend on that monotone map, Pearson does. ``last_per_query``: each pair's ``gold`` and
    ``prediction`` (score)."""

    task_kind = "STS"
    task_label = "an STS task"

    def __init__(self, task: STSTask, batch_size: int = 32) -> None:
        self.task = task
        self.batch_size = batch_size
        self.last_runs: dict[str, Run] = {}
        self.last_per_query: PerQuery = {}
        self.last_grid: list = []

    def prepare(self, show_progress_bar: bool = True) -> None:
        return None

    def score_plan(self) -> list[ScoreRequest]:
        return [ScoreRequest("pairs", list(zip(self.task.sentences1, self.task.sentences2)))]

    def compute(self, scores: dict[str, torch.Tensor], prefix: str = "test/", rerank_seconds: float | None = None) -> dict[str, float]:
        predicted = scores["pairs"].detach().double().cpu().reshape(-1)  # (P,)
        gold = torch.as_tensor(self.task.scores, dtype=torch.float64)  # (P,)
        self.last_per_query = sts_units(gold, predicted)
        spearman, pearson = correlations(predicted, gold)
        return {f"{prefix}spearman": spearman, f"{prefix}pearson": pearson}

    def evaluate(self, model, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        return self.compute(predict_plan(model, self.score_plan(), self.batch_size, show_progress_bar), prefix)


#: task type -> cross-encoder evaluator class (the bi-encoders' registry is ``evaluators.EVALUATORS``)
RERANK_EVALUATORS: dict[type, type] = {RetrievalTask: RerankEvaluator, STSTask: CrossEncoderSTSEvaluator}


def predict_plan(model, plan: list[ScoreRequest], batch_size: int, show_progress_bar: bool) -> dict[str, torch.Tensor]:
    """Score every request with ``model.predict`` (activated scores, in request order)."""
    return {
        req.key: model.predict(list(req.pairs), batch_size=batch_size, show_progress_bar=show_progress_bar, desc=f"score {req.key}")
        for req in plan
    }
