"""Unlabelled text collections: what a student embeds next to its teacher in embedding distillation.

A student distilled by embedding MSE learns the teacher's map only where it sees text: a student trained on one
domain's documents alone generalises badly elsewhere, so a collection usually mixes parts (a BEIR corpus and its
training queries, STS sentences, a text file, a Hugging Face dataset column). Each part yields ``(kind, text)``
rows (``kind`` = ``query`` / ``document``: which of the models' query/document settings embeds it);
:class:`TextCollection` joins the parts, drops repeated texts and yields one unlabelled
:class:`~embedlab.data.records.Example` per text (:func:`~embedlab.data.collate.collate_texts` batches them).

Test queries are evaluation data: :class:`BeirTexts` refuses ``query_split=test``.
"""

from __future__ import annotations

import json
import logging
import random
from os import PathLike
from pathlib import Path
from typing import Protocol, Sequence

from embedlab.data.errors import DataError
from embedlab.data.readers.beir import load_beir
from embedlab.data.readers.sts import load_sts
from embedlab.data.records import Example
from embedlab.errors import ConfigError
#: which of a model's query / document settings (prompt, max length) embeds a text
KINDS = ("query", "document")

log = logging.getLogger(__name__)

__all__ = ["BeirTexts", "FileTexts", "HFTexts", "STSTexts", "TextCollection"]


class TextPart(Protocol):
    """One part of a collection: ``texts()`` -> ``[(kind, text), ...]``; ``name`` for logs."""

    name: str

    def texts(self) -> list[tuple[str, str]]: ...


class BeirTexts:
    """A BEIR folder's corpus (as documents, ``title + " " + text`` as evaluation embeds them) and the queries of
    one split (as queries), e.g. SciFact's corpus and training queries.

    Args:
        folder: the BEIR folder.
        corpus: include the corpus documents.
        query_split: include the queries of ``qrels/<split>.tsv`` (``None``: no queries). ``test`` is refused:
            the student is evaluated on those queries.
    """

    def __init__(self, folder: str | PathLike[str], corpus: bool = True, query_split: str | None = "train") -> None:
        if query_split == "test":
            raise ConfigError(
                f"BeirTexts({folder}): query_split=test would distill on the test queries the student is evaluated "
                "on; use the train (or dev) queries"
            )
        self.folder = Path(folder)
        self.corpus = corpus
        self.query_split = query_split
        self.name = f"{self.folder.name}"

    def texts(self) -> list[tuple[str, str]]:
        task = load_beir(self.folder, split=self.query_split or "train") if self.query_split else None
        if task is None:
            task = load_beir(self.folder, split=_any_split(self.folder))
        rows = [("query", t) for t in task.queries.values()] if self.query_split else []
        if self.corpus:
            rows += [("document", t) for t in task.corpus.values()]
        return rows


def _any_split(folder: Path) -> str:
    """A qrels split to load a corpus with when no queries are wanted (any file of ``qrels/``)."""
    splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
    if not splits:
        raise DataError(f"{folder}/qrels: no <split>.tsv file")
    return splits[0]


