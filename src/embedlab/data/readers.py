"""Readers that turn dataset files into embedlab records.

Three families of input, one module:

- **BEIR retrieval folders** (:func:`load_beir`, :func:`beir_training_pairs`, :func:`beir_download`):
  ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
  ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``; a header row). This is the layout of
  every dataset in the BEIR benchmark and of MTEB's retrieval tasks.
- **The STS Benchmark release files** (:func:`load_sts`, :func:`sts_training_pairs`): tab-separated
  ``genre, file, year, id, score, sentence1, sentence2`` with no quoting at all; some rows carry
  extra trailing fields (a source attribution) that are ignored.
- **Generic tables** (:func:`load_table`, :func:`load_examples`): a local JSONL, JSON, CSV, TSV or
  Parquet file, or a Hugging Face dataset name, with configurable column names. This is how custom
  training data (pairs, triplets, scored pairs) gets in.

Every problem with the input is raised as :class:`~embedlab.data.errors.DataError` naming the full file
path, the 1-based line (text formats) or row (JSON arrays, Parquet, Hub datasets) and the field, so
the message alone says what to fix. Local files are parsed with ``json``/``csv``/``pyarrow`` directly
rather than through ``datasets`` precisely to keep those line numbers.

:func:`carve_split` carves a seeded validation split out of datasets that ship without one.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar
from urllib.request import urlopen

from tqdm.auto import tqdm

from embedlab.data.errors import DataError
from embedlab.data.records import Example, RetrievalTask, STSTask

__all__ = [
    "BEIR_URL",
    "beir_download",
    "beir_training_pairs",
    "beir_task_pairs",
    "carve_split",
    "load_beir",
    "load_examples",
    "load_sts",
    "load_table",
    "sts_training_pairs",
]

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"

# Below this size a file parses in well under a second, so a progress bar would only be noise.
_PROGRESS_MIN_BYTES = 50 * 1024 * 1024

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------
# BEIR
# --------------------------------------------------------------------------------------------------


def load_beir(
    folder: str | PathLike[str],
    split: str = "test",
    corpus_file: str = "corpus.jsonl",
    queries_file: str = "queries.jsonl",
    qrels_folder: str = "qrels",
    title_separator: str = " ",
) -> RetrievalTask:
    """Load one split of a BEIR-layout retrieval dataset.

    Args:
        folder: the dataset folder, e.g. ``.../scifact`` holding ``corpus.jsonl``, ``queries.jsonl``
            and ``qrels/test.tsv``.
        split: which ``qrels/<split>.tsv`` to read (``test``, ``dev``, ``train``).
        corpus_file, queries_file, qrels_folder: file names inside ``folder`` for datasets that
            deviate from the standard layout.
        title_separator: joins a document's title and text.

    Returns:
        A :class:`RetrievalTask` where

        - ``corpus`` is the *whole* corpus, each document ``(title + title_separator + text).strip()``
          -- the text BEIR and MTEB embed, so scores are comparable with published ones (a document
          without a title is just its text);
        - ``qrels`` holds the split's rows as ``{query_id: {doc_id: relevance}}``, graded relevance
          kept as written (``0`` rows included; metrics treat them as non-relevant); a repeated
          (query, document) pair keeps its last score, as in BEIR;
        - ``queries`` holds only the queries that appear in the split's qrels, in the order of the
          queries file, so ``len(task.queries)`` is the number of queries the split evaluates;
        - ``name`` is the folder's name (``"scifact"``).

    Raises:
        DataError: a missing folder or file (with the layout BEIR expects), malformed JSON, a
            missing ``_id``/``text`` field, a duplicate id, a qrels row with the wrong number of
            columns, a non-integer score or an id missing from the queries or corpus, or an empty
            corpus or split.
    """
    root = Path(folder)
    corpus_path = root / corpus_file
    queries_path = root / queries_file
    qrels_path = root / qrels_folder / f"{split}.tsv"
    layout = f"a BEIR folder holds {corpus_file}, {queries_file} and {qrels_folder}/<split>.tsv"
    if not root.is_dir():
        raise DataError(
            f"{root}: BEIR dataset folder not found ({layout}; "
            "embedlab.data.readers.beir_download(name, root) fetches one)"
        )
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found ({layout})")
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (root / qrels_folder).glob("*.tsv"))
        raise DataError(
            f"{qrels_path}: file not found ({layout}); splits available: "
            f"{', '.join(available) if available else 'none'}"
        )

    corpus = _read_beir_texts(corpus_path, title_separator)
    all_queries = _read_beir_texts(queries_path, None)
    qrels = _read_qrels(qrels_path, all_queries, corpus, queries_path, corpus_path)
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return RetrievalTask(corpus=corpus, queries=queries, qrels=qrels, name=root.name)


def beir_training_pairs(
    folder: str | PathLike[str],
    split: str = "train",
    query_ids: Sequence[str] | set[str] | None = None,
    corpus_file: str = "corpus.jsonl",
    queries_file: str = "queries.jsonl",
    qrels_folder: str = "qrels",
    title_separator: str = " ",
    min_score: int = 1,
) -> list[Example]:
    """(query, relevant document) training pairs from a BEIR split.

    One :class:`Example` per qrels row with ``score >= min_score``: ``query``/``positive`` are the
    query text and the document text (title joined as in :func:`load_beir`), ``query_id`` and
    ``positive_id`` their ids, so losses can mask a batch's other positives of the same query instead
    of treating them as negatives. Order follows the qrels file.

    Args:
        query_ids: keep only these queries, e.g. the training part (second) of
            ``carve_split(sorted(task.queries), 0.1, seed)``.
        min_score: the lowest relevance grade that counts as a positive.
        The other arguments are those of :func:`load_beir`.

    Raises:
        DataError: everything :func:`load_beir` raises, and a selection with no positive pair.
    """
    task = load_beir(folder, split, corpus_file, queries_file, qrels_folder, title_separator)
    return beir_task_pairs(task, Path(folder) / qrels_folder / f"{split}.tsv", query_ids, min_score)


def beir_task_pairs(
    task: RetrievalTask,
    qrels_path: str | PathLike[str],
    query_ids: Sequence[str] | set[str] | None = None,
    min_score: int = 1,
) -> list[Example]:
    """:func:`beir_training_pairs` of an already loaded ``task`` (``qrels_path`` names it in errors)."""
    keep = None if query_ids is None else set(query_ids)
    pairs = [
        Example(
            query=task.queries[qid],
            positive=task.corpus[doc_id],
            query_id=qid,
            positive_id=doc_id,
            known_positive_ids=sorted(d for d, s in docs.items() if s >= min_score),
        )
        for qid, docs in task.qrels.items()
        if keep is None or qid in keep
        for doc_id, score in docs.items()
        if score >= min_score
    ]
    if not pairs:
        selection = "" if keep is None else f" for the {len(keep)} query ids given"
        raise DataError(f"{qrels_path}: no qrels row with score >= {min_score}{selection}")
    return pairs


def read_hard_negatives(path: str | Path) -> dict[str, list[str]]:
    """``{query_id: negative_ids}`` from a file ``embedlab.mining.write_hard_negatives`` wrote (or any JSONL with those
    two fields); errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: hard-negatives file not found")
    out: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
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


