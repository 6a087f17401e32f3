"""Readers: BEIR folders, STS Benchmark files, generic tables, carve_split, and table sources as tasks.

Small files are written to ``tmp_path``; every error test checks that the message names the file
(full path), the line or row and the field, since those messages are the readers' user interface.
The ``slow`` test reads the real SciFact and STS-B data from ``$EMBEDLAB_SHARED/data``.
"""

from __future__ import annotations

import io
import json
import os
import re
import urllib.error
import zipfile
from pathlib import Path

import pytest

from embedlab.data import TableSource
from embedlab.errors import ConfigError
from embedlab.data.errors import DataError
from embedlab.data.readers import beir
from embedlab.data.readers import (
    beir_download,
    beir_training_pairs,
    carve_split,
    load_beir,
    load_examples,
    load_sts,
    load_table,
    sts_training_pairs,
)
from embedlab.data.records import Example, RetrievalTask, STSTask, example_ids, text_id
from embedlab.errors import UserError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(*objects: dict) -> list[str]:
    return [json.dumps(obj) for obj in objects]


def at(path: Path, rest: str) -> str:
    """A regex matching an error message that starts with the full ``path`` followed by ``rest``."""
    return "^" + re.escape(str(path)) + rest


# --------------------------------------------------------------------------------------------------
# BEIR
# --------------------------------------------------------------------------------------------------

CORPUS = jsonl(
    {"_id": "d1", "title": "Title one", "text": "Text one."},
    {"_id": "d2", "title": "", "text": "Text two."},
    {"_id": "d3", "text": "Text three, no title field."},
    {"_id": "d4", "title": None, "text": " padded "},
)
QUERIES = jsonl(
    {"_id": "q1", "text": "first query"},
    {"_id": "q2", "text": "second query", "metadata": {}},
    {"_id": "q3", "text": "third query"},
)
TEST_QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t1", "q3\td3\t0"]
TRAIN_QRELS = ["query-id\tcorpus-id\tscore", "q2\td1\t1", "q2\td4\t1", "q3\td2\t1", "q3\td3\t0"]


def make_beir(root: Path, corpus=CORPUS, queries=QUERIES, test=TEST_QRELS, train=TRAIN_QRELS) -> Path:
    write_lines(root / "corpus.jsonl", corpus)
    write_lines(root / "queries.jsonl", queries)
    if test is not None:
        write_lines(root / "qrels" / "test.tsv", test)
    if train is not None:
        write_lines(root / "qrels" / "train.tsv", train)
    return root


def test_load_beir_joins_titles_restricts_queries_and_keeps_graded_qrels(tmp_path):
    task = load_beir(make_beir(tmp_path / "mini"))

    assert task.name == "mini"
    assert task.corpus == {
        "d1": "Title one Text one.",
        "d2": "Text two.",
        "d3": "Text three, no title field.",
        "d4": "padded",
    }
    # q2 has no test qrels, so the test task does not carry it.
    assert task.queries == {"q1": "first query", "q3": "third query"}
    assert task.qrels == {"q1": {"d1": 2, "d2": 1}, "q3": {"d3": 0}}


def test_load_beir_other_split_separator_and_headerless_qrels(tmp_path):
    root = make_beir(tmp_path / "mini", train=TRAIN_QRELS[1:])
    task = load_beir(root, split="train", title_separator=". ")

    assert task.corpus["d1"] == "Title one. Text one."
    assert list(task.queries) == ["q2", "q3"]
    assert task.qrels == {"q2": {"d1": 1, "d4": 1}, "q3": {"d2": 1, "d3": 0}}


def test_load_beir_accepts_numeric_ids(tmp_path):
    root = make_beir(
        tmp_path,
        corpus=jsonl({"_id": 10, "title": "T", "text": "x"}),
        queries=jsonl({"_id": 7, "text": "q"}),
        test=["query-id\tcorpus-id\tscore", "7\t10\t1"],
    )
    task = load_beir(root)
    assert task.corpus == {"10": "T x"}
    assert task.qrels == {"7": {"10": 1}}


