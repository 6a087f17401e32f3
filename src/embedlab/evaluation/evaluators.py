"""Evaluators: turn a task (retrieval or STS) and its texts' embeddings into metrics.

An evaluator says which texts it needs embedded (``encode_plan``) and computes metrics from those
embeddings (``compute``). The split lets the same code run in two places: ``evaluate(model)`` encodes
and scores in one call (evaluate.py, benchmarks), while the LightningModule encodes the plan as ordinary
validation/test steps (so Lightning handles devices, progress bars and, under DDP, sharding) and calls
``compute`` once at the end of the epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from embedlab.data.records import RetrievalTask, STSTask
from embedlab.evaluation.grid import CompressionGrid, GridCell
from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.search import exact_search, search_to_run


@dataclass
class EncodeRequest:
    """One list of texts to embed: ``key`` names the result, ``kind`` picks query/document settings."""

    key: str
    kind: str
    texts: Sequence[str]


class RetrievalEvaluator:
    """Retrieval metrics (nDCG, MAP, MRR, Recall, Precision @k) of exact search over a BEIR-style task.

    Args:
        task: corpus, queries and graded qrels.
        k_values: cutoffs for every metric.
        score_function: ``cos`` or ``dot``.
        top_k: documents kept per query (>= max(k_values)).
        corpus_chunk_size / query_chunk_size: bound the search's memory (never a full queries x corpus matrix).
        batch_size: encoding batch size.
        ignore_identical_ids: drop a retrieved document whose id equals the query id (BEIR's option).
        dims / precisions / pca / rescore_multiplier / rescore_with: the compression grid
            (:class:`~embedlab.evaluation.grid.CompressionGrid`), evaluated from the same embeddings;
            its cells are also kept in ``last_grid`` for tables and plots.
    """

    def __init__(
        self,
        task: RetrievalTask,
        k_values: Sequence[int] = (1, 3, 5, 10, 100),
        score_function: str = "cos",
        top_k: int | None = None,
        corpus_chunk_size: int = 50_000,
        query_chunk_size: int = 1024,
        batch_size: int = 64,
        ignore_identical_ids: bool = False,
        dims: Sequence[int] | None = None,
        precisions: Sequence[str] = ("float32",),
        pca: Sequence[int] | None = None,
        rescore_multiplier: int = 4,
        rescore_with: str = "int8",
        **_: object,
    ) -> None:
        self.task = task
        self.k_values = tuple(int(k) for k in k_values)
        self.score_function = score_function
        self.top_k = max(top_k or 0, max(self.k_values))
        self.corpus_chunk_size = corpus_chunk_size
        self.query_chunk_size = query_chunk_size
        self.batch_size = batch_size
        self.ignore_identical_ids = ignore_identical_ids
        self.query_ids = list(task.queries)
        self.corpus_ids = list(task.corpus)
        self.grid = CompressionGrid(
            dims=dims, precisions=precisions, pca=pca, rescore_multiplier=rescore_multiplier, rescore_with=rescore_with,
            score_function=score_function, query_chunk_size=query_chunk_size, corpus_chunk_size=corpus_chunk_size,
        )
        self.last_grid: list[GridCell] = []

    def encode_plan(self) -> list[EncodeRequest]:
        return [
            EncodeRequest("query", "query", [self.task.queries[q] for q in self.query_ids]),
            EncodeRequest("document", "document", [self.task.corpus[d] for d in self.corpus_ids]),
        ]

    def compute(self, embeddings: dict[str, torch.Tensor], prefix: str = "test/") -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.search_metrics(embeddings["query"], embeddings["document"], prefix)
        metrics[f"{prefix}search_seconds"] = time.perf_counter() - start
        self.last_grid = []
        if self.grid.enabled:
            self.last_grid = self.grid.run(
                embeddings["query"], embeddings["document"], self.search_top_k, lambda s, i: self._score(s, i, "")
            )
            for cell in self.last_grid:
                metrics.update(cell.flat(prefix))
        return metrics

    @property
    def search_top_k(self) -> int:
        """Documents retrieved per query: one extra so dropping a query's own id still leaves ``top_k``."""
        return self.top_k + (1 if self.ignore_identical_ids else 0)

    def search_metrics(self, query: torch.Tensor, document: torch.Tensor, prefix: str = "test/") -> dict[str, float]:
        """Exact search of ``document`` ``(N, D)`` (the corpus, in ``corpus_ids`` order) for every row of ``query``
        ``(Q, D)`` (``query_ids`` order) and the metrics of the run; no grid, no timing."""
        scores, indices = exact_search(
            query,
            document,
            top_k=self.search_top_k,
            score_function=self.score_function,
            query_chunk_size=self.query_chunk_size,
            corpus_chunk_size=self.corpus_chunk_size,
        )
        return self._score(scores, indices, prefix)

    def _score(self, scores: torch.Tensor, indices: torch.Tensor, prefix: str) -> dict[str, float]:
        run = search_to_run(scores, indices, self.query_ids, self.corpus_ids)
        return retrieval_metrics(
            run, self.task.qrels, k_values=self.k_values, prefix=prefix, ignore_identical_ids=self.ignore_identical_ids
        )

    def evaluate(self, model, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        return self.compute(encode_plan(model, self.encode_plan(), self.batch_size, show_progress_bar), prefix)


class STSEvaluator:
    """Spearman correlation (in percent) between the cosine similarity of each pair and its gold score."""

    def __init__(self, task: STSTask, batch_size: int = 64, **_: object) -> None:
        self.task = task
        self.batch_size = batch_size
        self.last_grid: list[GridCell] = []

    def encode_plan(self) -> list[EncodeRequest]:
        return [
            EncodeRequest("sentences1", "document", self.task.sentences1),
            EncodeRequest("sentences2", "document", self.task.sentences2),
        ]

    def compute(self, embeddings: dict[str, torch.Tensor], prefix: str = "test/") -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        cos = F.cosine_similarity(embeddings["sentences1"], embeddings["sentences2"]).numpy()
        gold = self.task.scores
        return {
            f"{prefix}spearman_cosine": float(spearmanr(cos, gold).statistic) * 100,
            f"{prefix}pearson_cosine": float(pearsonr(cos, gold).statistic) * 100,
        }

    def evaluate(self, model, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        return self.compute(encode_plan(model, self.encode_plan(), self.batch_size, show_progress_bar), prefix)


#: task type -> evaluator class; extend by adding an entry, not a branch
EVALUATORS = {RetrievalTask: RetrievalEvaluator, STSTask: STSEvaluator}


def build_evaluator(task, **options) -> RetrievalEvaluator | STSEvaluator:
    """The evaluator for ``task`` (a RetrievalTask or STSTask), configured with the ``eval`` options."""
    try:
        cls = EVALUATORS[type(task)]
    except KeyError:
        raise TypeError(f"no evaluator for task type {type(task).__name__}; known: {[t.__name__ for t in EVALUATORS]}")
    return cls(task, **options)


def encode_plan(model, plan: list[EncodeRequest], batch_size: int, show_progress_bar: bool) -> dict[str, torch.Tensor]:
    return {
        req.key: model.encode(req.texts, kind=req.kind, batch_size=batch_size, show_progress_bar=show_progress_bar, desc=f"encode {req.key}")
        for req in plan
    }