def beir_download(name: str, root: str | PathLike[str]) -> Path:
    """Download and unzip BEIR dataset ``name`` (``"scifact"``, ``"nfcorpus"``, ...) into ``root``.

    Fetches :data:`BEIR_URL` and returns ``root/name``, the folder to pass to :func:`load_beir`.
    Nothing is fetched when ``root/name/corpus.jsonl`` already exists, so it is safe to call before
    every run. The zip file is removed after unpacking.

    Raises:
        ValueError: ``name`` is not a plain dataset name.
        DataError: the download or unpacking failed; the message says how to do it by hand.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"BEIR dataset name {name!r} must be a plain name such as 'scifact'")
    root = Path(root)
    target = root / name
    if (target / "corpus.jsonl").is_file():
        return target
    url = BEIR_URL.format(name=name)
    by_hand = (
        f"download {url} yourself and unzip it into {root} so that {target / 'corpus.jsonl'} exists, "
        f"then pass {target} to load_beir"
    )
    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / f"{name}.zip"
    try:
        with urlopen(url, timeout=60) as response, open(zip_path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.wrapattr(out, "write", total=total, desc=f"{name}.zip", unit="B", unit_scale=True) as sink:
                shutil.copyfileobj(response, sink, length=1 << 20)
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(root)
    # URLError, HTTPError and socket timeouts are all OSErrors.
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"could not fetch BEIR dataset '{name}' from {url}: {error}; {by_hand}") from error
    finally:
        zip_path.unlink(missing_ok=True)
    if not (target / "corpus.jsonl").is_file():
        raise DataError(f"{url} unpacked into {root} but {target / 'corpus.jsonl'} is missing; {by_hand}")
    return target


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file."""
    size = path.stat().st_size
    # Binary lines: json.loads decodes UTF-8 (and a BOM) itself, and len(line) is the byte count the
    # progress bar needs.
    with open(path, "rb") as file, tqdm(
        total=size, unit="B", unit_scale=True, desc=path.name, disable=size < _PROGRESS_MIN_BYTES, leave=False
    ) as bar:
        for number, line in enumerate(file, start=1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: invalid JSON: {error.msg} (column {error.colno})") from None
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {number}: not valid UTF-8 ({error.reason})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, found {type(obj).__name__}")
            yield number, obj


def _read_beir_texts(path: Path, title_separator: str | None) -> dict[str, str]:
    """Read a BEIR corpus (``title_separator`` given: title and text joined) or queries file."""
    texts: dict[str, str] = {}
    for number, obj in _iter_jsonl(path):
        item_id = _beir_id(obj, path, number)
        text = _beir_string(obj, "text", path, number)
        if title_separator is not None:
            title = obj.get("title") or ""  # absent or null title: BEIR treats both as no title
            if not isinstance(title, str):
                raise DataError(f"{path} line {number}: field 'title' must be a string, found {type(title).__name__}")
            text = (title + title_separator + text).strip()
        if item_id in texts:
            raise DataError(
                f"{path} line {number}: duplicate _id '{item_id}' (first on line {_first_line_with_id(path, item_id)})"
            )
        texts[item_id] = text
    if not texts:
        raise DataError(f"{path} has no rows")
    return texts


def _beir_id(obj: dict[str, Any], path: Path, number: int) -> str:
    if "_id" not in obj:
        raise DataError(f"{path} line {number}: missing field '_id'")
    value = obj["_id"]
    # Some exports write numeric ids as JSON numbers; qrels always hold them as text.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path} line {number}: field '_id' must be a non-empty string, found {value!r}")
    return value


def _beir_string(obj: dict[str, Any], field: str, path: Path, number: int) -> str:
    if field not in obj:
        raise DataError(f"{path} line {number}: missing field '{field}'")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{path} line {number}: field '{field}' must be a string, found {type(value).__name__}")
    return value


def _first_line_with_id(path: Path, item_id: str) -> int:
    # Only called on the error path: re-scanning beats keeping an id -> line map for every document.
    for number, obj in _iter_jsonl(path):
        if str(obj.get("_id")) == item_id:
            return number
    raise AssertionError("unreachable: the id was read from this file")


def _read_qrels(
    path: Path, queries: Mapping[str, str], corpus: Mapping[str, str], queries_path: Path, corpus_path: Path
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first_content_line = True
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]
            if len(fields) != 3:
                raise DataError(
                    f"{path} line {number}: expected 3 tab-separated columns "
                    f"(query-id, corpus-id, score), found {len(fields)}"
                )
            query_id, doc_id, score_text = fields
            try:
                score = int(score_text)
            except ValueError:
                # BEIR files start with a 'query-id corpus-id score' header; files without one are
                # accepted too, so a first row is a header exactly when its score is not a number.
                if first_content_line:
                    first_content_line = False
                    continue
                raise DataError(f"{path} line {number}: score {score_text!r} is not an integer") from None
            first_content_line = False
            if query_id not in queries:
                raise DataError(f"{path} line {number}: query-id '{query_id}' is not in the queries file {queries_path}")
            if doc_id not in corpus:
                raise DataError(f"{path} line {number}: corpus-id '{doc_id}' is not in the corpus file {corpus_path}")
            qrels.setdefault(query_id, {})[doc_id] = score
    if not qrels:
        raise DataError(f"{path} has no rows")
    return qrels


# --------------------------------------------------------------------------------------------------
# STS Benchmark
# --------------------------------------------------------------------------------------------------

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
            [0, score_scale], or a file with no rows.
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
    _check_score_scale(score_scale)
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
            scores.append(_parse_score(fields[4], score_scale, where, "score"))
            sentences1.append(fields[5])
            sentences2.append(fields[6])
    if not scores:
        raise DataError(f"{path} has no rows")
    return sentences1, sentences2, scores


def _check_score_scale(score_scale: float) -> None:
    if not score_scale > 0:
        raise ValueError(f"score_scale must be positive, got {score_scale!r}")


def _parse_score(value: Any, score_scale: float, where: str, field: str) -> float:
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


# --------------------------------------------------------------------------------------------------
# Generic tables
# --------------------------------------------------------------------------------------------------

_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


@dataclass
class _Table:
    """Rows read from one source, with what is needed to point at a row in an error message."""

    source: str
    rows: list[dict[str, Any]]
    # Text formats report the physical line a row starts on; arrays, Parquet and Hub datasets have no
    # meaningful line, so they report the 1-based row index (``None`` here).
    line_numbers: list[int] | None = None

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.source} line {self.line_numbers[index]}"
        return f"{self.source} row {index + 1}"


