"""Evaluators: turn a task (retrieval or STS) and its texts' embeddings into metrics.

An evaluator says which texts it needs embedded (``encode_plan``) and computes metrics from those
embeddings (``compute``). The split lets the same code run in two places: ``evaluate(model)`` encodes
and scores in one call (evaluate.py, benchmarks), while the LightningModule encodes the plan as ordinary
validation/test steps (so Lightning handles devices, progress bars and, under DDP, sharding) and calls
``compute`` once at the end of the epoch.

:func:`build_evaluator` picks the evaluator class by task type (:data:`EVALUATORS`) and checks the ``eval``
options against the classes' own signatures: a new evaluator class registers by joining :data:`EVALUATORS`, and
its keyword arguments (and their defaults) become valid ``eval`` options.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from embedlab.cache import EmbeddingCache, model_fingerprint, weights_digest
from embedlab.data.records import RetrievalTask, STSTask
from embedlab.errors import UserError
from embedlab.evaluation.grid import CompressionGrid, GridCell
from embedlab.evaluation.metrics import correlations, retrieval_metrics_and_units
from embedlab.evaluation.per_query import PerQuery
from embedlab.evaluation.runs import drop_identical_ids, top_k_run
from embedlab.evaluation.search import (
    DEFAULT_CORPUS_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    SEARCHES,
    SIMILARITIES,
    require_faiss,
    search_to_run,
)


class EvalOptionError(UserError, ValueError):
    """An ``eval`` option that no evaluator knows, or that the task's evaluator does not take."""


def check_similarity_option(similarity: str | None) -> None:
    """``similarity`` must be ``cos`` or ``dot``; ``None`` (``eval.similarity: null``) is the caller's to resolve."""
    if similarity is None:
        raise EvalOptionError(
            "eval.similarity is null (the model's similarity): resolve it to the model's 'cos' or 'dot' "
            "before building the evaluator"
        )
    if similarity not in SIMILARITIES:
        raise EvalOptionError(f"eval.similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")


@dataclass
class EncodeRequest:
    """One list of texts to embed: ``key`` names the result, ``kind`` picks query/document settings."""

    key: str
    kind: str
    texts: Sequence[str]


