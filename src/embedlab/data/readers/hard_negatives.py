"""Mined hard negatives: reading the file ``python mine.py`` writes and attaching its negatives to pairs.

The file (:func:`embedlab.mining.write_hard_negatives`) is JSON Lines, one line per query:
``{"query_id": ..., "negative_ids": [...], "negative_scores": [...]}``, best negative first. Training
reads only ``query_id`` and ``negative_ids``; any JSONL with those two fields works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import random
from dataclasses import replace
from os import PathLike
from pathlib import Path

from embedlab.data.errors import DataError
from embedlab.data.readers.tables import iter_jsonl
from embedlab.data.records import Example

log = logging.getLogger(__name__)

__all__ = ["attach_hard_negatives", "attach_random_negatives", "read_hard_negatives"]


def read_hard_negatives(path: str | PathLike[str]) -> dict[str, list[str]]:
    """``{query_id: negative_ids}`` from a hard-negatives file, ids as strings, in file order.

    Raises:
        DataError: naming the file, the line and the field, for a missing file, a line that is not a
            JSON object, a ``query_id`` that is not a string (or integer), ``negative_ids`` that is not a
            list of ids, or a query that appears on two lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: hard-negatives file not found")
    out: dict[str, list[str]] = {}
    for number, obj in iter_jsonl(path):
        where = f"{path} line {number}"
        qid, negs = obj.get("query_id"), obj.get("negative_ids")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise DataError(f"{where}: field 'query_id' must be a string, got {qid!r}")
        if not isinstance(negs, list) or not all(isinstance(d, (str, int)) for d in negs):
            raise DataError(f"{where}: field 'negative_ids' must be a list of document ids, got {negs!r}")
        if str(qid) in out:
            raise DataError(f"{where}: query_id {qid!r} appears twice")
        out[str(qid)] = [str(d) for d in negs]
    return out


def attach_hard_negatives(
    pairs: list[Example],
    negatives_by_query: Mapping[str, Sequence[str]],
    corpus: Mapping[str, str],
    num_negatives: int,
    path: str | PathLike[str],
    too_few: str = "error",
) -> list[Example]:
    """Copies of ``pairs`` with the first ``num_negatives`` mined negatives of each pair's query (texts and ids).

    Args:
        negatives_by_query: what :func:`read_hard_negatives` returns.
        corpus: ``{doc_id: text}`` the negative ids are looked up in.
        path: the hard-negatives file, named in errors.
        too_few: a query with fewer than ``num_negatives`` negatives (mining filters out candidates that score
            too close to a positive, and may leave none): ``"error"``, or ``"drop"`` its pairs (logged once,
            with the count).

    Raises:
        DataError: naming ``path`` and the query, for a query without a line, with fewer negatives than
            ``num_negatives`` (``too_few="error"``), or with a negative id that is not in the corpus.
    """
    if too_few not in ("error", "drop"):
        raise DataError(f"too_few must be 'error' or 'drop', got {too_few!r}")
    out = []
    dropped: list[str] = []
    for pair in pairs:
        negs = negatives_by_query.get(pair.query_id)
        if negs is None:
            raise DataError(f"{path}: no line for training query {pair.query_id!r}")
        if len(negs) < num_negatives and too_few == "drop":
            dropped.append(pair.query_id)
            continue
        if len(negs) < num_negatives:
            raise DataError(
                f"{path}: query {pair.query_id!r} has {len(negs)} negative_ids, num_negatives asks for {num_negatives} "
                "(mine again with a larger mining.range_max or a smaller mining.relative_margin, or drop such queries: "
                "data.train.too_few_negatives=drop)"
            )
        ids = list(negs[:num_negatives])
        unknown = [d for d in ids if d not in corpus]
        if unknown:
            raise DataError(f"{path}: query {pair.query_id!r}: negative_ids not in the corpus: {unknown}")
        out.append(replace(pair, negatives=[corpus[d] for d in ids], negative_ids=ids))
    if dropped:
        log.warning(
            "%s: %d training pairs dropped: their queries have fewer than %d negative_ids (first: %r)",
            path, len(dropped), num_negatives, dropped[0],
        )
    return out


def attach_random_negatives(
    pairs: list[Example],
    corpus: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    count: int,
    seed: int,
) -> list[Example]:
    """Copies of ``pairs`` with ``count`` random corpus documents appended to each pair's negatives.

    Rerankers trained on mined negatives alone learn that "looks relevant" means "is not", and degrade on
    the easy candidates a first stage also returns; mixing in random documents keeps both kinds in every
    group. A document is never one of the query's qrels documents (any grade) nor a negative the pair already
    has. The draw depends only on ``seed`` and the pair's ids, so every process and every run gets the same
    negatives; it is made once, at loading (the same random negatives every epoch).
    """
    if count <= 0:
        return list(pairs)
    doc_ids = sorted(corpus)
    out = []
    for pair in pairs:
        taken = set(qrels.get(pair.query_id, {})) | set(pair.negative_ids) | {pair.positive_id}
        if len(doc_ids) - len(taken & set(doc_ids)) < count:
            raise DataError(f"random_negatives={count}: the corpus has too few other documents for query {pair.query_id!r}")
        rng = random.Random(f"{seed}:{pair.query_id}:{pair.positive_id}")  # str seeds hash the same in every process
        picked: list[str] = []
        while len(picked) < count:
            doc = doc_ids[rng.randrange(len(doc_ids))]
            if doc not in taken:
                taken.add(doc)
                picked.append(doc)
        out.append(
            replace(pair, negatives=list(pair.negatives) + [corpus[d] for d in picked], negative_ids=list(pair.negative_ids) + picked)
        )
    return out