def load_table(
    path_or_name: str | PathLike[str],
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    format: str | None = None,
    **hf_kwargs: Any,
) -> list[dict[str, Any]]:
    """Read a table of records from a local file or the Hugging Face Hub.

    Sources, tried in this order:

    - an existing **file**: the format comes from the extension (``.jsonl``/``.ndjson``, ``.json``,
      ``.csv``, ``.tsv``, ``.parquet``) unless ``format`` names one of ``jsonl json csv tsv parquet``.
      JSON is a list of objects (a ``.json`` file holding one object per line is read as JSONL). CSV and
      TSV need a header row and use standard CSV quoting; every value is a string. ``split`` must be
      ``None``: a single file has no splits.
    - an existing **folder**: ``split`` picks ``<folder>/<split>.<ext>`` (exactly one such file).
    - anything else that does not look like a local path is a **Hub dataset name**, loaded with
      ``datasets.load_dataset(path_or_name, split=split, **hf_kwargs)`` (``hf_kwargs`` carries e.g. the
      config ``name=`` or ``revision=``). Without ``split`` the dataset must have a single split.

    Args:
        columns: ``{key: column}``: keep only these columns, renamed to the keys, e.g.
            ``{"query": "anchor"}``. ``None`` keeps every column under its own name.

    Returns:
        One dict per row.

    Raises:
        DataError: a missing file, malformed content (with line or row), a missing column (with the
            columns that do exist), a Hub load failure, or no rows at all.
    """
    table = _read_table(path_or_name, split, format, hf_kwargs)
    if columns is None:
        return table.rows
    selected = []
    for index, row in enumerate(table.rows):
        for column in columns.values():
            if column not in row:
                raise _missing_column(table, index, row, column)
        selected.append({key: row[column] for key, column in columns.items()})
    return selected


