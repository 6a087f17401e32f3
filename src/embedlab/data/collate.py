"""Batching: training examples -> text lists + ids + scores; evaluation texts -> length-sorted batches.

Batches carry raw text; the LightningModule tokenizes them with its model's query/document settings, so
the data layer never needs the tokenizer and the same dataset serves any model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from embedlab.data.errors import DataError
from embedlab.data.records import Example, example_ids, text_id


class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate_examples(examples: list[Example]) -> dict:
    """list[Example] -> {query, positive: list[str]; negatives: list[str] (B*n, grouped by example) or None;
    num_negatives; scores: (B,) float tensor or None; query_ids / positive_ids / negative_ids;
    known_positive_ids: per example the ids of its query's known positives (empty list when unknown)}."""
    text_only = [e.query is None or e.positive is None for e in examples]
    if any(text_only):
        if not all(text_only):
            raise DataError(
                "a batch mixes unlabelled texts (a text collection) with (query, positive) pairs: "
                "put them in different datasets of a mixture (data=mixture), one dataset per step"
            )
        return collate_texts(examples)
    n = len(examples[0].negatives)
    if any(len(e.negatives) != n for e in examples):
        counts = sorted({len(e.negatives) for e in examples})
        raise DataError(f"every example in a batch needs the same number of negatives; this batch has {counts}")
    has_scores = [e.score is not None for e in examples]
    if any(has_scores) and not all(has_scores):
        raise DataError("some examples in a batch have a score and others do not")
    all_ids = [example_ids(e) for e in examples]  # the data's ids, else text hashes
    batch = {
        "query": [e.query for e in examples],
        "positive": [e.positive for e in examples],
        "negatives": [t for e in examples for t in e.negatives] if n else None,
        "num_negatives": n,
        "scores": torch.tensor([float(e.score) for e in examples]) if all(has_scores) else None,
        "query_ids": [ids.query for ids in all_ids],
        "positive_ids": [ids.positive for ids in all_ids],
        "negative_ids": [n for ids in all_ids for n in ids.negatives],
        "known_positive_ids": [list(e.known_positive_ids) for e in examples],
        "paired": True,
    }
    if examples[0].teacher_scores is not None:
        batch["teacher_scores"] = torch.tensor([e.teacher_scores for e in examples], dtype=torch.float32)
    return batch


def collate_texts(examples: list[Example]) -> dict:
    """Unlabelled texts (``Example(query=text, positive=None)`` for a query, ``Example(query=None, positive=text)``
    for a document; :class:`~embedlab.data.texts.TextCollection`) -> {query: the query texts, positive: the
    document texts, paired: False}; no pair losses apply, only losses of each text's embedding (distillation)."""
    queries = [e.query for e in examples if e.query is not None]
    docs = [e.positive for e in examples if e.positive is not None]
    return {
        "query": queries,
        "positive": docs,
        "negatives": None,
        "num_negatives": 0,
        "scores": None,
        "query_ids": [text_id(t) for t in queries],
        "positive_ids": [text_id(t) for t in docs],
        "negative_ids": [],
        "known_positive_ids": [],
        "paired": False,
    }


class EncodeBatches(Dataset):
    """Pre-built, length-sorted batches of texts to embed for evaluation (one item = one batch).

    Each item: ``{"key", "kind", "index": (b,) positions in the request, "texts"}``. Longest texts come
    first so each batch pads little, and a batch never mixes queries with documents.
    """

    def __init__(self, requests, batch_size: int) -> None:
        self.batches = []
        self.sizes = {}
        for req in requests:
            self.sizes[req.key] = len(req.texts)
            for idx in length_sorted_batches([len(t) for t in req.texts], batch_size):
                self.batches.append(
                    {"key": req.key, "kind": req.kind, "index": torch.tensor(idx), "texts": [req.texts[i] for i in idx]}
                )

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` in batches of ``batch_size``, longest first (ties keep their order), so
    each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def identity_collate(item):
    return item
