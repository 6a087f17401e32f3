"""STS Benchmark release files, and the rule every similarity score in embedlab's data follows.

A release file (``sts-train.csv``, ``sts-dev.csv``, ``sts-test.csv``) is tab-separated
``genre, file, year, id, score, sentence1, sentence2`` with no quoting at all; some rows carry extra
trailing fields (a source attribution) that are ignored.

Scores are divided by ``score_scale`` (the top of the dataset's range: 5 for STS-B's 0-5 scale) and must
then lie in [0, 1]; :func:`parse_score` is that rule, shared with scored tables
(:mod:`~embedlab.data.readers.tables`).
"""

from __future__ import annotations

import csv
import math
from os import PathLike
from pathlib import Path
from typing import Any

from embedlab.data.errors import DataError
from embedlab.data.records import Example, STSTask

__all__ = ["check_score_scale", "load_sts", "parse_score", "sts_training_pairs"]

_STS_COLUMNS = "genre, file, year, id, score, sentence1, sentence2"


def load_sts(path: str | PathLike[str], score_scale: float = 5.0) -> STSTask:
    """Load an STS Benchmark release file (``sts-train.csv``, ``sts-dev.csv``, ``sts-test.csv``).

    The files are tab-separated with quoting disabled (sentences contain bare ``"`` characters that a
    CSV parser would otherwise treat as quotes and merge lines). Field 4 is the gold score, fields 5
    and 6 the sentences; trailing fields beyond the seventh are ignored. Scores are divided by
    ``score_scale`` (the top of the 0-5 scale) into [0, 1]. ``name`` is the file's stem
    (``"sts-test"``).

    Raises:
        DataError: a row with fewer than 7 fields, a non-numeric score or one outside
            [0, score_scale], a file with no rows, or a ``score_scale`` that is not positive.
    """
    sentences1, sentences2, scores = _read_sts(Path(path), score_scale)
    return STSTask(sentences1=sentences1, sentences2=sentences2, scores=scores, name=Path(path).stem)


def sts_training_pairs(path: str | PathLike[str], score_scale: float = 5.0) -> list[Example]:
    """STS Benchmark rows as scored training pairs: ``query`` = sentence 1, ``positive`` = sentence 2,
    ``score`` = the gold score divided by ``score_scale`` (for CoSENT / cosine-similarity losses).
    Reads the same format as :func:`load_sts` and raises the same errors."""
    sentences1, sentences2, scores = _read_sts(Path(path), score_scale)
    return [Example(query=s1, positive=s2, score=score) for s1, s2, score in zip(sentences1, sentences2, scores)]


def _read_sts(path: Path, score_scale: float) -> tuple[list[str], list[str], list[float]]:
    check_score_scale(score_scale)
    if not path.is_file():
        raise DataError(f"{path}: file not found (an STS Benchmark release file such as sts-test.csv)")
    sentences1: list[str] = []
    sentences2: list[str] = []
    scores: list[float] = []
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        for fields in reader:
            if not fields:
                continue
            # QUOTE_NONE makes one record one physical line, so line_num is the record's line.
            where = f"{path} line {reader.line_num}"
            if len(fields) < 7:
                raise DataError(f"{where}: expected at least 7 tab-separated fields ({_STS_COLUMNS}), found {len(fields)}")
            scores.append(parse_score(fields[4], score_scale, where, "score"))
            sentences1.append(fields[5])
            sentences2.append(fields[6])
    if not scores:
        raise DataError(f"{path} has no rows")
    return sentences1, sentences2, scores


def check_score_scale(score_scale: float) -> None:
    """Refuse a ``score_scale`` (a config value) that is not a positive number."""
    if not score_scale > 0:
        raise DataError(f"score_scale must be positive, got {score_scale!r}")


def parse_score(value: Any, score_scale: float, where: str, field: str) -> float:
    """``value / score_scale`` as a float in [0, 1], or a DataError naming ``where`` and ``field``."""
    try:
        if isinstance(value, bool):  # float(True) works, but a boolean is a label mix-up, not a score
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{field}' is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: field '{field}' is not a finite number: {value!r}")
    score = number / score_scale
    if not 0.0 <= score <= 1.0:
        raise DataError(
            f"{where}: field '{field}' = {value!r} is {score:g} after dividing by score_scale={score_scale:g}, "
            "outside [0, 1]; set score_scale to the top of the score range (5.0 for STS-B)"
        )
    return score