# Role -> default column name, per kind; the first entries of each are required, the rest optional.
_ROLES: dict[str, dict[str, Any]] = {
    "pairs": {
        "query": "query",
        "positive": "positive",
        "negatives": "negatives",
        "query_id": "query_id",
        "positive_id": "positive_id",
        "negative_ids": "negative_ids",
    },
    "triplets": {
        "query": "query",
        "positive": "positive",
        "negative": "negative",
        "query_id": "query_id",
        "positive_id": "positive_id",
        "negative_id": "negative_id",
    },
    "scored": {"text1": "sentence1", "text2": "sentence2", "score": "score"},
}
_REQUIRED_ROLES = {
    "pairs": ("query", "positive"),
    "triplets": ("query", "positive", "negative"),
    "scored": ("text1", "text2", "score"),
}
_NUMBERED_NEGATIVE = re.compile(r"negative_(\d+)")


def load_examples(
    path: str | PathLike[str],
    kind: str = "pairs",
    columns: Mapping[str, str | Sequence[str]] | None = None,
    split: str | None = None,
    score_scale: float = 1.0,
    format: str | None = None,
    **hf_kwargs: Any,
) -> list[Example]:
    """Read training examples from a table (any source :func:`load_table` reads).

    ``kind`` says what a row is; ``columns`` maps a role to the column that holds it, overriding the
    defaults below, e.g. ``columns={"query": "anchor", "positive": "pos"}``.

    - ``"pairs"``: ``query``, ``positive`` (required); optional ``negatives`` -- a list column, a
      single-string column (one negative), or a list of column names (``{"negatives": ["neg_a",
      "neg_b"]}``); left at its default and absent, columns ``negative_1``, ``negative_2``, ... are
      used in numeric order. Null or empty negatives are skipped, so rows may have different counts.
      Optional ``query_id``, ``positive_id``, ``negative_ids`` (a list column, one id per kept negative).
    - ``"triplets"``: ``query``, ``positive``, ``negative`` (required) -> ``negatives=[negative]``;
      optional ``query_id``, ``positive_id``, ``negative_id``.
    - ``"scored"``: ``text1`` (default column ``sentence1``), ``text2`` (``sentence2``), ``score``
      (``score``) -> ``Example(query=text1, positive=text2, score=score / score_scale)``; the divided
      score must lie in [0, 1] (set ``score_scale=5.0`` for 0-5 STS scores; 0/1 labels need none).

    An optional role mapped explicitly in ``columns`` becomes required. Ids are returned as strings.

    Raises:
        ValueError: an unknown ``kind`` or role name.
        DataError: everything :func:`load_table` raises; a missing column (with the first row that
            lacks it and the columns present); a text that is not a string; a bad score.
    """
    if kind not in _ROLES:
        raise ValueError(f"kind must be one of {', '.join(_ROLES)}, got {kind!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(_ROLES[kind])
    if unknown:
        raise ValueError(
            f"columns keys {sorted(unknown)} are not roles of kind {kind!r}; its roles are {', '.join(_ROLES[kind])}"
        )
    _check_score_scale(score_scale)
    roles = {**_ROLES[kind], **columns}
    required = set(_REQUIRED_ROLES[kind]) | set(columns)
    table = _read_table(path, split, format, hf_kwargs)
    reader = _RowReader(table, roles, required)
    examples = []
    for index, row in enumerate(table.rows):
        reader.check_required(index, row)
        if kind == "scored":
            score_column = roles["score"]
            examples.append(
                Example(
                    query=reader.text(index, row, "text1"),
                    positive=reader.text(index, row, "text2"),
                    score=_parse_score(row[score_column], score_scale, table.where(index), score_column),
                )
            )
            continue
        if kind == "triplets":
            negatives = [reader.text(index, row, "negative")]
            negative_id = reader.optional_id(row, "negative_id")
            negative_ids = [] if negative_id is None else [negative_id]
        else:
            negatives = reader.negatives(index, row)
            negative_ids = reader.id_list(index, row, "negative_ids")
            # Losses and evaluators pair ids with negatives by position.
            if negative_ids and len(negative_ids) != len(negatives):
                raise DataError(
                    f"{table.where(index)}: column '{roles['negative_ids']}' has {len(negative_ids)} ids "
                    f"for {len(negatives)} negatives"
                )
        examples.append(
            Example(
                query=reader.text(index, row, "query"),
                positive=reader.text(index, row, "positive"),
                negatives=negatives,
                query_id=reader.optional_id(row, "query_id"),
                positive_id=reader.optional_id(row, "positive_id"),
                negative_ids=negative_ids,
            )
        )
    return examples


class _RowReader:
    """Pulls role values out of rows, raising DataErrors that point at the row and column."""

    def __init__(self, table: _Table, roles: Mapping[str, Any], required: set[str]):
        self.table = table
        self.roles = roles
        self.required_columns = [
            column
            for role in roles
            if role in required
            for column in ([roles[role]] if isinstance(roles[role], str) else roles[role])
        ]

    def check_required(self, index: int, row: Mapping[str, Any]) -> None:
        for column in self.required_columns:
            if column not in row:
                raise _missing_column(self.table, index, row, column)

    def text(self, index: int, row: Mapping[str, Any], role: str) -> str:
        column = self.roles[role]
        value = row[column]
        if not isinstance(value, str):
            raise DataError(
                f"{self.table.where(index)}: column '{column}' must be a string, found {type(value).__name__} {value!r}"
            )
        return value

    def optional_id(self, row: Mapping[str, Any], role: str) -> str | None:
        value = row.get(self.roles[role])
        return None if value is None else str(value)

    def id_list(self, index: int, row: Mapping[str, Any], role: str) -> list[str]:
        column = self.roles[role]
        value = row.get(column)
        if value is None:
            return []
        if not isinstance(value, list):
            raise DataError(f"{self.table.where(index)}: column '{column}' must be a list, found {type(value).__name__}")
        return [str(item) for item in value if item is not None]  # None pads ragged lists, like negatives

    def negatives(self, index: int, row: Mapping[str, Any]) -> list[str]:
        spec = self.roles["negatives"]
        if not isinstance(spec, str):  # a list of column names, one negative in each
            found = [(column, row[column]) for column in spec]
        elif spec in row:
            value = row[spec]
            if value is None:
                return []
            if isinstance(value, str):
                found = [(spec, value)]
            elif isinstance(value, list):
                found = [(spec, item) for item in value]
            else:
                raise DataError(
                    f"{self.table.where(index)}: column '{spec}' must be a list of strings or a string, "
                    f"found {type(value).__name__} (in CSV/TSV use one column per negative: negative_1, negative_2, ...)"
                )
        else:  # default name absent (an explicit one would have failed check_required): numbered columns
            numbered = sorted((int(m.group(1)), key) for key in row if (m := _NUMBERED_NEGATIVE.fullmatch(key)))
            found = [(key, row[key]) for _, key in numbered]
        negatives = []
        for column, value in found:
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{self.table.where(index)}: column '{column}' holds a {type(value).__name__} negative, expected a string"
                )
            negatives.append(value)
        return negatives


