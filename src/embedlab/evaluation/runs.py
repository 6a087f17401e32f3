"""Run files: the ranked candidate lists a first-stage retriever hands to a reranker or to trec_eval.

A *run* is ``{query_id: {doc_id: score}}`` (:data:`Run`), higher score = better, the layout of ``pytrec_eval``
and of :mod:`embedlab.evaluation.metrics`. Two file formats hold one:

* **TREC** (the format of trec_eval, pytrec_eval, Pyserini and every TREC track): one line per retrieved document,
  six whitespace-separated columns ``qid Q0 docid rank score tag``::

      1 Q0 31715818 1 0.8127 embedlab
      1 Q0 14717500 2 0.7904 embedlab

  ``Q0`` is a historical placeholder and ``tag`` names the system; neither is read back. Readers (trec_eval
  included) rank by ``score`` and ignore ``rank``, so :func:`read_run` does too.
* **JSON**: the run itself, ``{"qid": {"docid": score, ...}, ...}``, e.g. BEIR's saved results.

Order within a query: the rank column :func:`write_trec_run` writes, and the cut :func:`top_k_run` makes, follow
trec_eval's own order (:func:`embedlab.evaluation.metrics.rank_documents`: score descending, ties by doc id
*descending*), so rank ``r`` in a written file is the document trec_eval evaluates at rank ``r``.

Scores are written with Python's shortest round-trip repr, so ``read_run(write_trec_run(run))`` returns the very
same floats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

from embedlab.atomic import atomic_write_text
from embedlab.data.errors import DataError
from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.metrics import rank_documents

__all__ = ["Run", "drop_identical_ids", "read_run", "top_k_run", "write_json_run", "write_trec_run", "write_trec_runs"]

#: ``{query_id: {doc_id: score}}``, higher score = better.
Run = dict[str, dict[str, float]]

TREC_COLUMNS = "qid Q0 docid rank score tag"


def _check_id(kind: str, value: str, path: Path) -> None:
    """TREC columns are whitespace-separated: an id with a space or tab cannot be written (nor read back)."""
    if not value or any(c.isspace() for c in value):
        raise DataError(
            f"{path}: {kind} {value!r} is empty or contains whitespace, which a TREC run file cannot hold "
            "(write_json_run writes any id)"
        )


def _check_score(score: float, where: str) -> float:
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: score {score!r} is not a finite number")
    return float(score)


def write_trec_runs(runs: Mapping[str, Mapping[str, Mapping[str, float]]], folder: str | PathLike[str], prefix: str) -> list[Path]:
    """An evaluator's runs (``{"run": final, "first_stage": ...}``) as ``<folder>/<prefix>_<name>.trec``."""
    return [write_trec_run(run, Path(folder) / f"{prefix}_{name}.trec") for name, run in runs.items()]


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | PathLike[str], tag: str = "embedlab") -> Path:
    """Write ``run`` as a TREC run file (``qid Q0 docid rank score tag``), atomically.

    Queries appear in the run's order; each query's documents in trec_eval's order (score descending, ties by doc id
    descending) with ranks from 1. A query with no document writes no line (TREC files cannot say "retrieved
    nothing"; :func:`read_run` then simply lacks it).

    Raises:
        DataError: a query id, doc id or ``tag`` that is empty or holds whitespace, or a non-finite score.
    """
    path = Path(path)
    _check_id("tag", tag, path)
    lines: list[str] = []
    for qid, docs in run.items():
        _check_id("query id", qid, path)
        for doc_id, score in docs.items():
            _check_id("document id", doc_id, path)
            _check_score(score, f"{path}: query {qid!r}: document {doc_id!r}")
        for rank, doc_id in enumerate(rank_documents(docs), start=1):
            lines.append(f"{qid} Q0 {doc_id} {rank} {float(docs[doc_id])!r} {tag}\n")
    atomic_write_text(path, "".join(lines))
    return path


def write_json_run(run: Mapping[str, Mapping[str, float]], path: str | PathLike[str]) -> Path:
    """Write ``run`` as JSON ``{qid: {docid: score}}`` (queries and documents in the run's order), atomically.

    Raises:
        DataError: a non-finite score (JSON has no NaN / infinity).
    """
    path = Path(path)
    for qid, docs in run.items():
        for doc_id, score in docs.items():
            _check_score(score, f"{path}: query {qid!r}: document {doc_id!r}")
    payload = {qid: {doc_id: float(score) for doc_id, score in docs.items()} for qid, docs in run.items()}
    atomic_write_text(path, json.dumps(payload, ensure_ascii=False) + "\n")
    return path


