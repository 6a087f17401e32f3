"""Hard-negative mining: documents a model ranks high for a query that the qrels do not mark relevant.

In-batch negatives are mostly easy (random documents of other queries). A few "hard" negatives per query,
retrieved by a model but not relevant, teach the contrastive loss the fine distinctions retrieval needs
(Karpukhin et al. 2020, "Dense Passage Retrieval"; Xiong et al. 2021, "ANCE"). Candidates near the top can be
relevant documents nobody labelled (false negatives), so two filters drop the riskiest ones:

- ``range_min``: the first ``range_min`` ranks (known positives excluded) are skipped outright;
- ``relative_margin``: a candidate scoring above ``(1 - relative_margin) x`` the query's lowest positive score
  is dropped (the "TopK-PercPos" filter of Moreira et al. 2024, "NV-Retriever", with 0.05 there).

The result is a JSONL file, one line per query: ``{"query_id", "negative_ids", "negative_scores"}``, best
first. ``BeirSource(hard_negatives=FILE, num_negatives=n)`` attaches the first ``n`` to every training pair of
the query. ``python mine.py`` runs :func:`mine` from a config (docs/hard_negatives.md).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embedlab.data.errors import DataError
from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.search import exact_search, prepare_embeddings

log = logging.getLogger(__name__)


@dataclass
class MinedNegatives:
    """One query's mined negatives, best first: ``negative_ids[i]`` scored ``negative_scores[i]``."""

    query_id: str
    negative_ids: list[str]
    negative_scores: list[float]


def check_mining_args(num_negatives: int, range_min: int, range_max: int, relative_margin: float | None) -> None:
    if num_negatives < 1:
        raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
    if range_min < 0:
        raise ConfigError(f"range_min must be >= 0, got {range_min}")
    if range_max < range_min + num_negatives:
        raise ConfigError(
            f"range_max must be >= range_min + num_negatives ({range_min} + {num_negatives}), got {range_max}"
        )
    if relative_margin is not None and not 0.0 <= relative_margin < 1.0:
        raise ConfigError(f"relative_margin must be in [0, 1) or null, got {relative_margin}")


def select_negatives(
    ranked_ids: list[str],
    ranked_scores: list[float],
    positive_scores: list[float],
    known_positive_ids: set[str],
    num_negatives: int,
    range_min: int = 0,
    relative_margin: float | None = 0.05,
    range_max: int | None = None,
) -> tuple[list[str], list[float]]:
    """The filters of one query, on its ranked candidates (best first).

    Known positives are removed first and the ranking cut to its first ``range_max`` (None: all); then the
    first ``range_min`` candidates are skipped, candidates above ``(1 - relative_margin) * min(positive_scores)``
    are dropped, and the first ``num_negatives`` left are kept (fewer when the ranking runs out).
    """
    ceiling = None
    if relative_margin is not None and positive_scores:
        ceiling = (1.0 - relative_margin) * min(positive_scores)
    candidates = [(d, s) for d, s in zip(ranked_ids, ranked_scores) if d not in known_positive_ids][:range_max]
    kept = [(d, s) for d, s in candidates[range_min:] if ceiling is None or s <= ceiling][:num_negatives]
    return [d for d, _ in kept], [s for _, s in kept]


