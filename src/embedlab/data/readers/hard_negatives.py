"""Mined hard negatives: reading the file ``python mine.py`` writes and attaching its negatives to pairs.

The file (:func:`embedlab.mining.write_hard_negatives`) is JSON Lines, one line per query:
``{"query_id": ..., "negative_ids": [...], "negative_scores": [...]}``, best negative first. Training
reads ``query_id``, ``negative_ids`` and, when present, ``teacher_scores``; any JSONL with the first two
fields works.

``teacher_scores`` (written by ``python score.py``, :mod:`embedlab.scoring`): ``{doc_id: score}`` of a
teacher for the query's positives and its negatives. Each training pair then carries
``Example.teacher_scores = [score of its positive, score of each kept negative in order]`` (1 + n floats),
which the collate function stacks into ``batch["teacher_scores"]`` (B, 1 + n) for score-distillation losses.
Either every line of a file has the field or none does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
import math
import random
from dataclasses import replace
from os import PathLike
from pathlib import Path

from embedlab.data.errors import DataError
from embedlab.data.readers.tables import iter_jsonl
from embedlab.data.records import Example

log = logging.getLogger(__name__)

__all__ = ["HardNegatives", "attach_hard_negatives", "attach_random_negatives", "read_hard_negatives"]


class HardNegatives(dict[str, list[str]]):
    """``{query_id: negative_ids}`` read from a hard-negatives file (file order), plus what else its lines carry.

    A plain dict of lists to any code that only wants the negatives (``==`` compares that dict alone).

    Attributes:
        path: the file, named in errors.
        line_numbers: ``{query_id: 1-based line number}``.
        teacher_scores: ``{query_id: {doc_id: score}}`` when the file's lines carry ``teacher_scores``, else None.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.line_numbers: dict[str, int] = {}
        self.teacher_scores: dict[str, dict[str, float]] | None = None


def read_hard_negatives(path: str | PathLike[str]) -> HardNegatives:
    """``{query_id: negative_ids}`` from a hard-negatives file, ids as strings, in file order; with the
    lines' ``teacher_scores`` (ids as strings, scores as floats) when the file has them.

    Raises:
        DataError: naming the file, the line and the field, for a missing file, a line that is not a
            JSON object, a ``query_id`` that is not a string (or integer), ``negative_ids`` that is not a
            list of ids, a query that appears on two lines, ``teacher_scores`` that is not an object of finite
            numbers, or a line without ``teacher_scores`` in a file whose other lines have them (or the reverse).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: hard-negatives file not found")
    out = HardNegatives(path)
    teacher: dict[str, dict[str, float]] = {}
    scored_line = unscored_line = None  # first line with / without teacher_scores
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
        out.line_numbers[str(qid)] = number
        if "teacher_scores" in obj:
            scored_line = scored_line or number
            teacher[str(qid)] = _teacher_scores(obj["teacher_scores"], where)
        else:
            unscored_line = unscored_line or number
        if scored_line and unscored_line:  # this line is the first to disagree with an earlier one
            this, other = ("has", f"line {unscored_line} has none") if number == scored_line else (
                "lacks", f"line {scored_line} has it")
            raise DataError(
                f"{where}: {this} field 'teacher_scores' but {other}: every line needs it or none "
                "(score the whole file with python score.py)"
            )
    if scored_line:
        out.teacher_scores = teacher
    return out


def _teacher_scores(value, where: str) -> dict[str, float]:
    """A line's ``teacher_scores`` as ``{doc_id: float}``; DataError unless an object of finite numbers."""
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise DataError(f"{where}: field 'teacher_scores' must be an object {{document id: number}}, got {value!r}")
    bad = [d for d, v in value.items() if not math.isfinite(v)]
    if bad:
        raise DataError(f"{where}: field 'teacher_scores' has a non-finite score for document {bad[0]!r}: {value[bad[0]]}")
    return {str(d): float(v) for d, v in value.items()}


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
        negatives_by_query: what :func:`read_hard_negatives` returns (a :class:`HardNegatives` whose
            ``teacher_scores`` set each pair's ``Example.teacher_scores``: positive first, then the kept
            negatives in order), or any ``{query_id: negative_ids}`` mapping (no teacher scores).
        corpus: ``{doc_id: text}`` the negative ids are looked up in.
        path: the hard-negatives file, named in errors.
        too_few: a query with fewer than ``num_negatives`` negatives (mining filters out candidates that score
            too close to a positive, and may leave none): ``"error"``, or ``"drop"`` its pairs (logged once,
            with the count).

    Raises:
        DataError: naming ``path`` and the query, for a query without a line, with fewer negatives than
            ``num_negatives`` (``too_few="error"``), with a negative id that is not in the corpus, or (scored
            files, naming the line too) whose ``teacher_scores`` lack the pair's positive or a kept negative.
    """
    if too_few not in ("error", "drop"):
        raise DataError(f"too_few must be 'error' or 'drop', got {too_few!r}")
    teacher = negatives_by_query.teacher_scores if isinstance(negatives_by_query, HardNegatives) else None
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
        scores = None
        if teacher is not None:
            scores = _pair_teacher_scores(teacher[pair.query_id], [pair.positive_id, *ids], pair.query_id,
                                          f"{path} line {negatives_by_query.line_numbers[pair.query_id]}")
        out.append(replace(pair, negatives=[corpus[d] for d in ids], negative_ids=ids, teacher_scores=scores))
    if dropped:
        log.warning(
            "%s: %d training pairs dropped: their queries have fewer than %d negative_ids (first: %r)",
            path, len(dropped), num_negatives, dropped[0],
        )
    return out


def _pair_teacher_scores(scores: Mapping[str, float], doc_ids: list[str], query_id: str, where: str) -> list[float]:
    """``[scores[d] for d in doc_ids]`` (the positive, then the kept negatives); DataError naming the missing ids."""
    missing = [d for d in doc_ids if d not in scores]
    if missing:
        raise DataError(
            f"{where}: query {query_id!r}: teacher_scores has no score for {missing} "
            "(score this file again with python score.py)"
        )
    return [scores[d] for d in doc_ids]


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

    Random documents have no teacher score: a pair that had ``teacher_scores`` (a scored hard-negatives file)
    loses them (``None``), with one warning per call. Contrastive and classification losses train as before;
    a score-distillation loss then stops with its own error. (Scoring the random documents too would mean
    running the teacher at loading, which ``score.py`` exists to avoid.)
    """
    if count <= 0:
        return list(pairs)
    doc_ids = sorted(corpus)
    scored = sum(p.teacher_scores is not None for p in pairs)
    if scored:
        log.warning(
            "random_negatives=%d: random documents have no teacher score, so %d training pairs lose their "
            "teacher_scores (score-distillation losses need them: set random_negatives=0)", count, scored,
        )
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
            replace(pair, negatives=list(pair.negatives) + [corpus[d] for d in picked],
                    negative_ids=list(pair.negative_ids) + picked, teacher_scores=None)
        )
    return out
