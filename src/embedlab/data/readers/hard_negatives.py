"""Mined hard negatives: reading the file ``python mine.py`` writes and attaching its negatives to pairs.

The file (:func:`embedlab.mining.write_hard_negatives`) is JSON Lines, one line per query:
``{"query_id": ..., "negative_ids": [...], "negative_scores": [...]}``, best negative first. Training
reads only ``query_id`` and ``negative_ids``; any JSONL with those two fields works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from os import PathLike
from pathlib import Path

from embedlab.data.errors import DataError
from embedlab.data.readers.tables import iter_jsonl
from embedlab.data.records import Example

__all__ = ["attach_hard_negatives", "read_hard_negatives"]


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
) -> list[Example]:
    """Copies of ``pairs`` with the first ``num_negatives`` mined negatives of each pair's query (texts and ids).

    Args:
        negatives_by_query: what :func:`read_hard_negatives` returns.
        corpus: ``{doc_id: text}`` the negative ids are looked up in.
        path: the hard-negatives file, named in errors.

    Raises:
        DataError: naming ``path`` and the query, for a query without a line, with fewer negatives than
            ``num_negatives``, or with a negative id that is not in the corpus.
    """
    out = []
    for pair in pairs:
        negs = negatives_by_query.get(pair.query_id)
        if negs is None:
            raise DataError(f"{path}: no line for training query {pair.query_id!r}")
        if len(negs) < num_negatives:
            raise DataError(
                f"{path}: query {pair.query_id!r} has {len(negs)} negative_ids, num_negatives asks for {num_negatives} "
                "(mine again with a larger mining.range_max or a smaller mining.relative_margin)"
            )
        ids = list(negs[:num_negatives])
        unknown = [d for d in ids if d not in corpus]
        if unknown:
            raise DataError(f"{path}: query {pair.query_id!r}: negative_ids not in the corpus: {unknown}")
        out.append(replace(pair, negatives=[corpus[d] for d in ids], negative_ids=ids))
    return out