def _missing_column(table: _Table, index: int, row: Mapping[str, Any], column: str) -> DataError:
    present = ", ".join(repr(key) for key in row) or "none"
    return DataError(
        f"{table.where(index)}: missing column '{column}'; columns present: {present} "
        "(map other names with columns={role: column})"
    )


def _read_table(
    path_or_name: str | PathLike[str], split: str | None, format: str | None, hf_kwargs: Mapping[str, Any]
) -> _Table:
    if format is not None and format not in _FORMATS:
        raise ValueError(f"format must be one of {', '.join(_FORMATS)} or None, got {format!r}")
    path = Path(path_or_name)
    if path.is_dir() or path.is_file():
        if hf_kwargs:
            raise ValueError(f"{path} is local; the Hugging Face options {sorted(hf_kwargs)} apply to Hub datasets only")
        table = _read_local(_resolve_local_file(path, split, format), format)
    elif _looks_local(path_or_name, format):
        raise DataError(f"{path}: file not found")
    else:
        table = _read_hub(str(path_or_name), split, hf_kwargs)
    if not table.rows:
        raise DataError(f"{table.source} has no rows")
    return table


def _looks_local(path_or_name: str | PathLike[str], format: str | None) -> bool:
    # Hub names look like 'owner/name'; anything with a file extension, an explicit format, a
    # leading '.', '/' or '~', or more than one '/' can only have been meant as a local path.
    text = str(path_or_name)
    return (
        format is not None
        or Path(text).suffix.lower() in _FORMAT_BY_SUFFIX
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
    )