def test_beir_training_pairs_keeps_positive_rows_with_ids(tmp_path):
    root = make_beir(tmp_path)
    pairs = beir_training_pairs(root)

    assert pairs == [
        Example(query="second query", positive="Title one Text one.", query_id="q2", positive_id="d1"),
        Example(query="second query", positive="padded", query_id="q2", positive_id="d4"),
        Example(query="third query", positive="Text two.", query_id="q3", positive_id="d2"),
    ]
    assert [p.positive_id for p in beir_training_pairs(root, query_ids={"q3"})] == ["d2"]
    assert [p.positive_id for p in beir_training_pairs(root, split="test", min_score=2)] == ["d1"]


def test_beir_training_pairs_without_positives_is_an_error(tmp_path):
    root = make_beir(tmp_path)
    with pytest.raises(DataError, match=at(root / "qrels" / "train.tsv", r": no qrels row with score >= 1 for the 1 query ids")):
        beir_training_pairs(root, query_ids=["q1"])


@pytest.mark.parametrize(
    ("file", "lines", "message"),
    [
        ("corpus.jsonl", [CORPUS[0], '{"_id": "d2", "text": '], r" line 2: invalid JSON: Expecting value \(column \d+\)"),
        ("corpus.jsonl", [CORPUS[0], '["d2", "text"]'], r" line 2: expected a JSON object, found list"),
        ("corpus.jsonl", [CORPUS[0], "", '{"title": "t", "text": "x"}'], r" line 3: missing field '_id'$"),
        ("corpus.jsonl", [CORPUS[0], '{"_id": "d2", "title": "t"}'], r" line 2: missing field 'text'$"),
        ("corpus.jsonl", [CORPUS[0], '{"_id": "d2", "text": null}'], r" line 2: field 'text' must be a string, found NoneType"),
        ("corpus.jsonl", [CORPUS[0], '{"_id": "", "text": "x"}'], r" line 2: field '_id' must be a non-empty string"),
        ("corpus.jsonl", [CORPUS[0], CORPUS[1], CORPUS[0]], r" line 3: duplicate _id 'd1' \(first on line 1\)"),
        ("queries.jsonl", ['{"_id": "q1"}'], r" line 1: missing field 'text'$"),
        ("queries.jsonl", [QUERIES[0], QUERIES[0]], r" line 2: duplicate _id 'q1' \(first on line 1\)"),
    ],
)
def test_load_beir_jsonl_errors_name_file_line_and_field(tmp_path, file, lines, message):
    root = make_beir(tmp_path)
    write_lines(root / file, lines)
    with pytest.raises(DataError, match=at(root / file, message)):
        load_beir(root)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2"], r" line 3: expected 3 tab-separated columns \(query-id, corpus-id, score\), found 2"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1\textra"], r" line 2: expected 3 tab-separated columns .*found 4"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1.5"], r" line 2: score '1.5' is not an integer"),
        (["q1\td1\t1", "q1\td2\thigh"], r" line 2: score 'high' is not an integer"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q9\td1\t1"], r" line 3: query-id 'q9' is not in the queries file .*queries\.jsonl$"),
        (["query-id\tcorpus-id\tscore", "q1\td9\t1"], r" line 2: corpus-id 'd9' is not in the corpus file .*corpus\.jsonl$"),
        (["query-id\tcorpus-id\tscore"], r" has no rows$"),
        ([], r" has no rows$"),
    ],
)
def test_load_beir_qrels_errors_name_file_and_line(tmp_path, lines, message):
    root = make_beir(tmp_path, test=lines)
    with pytest.raises(DataError, match=at(root / "qrels" / "test.tsv", message)):
        load_beir(root)