class RetrievalEvaluator:
    """Retrieval metrics (nDCG, MAP, MRR, Recall, Precision @k) of a top-k search over a BEIR-style task.

    Args:
        task: corpus, queries and graded qrels.
        k_values: cutoffs for every metric.
        similarity: ``cos`` or ``dot`` (the model's similarity; callers resolve ``eval.similarity: null`` to it).
        top_k: documents kept per query (raised to ``max(k_values)`` if smaller); ``binary_rescore`` rescores
            ``top_k * rescore_multiplier`` candidates.
        search: ``exact`` (chunked matrix products, :func:`~embedlab.evaluation.search.exact_search`) or ``faiss``
            (each corpus chunk searched by a FAISS flat inner-product index on CPU,
            :func:`~embedlab.evaluation.search.faiss_search`); both are exact, bounded by the chunk sizes.
        corpus_chunk_size / query_chunk_size: bound the search's memory (never a full queries x corpus matrix).
        batch_size: encoding batch size.
        ignore_identical_ids: drop a retrieved document whose id equals the query id (BEIR's option).
        dims / precisions / pca / rescore_multiplier / rescore_with: the compression grid
            (:class:`~embedlab.evaluation.grid.CompressionGrid`), evaluated from the same embeddings;
            its cells are also kept in ``last_grid`` for tables and plots.

    After :meth:`compute`: ``last_runs`` (the final ranking, for run files) and ``last_per_query`` (every
    query's metric values, grid cells included, under the keys of the returned metrics; see
    :mod:`embedlab.evaluation.per_query`).
    """

    task_kind = "retrieval"
    task_label = "a retrieval task"

    def __init__(
        self,
        task: RetrievalTask,
        k_values: Sequence[int] = (1, 3, 5, 10, 100),
        similarity: str = "cos",
        top_k: int = 100,
        search: str = "exact",
        corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
        query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
        batch_size: int = 64,
        ignore_identical_ids: bool = False,
        dims: Sequence[int] | None = None,
        precisions: Sequence[str] = ("float32",),
        pca: Sequence[int] | None = None,
        rescore_multiplier: int = 4,
        rescore_with: str = "int8",
    ) -> None:
        check_similarity_option(similarity)
        if search not in SEARCHES:
            raise EvalOptionError(f"eval.search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if search == "faiss":
            require_faiss()  # fail before encoding, not after
        self.task = task
        self.k_values = tuple(int(k) for k in k_values)
        self.similarity = similarity
        self.top_k = max(top_k or 0, max(self.k_values))
        self.search = SEARCHES[search]
        self.corpus_chunk_size = corpus_chunk_size
        self.query_chunk_size = query_chunk_size
        self.batch_size = batch_size
        self.ignore_identical_ids = ignore_identical_ids
        self.query_ids = list(task.queries)
        self.corpus_ids = list(task.corpus)
        self.grid = CompressionGrid(
            dims=dims, precisions=precisions, pca=pca, rescore_multiplier=rescore_multiplier, rescore_with=rescore_with,
            similarity=similarity, search=search, query_chunk_size=query_chunk_size,
            corpus_chunk_size=corpus_chunk_size,
        )
        self.last_grid: list[GridCell] = []
        self.last_runs: dict[str, dict[str, dict[str, float]]] = {}
        self.last_per_query: PerQuery = {}

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
            cell_units: list[PerQuery] = []  # one per cell, in the grid's order

            def score(scores: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
                means, units = self._metrics(search_to_run(scores, indices, self.query_ids, self.corpus_ids), "")
                cell_units.append(units)
                return means

            self.last_grid = self.grid.run(embeddings["query"], embeddings["document"], self.search_top_k, score)
            for cell, units in zip(self.last_grid, cell_units):
                metrics.update(cell.flat(prefix))
                for qid, values in units.items():
                    self.last_per_query[qid].update({f"{prefix}{name}{cell.suffix}": v for name, v in values.items()})
        return metrics

    @property
    def search_top_k(self) -> int:
        """Documents retrieved per query: one extra so dropping a query's own id still leaves ``top_k``."""
        return self.top_k + (1 if self.ignore_identical_ids else 0)

    def search_metrics(self, query: torch.Tensor, document: torch.Tensor, prefix: str = "test/") -> dict[str, float]:
        """Search ``document`` ``(N, D)`` (the corpus, in ``corpus_ids`` order) for every row of ``query``
        ``(Q, D)`` (``query_ids`` order) and the metrics of the run; no grid, no timing."""
        scores, indices = self.search(
            query, document, self.search_top_k, self.similarity,
            query_chunk_size=self.query_chunk_size, corpus_chunk_size=self.corpus_chunk_size,
        )
        run = search_to_run(scores, indices, self.query_ids, self.corpus_ids)
        # the final ranking, for run files: what the metrics score (top_k, without the query itself)
        self.last_runs = {"run": top_k_run(drop_identical_ids(run), self.top_k) if self.ignore_identical_ids else run}
        metrics, self.last_per_query = self._metrics(run, prefix)
        return metrics

    def _metrics(self, run: dict[str, dict[str, float]], prefix: str) -> tuple[dict[str, float], PerQuery]:
        return retrieval_metrics_and_units(
            run, self.task.qrels, k_values=self.k_values, prefix=prefix, ignore_identical_ids=self.ignore_identical_ids
        )

    def evaluate(self, model, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        return self.compute(encode_plan(model, self.encode_plan(), self.batch_size, show_progress_bar), prefix)


class STSEvaluator:
    """Spearman and Pearson correlations (in percent) between each pair's similarity and its gold score.

    Keys: ``{prefix}spearman_cosine`` / ``{prefix}pearson_cosine`` for ``similarity="cos"``, ``..._dot`` for
    ``"dot"`` (sentence-transformers' ``EmbeddingSimilarityEvaluator`` names). Similarities are computed in float64
    and correlated by ``torchmetrics.functional``; its Spearman ranks ties by their mean rank in float32, so it
    agrees with ``scipy.stats.spearmanr`` to about 1e-7 (Pearson to float64 round-off). ``last_per_query``: each
    pair's ``gold`` score and ``prediction`` (similarity), keyed by its index in the task.
    """

    task_kind = "STS"
    task_label = "an STS task"
    _KEY_NAMES = {"cos": "cosine", "dot": "dot"}

    def __init__(self, task: STSTask, similarity: str = "cos", batch_size: int = 64) -> None:
        check_similarity_option(similarity)
        self.task = task
        self.similarity = similarity
        self.batch_size = batch_size
        self.last_grid: list[GridCell] = []
        self.last_runs: dict = {}  # no ranking: nothing to write as a run file
        self.last_per_query: PerQuery = {}

    def encode_plan(self) -> list[EncodeRequest]:
        return [
            EncodeRequest("sentences1", "document", self.task.sentences1),
            EncodeRequest("sentences2", "document", self.task.sentences2),
        ]

    def compute(self, embeddings: dict[str, torch.Tensor], prefix: str = "test/") -> dict[str, float]:
        left, right = embeddings["sentences1"].double(), embeddings["sentences2"].double()  # (P, D) each
        if self.similarity == "cos":
            left, right = torch.nn.functional.normalize(left, dim=1), torch.nn.functional.normalize(right, dim=1)
        predicted = (left * right).sum(dim=1).cpu()  # (P,)
        gold = torch.as_tensor(self.task.scores, dtype=torch.float64)  # (P,)
        name = self._KEY_NAMES[self.similarity]
        self.last_per_query = sts_units(gold, predicted)
        spearman, pearson = correlations(predicted, gold)
        return {f"{prefix}spearman_{name}": spearman, f"{prefix}pearson_{name}": pearson}

    def evaluate(self, model, prefix: str = "test/", show_progress_bar: bool = True) -> dict[str, float]:
        return self.compute(encode_plan(model, self.encode_plan(), self.batch_size, show_progress_bar), prefix)


def sts_units(gold: torch.Tensor, predicted: torch.Tensor) -> PerQuery:
    """Per-pair units of an STS evaluation: ``{pair index: {"gold": g, "prediction": p}}`` from (P,) tensors."""
    return {str(i): {"gold": g, "prediction": p} for i, (g, p) in enumerate(zip(gold.tolist(), predicted.tolist()))}


#: task type -> evaluator class; a new evaluator registers here, and its keyword arguments become ``eval`` options
EVALUATORS: dict[type, type] = {RetrievalTask: RetrievalEvaluator, STSTask: STSEvaluator}


#: ``eval`` options of the encoding side, dropped by :func:`build_evaluator` (``cache_dir``: :mod:`embedlab.cache`)
ENCODE_OPTIONS = ("cache_dir",)


def _options_of(cls: type) -> dict[str, Any]:
    """``{option: default}`` of an evaluator class: its ``__init__`` parameters after ``task``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # drop self, task
    return {p.name: p.default for p in params}


def _same_value(a: Any, b: Any) -> bool:
    """Config values compare to Python defaults with lists and tuples alike (``[1, 3]`` == ``(1, 3)``)."""
    def norm(x: Any) -> Any:
        return tuple(norm(v) for v in x) if isinstance(x, (list, tuple)) else x
    return norm(a) == norm(b)


def with_model_similarity(options: Mapping[str, Any], model) -> dict[str, Any]:
    """The ``eval`` options with ``similarity: null`` resolved to ``model.similarity`` (what it was trained for)."""
    options = dict(options)
    if options.get("similarity", "") is None:
        options["similarity"] = model.similarity
    return options


def build_evaluator(task, registry: Mapping[type, type] | None = None, **options):
    """The evaluator for ``task`` (a RetrievalTask or STSTask), configured with the ``eval`` options.

    ``registry``: task type -> evaluator class (default :data:`EVALUATORS`, the bi-encoder's; cross-encoders use
    :data:`embedlab.evaluation.rerank.RERANK_EVALUATORS`).

    The ``eval`` config is shared by every task, so it holds options of all evaluators. An option the task's
    evaluator does not take is dropped when it equals the default of the evaluators that take it, and is an error
    otherwise (a setting that would silently do nothing).

    Raises:
        TypeError: no evaluator for the task's type.
        EvalOptionError: ``unknown eval option 'foo' (known: ...)`` for a name no evaluator takes;
            ``eval.dims does not apply to an STS task (...)`` for another evaluator's option set away from its
            default.
    """
    registry = EVALUATORS if registry is None else registry
    # the embedding cache is the encoding side's option (encode_plan, the module's steps), not an evaluator's
    options = {k: v for k, v in options.items() if k not in ENCODE_OPTIONS}
    try:
        cls = registry[type(task)]
    except KeyError:
        raise TypeError(f"no evaluator for task type {type(task).__name__}; known: {[t.__name__ for t in registry]}")
    own = _options_of(cls)
    others = {other: _options_of(other) for other in registry.values() if other is not cls}
    known = set(own).union(*others.values())
    kept = {}
    for name, value in options.items():
        if name in own:
            kept[name] = value
            continue
        if name not in known:
            raise EvalOptionError(f"unknown eval option {name!r} (known: {', '.join(sorted(known))})")
        takers = [other for other, defaults in others.items() if name in defaults]
        if not all(_same_value(value, others[other][name]) for other in takers):
            raise EvalOptionError(
                f"eval.{name} does not apply to {cls.task_label} (a {' / '.join(o.task_kind for o in takers)} "
                f"option; {cls.task_kind} options: {', '.join(own)}): drop eval.{name}={value!r}"
            )
    return cls(task, **kept)


def encode_plan(
    model,
    plan: list[EncodeRequest],
    batch_size: int,
    show_progress_bar: bool,
    cache: EmbeddingCache | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Embed every request of ``plan`` with ``model.encode``: ``{request key: (N, D) float32 CPU}``.

    With ``cache`` (``eval.cache_dir``, :class:`~embedlab.cache.EmbeddingCache`) cached rows are read and only
    the missing texts are encoded (and stored); the weights are hashed once for the whole plan. ``device``
    (cache only): where the model moves before it encodes a missing text, so a full hit leaves it where it is.
    """
    if cache is None:
        return {
            req.key: model.encode(
                req.texts, kind=req.kind, batch_size=batch_size, show_progress_bar=show_progress_bar, desc=f"encode {req.key}"
            )
            for req in plan
        }
    weights = weights_digest(model)
    device_type = torch.device(device).type if device is not None else None
    return {
        req.key: cache.encode(
            model, req.texts, kind=req.kind, batch_size=batch_size, show_progress_bar=show_progress_bar,
            desc=f"encode {req.key}", fingerprint=model_fingerprint(model, req.kind, weights, device_type), device=device,
        )
        for req in plan
    }