def _resolve_local_file(path: Path, split: str | None, format: str | None) -> Path:
    if path.is_file():
        if split is not None:
            raise DataError(
                f"{path}: split={split!r} given for a single file; split picks <folder>/<split>.<ext> "
                "inside a folder or a Hugging Face dataset split"
            )
        return path
    if split is None:
        raise DataError(f"{path} is a folder: pass split= to read <folder>/<split>.<ext>")
    candidates = [
        path / f"{split}{suffix}"
        for suffix, suffix_format in _FORMAT_BY_SUFFIX.items()
        if (format is None or suffix_format == format) and (path / f"{split}{suffix}").is_file()
    ]
    if len(candidates) != 1:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        problem = "no file" if not candidates else "several files"
        raise DataError(
            f"{path}: {problem} for split '{split}' (looked for {split}.<{'|'.join(s[1:] for s in _FORMAT_BY_SUFFIX)}>); "
            f"the folder holds: {found}"
        )
    return candidates[0]


def _read_local(path: Path, format: str | None) -> _Table:
    format = format or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if format is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; pass format= one of {', '.join(_FORMATS)}"
        )
    if format == "jsonl":
        return _read_jsonl_table(path)
    if format == "json":
        return _read_json_table(path)
    if format == "parquet":
        return _read_parquet_table(path)
    return _read_delimited_table(path, "," if format == "csv" else "\t")


