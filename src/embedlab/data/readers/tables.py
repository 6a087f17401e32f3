"""Generic tables of training data: pairs, triplets or scored pairs, from a file or a Hugging Face dataset.

:func:`load_table` reads rows (local JSONL, JSON, CSV, TSV, Parquet, or a Hub dataset name);
:func:`load_examples` turns them into :class:`~embedlab.data.records.Example` records, mapping embedlab's
roles (``query``, ``positive``, ``negatives``, ids, ``score``) to the table's column names. This is how
custom training data gets in (``data=pairs``, :class:`~embedlab.data.sources.TableSource`).

Errors name the file and the line a row starts on (JSONL, CSV, TSV) or its 1-based row (JSON arrays,
Parquet, Hub datasets), and the column. :func:`iter_jsonl` is the JSON Lines reader the other readers
(BEIR, hard negatives) use too, so every JSONL file reports its errors the same way.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from embedlab.data.errors import DataError
from embedlab.data.readers.sts import check_score_scale, parse_score
from embedlab.data.records import Example

__all__ = ["iter_jsonl", "load_examples", "load_table"]

# Below this size a file parses in well under a second, so a progress bar would only be noise.
_PROGRESS_MIN_BYTES = 50 * 1024 * 1024

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
            columns that do exist), a Hub load failure, no rows at all, an unknown ``format``, or
            Hugging Face options given for a local file.
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
        DataError: an unknown ``kind`` or role name (config values); everything :func:`load_table` raises; a missing column (with the first row that
            lacks it and the columns present); a text that is not a string; a bad score.
    """
    if kind not in _ROLES:
        raise DataError(f"kind must be one of {', '.join(_ROLES)}, got {kind!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(_ROLES[kind])
    if unknown:
        raise DataError(
            f"columns keys {sorted(unknown)} are not roles of kind {kind!r}; its roles are {', '.join(_ROLES[kind])}"
        )
    check_score_scale(score_scale)
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
                    score=parse_score(row[score_column], score_scale, table.where(index), score_column),
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
        raise DataError(f"format must be one of {', '.join(_FORMATS)} or None, got {format!r}")
    path = Path(path_or_name)
    if path.is_dir() or path.is_file():
        if hf_kwargs:
            raise DataError(f"{path} is local; the Hugging Face options {sorted(hf_kwargs)} apply to Hub datasets only")
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
    for number, obj in iter_jsonl(path):
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


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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