@torch.no_grad()
def mine_hard_negatives(
    model,
    task: RetrievalTask,
    num_negatives: int = 10,
    range_min: int = 0,
    range_max: int = 100,
    relative_margin: float | None = 0.05,
    min_score: int = 1,
    batch_size: int = 64,
    similarity: str | None = None,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 50_000,
    show_progress_bar: bool = True,
    cache=None,
) -> list[MinedNegatives]:
    """Mine up to ``num_negatives`` hard negatives for every query of ``task`` that has a positive.

    The corpus and the queries are encoded once (``model.encode``), the top ``range_max`` documents of every
    query are found by the chunked exact search of evaluation (memory bounded by the chunk sizes), and
    :func:`select_negatives` filters them. Positives are the qrels rows with ``score >= min_score``; every
    document in a query's qrels (any grade) is excluded from its negatives. ``cache``: an
    :class:`~embedlab.cache.EmbeddingCache` the embeddings are read from and stored in (mining, distillation
    teachers and evaluation of the same model then encode the corpus once).

    Returns:
        one :class:`MinedNegatives` per query with a positive, in sorted query-id order. A query may get fewer
        than ``num_negatives`` when its ranking runs out after filtering (logged).
    """
    check_mining_args(num_negatives, range_min, range_max, relative_margin)
    similarity = similarity or model.similarity  # None: what the model was trained for
    query_ids = sorted(
        q for q, docs in task.qrels.items() if q in task.queries and any(s >= min_score for s in docs.values())
    )
    if not query_ids:
        raise DataError(f"{task.name}: no query with a qrels row of score >= {min_score} to mine negatives for")
    corpus_ids = list(task.corpus)
    index = {d: i for i, d in enumerate(corpus_ids)}
    missing = sorted({d for q in query_ids for d in task.qrels[q] if d not in index})
    if missing:
        raise DataError(f"{task.name}: qrels name documents missing from the corpus: {missing[:5]}")

    encode = functools.partial(cache.encode, model) if cache is not None else model.encode
    docs = encode([task.corpus[d] for d in corpus_ids], kind="document", batch_size=batch_size,
                  show_progress_bar=show_progress_bar, desc="encode corpus")  # (N, D)
    queries = encode([task.queries[q] for q in query_ids], kind="query", batch_size=batch_size,
                     show_progress_bar=show_progress_bar, desc="encode queries")  # (Q, D)
    # a query's qrels documents never count, so look that many further down the ranking
    extra = max(len(task.qrels[q]) for q in query_ids)
    scores, indices = exact_search(queries, docs, range_max + extra, similarity,
                                   query_chunk_size, corpus_chunk_size)  # (Q, k) each
    mined, short = [], 0
    for row, qid in enumerate(query_ids):
        judged = task.qrels[qid]
        positives = [index[d] for d, s in judged.items() if s >= min_score]
        pos_scores = (prepare_embeddings(docs[positives], similarity)
                      @ prepare_embeddings(queries[row], similarity)).tolist()  # (P,)
        neg_ids, neg_scores = select_negatives(
            [corpus_ids[i] for i in indices[row].tolist()], scores[row].tolist(), pos_scores, set(judged),
            num_negatives, range_min, relative_margin, range_max,
        )
        short += len(neg_ids) < num_negatives
        mined.append(MinedNegatives(qid, neg_ids, neg_scores))
    if short:
        log.warning("%d of %d queries got fewer than %d negatives after filtering", short, len(mined), num_negatives)
    return mined


def write_hard_negatives(mined: list[MinedNegatives], path: str | Path) -> Path:
    """One JSON line per query: ``{"query_id", "negative_ids", "negative_scores"}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for m in mined:
            f.write(json.dumps({"query_id": m.query_id, "negative_ids": m.negative_ids,
                                "negative_scores": m.negative_scores}) + "\n")
    return path


def mine(cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """``python mine.py``: mine ``cfg.source``'s queries with ``cfg.model``, write ``cfg.out``; returns
    (summary, objects) like ``train`` and ``evaluate``."""
    from hydra.utils import instantiate  # Hydra only for the config entry point

    from embedlab.evaluating import resolve_device

    task = instantiate(cfg.source).task()
    model = instantiate(cfg.model).to(resolve_device(cfg.get("device")))
    from embedlab.cache import EmbeddingCache

    cache = EmbeddingCache(cfg.cache_dir) if cfg.get("cache_dir") else None
    mined = mine_hard_negatives(model, task, show_progress_bar=cfg.get("progress_bar", True), cache=cache, **cfg.mining)
    path = write_hard_negatives(mined, cfg.out)
    counts = [len(m.negative_ids) for m in mined]
    summary = {"queries": len(mined), "negatives_min": min(counts), "negatives_mean": sum(counts) / len(counts),
               "path": str(path)}
    log.info("mined %s", summary)
    return summary, {"model": model, "task": task, "mined": mined}
