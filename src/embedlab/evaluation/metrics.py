"""Ranking metrics for retrieval, numerically identical to ``pytrec_eval`` (trec_eval) as BEIR/MTEB report them.

Inputs use the ``pytrec_eval`` dict layout:

* ``run``: ``{query_id: {doc_id: score}}``, higher score = better; a doc's rank comes from the score only.
* ``qrels``: ``{query_id: {doc_id: relevance}}``, integer graded relevance judgments.

Metrics at cutoff ``k`` (all computed per query, then averaged over queries):

* ``ndcg@k`` (trec_eval ``ndcg_cut_k``): ``DCG@k / IDCG@k`` with ``DCG@k = sum_{r<=k} gain_r / log2(r + 1)``.
  The gain is the graded relevance itself (``max(rel, 0)``; *not* ``2**rel - 1``), and the ideal ranking
  sorts every judged doc of the query by gain, so relevant docs missing from the run still lower the score.
* ``map@k`` (``map_cut_k``): sum of ``precision@r`` over the ranks ``r <= k`` that hold a relevant doc, divided by
  the query's *total* number of relevant docs (not ``min(k, num_rel)``).
* ``recall@k`` (``recall_k``): relevant docs in the top ``k`` / total relevant docs of the query.
* ``precision@k`` (``P_k``): relevant docs in the top ``k`` / ``k``; the denominator stays ``k`` even when the
  run holds fewer than ``k`` docs.
* ``mrr@k``: trec_eval ``recip_rank`` of the run cut to its top ``k``: ``1 / rank`` of the first relevant doc,
  0 when none is in the top ``k``.

trec_eval conventions, reproduced exactly:

* A doc is relevant when ``rel >= 1`` (pytrec_eval's default ``relevance_level``). Docs judged ``<= 0`` and docs
  absent from ``qrels`` are non-relevant and contribute zero gain.
* Scores are stored as C ``float`` (float32) by trec_eval, so two doubles that round to the same float32 tie.
* Ranking: score descending, ties broken by doc id *descending* (byte-wise string comparison, ``"b"`` before
  ``"a"``, ``"9"`` before ``"10"``). The run's own dict order never matters.
* A query with no relevant doc still counts, with 0 on every metric; a query whose qrels dict is empty does not
  exist for trec_eval.

Which queries are averaged (``missing_queries``):

* ``"skip"``: exactly ``pytrec_eval``/BEIR: the queries present in both ``run`` and ``qrels`` (a run entry with an
  empty dict still counts, as 0). A qrels query the retriever returned nothing for is silently left out, which
  inflates the mean.
* ``"zero"`` (default): every query of ``qrels``; one absent from ``run`` is scored as an empty ranking, i.e. 0 on
  every metric. This is the honest number when the run may be incomplete; when the run covers every qrels query
  (the usual exact-search case) both modes agree.

Queries in ``run`` but not in ``qrels`` are ignored in both modes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: metric names, in the order they appear in the output dicts
METRICS = ("ndcg", "map", "mrr", "recall", "precision")

MISSING_QUERIES = ("zero", "skip")

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def rank_documents(scores: Mapping[str, float], top_k: int | None = None) -> list[str]:
    """Doc ids of one query in trec_eval order: float32 score descending, then doc id descending.

    Raises:
        ValueError: a score is NaN (trec_eval's order is undefined then).
    """
    doc_ids = list(scores)
    if not doc_ids:
        return []
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(doc_ids))
    if np.isnan(values).any():
        raise ValueError("run contains NaN scores; ranking is undefined")
    # trec_eval keeps `float sim`: round to float32 first so near-equal doubles tie as they do there
    with np.errstate(over="ignore"):
        values32 = values.astype(np.float32).astype(np.float64).tolist()
    # (score, doc_id) tuples in reverse order == score desc, doc id desc (ids are unique within a query)
    pairs = zip(values32, doc_ids)
    if top_k is not None and top_k < len(doc_ids):
        ranked = heapq.nlargest(top_k, pairs)
    else:
        ranked = sorted(pairs, reverse=True)
    return [doc_id for _, doc_id in ranked]


def _evaluated_queries(run: Run, qrels: Qrels, missing_queries: str) -> list[str]:
    if missing_queries not in MISSING_QUERIES:
        raise ValueError(
            f"missing_queries must be one of {', '.join(map(repr, MISSING_QUERIES))}, got {missing_queries!r}"
        )
    # a query with an empty qrels dict is unknown to trec_eval in both modes
    judged = [qid for qid, judgments in qrels.items() if judgments]
    if missing_queries == "skip":
        return [qid for qid in judged if qid in run]
    return judged


def _check_k_values(k_values: Iterable[int]) -> list[int]:
    ks = list(dict.fromkeys(int(k) for k in k_values))
    if not ks or min(ks) < 1:
        raise ValueError(f"k_values must be a non-empty collection of integers >= 1, got {list(k_values)!r}")
    return ks


def per_query_metrics(
    run: Run,
    qrels: Qrels,
    k_values: Sequence[int] = (1, 3, 5, 10, 100),
    missing_queries: str = "zero",
    ignore_identical_ids: bool = False,
) -> dict[str, dict[str, float]]:
    """Every metric at every cutoff for each evaluated query.

    Args:
        run: ``{query_id: {doc_id: score}}``.
        qrels: ``{query_id: {doc_id: relevance}}``.
        k_values: cutoffs; each metric is reported at each.
        missing_queries: ``"zero"`` or ``"skip"``; which queries are evaluated (see the module docstring).
        ignore_identical_ids: drop a retrieved doc whose id equals the query id before ranking, as BEIR does for
            datasets whose queries are also corpus docs (ArguAna, Quora, CQADupStack).

    Returns:
        ``{query_id: {"ndcg@10": ..., "map@10": ..., "mrr@10": ..., "recall@10": ..., "precision@10": ...}}``
        in qrels order.
    """
    ks = _check_k_values(k_values)
    max_k = max(ks)
    query_ids = _evaluated_queries(run, qrels, missing_queries)
    n = len(query_ids)

    # graded relevance of the docs at ranks 1..max_k; zero beyond the end of a short run: (n, max_k)
    ranked_rel = np.zeros((n, max_k), dtype=np.float64)
    # gains of the ideal ranking (all judged docs by decreasing gain), cut at max_k: (n, max_k)
    ideal_gain = np.zeros((n, max_k), dtype=np.float64)
    num_rel = np.zeros(n, dtype=np.float64)
    for row, qid in enumerate(query_ids):
        judgments = qrels[qid]
        scores = run.get(qid, {})
        if ignore_identical_ids and qid in scores:
            scores = {doc_id: s for doc_id, s in scores.items() if doc_id != qid}
        ranking = rank_documents(scores, max_k)
        ranked_rel[row, : len(ranking)] = [judgments.get(doc_id, 0) for doc_id in ranking]
        gains = sorted((rel for rel in judgments.values() if rel > 0), reverse=True)[:max_k]
        ideal_gain[row, : len(gains)] = gains
        num_rel[row] = sum(1 for rel in judgments.values() if rel >= 1)

    is_rel = (ranked_rel >= 1).astype(np.float64)  # (n, max_k)
    gain = np.maximum(ranked_rel, 0.0)  # negative judgments count as 0, like trec_eval
    ranks = np.arange(1, max_k + 1, dtype=np.float64)  # (max_k,)
    discount = 1.0 / np.log2(ranks + 1.0)

    cum_rel = np.cumsum(is_rel, axis=1)  # relevant docs in the top r: (n, max_k)
    cum_dcg = np.cumsum(gain * discount, axis=1)
    cum_idcg = np.cumsum(ideal_gain * discount, axis=1)
    cum_ap = np.cumsum(is_rel * cum_rel / ranks, axis=1)  # sum of precision@r at relevant ranks
    # rank of the first relevant doc, 0 when none in the top max_k: (n,)
    has_rel = is_rel.any(axis=1)
    first_rank = np.where(has_rel, is_rel.argmax(axis=1) + 1, 0)

    safe_num_rel = np.where(num_rel > 0, num_rel, 1.0)  # num_rel == 0 -> numerators are 0 too
    values: dict[str, np.ndarray] = {}
    for k in ks:
        c = k - 1
        idcg = cum_idcg[:, c]
        values[f"ndcg@{k}"] = np.divide(cum_dcg[:, c], idcg, out=np.zeros(n), where=idcg > 0)
        values[f"map@{k}"] = cum_ap[:, c] / safe_num_rel
        values[f"mrr@{k}"] = np.where((first_rank > 0) & (first_rank <= k), 1.0 / np.maximum(first_rank, 1), 0.0)
        values[f"recall@{k}"] = cum_rel[:, c] / safe_num_rel
        values[f"precision@{k}"] = cum_rel[:, c] / k

    names = [f"{metric}@{k}" for metric in METRICS for k in ks]
    columns = {name: values[name].tolist() for name in names}
    return {qid: {name: columns[name][row] for name in names} for row, qid in enumerate(query_ids)}


def retrieval_metrics(
    run: Run,
    qrels: Qrels,
    k_values: Sequence[int] = (1, 3, 5, 10, 100),
    prefix: str = "test/",
    missing_queries: str = "zero",
    ignore_identical_ids: bool = False,
) -> dict[str, float]:
    """Mean over queries of nDCG, MAP, MRR, recall and precision at each cutoff, as pytrec_eval computes them.

    Args:
        run, qrels, k_values, missing_queries, ignore_identical_ids: see :func:`per_query_metrics`.
        prefix: prepended to every key, e.g. ``"val/"`` for logging.

    Returns:
        Flat ``{f"{prefix}{metric}@{k}": mean}`` for metric in ``ndcg, map, mrr, recall, precision`` and each k.

    Raises:
        ValueError: no query is left to evaluate (empty qrels, or no overlap with the run under ``"skip"``).
    """
    return retrieval_metrics_and_units(run, qrels, k_values, prefix, missing_queries, ignore_identical_ids)[0]


def retrieval_metrics_and_units(
    run: Run,
    qrels: Qrels,
    k_values: Sequence[int] = (1, 3, 5, 10, 100),
    prefix: str = "test/",
    missing_queries: str = "zero",
    ignore_identical_ids: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """:func:`retrieval_metrics` and the per-query values it averages, with the same prefixed keys:
    ``({"test/ndcg@10": mean, ...}, {query_id: {"test/ndcg@10": value, ...}})`` (the per-query files of
    :mod:`embedlab.evaluation.per_query`)."""
    ks = _check_k_values(k_values)
    per_query = per_query_metrics(
        run, qrels, ks, missing_queries=missing_queries, ignore_identical_ids=ignore_identical_ids
    )
    if not per_query:
        raise ValueError(
            f"no query to evaluate: {len(qrels)} qrels queries, {len(run)} run queries, "
            f"missing_queries={missing_queries!r}"
        )
    names = [f"{metric}@{k}" for metric in METRICS for k in ks]
    table = np.array([[row[name] for name in names] for row in per_query.values()], dtype=np.float64)
    means = table.mean(axis=0).tolist()
    units = {qid: {f"{prefix}{name}": row[name] for name in names} for qid, row in per_query.items()}
    return {f"{prefix}{name}": mean for name, mean in zip(names, means)}, units


def correlations(predicted: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """``(Spearman, Pearson)`` in percent between (P,) predicted similarities and (P,) gold scores
    (``torchmetrics.functional``, imported here: it pulls in scipy and takes seconds to import)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    return float(spearman_corrcoef(predicted, gold)) * 100, float(pearson_corrcoef(predicted, gold)) * 100
