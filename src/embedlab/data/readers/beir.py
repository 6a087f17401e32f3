"""BEIR retrieval folders: evaluation tasks, (query, relevant document) training pairs, and downloads.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``; a header row). This is the
layout of every dataset in the BEIR benchmark and of MTEB's retrieval tasks.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from tqdm.auto import tqdm

from embedlab.data.errors import DataError
from embedlab.data.readers.tables import iter_jsonl
from embedlab.data.records import Example, RetrievalTask

__all__ = ["BEIR_URL", "beir_download", "beir_task_pairs", "beir_training_pairs", "load_beir"]

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


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


def beir_download(name: str, root: str | PathLike[str]) -> Path:
    """Download and unzip BEIR dataset ``name`` (``"scifact"``, ``"nfcorpus"``, ...) into ``root``.

    Fetches :data:`BEIR_URL` and returns ``root/name``, the folder to pass to :func:`load_beir`.
    Nothing is fetched when ``root/name/corpus.jsonl`` already exists, so it is safe to call before
    every run. The zip file is removed after unpacking.

    Raises:
        DataError: ``name`` is not a plain dataset name; the download or unpacking failed; the message says how to do it by hand.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DataError(f"BEIR dataset name {name!r} must be a plain name such as 'scifact'")
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


def _read_beir_texts(path: Path, title_separator: str | None) -> dict[str, str]:
    """Read a BEIR corpus (``title_separator`` given: title and text joined) or queries file."""
    texts: dict[str, str] = {}
    for number, obj in iter_jsonl(path):
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
    for number, obj in iter_jsonl(path):
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