def test_load_beir_missing_folder_files_and_split(tmp_path):
    with pytest.raises(DataError, match=at(tmp_path / "nope", r": BEIR dataset folder not found \(a BEIR folder holds corpus\.jsonl, queries\.jsonl and qrels/<split>\.tsv; .*beir_download")):
        load_beir(tmp_path / "nope")

    root = make_beir(tmp_path / "mini")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=at(root / "queries.jsonl", r": file not found \(a BEIR folder holds")):
        load_beir(root)

    root = make_beir(tmp_path / "mini2")
    with pytest.raises(DataError, match=at(root / "qrels" / "dev.tsv", r": file not found .*; splits available: test, train$")):
        load_beir(root, split="dev")


def test_load_beir_empty_corpus(tmp_path):
    root = make_beir(tmp_path, corpus=[""])
    with pytest.raises(DataError, match=at(root / "corpus.jsonl", r" has no rows$")):
        load_beir(root)


def _zip_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


class _FakeResponse(io.BytesIO):
    headers: dict = {}


def test_beir_download_unzips_and_skips_when_present(tmp_path, monkeypatch):
    payload = _zip_bytes(
        {
            "mini/corpus.jsonl": "\n".join(CORPUS) + "\n",
            "mini/queries.jsonl": "\n".join(QUERIES) + "\n",
            "mini/qrels/test.tsv": "\n".join(TEST_QRELS) + "\n",
        }
    )
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(beir, "urlopen", fake_urlopen)
    folder = beir_download("mini", tmp_path / "data")

    assert folder == tmp_path / "data" / "mini"
    assert urls == ["https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/mini.zip"]
    assert not (tmp_path / "data" / "mini.zip").exists()
    assert len(load_beir(folder).corpus) == 4
    assert beir_download("mini", tmp_path / "data") == folder
    assert len(urls) == 1


def test_beir_download_failure_explains_manual_route(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(beir, "urlopen", offline)
    with pytest.raises(DataError, match=r"could not fetch BEIR dataset 'scifact' from https://\S+/scifact\.zip: .*no network.*; download .* yourself and unzip it into"):
        beir_download("scifact", tmp_path)
    assert not (tmp_path / "scifact.zip").exists()
    with pytest.raises(DataError, match="plain name"):
        beir_download("../etc", tmp_path)


# --------------------------------------------------------------------------------------------------
# STS Benchmark
# --------------------------------------------------------------------------------------------------

STS_ROWS = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.",
    'main-news\theadlines\t2013\t0002\t2.5\tHe said "no\tShe said "yes"',
    "main-news\theadlines\t2016\t0281\t0\tUS court rules\tHigh court checks\tEurope Media Monitor\tsource",
]


def test_load_sts_reads_release_format(tmp_path):
    path = write_lines(tmp_path / "sts-dev.csv", STS_ROWS)
    task = load_sts(path)

    assert task.name == "sts-dev"
    # The unbalanced quote in row 2 stays literal text (QUOTE_NONE), and row 3's trailing fields are ignored.
    assert task.sentences1 == ["A plane is taking off.", 'He said "no', "US court rules"]
    assert task.sentences2 == ["An air plane is taking off.", 'She said "yes"', "High court checks"]
    assert task.scores == [1.0, 0.5, 0.0]


def test_sts_training_pairs_are_scored_examples(tmp_path):
    path = write_lines(tmp_path / "sts-train.csv", STS_ROWS)
    assert sts_training_pairs(path, score_scale=10.0)[1] == Example(
        query='He said "no', positive='She said "yes"', score=0.25
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([STS_ROWS[0], "g\tf\t2012\t0003\t4.0\tonly one sentence"], r" line 2: expected at least 7 tab-separated fields \(genre, file, year, id, score, sentence1, sentence2\), found 6"),
        ([STS_ROWS[0], STS_ROWS[1], "g\tf\t2012\t0003\tn/a\ta\tb"], r" line 3: field 'score' is not a number: 'n/a'"),
        (["g\tf\t2012\t0003\t7.5\ta\tb"], r" line 1: field 'score' = '7.5' is 1.5 after dividing by score_scale=5, outside \[0, 1\]"),
        ([], r" has no rows$"),
    ],
)
def test_load_sts_errors_name_file_line_and_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "sts-test.csv", lines)
    with pytest.raises(DataError, match=at(path, message)):
        load_sts(path)


