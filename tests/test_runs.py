"""Run files: TREC / JSON round trips, pytrec_eval's reader as the reference, exact errors for bad files."""

from __future__ import annotations

import json

import pytest

from embedlab.data import DataError, RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.runs import read_run, top_k_run, write_json_run, write_trec_run

# scores with many digits, a tie (d2 / d10 in q1) and a negative score
RUN = {
    "q1": {"d1": 0.8127312345678901, "d2": 0.5, "d10": 0.5, "d3": -1.25e-3},
    "q2": {"d3": 12.0, "d1": 3.0000000000000004},
    "q10": {},
}


def small_task() -> RetrievalTask:
    corpus = {f"d{i}": f"document {i}" for i in (1, 2, 3, 10)}
    return RetrievalTask(corpus=corpus, queries={"q1": "a", "q2": "b", "q10": "c"}, qrels={"q1": {"d1": 1}})


def test_trec_lines_are_standard_and_ranked_as_trec_eval_ranks(tmp_path):
    path = write_trec_run(RUN, tmp_path / "run.trec", tag="bm25")
    assert path == tmp_path / "run.trec"
    # trec_eval's order: score descending, ties by doc id descending ("d2" > "d10" byte-wise)
    assert path.read_text().splitlines() == [
        "q1 Q0 d1 1 0.8127312345678901 bm25",
        "q1 Q0 d2 2 0.5 bm25",
        "q1 Q0 d10 3 0.5 bm25",
        "q1 Q0 d3 4 -0.00125 bm25",
        "q2 Q0 d3 1 12.0 bm25",
        "q2 Q0 d1 2 3.0000000000000004 bm25",
    ]


def test_trec_round_trip_and_pytrec_eval_reads_the_same_run(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    path = write_trec_run(RUN, tmp_path / "run.txt")
    expected = {qid: docs for qid, docs in RUN.items() if docs}  # a TREC file cannot list an empty query
    assert read_run(path) == expected
    assert read_run(path, small_task()) == expected
    with open(path) as f:
        assert dict(pytrec_eval.parse_run(f)) == expected
    # pytrec_eval evaluates the written file exactly as the in-memory run
    qrels = {"q1": {"d10": 1, "d3": 2}, "q2": {"d1": 1}}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_3", "recip_rank"})
    with open(path) as f:
        assert evaluator.evaluate(pytrec_eval.parse_run(f)) == evaluator.evaluate(RUN)


def test_json_round_trip_and_format_detection(tmp_path):
    path = write_json_run(RUN, tmp_path / "run.json")
    assert json.loads(path.read_text()) == RUN
    assert read_run(path, small_task()) == RUN  # empty queries survive in JSON
    # detected by content when the suffix says nothing
    (tmp_path / "run.out").write_text(path.read_text())
    assert read_run(tmp_path / "run.out") == RUN
    (tmp_path / "trec.json.txt").write_text("q1 Q0 d1 1 2.5 x\n\n  q1 Q0 d2 2 1 x\n")  # blank line skipped
    assert read_run(tmp_path / "trec.json.txt") == {"q1": {"d1": 2.5, "d2": 1.0}}


def test_top_k_run():
    assert top_k_run(RUN, 2) == {"q1": {"d1": RUN["q1"]["d1"], "d2": 0.5}, "q2": RUN["q2"], "q10": {}}
    assert list(top_k_run(RUN, 3)["q1"]) == ["d1", "d2", "d10"]
    with pytest.raises(ConfigError, match=r"^top_k must be >= 1, got 0$"):
        top_k_run(RUN, 0)


def write_lines(tmp_path, lines: list[str], name: str = "bad.trec"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = ["q1 Q0 d1 1 2.0 t", "q1 Q0 d2 2 1.0 t"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("q1 Q0 d3 3 0.5", "line 3: expected 6 columns (qid Q0 docid rank score tag), got 5"),
        ("q1 Q0 d3 3 0.5 t extra", "line 3: expected 6 columns (qid Q0 docid rank score tag), got 7"),
        ("q1 Q0 d3 3 high t", "line 3: score 'high' is not a number"),
        ("q1 Q0 d3 3 nan t", "line 3: score 'nan' is not a finite number"),
        ("q1 Q0 d1 3 0.5 t", "line 3: document 'd1' listed twice for query 'q1' (first on line 1)"),
    ],
)
def test_malformed_trec_lines(tmp_path, line, message):
    path = write_lines(tmp_path, [*GOOD, line])
    with pytest.raises(DataError) as err:
        read_run(path)
    assert str(err.value) == f"{path} {message}"


def test_unknown_ids_need_the_task(tmp_path):
    task = small_task()
    path = write_lines(tmp_path, [*GOOD, "q1 Q0 d9 3 0.5 t"])
    assert read_run(path)["q1"]["d9"] == 0.5  # without a task any id is fine
    with pytest.raises(DataError) as err:
        read_run(path, task)
    assert str(err.value) == f"{path} line 3: unknown document id 'd9' (not in the corpus of 4 documents)"
    path = write_lines(tmp_path, ["x Q0 d1 1 0.5 t", *GOOD])
    with pytest.raises(DataError) as err:
        read_run(path, task)
    assert str(err.value) == f"{path} line 1: unknown query id 'x' (not in the task's 3 queries)"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"q1": {"d9": 1.0}}', "query 'q1': unknown document id 'd9' (not in the corpus of 4 documents)"),
        ('{"x": {"d1": 1.0}}', "unknown query id 'x' (not in the task's 3 queries)"),
        ('{"q1": [1, 2]}', "query 'q1': expected an object {doc_id: score}, got list"),
        ('{"q1": {"d1": "high"}}', "query 'q1': document 'd1': score 'high' is not a finite number"),
        ('{"q1": {"d1": true}}', "query 'q1': document 'd1': score True is not a finite number"),
        ("[1, 2]", "a JSON run must be an object {query_id: {doc_id: score}}, got list"),
        ('{"q1": {"d1": 1.0}', "not valid JSON (Expecting ',' delimiter at line 1 column 19)"),
    ],
)
def test_malformed_json_runs(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_run(path, small_task())
    assert str(err.value) == f"{path}: {message}"


def test_write_and_read_errors(tmp_path):
    path = tmp_path / "run.trec"
    with pytest.raises(DataError) as err:
        write_trec_run({"q 1": {"d1": 1.0}}, path)
    assert str(err.value) == (
        f"{path}: query id 'q 1' is empty or contains whitespace, which a TREC run file cannot hold "
        "(write_json_run writes any id)"
    )
    with pytest.raises(DataError) as err:
        write_trec_run({"q1": {"d1": float("inf")}}, path)
    assert str(err.value) == f"{path}: query 'q1': document 'd1': score inf is not a finite number"
    assert not path.exists()  # nothing half-written
    assert write_json_run({"q 1": {"d 1": 1.0}}, tmp_path / "ok.json").is_file()  # JSON holds any id
    with pytest.raises(DataError) as err:
        read_run(tmp_path / "missing.trec")
    assert str(err.value) == f"{tmp_path / 'missing.trec'}: run file not found"