def _read_jsonl_table(path: Path) -> _Table:
    numbers, rows = [], []
    for number, obj in _iter_jsonl(path):
        numbers.append(number)
        rows.append(obj)
    return _Table(str(path), rows, numbers)


def _read_json_table(path: Path) -> _Table:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        # "Extra data" after a first complete value: one object per line, i.e. JSONL named .json.
        if error.msg == "Extra data":
            return _read_jsonl_table(path)
        raise DataError(f"{path} line {error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or one object per line), found {type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} row {index + 1}: expected a JSON object, found {type(item).__name__}")
    return _Table(str(path), data)


def _read_delimited_table(path: Path, delimiter: str) -> _Table:
    numbers, rows = [], []
    start = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return _Table(str(path), [], [])
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                raise DataError(f"{path} line 1: duplicate column names in the header: {', '.join(duplicates)}")
            start = reader.line_num + 1
            for fields in reader:
                # A quoted field may span lines, so a row starts one line after the previous ended.
                if fields:
                    if len(fields) != len(header):
                        raise DataError(
                            f"{path} line {start}: expected {len(header)} fields as in the header, found {len(fields)}"
                        )
                    numbers.append(start)
                    rows.append(dict(zip(header, fields)))
                start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{path} line {start}: {error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason})") from None
    return _Table(str(path), rows, numbers)


def _read_parquet_table(path: Path) -> _Table:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None
    return _Table(str(path), rows)


def _read_hub(name: str, split: str | None, hf_kwargs: Mapping[str, Any]) -> _Table:
    import datasets  # imported here: slow to import and needed only for Hub datasets

    source = f"Hugging Face dataset '{name}'" + (f" split '{split}'" if split else "")
    try:
        dataset = datasets.load_dataset(name, split=split, **hf_kwargs)
    # load_dataset fails in many ways (network, unknown name or split, bad config); all mean the
    # same to the user, who needs the name and the cause.
    except Exception as error:
        raise DataError(
            f"could not load '{name}': no local file or folder has that name, and loading it from the "
            f"Hugging Face Hub failed: {type(error).__name__}: {error}"
        ) from error
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if len(dataset) != 1:
            raise DataError(f"{source} has splits {', '.join(dataset)}; pass split= to choose one")
        dataset = next(iter(dataset.values()))
    rows = dataset.to_list() if isinstance(dataset, datasets.Dataset) else [dict(row) for row in dataset]
    return _Table(source, rows)


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def carve_split(
    items: Sequence[_T], fraction: float, seed: int, *, key: Callable[[_T], Hashable] | None = None
) -> tuple[list[_T], list[_T]]:
    """Carve about ``fraction`` of ``items`` out as a held-out part: returns ``(carved, rest)``, reproducibly.

    Meant for datasets without a validation split::

        validation, train = carve_split(pairs, 0.1, seed=42)

    The same items, fraction and seed always give the same split (a private ``random.Random(seed)``,
    so global random state neither affects it nor is touched). Both parts keep the input order.
    ``carved`` gets ``round(fraction * n)`` items, clamped so each part has at least one when ``n >= 2``;
    with fewer items everything stays in ``rest``.

    With ``key``, items sharing a key go to the same part and ``fraction`` counts keys, not items --
    ``key=lambda e: e.query_id`` keeps a query with several positives from leaking from training into
    validation.

    Raises:
        ValueError: ``fraction`` not strictly between 0 and 1.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction!r}")
    group_of = [index if key is None else key(item) for index, item in enumerate(items)]
    groups = list(dict.fromkeys(group_of))
    if len(groups) < 2:
        return [], list(items)
    carved_count = min(max(round(len(groups) * fraction), 1), len(groups) - 1)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    carved_groups = {groups[position] for position in order[:carved_count]}
    carved = [item for item, group in zip(items, group_of) if group in carved_groups]
    rest = [item for item, group in zip(items, group_of) if group not in carved_groups]
    return carved, rest
