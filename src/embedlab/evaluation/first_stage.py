"""First-stage retrievers: the candidate lists (a :data:`~embedlab.evaluation.runs.Run`) a reranker rescores.

Two-stage retrieval (e.g. Nogueira & Cho 2019, "Passage Re-ranking with BERT") first asks a cheap retriever for the
top ``k`` documents of every query, then scores only those ``k`` with an expensive model (a cross-encoder). Every
retriever here has the same small interface (:class:`Retriever`)::

    run = retriever.retrieve(task, top_k=100)   # {query_id: {doc_id: score}} for every query of the task

* :class:`DenseRetriever`: a bi-encoder embeds queries and corpus; exact (or FAISS) top-k search over the embeddings,
  the same search as :class:`~embedlab.evaluation.evaluators.RetrievalEvaluator`.
* :class:`BM25Retriever`: lexical BM25 (Robertson & Zaragoza 2009) via the ``bm25s`` library (Lù 2024), with
  Snowball stemming (PyStemmer) and stopword removal; the classic strong baseline of BEIR (Thakur et al. 2021).
* :class:`HybridRetriever`: reciprocal-rank fusion (Cormack, Clarke & Büttcher 2009) of several retrievers, e.g.
  dense + BM25, whose errors differ.
* :class:`RunFileRetriever`: candidates read from a TREC or JSON run file (:mod:`embedlab.evaluation.runs`), e.g.
  a run from Pyserini or from an earlier ``evaluate.py``.

Ties: dense and BM25 cut ties at the k-th score by corpus order (the lower position in ``task.corpus`` wins), as
:mod:`embedlab.evaluation.search` does; fusion and run files use trec_eval's order (score descending, doc id
descending), as :func:`~embedlab.evaluation.runs.top_k_run` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.metrics import rank_documents
from embedlab.evaluation.runs import Run, read_run, top_k_run
from embedlab.evaluation.search import (
    DEFAULT_CORPUS_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    SEARCHES,
    SIMILARITIES,
    check_search_args,
    require_faiss,
    search_to_run,
)

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "HybridRetriever",
    "Retriever",
    "RunFileRetriever",
    "reciprocal_rank_fusion",
]

log = logging.getLogger(__name__)


class Retriever(Protocol):
    """What a reranker needs from a first stage: a ``name`` and the top ``top_k`` documents of every query."""

    name: str

    def retrieve(self, task: RetrievalTask, top_k: int, show_progress_bar: bool = True) -> Run:
        """``{query_id: {doc_id: score}}`` with one entry per query of ``task`` (empty dict: no candidate), at most
        ``top_k`` documents each, higher score = better."""
        ...

    def models(self) -> list[Any]:
        """The neural models it holds (``[]`` for lexical ones), e.g. for an entry point to move to a device."""
        ...


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")


# ----------------------------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------------------------
class DenseRetriever:
    """Bi-encoder retrieval: embed queries and corpus, top-k by cosine / dot product.

    Args:
        model: a :class:`~embedlab.models.BiEncoder` (anything with ``encode(texts, kind=, batch_size=,
            show_progress_bar=, desc=) -> (N, D)`` and ``similarity``). It is re-encoded on every call, so a model
            that trains between calls is retrieved with its current weights.
        batch_size: encoding batch size.
        similarity: ``cos`` or ``dot``; ``None``: the model's own ``similarity``.
        search: ``exact`` or ``faiss`` (:data:`~embedlab.evaluation.search.SEARCHES`); both exact.
        query_chunk_size, corpus_chunk_size: bound the search's memory (a ``query_chunk_size x corpus_chunk_size``
            score block at a time, never the full ``Q x N`` matrix).

    Scores are the similarities themselves; every query gets ``min(top_k, len(corpus))`` documents.
    """

    name = "dense"

    def __init__(
        self,
        model: Any,
        batch_size: int = 64,
        similarity: str | None = None,
        search: str = "exact",
        query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
        corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
    ) -> None:
        if similarity is not None and similarity not in SIMILARITIES:
            raise ConfigError(
                f"retriever.similarity must be one of {', '.join(SIMILARITIES)} or null, got {similarity!r}"
            )
        if search not in SEARCHES:
            raise ConfigError(f"retriever.search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if search == "faiss":
            require_faiss()  # fail at construction, not after encoding
        if batch_size < 1:
            raise ConfigError(f"retriever.batch_size must be >= 1, got {batch_size}")
        check_search_args(1, query_chunk_size, corpus_chunk_size)
        self.model = model
        self.batch_size = batch_size
        self.similarity = similarity
        self.search = search
        self.query_chunk_size = query_chunk_size
        self.corpus_chunk_size = corpus_chunk_size

    def models(self) -> list[Any]:
        return [self.model]

    def retrieve(self, task: RetrievalTask, top_k: int, show_progress_bar: bool = True) -> Run:
        _check_top_k(top_k)
        query_ids, corpus_ids = list(task.queries), list(task.corpus)

        def encode(texts: list[str], kind: str, desc: str):
            return self.model.encode(
                texts, kind=kind, batch_size=self.batch_size, show_progress_bar=show_progress_bar, desc=desc
            )

        queries = encode([task.queries[q] for q in query_ids], "query", "encode queries")  # (Q, D) float32 CPU
        corpus = encode([task.corpus[d] for d in corpus_ids], "document", "encode corpus")  # (N, D)
        device = getattr(self.model, "device", None)
        if device is not None:
            queries = queries.to(device)  # search on the model's device; the corpus follows chunk by chunk
        scores, indices = SEARCHES[self.search](
            queries, corpus, top_k, self.similarity or self.model.similarity,
            query_chunk_size=self.query_chunk_size, corpus_chunk_size=self.corpus_chunk_size,
        )  # (Q, k) each
        return search_to_run(scores, indices, query_ids, corpus_ids)


# ----------------------------------------------------------------------------------------------------------------
# BM25
# ----------------------------------------------------------------------------------------------------------------
#: ``bm25s`` scoring variants (Kamphuis et al. 2020, "Which BM25 Do You Mean?").
BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


class BM25Retriever:
    """Okapi BM25 over ``task.corpus`` (each document as the task holds it: title + text for BEIR).

    Score of document ``d`` for query ``q`` (``method="lucene"``, the variant of Lucene / Elasticsearch / Pyserini)::

        score(q, d) = sum over query tokens t in d of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
        idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

    with ``tf`` the count of ``t`` in ``d``, ``|d|`` the document's token count (after stopword removal), ``avgdl``
    the corpus mean, ``N`` the corpus size and ``df`` the number of documents holding ``t``. A token repeated in
    the query counts once per occurrence (Lucene's bag-of-words query does the same). ``k1`` sets how fast term
    frequency saturates, ``b`` how strongly long documents are penalised (Robertson & Zaragoza 2009).

    Tokenization (``bm25s.tokenize``, the same for corpus and queries): lowercase, words of two or more word
    characters (scikit-learn's pattern), then stopword removal, then the Snowball stemmer.

    Args:
        k1, b: BM25 parameters (``k1 >= 0``, ``0 <= b <= 1``); 1.5 / 0.75 are bm25s' defaults, Pyserini uses
            0.9 / 0.4.
        method: ``lucene`` | ``robertson`` | ``atire`` | ``bm25l`` | ``bm25+`` (:data:`BM25_METHODS`).
        stopwords: ``"en"`` (bm25s' English list), another language bm25s knows (``"de"``, ``"fr"``...), a list of
            words, or ``None`` for none.
        stemmer: a PyStemmer (Snowball) language such as ``"english"``, or ``None`` for no stemming.
        config_key: the config node these options come from, named in errors (``retriever``; a BM25 teacher
            passes its own).

    Candidates: only documents that hold at least one query token are listed (a document matching nothing has no
    BM25 evidence; ranking it at score 0 among thousands of ties would be arbitrary), so a query can get fewer than
    ``top_k`` documents, and a query with no indexed token gets none. Ties at the k-th score go to the lower
    corpus position. Scores are bm25s' float32 values.

    The index is built on the first :meth:`retrieve` of a corpus and reused while later calls pass the same corpus
    object (``task.corpus``, compared by identity and size), so per-epoch validation indexes once. Build a new
    dict rather than editing a retrieved corpus in place.

    :meth:`score` gives the BM25 score of chosen documents instead of the top ``k`` (e.g. a teacher scoring mined
    candidates, :mod:`embedlab.scoring`): same index, same tokens, same numbers.
    """

    name = "bm25"

    def __init__(
        self,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | Sequence[str] | None = "en",
        stemmer: str | None = "english",
        config_key: str = "retriever",
    ) -> None:
        import bm25s

        key = config_key  # where the options sit in the user's config, named in errors
        if k1 < 0:
            raise ConfigError(f"{key}.k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise ConfigError(f"{key}.b must be in [0, 1], got {b}")
        if method not in BM25_METHODS:
            raise ConfigError(f"{key}.method must be one of {', '.join(BM25_METHODS)}, got {method!r}")
        if stopwords is not None and not isinstance(stopwords, str):
            stopwords = [str(w) for w in stopwords]  # a ListConfig from Hydra -> plain strings
        try:
            bm25s.tokenize([""], stopwords=stopwords, show_progress=False)  # the public way to check the name
        except ValueError:
            raise ConfigError(
                f"{key}.stopwords {stopwords!r} is not a language bm25s knows (en, de, fr, es, ...): "
                "give a language code, a list of words, or null"
            ) from None
        if stemmer is not None:
            import Stemmer

            if stemmer not in Stemmer.algorithms():
                raise ConfigError(
                    f"{key}.stemmer must be null or one of PyStemmer's languages "
                    f"({', '.join(Stemmer.algorithms())}), got {stemmer!r}"
                )
        self.k1 = float(k1)
        self.b = float(b)
        self.method = method
        self.stopwords = stopwords
        self.stemmer = stemmer
        self._stemmer_fn = None
        # (corpus dict it was built from, its size, bm25s.BM25 or None for a corpus without any token)
        self._index: tuple[dict[str, str], int, Any] | None = None

    def _tokenize(self, texts: list[str], return_ids: bool, show_progress_bar: bool):
        """``bm25s.tokenize`` with this retriever's stopwords and stemmer."""
        import bm25s

        if self.stemmer is not None and self._stemmer_fn is None:
            import Stemmer

            self._stemmer_fn = Stemmer.Stemmer(self.stemmer).stemWords
        return bm25s.tokenize(
            texts, stopwords=self.stopwords, stemmer=self._stemmer_fn if self.stemmer else None,
            return_ids=return_ids, show_progress=show_progress_bar,
        )

    def _bm25(self, corpus: dict[str, str], show_progress_bar: bool):
        """The bm25s index of ``corpus`` (documents in ``corpus`` order), built once per corpus object."""
        if self._index is not None and self._index[0] is corpus and self._index[1] == len(corpus):
            return self._index[2]
        import bm25s

        tokens = self._tokenize(list(corpus.values()), return_ids=True, show_progress_bar=show_progress_bar)
        index = None
        if tokens.vocab:
            index = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
            index.index(tokens, create_empty_token=False, show_progress=show_progress_bar)
        self._index = (corpus, len(corpus), index)
        return index

    def _query_token_ids(self, index, queries: list[str], show_progress_bar: bool) -> list[list[int]]:
        """Each query's tokens as columns of ``index`` (tokens the corpus lacks dropped; repeats kept)."""
        vocab = index.vocab_dict  # token -> column of the (N, V) score matrix, stored as CSC
        return [[vocab[t] for t in tokens if t in vocab] for tokens in self._tokenize(queries, False, show_progress_bar)]

    def models(self) -> list[Any]:
        return []

    def score(
        self,
        corpus: dict[str, str],
        queries: Sequence[str],
        candidates: Sequence[Sequence[str]],
        show_progress_bar: bool = True,
    ) -> list[np.ndarray]:
        """BM25 scores of given documents: ``out[i][j]`` = score of document ``candidates[i][j]`` for ``queries[i]``.

        Args:
            corpus: ``{doc_id: text}``, the collection the statistics (``N``, ``df``, ``avgdl``) come from; indexed
                once per corpus object, as in :meth:`retrieve`.
            queries: query texts.
            candidates: per query, ids of ``corpus`` documents (any number, repeats allowed).

        Returns:
            one float64 array (len(candidates[i]),) per query: exactly what :meth:`retrieve` gives a document it
            lists (bm25s' float32 sum over the query's tokens, token by token in query order), and 0 for a
            document holding no query token (``lucene``, ``robertson``, ``atire``; ``bm25l`` / ``bm25+`` add
            their constant non-occurrence score to every document, as bm25s does).

        Cost per query: one pass over the posting lists of its tokens, never a score for every corpus document.
        """
        if len(queries) != len(candidates):
            raise ValueError(f"got {len(queries)} queries but {len(candidates)} candidate lists: they must pair up")
        index = self._bm25(corpus, show_progress_bar)
        if index is None:
            return [np.zeros(len(c)) for c in candidates]
        position = {d: i for i, d in enumerate(corpus)}
        unknown = sorted({d for c in candidates for d in c if d not in position})
        if unknown:
            raise ValueError(f"candidate documents not in the corpus: {unknown[:5]}")
        data, indptr, postings = index.scores["data"], index.scores["indptr"], index.scores["indices"]
        nonoccurrence = getattr(index, "nonoccurrence_array", None)  # bm25l / bm25+ only
        out = []
        for token_ids, docs in tqdm(
            zip(self._query_token_ids(index, list(queries), show_progress_bar), candidates), total=len(queries),
            desc="bm25 score", disable=not show_progress_bar, leave=False,
        ):
            # distinct candidate rows, sorted: a posting belongs to a candidate when it lands on an equal entry
            rows, slots = np.unique(np.array([position[d] for d in docs], dtype=np.int64), return_inverse=True)
            acc = np.zeros(len(rows), dtype=data.dtype)  # (u,) summed in bm25s' dtype and order: token by token
            for t in token_ids if len(rows) else []:
                docs_t, values_t = postings[indptr[t] : indptr[t + 1]], data[indptr[t] : indptr[t + 1]]
                at = np.minimum(np.searchsorted(rows, docs_t), len(rows) - 1)
                hit = rows[at] == docs_t
                acc[at[hit]] += values_t[hit]  # a token's postings name each document once: no repeated slot
            scores = acc[slots]  # (c,) back to the candidates' order, repeats included
            if nonoccurrence is not None and token_ids:
                scores += nonoccurrence[token_ids].sum()
            out.append(scores.astype(np.float64))
        return out

    def retrieve(self, task: RetrievalTask, top_k: int, show_progress_bar: bool = True) -> Run:
        _check_top_k(top_k)
        corpus_ids = list(task.corpus)
        index = self._bm25(task.corpus, show_progress_bar)
        query_ids = list(task.queries)
        run: Run = {qid: {} for qid in query_ids}
        if index is None or not query_ids:
            return run
        indptr, postings = index.scores["indptr"], index.scores["indices"]
        for qid, token_ids in tqdm(
            zip(query_ids, self._query_token_ids(index, [task.queries[q] for q in query_ids], show_progress_bar)),
            total=len(query_ids), desc="bm25 retrieve", disable=not show_progress_bar, leave=False,
        ):
            if not token_ids:
                continue
            # documents holding at least one query token: the union of the tokens' posting lists, ascending
            matched = np.unique(np.concatenate([postings[indptr[t] : indptr[t + 1]] for t in token_ids]))
            scores = index.get_scores_from_ids(token_ids)[matched].astype(np.float64)  # (m,)
            if len(matched) > top_k:  # keep every doc scoring >= the k-th best, then cut after a stable sort
                kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
                keep = np.flatnonzero(scores >= kth)
                matched, scores = matched[keep], scores[keep]
            order = np.argsort(-scores, kind="stable")[:top_k]  # ties keep ascending corpus position
            run[qid] = {corpus_ids[j]: s for j, s in zip(matched[order].tolist(), scores[order].tolist())}
        return run


# ----------------------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------------------
def reciprocal_rank_fusion(
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    weights: Mapping[str, float] | None = None,
    k: float = 60,
) -> Run:
    """Weighted reciprocal-rank fusion (Cormack, Clarke & Büttcher 2009, SIGIR).

    ``score(q, d) = sum_i w_i / (k + rank_i(q, d))`` over the runs ``i`` that list ``d`` for ``q``, with
    ``rank_i`` from 1 in trec_eval's order (score descending, ties by doc id descending); a run that does not list
    ``d`` adds nothing. Only ranks count, never raw scores, so runs on incomparable scales (BM25 vs cosine) fuse
    without normalisation; ``k`` (60 in the paper) damps the weight of the very first ranks.

    Args:
        runs: ``{name: run}``.
        weights: ``{name: w_i}`` for every name of ``runs``; ``None``: 1 each.
        k: the rank constant, ``>= 0``.

    Returns:
        ``{query_id: {doc_id: fused score}}`` over every query of any run (queries in first-seen order).

    Raises:
        ConfigError: ``weights`` keys differ from ``runs`` keys, a negative or non-finite weight, ``k < 0``.
    """
    if k < 0:
        raise ConfigError(f"retriever.k must be >= 0, got {k}")
    weights = _check_weights(weights, runs.keys())
    fused: Run = {}
    for name, run in runs.items():
        w = weights[name]
        for qid, docs in run.items():
            scores = fused.setdefault(qid, {})
            for rank, doc_id in enumerate(rank_documents(docs), start=1):
                scores[doc_id] = scores.get(doc_id, 0.0) + w / (k + rank)
    return fused


def _check_weights(weights: Mapping[str, float] | None, names) -> dict[str, float]:
    names = list(names)
    if weights is None:
        return {name: 1.0 for name in names}
    weights = {str(key): float(value) for key, value in weights.items()}
    if set(weights) != set(names):
        raise ConfigError(
            f"retriever.weights must give one weight per retriever ({', '.join(names)}), got {', '.join(weights)}"
        )
    for name, w in weights.items():
        if not np.isfinite(w) or w < 0:
            raise ConfigError(f"retriever.weights.{name} must be a finite number >= 0, got {w}")
    return weights


class HybridRetriever:
    """Reciprocal-rank fusion of several first stages (:func:`reciprocal_rank_fusion`), e.g. dense + BM25.

    Args:
        retrievers: ``{name: retriever}``; each retrieves its top ``depth`` documents.
        weights: ``{name: weight}`` (same names); ``None``: equal weights.
        k: RRF's rank constant (60 in Cormack et al. 2009).
        depth: documents taken from each retriever; ``None``: ``max(top_k, 100)``. A document beyond a retriever's
            depth gets nothing from that retriever.

    The fused run keeps each query's best ``top_k`` by fused score (trec_eval's order, ties by doc id).
    """

    name = "hybrid"

    def __init__(
        self,
        retrievers: Mapping[str, Retriever],
        weights: Mapping[str, float] | None = None,
        k: float = 60,
        depth: int | None = None,
    ) -> None:
        if not retrievers:
            raise ConfigError("retriever.retrievers must hold at least one retriever")
        if k < 0:
            raise ConfigError(f"retriever.k must be >= 0, got {k}")
        if depth is not None and depth < 1:
            raise ConfigError(f"retriever.depth must be >= 1 or null, got {depth}")
        self.retrievers = dict(retrievers)
        self.weights = _check_weights(weights, self.retrievers)
        self.k = k
        self.depth = depth

    def models(self) -> list[Any]:
        return [m for r in self.retrievers.values() for m in getattr(r, "models", list)()]

    def retrieve(self, task: RetrievalTask, top_k: int, show_progress_bar: bool = True) -> Run:
        _check_top_k(top_k)
        depth = self.depth if self.depth is not None else max(top_k, 100)
        runs = {name: r.retrieve(task, depth, show_progress_bar) for name, r in self.retrievers.items()}
        fused = top_k_run(reciprocal_rank_fusion(runs, self.weights, self.k), top_k)
        return {qid: fused.get(qid, {}) for qid in task.queries}


# ----------------------------------------------------------------------------------------------------------------
# run files
# ----------------------------------------------------------------------------------------------------------------
class RunFileRetriever:
    """Candidates from a TREC or JSON run file (:func:`~embedlab.evaluation.runs.read_run`).

    Every query and document id of the file must belong to the task (a run of another split or corpus is an error,
    not a silently low score). Each query keeps its best ``top_k`` documents (trec_eval's order); a query of the
    task that the file lacks gets no candidates, with one warning giving the count. The file is read once per task.
    """

    name = "run"

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self._cache: tuple[RetrievalTask, Run] | None = None
        self._warned = False

    def models(self) -> list[Any]:
        return []

    def retrieve(self, task: RetrievalTask, top_k: int, show_progress_bar: bool = True) -> Run:
        _check_top_k(top_k)
        if self._cache is None or self._cache[0] is not task:
            self._cache = (task, read_run(self.path, task))
        run = self._cache[1]
        missing = sum(1 for qid in task.queries if qid not in run)
        if missing and not self._warned:
            log.warning(
                "%s: %d of the task's %d queries are not in the run file; they get no candidates",
                self.path, missing, len(task.queries),
            )
            self._warned = True
        top = top_k_run({qid: run[qid] for qid in task.queries if qid in run}, top_k)
        return {qid: top.get(qid, {}) for qid in task.queries}