class STSTexts:
    """Both sentence columns of an STS Benchmark file (e.g. ``sts-train.csv``), as documents."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        self.name = self.path.stem

    def texts(self) -> list[tuple[str, str]]:
        task = load_sts(self.path)
        return [("document", t) for t in list(task.sentences1) + list(task.sentences2)]


class FileTexts:
    """A text file (one text per non-blank line) or a JSON Lines file (the ``field`` of each object).

    ``kind``: ``document`` (default) or ``query``. The format follows the suffix (``.jsonl`` / ``.json``: JSON
    Lines; anything else: plain text).
    """

    def __init__(self, path: str | PathLike[str], field: str = "text", kind: str = "document") -> None:
        self.path = Path(path)
        self.field = field
        self.kind = _check_kind(kind)
        self.name = self.path.name

    def texts(self) -> list[tuple[str, str]]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: text file not found")
        if self.path.suffix not in (".jsonl", ".json"):
            with open(self.path, encoding="utf-8") as f:
                return [(self.kind, line.strip()) for line in f if line.strip()]
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{self.path} line {number}: not JSON ({err.msg})") from None
                value = obj.get(self.field) if isinstance(obj, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{self.path} line {number}: field {self.field!r} must be a string, got {value!r}")
                rows.append((self.kind, value))
        return rows


class HFTexts:
    """One column of a Hugging Face dataset: ``datasets.load_dataset(path, name, split=split,
    data_files=data_files)[column]``; ``path`` is a Hub id (online users), a local dataset folder, or a builder
    such as ``json`` / ``csv`` / ``parquet`` with ``data_files``."""

    def __init__(
        self, path: str, column: str, split: str = "train", name: str | None = None, kind: str = "document",
        data_files: str | list[str] | None = None,
    ) -> None:
        self.path, self.column, self.split, self.config_name = path, column, split, name
        self.data_files = list(data_files) if isinstance(data_files, (list, tuple)) else data_files
        self.kind = _check_kind(kind)
        self.name = f"{path}:{column}"

    def texts(self) -> list[tuple[str, str]]:
        import datasets

        data = datasets.load_dataset(self.path, self.config_name, split=self.split, data_files=self.data_files)
        if self.column not in data.column_names:
            raise DataError(f"dataset {self.path!r} ({self.split}): no column {self.column!r}; columns: {', '.join(data.column_names)}")
        return [(self.kind, t) for t in data[self.column] if isinstance(t, str) and t.strip()]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


class TextCollection:
    """The texts of several parts, each once, in a seeded random order, as unlabelled examples.

    Args:
        parts: :class:`BeirTexts`, :class:`STSTexts`, :class:`FileTexts`, :class:`HFTexts` (anything with
            ``texts() -> [(kind, text)]``).
        max_texts: keep at most this many (after removing repeats; a seeded sample), ``None``: all.
        seed: the order and the sample.
        group_by_length: after shuffling, sort each run of this many texts by length, longest first (``None``: off).
            Consecutive batches then hold texts of similar length and pad little (a corpus's 256-token documents
            next to 15-token sentences would otherwise pad every batch to the longest); use it with
            ``data.shuffle=false`` so the loader keeps this order, and a multiple of the batch size (e.g. 50
            batches), as the Hugging Face Trainer's ``group_by_length`` does with its mega-batches.

    A text that occurs twice with the same kind is kept once (the teacher's target is the same); an empty text
    is dropped. There are no labels to validate on: the data config sets ``data.val`` (a BEIR split or an STS
    file), as ``data=distill_texts`` does.
    """

    def __init__(
        self, parts: Sequence[TextPart], max_texts: int | None = None, seed: int = 42, group_by_length: int | None = None
    ) -> None:
        if not parts:
            raise ConfigError("TextCollection needs at least one part (BeirTexts, STSTexts, FileTexts, HFTexts)")
        if max_texts is not None and max_texts < 1:
            raise ConfigError(f"max_texts must be >= 1 or null, got {max_texts}")
        self.parts = list(parts)
        self.max_texts = max_texts
        self.seed = seed
        if group_by_length is not None and group_by_length < 1:
            raise ConfigError(f"group_by_length must be >= 1 or null, got {group_by_length}")
        self.group_by_length = group_by_length

    def rows(self) -> list[tuple[str, str]]:
        """``[(kind, text)]`` of every part, repeats removed, shuffled by ``seed`` (and cut to ``max_texts``)."""
        seen: set[tuple[str, str]] = set()
        rows = []
        for part in self.parts:
            texts = part.texts()
            added = 0
            for kind, text in texts:
                if text and (kind, text) not in seen:
                    seen.add((kind, text))
                    rows.append((kind, text))
                    added += 1
            log.info("text collection: %d texts from %s (%d repeats dropped)", added, part.name, len(texts) - added)
        random.Random(self.seed).shuffle(rows)
        rows = rows[: self.max_texts] if self.max_texts is not None else rows
        if self.group_by_length:
            size = self.group_by_length
            # characters stand in for tokens: the order only needs to put similar lengths together
            rows = [r for i in range(0, len(rows), size) for r in sorted(rows[i : i + size], key=lambda r: -len(r[1]))]
        return rows

    def examples(self) -> list[Example]:
        return [Example(query=t, positive=None) if kind == "query" else Example(query=None, positive=t) for kind, t in self.rows()]

    def carve(self, fraction: float, seed: int):
        raise DataError(
            "a text collection has no labels to hold out for validation: set data.val (a BeirSource split or an "
            "STSSource file), or data.val_fraction=0"
        )