def _is_json(path: Path, text: str) -> bool:
    """JSON by suffix, else by content (a JSON run starts with ``{``; a TREC line never does)."""
    if path.suffix.lower() == ".json":
        return True
    return text.lstrip().startswith("{")


def read_run(path: str | PathLike[str], task: RetrievalTask | None = None) -> Run:
    """Read a TREC or JSON run file (picked by the ``.json`` suffix, else by content).

    Args:
        path: the run file.
        task: when given, every query id must be one of ``task.queries`` and every doc id one of ``task.corpus``
            (a run from another split or corpus is caught here, not as a silently low score).

    Returns:
        ``{qid: {docid: score}}`` in file order. TREC: blank lines are skipped; ``Q0``, ``rank`` and ``tag`` are
        not checked (trec_eval ignores them too).

    Raises:
        DataError: a missing file; a TREC line without 6 columns, with a non-numeric or non-finite score, or
            listing a document twice for a query; malformed JSON or a JSON value that is not
            ``{qid: {docid: number}}``; with ``task``, an unknown query or document id. Each message names the
            file and, for TREC, the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: run file not found")
    text = path.read_text(encoding="utf-8")
    return _read_json(path, text, task) if _is_json(path, text) else _read_trec(path, text, task)


def _unknown_query(qid: str, task: RetrievalTask) -> str:
    return f"unknown query id {qid!r} (not in the task's {len(task.queries)} queries)"


def _unknown_document(doc_id: str, task: RetrievalTask) -> str:
    return f"unknown document id {doc_id!r} (not in the corpus of {len(task.corpus)} documents)"


def _read_trec(path: Path, text: str, task: RetrievalTask | None) -> Run:
    run: Run = {}
    first_line: dict[tuple[str, str], int] = {}  # (qid, docid) -> line, to report duplicates
    for number, line in enumerate(text.splitlines(), start=1):
        columns = line.split()
        if not columns:
            continue
        where = f"{path} line {number}"
        if len(columns) != 6:
            raise DataError(f"{where}: expected 6 columns ({TREC_COLUMNS}), got {len(columns)}")
        qid, _, doc_id, _, score_text, _ = columns
        try:
            score = float(score_text)
        except ValueError:
            raise DataError(f"{where}: score {score_text!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: score {score_text!r} is not a finite number")
        if task is not None:
            if qid not in task.queries:
                raise DataError(f"{where}: {_unknown_query(qid, task)}")
            if doc_id not in task.corpus:
                raise DataError(f"{where}: {_unknown_document(doc_id, task)}")
        if (qid, doc_id) in first_line:
            raise DataError(
                f"{where}: document {doc_id!r} listed twice for query {qid!r} (first on line {first_line[qid, doc_id]})"
            )
        first_line[qid, doc_id] = number
        run.setdefault(qid, {})[doc_id] = score
    return run


def _read_json(path: Path, text: str, task: RetrievalTask | None) -> Run:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: a JSON run must be an object {{query_id: {{doc_id: score}}}}, got {type(data).__name__}"
        )
    run: Run = {}
    for qid, docs in data.items():
        if task is not None and qid not in task.queries:
            raise DataError(f"{path}: {_unknown_query(qid, task)}")
        if not isinstance(docs, dict):
            raise DataError(f"{path}: query {qid!r}: expected an object {{doc_id: score}}, got {type(docs).__name__}")
        for doc_id in docs:
            if task is not None and doc_id not in task.corpus:
                raise DataError(f"{path}: query {qid!r}: {_unknown_document(doc_id, task)}")
        run[qid] = {
            doc_id: _check_score(score, f"{path}: query {qid!r}: document {doc_id!r}") for doc_id, score in docs.items()
        }
    return run


def drop_identical_ids(run: Mapping[str, Mapping[str, float]]) -> Run:
    """The run without any document whose id equals its query's id (BEIR's ``ignore_identical_ids``, for corpora
    that contain the queries)."""
    return {qid: {doc_id: score for doc_id, score in docs.items() if doc_id != qid} for qid, docs in run.items()}


def top_k_run(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """The best ``k`` documents of every query, in trec_eval's order (score descending, ties by doc id descending).

    Queries with no document stay in the result with an empty dict.

    Raises:
        ConfigError: ``k < 1``.
    """
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {k}")
    return {qid: {doc_id: docs[doc_id] for doc_id in rank_documents(docs, k)} for qid, docs in run.items()}