def test_load_sts_missing_file(tmp_path):
    with pytest.raises(DataError, match=at(tmp_path / "sts-test.csv", r": file not found")):
        load_sts(tmp_path / "sts-test.csv")


# --------------------------------------------------------------------------------------------------
# Generic tables
# --------------------------------------------------------------------------------------------------

PAIR_ROWS = [
    {"anchor": "what is a cat", "pos": "a cat is an animal", "negative_1": "a car", "negative_2": "a cap", "query_id": 1},
    {"anchor": "what is rain", "pos": "rain is water", "negative_1": "a rainbow", "negative_2": "", "query_id": 2},
]


def write_table(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format ``path``'s extension names (CSV/TSV turn values into strings)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        write_lines(path, jsonl(*rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        import csv

        with open(path, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="," if suffix == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_load_examples_same_pairs_from_every_format(tmp_path, suffix):
    path = write_table(tmp_path / f"train{suffix}", PAIR_ROWS)
    examples = load_examples(path, columns={"query": "anchor", "positive": "pos"})

    assert examples == [
        Example(query="what is a cat", positive="a cat is an animal", negatives=["a car", "a cap"], query_id="1"),
        Example(query="what is rain", positive="rain is water", negatives=["a rainbow"], query_id="2"),
    ]


def test_load_table_keeps_or_renames_columns(tmp_path):
    path = write_table(tmp_path / "train.csv", PAIR_ROWS)
    assert load_table(path)[0]["anchor"] == "what is a cat"
    assert load_table(path, columns={"q": "anchor", "p": "pos"}) == [
        {"q": "what is a cat", "p": "a cat is an animal"},
        {"q": "what is rain", "p": "rain is water"},
    ]


def test_load_table_format_override_json_lines_and_split_folders(tmp_path):
    txt = write_lines(tmp_path / "pairs.txt", jsonl(*PAIR_ROWS))
    assert len(load_table(txt, format="jsonl")) == 2
    with pytest.raises(DataError, match=at(txt, r": cannot tell the format from the extension '\.txt'; pass format=")):
        load_table(txt)

    # A .json file holding one object per line is JSONL in disguise.
    assert load_table(write_lines(tmp_path / "lines.json", jsonl(*PAIR_ROWS))) == PAIR_ROWS

    folder = tmp_path / "data"
    folder.mkdir()
    write_table(folder / "train.parquet", PAIR_ROWS)
    write_table(folder / "validation.jsonl", PAIR_ROWS[:1])
    assert len(load_table(folder, split="validation")) == 1
    with pytest.raises(DataError, match=at(folder, r": no file for split 'test' .*; the folder holds: train\.parquet, validation\.jsonl")):
        load_table(folder, split="test")
    with pytest.raises(DataError, match=at(folder, r" is a folder: pass split=")):
        load_table(folder)
    with pytest.raises(DataError, match=at(folder / "train.parquet", r": split='train' given for a single file")):
        load_table(folder / "train.parquet", split="train")


def test_load_examples_negative_columns_lists_and_ids(tmp_path):
    path = write_table(
        tmp_path / "mined.parquet",
        [
            {"query": "q", "positive": "p", "negatives": ["n1", None, "n2"], "positive_id": 5, "negative_ids": [7, None, 8]},
            {"query": "q2", "positive": "p2", "negatives": None, "positive_id": None, "negative_ids": None},
        ],
    )
    first, second = load_examples(path)
    assert first == Example(query="q", positive="p", negatives=["n1", "n2"], positive_id="5", negative_ids=["7", "8"])
    assert second == Example(query="q2", positive="p2")

    mismatched = write_table(tmp_path / "ids.jsonl", [{"query": "q", "positive": "p", "negatives": ["n1", "n2"], "negative_ids": ["7"]}])
    with pytest.raises(DataError, match=at(mismatched, r" line 1: column 'negative_ids' has 1 ids for 2 negatives")):
        load_examples(mismatched)

    named = write_table(tmp_path / "named.jsonl", [{"query": "q", "positive": "p", "hard_a": "a", "hard_b": "b", "negative": "c"}])
    assert load_examples(named, columns={"negatives": ["hard_b", "hard_a"]})[0].negatives == ["b", "a"]
    assert load_examples(named, columns={"negatives": "negative"})[0].negatives == ["c"]
    # Numbered columns sort numerically, not as text.
    numbered = write_table(tmp_path / "numbered.jsonl", [{"query": "q", "positive": "p", **{f"negative_{i}": f"n{i}" for i in (10, 2, 1)}}])
    assert load_examples(numbered)[0].negatives == ["n1", "n2", "n10"]


def test_load_examples_triplets_and_scored(tmp_path):
    triplets = write_table(tmp_path / "triplets.tsv", [{"query": "q", "positive": "p", "negative": "n"}])
    assert load_examples(triplets, kind="triplets") == [Example(query="q", positive="p", negatives=["n"])]

    scored = write_table(tmp_path / "scored.csv", [{"sentence1": "a", "sentence2": "b", "score": "4.5"}, {"sentence1": "c", "sentence2": "d", "score": "0"}])
    assert load_examples(scored, kind="scored", score_scale=5.0) == [
        Example(query="a", positive="b", score=0.9),
        Example(query="c", positive="d", score=0.0),
    ]
    labels = write_table(tmp_path / "labels.jsonl", [{"s1": "a", "s2": "b", "label": 1}])
    assert load_examples(labels, kind="scored", columns={"text1": "s1", "text2": "s2", "score": "label"})[0].score == 1.0


def test_load_examples_missing_column_names_row_column_and_present_columns(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", jsonl({"query": "q", "positive": "p"}, {"query": "q", "positive": "p"}, {"query": "q", "pos": "p"}))
    with pytest.raises(DataError, match=at(path, r" line 3: missing column 'positive'; columns present: 'query', 'pos' \(map other names with columns=")):
        load_examples(path)

    csv_path = write_table(tmp_path / "train.csv", PAIR_ROWS)
    with pytest.raises(DataError, match=at(csv_path, r" line 2: missing column 'query'; columns present: 'anchor', 'pos', ")):
        load_examples(csv_path)
    with pytest.raises(DataError, match=at(csv_path, r" line 2: missing column 'label'")):
        load_table(csv_path, columns={"score": "label"})

    parquet = write_table(tmp_path / "train.parquet", PAIR_ROWS)
    with pytest.raises(DataError, match=at(parquet, r" row 1: missing column 'query_id_x'")):
        load_examples(parquet, columns={"query": "anchor", "positive": "pos", "query_id": "query_id_x"})

    triplets = write_table(tmp_path / "t.jsonl", [{"query": "q", "positive": "p"}])
    with pytest.raises(DataError, match=at(triplets, r" line 1: missing column 'negative'")):
        load_examples(triplets, kind="triplets")


def test_load_examples_bad_values_name_row_and_field(tmp_path):
    scored = write_table(tmp_path / "sts.csv", [{"sentence1": "a", "sentence2": "b", "score": "1"}, {"sentence1": "a", "sentence2": "b", "score": "high"}])
    with pytest.raises(DataError, match=at(scored, r" line 3: field 'score' is not a number: 'high'")):
        load_examples(scored, kind="scored")
    wide = write_table(tmp_path / "wide.csv", [{"sentence1": "a", "sentence2": "b", "score": "4"}])
    with pytest.raises(DataError, match=at(wide, r" line 2: field 'score' = '4' is 4 after dividing by score_scale=1, outside \[0, 1\]; set score_scale")):
        load_examples(wide, kind="scored")

    nulls = write_table(tmp_path / "nulls.json", [{"query": "q", "positive": "p"}, {"query": None, "positive": "p"}])
    with pytest.raises(DataError, match=at(nulls, r" row 2: column 'query' must be a string, found NoneType None")):
        load_examples(nulls)

    negatives = write_table(tmp_path / "neg.jsonl", [{"query": "q", "positive": "p", "negatives": {"a": 1}}])
    with pytest.raises(DataError, match=at(negatives, r" line 1: column 'negatives' must be a list of strings or a string")):
        load_examples(negatives)


def test_table_file_errors(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=at(empty, r" has no rows$")):
        load_examples(empty)
    header_only = write_lines(tmp_path / "header.csv", ["query,positive"])
    with pytest.raises(DataError, match=at(header_only, r" has no rows$")):
        load_examples(header_only)
    ragged = write_lines(tmp_path / "ragged.csv", ["query,positive", "q,p", "", '"multi', 'line",p', "q,p,extra"])
    with pytest.raises(DataError, match=at(ragged, r" line 6: expected 2 fields as in the header, found 3")):
        load_table(ragged)
    broken = write_lines(tmp_path / "broken.jsonl", jsonl({"query": "q"}) + ["{oops"])
    with pytest.raises(DataError, match=at(broken, r" line 2: invalid JSON: ")):
        load_table(broken)
    not_parquet = write_lines(tmp_path / "bad.parquet", ["not parquet"])
    with pytest.raises(DataError, match=at(not_parquet, r": not a readable Parquet file")):
        load_table(not_parquet)
    with pytest.raises(DataError, match=at(tmp_path / "missing.jsonl", r": file not found$")):
        load_table(tmp_path / "missing.jsonl")


def test_load_examples_argument_errors(tmp_path):
    path = write_table(tmp_path / "t.jsonl", PAIR_ROWS)
    with pytest.raises(DataError, match="kind must be one of pairs, triplets, scored"):
        load_examples(path, kind="quads")
    with pytest.raises(DataError, match=r"columns keys \['anchor'\] are not roles of kind 'pairs'"):
        load_examples(path, columns={"anchor": "query"})
    with pytest.raises(DataError, match="format must be one of"):
        load_table(path, format="xlsx")


def test_hub_names_go_to_datasets_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        if path == "owner/missing":
            raise FileNotFoundError("Couldn't find a dataset")
        table = datasets.Dataset.from_list([{"anchor": "q", "positive": "p", "negative": "n"}])
        return table if split else datasets.DatasetDict({"train": table, "test": table})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("owner/all-nli", kind="triplets", columns={"query": "anchor"}, split="train", name="triplet")
    assert examples == [Example(query="q", positive="p", negatives=["n"])]
    assert calls == [("owner/all-nli", "train", {"name": "triplet"})]

    with pytest.raises(DataError, match=r"^Hugging Face dataset 'owner/all-nli' split 'train' row 1: missing column 'query'"):
        load_examples("owner/all-nli", split="train")
    with pytest.raises(DataError, match=r"^Hugging Face dataset 'owner/all-nli' has splits train, test; pass split="):
        load_table("owner/all-nli")
    with pytest.raises(DataError, match=r"^could not load 'owner/missing': no local file or folder has that name, .*FileNotFoundError"):
        load_table("owner/missing", split="train")


# --------------------------------------------------------------------------------------------------
# Text ids and table sources as evaluation tasks
# --------------------------------------------------------------------------------------------------


def blake_id(text: str) -> str:
    """Reference for text ids, written from the definition: "h:" + 8-byte BLAKE2b of the UTF-8 text."""
    import hashlib

    return "h:" + hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def test_example_ids_use_given_ids_else_text_hashes():
    e = Example(query="q", positive="p", negatives=["n1", "n2", "n3"], query_id="", positive_id="7", negative_ids=["a", ""])
    ids = example_ids(e)
    assert ids == (blake_id("q"), "7", ["a", blake_id("n2"), blake_id("n3")])
    assert text_id("é") == blake_id("é") != blake_id("e")


PAIRS_CSV = [
    "query,positive,query_id",
    "what is a cat,a cat is an animal,q1",
    "what is rain,rain is water,q2",
    "what is a cat,cats purr,q1",
    "what is snow,rain is water,",
]


def test_table_source_pairs_as_a_test_task_is_the_hand_built_retrieval_task(tmp_path):
    path = write_lines(tmp_path / "pairs.csv", PAIRS_CSV)
    cat, cats, rain = blake_id("a cat is an animal"), blake_id("cats purr"), blake_id("rain is water")
    snow = blake_id("what is snow")  # an empty query_id cell means no id: the query text's hash
    expected = RetrievalTask(
        corpus={cat: "a cat is an animal", rain: "rain is water", cats: "cats purr"},
        queries={"q1": "what is a cat", "q2": "what is rain", snow: "what is snow"},
        qrels={"q1": {cat: 1, cats: 1}, "q2": {rain: 1}, snow: {rain: 1}},
        name="pairs.csv",
    )
    assert TableSource(str(path)).task() == expected

    # carving holds out whole queries: q1's two pairs never straddle train and validation
    for seed in range(4):
        train, val = TableSource(str(path)).carve(0.5, seed)
        train_queries = {example_ids(e).query for e in train}
        assert not train_queries & set(val.queries)
        assert len(train) + sum(len(docs) for docs in val.qrels.values()) == 4
        assert train_queries | set(val.queries) == {"q1", "q2", snow}


def test_table_source_scored_as_a_test_task_divides_by_score_scale(tmp_path):
    path = write_lines(tmp_path / "sts.csv", ["sentence1,sentence2,score", "a,b,4.5", "c,d,0", "e,f,2"])
    task = TableSource(str(path), kind="scored", score_scale=5.0).task()
    assert task == STSTask(sentences1=["a", "c", "e"], sentences2=["b", "d", "f"], scores=[0.9, 0.0, 0.4], name="sts.csv")


def test_table_source_errors_name_file_line_and_field(tmp_path):
    scored = write_lines(tmp_path / "sts.csv", ["sentence1,sentence2,score", "a,b,4.5", "c,d,many"])
    with pytest.raises(DataError, match=at(scored, r" line 3: field 'score' is not a number: 'many'$")):
        TableSource(str(scored), kind="scored", score_scale=5.0).task()
    pairs = write_lines(tmp_path / "pairs.csv", ["query,answer", "q,a"])
    # a user error: entry points print the message as one line and exit 1
    with pytest.raises(UserError, match=at(pairs, r" line 2: missing column 'positive'; columns present: 'query', 'answer'")):
        TableSource(str(pairs)).task()
    with pytest.raises(DataError, match=r"^kind must be one of pairs, triplets, scored, got 'pair'$"):
        TableSource(str(pairs), kind="pair").task()


# --------------------------------------------------------------------------------------------------
# carve_split
# --------------------------------------------------------------------------------------------------


def test_carve_split_is_seeded_disjoint_and_order_preserving():
    items = list(range(100))
    carved, rest = carve_split(items, 0.2, seed=3)

    assert (carved, rest) == carve_split(items, 0.2, seed=3)
    assert len(carved) == 20 and len(rest) == 80
    assert sorted(carved + rest) == items
    assert carved == sorted(carved) and rest == sorted(rest)
    assert carve_split(items, 0.2, seed=4)[0] != carved


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_carve_split_leaves_one_item_on_each_side(fraction):
    carved, rest = carve_split(["a", "b"], fraction, seed=0)
    assert len(carved) == 1 and len(rest) == 1
    assert carve_split(["a"], fraction, seed=0) == ([], ["a"])
    assert carve_split([], fraction, seed=0) == ([], [])


def test_carve_split_groups_by_key_and_rejects_bad_fractions():
    pairs = [("q1", 1), ("q2", 1), ("q1", 2), ("q3", 1), ("q2", 2), ("q4", 1)]
    carved, rest = carve_split(pairs, 0.5, seed=1, key=lambda pair: pair[0])
    assert len({q for q, _ in carved}) == 2
    assert not {q for q, _ in carved} & {q for q, _ in rest}
    for fraction in (0, 1, -0.5, 1.5):
        with pytest.raises(DataError, match="strictly between 0 and 1"):
            carve_split(pairs, fraction, seed=0)


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_scifact_and_stsb_counts():
    shared = os.environ.get("EMBEDLAB_SHARED")
    if not shared:
        pytest.skip("EMBEDLAB_SHARED not set: real-data check needs the shared data folder (CI sets it)")
    data = Path(shared) / "data"

    test = load_beir(data / "scifact")
    assert len(test.corpus) == 5183
    assert len(test.queries) == 300
    assert sum(len(docs) for docs in test.qrels.values()) == 339
    train = load_beir(data / "scifact", split="train")
    assert len(train.queries) == 809
    assert sum(len(docs) for docs in train.qrels.values()) == 919
    assert len(beir_training_pairs(data / "scifact")) == 919
    assert not set(test.queries) & set(train.queries)

    for split, count in (("train", 5749), ("dev", 1500), ("test", 1379)):
        task = load_sts(data / "stsbenchmark" / f"sts-{split}.csv")
        assert len(task.scores) == len(task.sentences1) == len(task.sentences2) == count
        assert min(task.scores) == 0.0 and max(task.scores) == 1.0


# ------------------------------------------------------------------------------------------------------------
# random negatives (rerankers) and both orders of scored pairs (cross-encoders)
# ------------------------------------------------------------------------------------------------------------
def test_random_negatives_follow_the_mined_ones_and_avoid_every_qrels_document(tiny_data_root, tmp_path):
    import json as _json

    from embedlab.data import BeirSource
    from embedlab.data.readers import load_beir

    folder = tiny_data_root / "scifact"
    mined = tmp_path / "hn.jsonl"
    train = load_beir(folder, split="train")
    mined.write_text("".join(_json.dumps({"query_id": q, "negative_ids": [f"x{q[1:]}"]}) + "\n" for q in train.qrels))
    source = BeirSource(str(folder), split="train", hard_negatives=str(mined), num_negatives=1, random_negatives=3, seed=7)
    examples = source.examples()
    assert len(examples) == len(train.qrels)
    full = load_beir(folder, split="train")
    for ex in examples:
        assert len(ex.negatives) == len(ex.negative_ids) == 4
        assert ex.negative_ids[0] == f"x{ex.query_id[1:]}"  # the mined one first
        assert len(set(ex.negative_ids)) == 4 and not set(ex.negative_ids) & set(full.qrels[ex.query_id])
        assert ex.negatives == [full.corpus[d] for d in ex.negative_ids]
    # a draw of (seed, pair) alone: the same again, another with another seed
    assert [e.negative_ids for e in source.examples()] == [e.negative_ids for e in examples]
    other = BeirSource(str(folder), split="train", random_negatives=3, seed=8).examples()
    assert [e.negative_ids for e in other] != [e.negative_ids[1:] for e in examples]
    with pytest.raises(ConfigError, match=r"^random_negatives must be >= 0, got -1$"):
        BeirSource(str(folder), random_negatives=-1)


def test_both_orders_doubles_training_pairs_but_not_the_held_out_ones(tmp_path):
    from embedlab.data import STSSource

    path = tmp_path / "sts-train.csv"  # 20 distinct pairs
    path.write_text("".join(f"main-news\tnews\t2012\t{i:04d}\t{i % 5}.0\tsentence a{i}\tsentence b{i}\n" for i in range(20)))
    path = str(path)
    once, twice = STSSource(path).examples(), STSSource(path, both_orders=True).examples()
    assert twice[: len(once)] == once
    assert [(e.positive, e.query, e.score) for e in twice[len(once):]] == [(e.query, e.positive, e.score) for e in once]
    train, val = STSSource(path, both_orders=True).carve(0.25, seed=0)
    held = set(zip(val.sentences1, val.sentences2))
    assert len(train) == 2 * (len(once) - len(held))
    assert not {(e.query, e.positive) for e in train} & (held | {(b, a) for a, b in held})
