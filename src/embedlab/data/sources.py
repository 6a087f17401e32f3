"""Data sources: where a split's examples or evaluation task come from, one class per on-disk layout.

A source built from config (``_target_``) offers:
- ``examples()``: training :class:`Example` records;
- ``task()``: an evaluation task (:class:`RetrievalTask` or :class:`STSTask`);
- ``carve(fraction, seed)``: training examples and a held-out evaluation task, for datasets without a
  validation split (seeded and disjoint: by query when the held-out task is retrieval, by pair for STS).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from embedlab.data.errors import DataError
from embedlab.data.readers.beir import beir_download, beir_task_pairs, load_beir
from embedlab.data.readers.hard_negatives import attach_hard_negatives, attach_random_negatives, read_hard_negatives
from embedlab.data.readers.splits import carve_split
from embedlab.data.readers.sts import load_sts, sts_training_pairs
from embedlab.data.readers.tables import load_examples
from embedlab.data.records import Example, RetrievalTask, STSTask, example_ids
from embedlab.errors import ConfigError


class BeirSource:
    """A BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Training examples are (query, relevant document) pairs from the split's qrels (score >= 1).
    With ``download=true`` a missing folder is fetched from the BEIR mirror first (online users only).
    ``hard_negatives``: a JSONL file of mined negatives (``python mine.py``, :mod:`embedlab.mining`); every
    pair of a query then carries the first ``num_negatives`` of its ``negative_ids`` (texts and ids).
    ``random_negatives``: that many random corpus documents (never the query's qrels documents) appended
    after the mined ones, drawn once from ``seed`` and the pair's ids
    (:func:`~embedlab.data.readers.hard_negatives.attach_random_negatives`): the usual mix for rerankers.
    ``too_few_negatives``: ``error`` (default) or ``drop`` the pairs of a query with fewer mined negatives than
    ``num_negatives``.
    """

    def __init__(
        self,
        folder: str,
        split: str = "test",
        name: str | None = None,
        download: bool = False,
        hard_negatives: str | None = None,
        num_negatives: int = 1,
        random_negatives: int = 0,
        seed: int = 42,
        too_few_negatives: str = "error",
    ) -> None:
        self.folder = Path(folder)
        self.split = split
        self.name = name or self.folder.name
        if num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
        self.hard_negatives = None if hard_negatives in (None, "") else Path(hard_negatives)
        self.num_negatives = num_negatives
        if random_negatives < 0:
            raise ConfigError(f"random_negatives must be >= 0, got {random_negatives}")
        self.random_negatives = int(random_negatives)
        self.seed = seed
        self.too_few_negatives = too_few_negatives
        if download and not self.folder.is_dir():
            beir_download(self.name, self.folder.parent)

    def task(self) -> RetrievalTask:
        return load_beir(self.folder, split=self.split)

    def examples(self, query_ids=None, task: RetrievalTask | None = None) -> list[Example]:
        """Training pairs (of ``query_ids`` only, when given); ``task``: this split, if already loaded."""
        task = self.task() if task is None else task
        pairs = beir_task_pairs(task, self.folder / "qrels" / f"{self.split}.tsv", query_ids)
        if self.hard_negatives is not None:
            pairs = attach_hard_negatives(
                pairs, read_hard_negatives(self.hard_negatives), task.corpus, self.num_negatives, self.hard_negatives,
                too_few=self.too_few_negatives,
            )
        return attach_random_negatives(pairs, task.corpus, task.qrels, self.random_negatives, self.seed)

    def carve(self, fraction: float, seed: int) -> tuple[list[Example], RetrievalTask]:
        """Hold out ``fraction`` of the split's queries (with all their qrels) as a validation task."""
        full = self.task()
        val_ids, train_ids = carve_split(sorted(full.queries), fraction, seed)
        val_ids = set(val_ids)
        val = RetrievalTask(
            corpus=full.corpus,
            queries={q: t for q, t in full.queries.items() if q in val_ids},
            qrels={q: r for q, r in full.qrels.items() if q in val_ids},
            name=f"{self.name}-{self.split}-heldout",
        )
        return self.examples(query_ids=set(train_ids), task=full), val


class STSSource:
    """An STS Benchmark file of the original release (tab-separated, score 0-5 in column 5)."""

    def __init__(self, path: str, score_scale: float = 5.0, both_orders: bool = False) -> None:
        self.path = Path(path)
        self.score_scale = score_scale
        self.both_orders = both_orders

    def task(self) -> STSTask:
        return load_sts(self.path, score_scale=self.score_scale)

    def examples(self) -> list[Example]:
        """Scored pairs; ``both_orders``: each pair also as (text 2, text 1), for models whose score depends on
        the order of their inputs (a cross-encoder reads the pair as one sequence), so they learn a symmetric score."""
        return self._orders(sts_training_pairs(self.path, score_scale=self.score_scale))

    def _orders(self, pairs: list[Example]) -> list[Example]:
        if not self.both_orders:
            return pairs
        return pairs + [replace(e, query=e.positive, positive=e.query, query_id=e.positive_id, positive_id=e.query_id) for e in pairs]

    def carve(self, fraction: float, seed: int) -> tuple[list[Example], STSTask]:
        # carved before doubling: a held-out pair never trains in its other order
        val, train = carve_split(sts_training_pairs(self.path, score_scale=self.score_scale), fraction, seed)
        return self._orders(train), examples_to_sts(val, f"{self.path.name}-heldout")


class TableSource:
    """Pairs, triplets or scored pairs from a local JSONL/CSV/TSV/Parquet file or a Hugging Face dataset.

    ``columns`` maps embedlab's fields to the file's column names, e.g. ``{query: anchor, positive: pos}``.
    As an evaluation task, pairs become retrieval (each query against all positives of the split) and
    scored pairs become STS.
    """

    def __init__(
        self,
        path: str,
        kind: str = "pairs",
        columns: dict | None = None,
        split: str | None = None,
        score_scale: float = 1.0,
        format: str | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.columns = dict(columns) if columns else None
        self.split = split
        self.score_scale = score_scale
        self.format = format

    def examples(self) -> list[Example]:
        return load_examples(
            self.path, kind=self.kind, columns=self.columns, split=self.split, score_scale=self.score_scale, format=self.format
        )

    def task(self) -> RetrievalTask | STSTask:
        return self._as_task(self.examples(), f"{Path(str(self.path)).name}")

    def carve(self, fraction: float, seed: int) -> tuple[list[Example], RetrievalTask | STSTask]:
        """Hold out ``fraction`` of the pairs as an evaluation task: scored pairs one by one, other kinds
        by query (all pairs of a query on the same side, so no validation query is trained on)."""
        key = None if self.kind == "scored" else (lambda e: example_ids(e).query)
        val, train = carve_split(self.examples(), fraction, seed, key=key)
        return train, self._as_task(val, f"{Path(str(self.path)).name}-heldout")

    def _as_task(self, examples: list[Example], name: str):
        if self.kind == "scored":
            return examples_to_sts(examples, name)
        return examples_to_retrieval(examples, name)


def examples_to_sts(examples: list[Example], name: str) -> STSTask:
    if not examples:
        raise DataError(f"{name}: no scored pairs to evaluate")
    return STSTask([e.query for e in examples], [e.positive for e in examples], [float(e.score) for e in examples], name)


def examples_to_retrieval(examples: list[Example], name: str) -> RetrievalTask:
    """Each query must find its own positive among all positives (and negatives) of the split.

    Texts are keyed by :func:`~embedlab.data.records.example_ids` (the example's ids, else text hashes),
    so a query or document that occurs in several pairs is one entry, and a query with several positives
    has them all in its qrels (relevance 1).
    """
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for e in examples:
        ids = example_ids(e)
        queries[ids.query] = e.query
        corpus[ids.positive] = e.positive
        for neg, nid in zip(e.negatives, ids.negatives):
            corpus[nid] = neg
        qrels.setdefault(ids.query, {})[ids.positive] = 1
    if not queries:
        raise DataError(f"{name}: no pairs to evaluate")
    return RetrievalTask(corpus=corpus, queries=queries, qrels=qrels, name=name)
