"""Teacher scores (embedlab.scoring, score.py) against references: per-pair cross-encoder logits, float64 cosine
of live embeddings, BM25Retriever's own scores and a naive float64 BM25, a float64 hand fusion; the scored file
read back into Example.teacher_scores; exact error messages."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from embedlab.data import BeirSource
from embedlab.data.collate import collate_examples
from embedlab.data.errors import DataError
from embedlab.data.readers import load_beir, read_hard_negatives
from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.first_stage import BM25Retriever
from embedlab.models import tiny_bi_encoder, tiny_cross_encoder
from embedlab.scoring import (
    BiEncoderTeacher,
    BM25Teacher,
    CandidateList,
    CrossEncoderTeacher,
    candidate_lists,
    check_weights,
    fuse_scores,
    score,
    score_lists,
    selected_teachers,
    standardize,
)
from tests.conftest import compose_config
from tests.test_cli import assert_one_line_error, run_entry_point_in_process
from tests.test_first_stage import CORPUS, QUERIES, naive_bm25

TOY = RetrievalTask(corpus=dict(CORPUS), queries=dict(QUERIES), qrels={}, name="toy")
# every query against a mix of matching and non-matching documents; q_none matches nothing, q_rep repeats "z1"
TOY_LISTS = [
    CandidateList("q_cat", ["w4", "x3", "y2", "z1", "u6"]),
    CandidateList("q_rep", ["z1", "v5", "z1"]),
    CandidateList("q_solar", ["dup_a", "x3", "dup_b", "v5"]),
    CandidateList("q_none", ["z1", "y2"]),
    CandidateList("q_mixed", ["x3", "v5", "w4", "u6", "dup_a"]),
]


# ---------------------------------------------------------------------------------------------------------- teachers
def test_cross_encoder_teacher_gives_raw_logits_of_each_pair(tmp_path):
    model = tiny_cross_encoder(seed=3)  # sigmoid activation by default: the teacher must not apply it
    folder = model.save(tmp_path / "ce")
    teacher = CrossEncoderTeacher(str(folder), batch_size=3)
    got = teacher.score(TOY, TOY_LISTS, show_progress_bar=False)
    model.eval()
    with torch.no_grad():
        for c, scores in zip(TOY_LISTS, got):
            assert scores.dtype == np.float64 and scores.shape == (len(c.doc_ids),)
            for d, s in zip(c.doc_ids, scores):
                # one pair at a time, unpadded: no batching or length sorting in the reference
                logit = model(model.tokenize([TOY.queries[c.query_id]], [TOY.corpus[d]]))[0, 0].item()
                assert s == pytest.approx(logit, abs=1e-5)
    # a folder without a trained head would score with a random one: refused
    encoder = tiny_bi_encoder().save(tmp_path / "bi")
    with pytest.raises(Exception, match="is not a cross-encoder: no sequence-classification head"):
        CrossEncoderTeacher(str(encoder))
    two = tiny_cross_encoder(num_labels=2).save(tmp_path / "ce2")
    with pytest.raises(ConfigError) as e:
        CrossEncoderTeacher(str(two))
    assert str(e.value) == (
        f"teachers.cross_encoder.path {str(two)!r} has 2 output labels; a teacher needs a relevance model with one "
        "logit per pair"
    )


@pytest.mark.parametrize("similarity", [None, "cos", "dot"])
def test_bi_encoder_teacher_equals_float64_similarity_of_live_embeddings(similarity, tmp_path):
    model = tiny_bi_encoder(seed=5, normalize=False, query_prompt="query: ", similarity="dot")  # cos != dot here
    folder = model.save(tmp_path / "bi")
    teacher = BiEncoderTeacher(str(folder), batch_size=2, similarity=similarity)
    assert teacher.similarity == (similarity or "dot")  # None: the folder's own similarity
    got = teacher.score(TOY, TOY_LISTS, show_progress_bar=False)
    for c, scores in zip(TOY_LISTS, got):
        q = model.encode([TOY.queries[c.query_id]], kind="query")[0].double()  # the query prompt applies
        for d, s in zip(c.doc_ids, scores):
            v = model.encode([TOY.corpus[d]], kind="document")[0].double()
            ref = float(q @ v) if teacher.similarity == "dot" else float(q @ v / (q.norm() * v.norm()))
            assert s == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ConfigError) as e:
        BiEncoderTeacher(str(folder), similarity="l2")
    assert str(e.value) == "teachers.bi_encoder.similarity must be one of cos, dot or null, got 'l2'"


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_bm25_teacher_gives_the_retrievers_scores_and_zero_without_a_shared_token(method):
    teacher = BM25Teacher(k1=1.2, b=0.75, method=method, stopwords=None, stemmer=None)
    got = teacher.score(TOY, TOY_LISTS, show_progress_bar=False)
    run = BM25Retriever(k1=1.2, b=0.75, method=method, stopwords=None, stemmer=None).retrieve(
        TOY, top_k=len(CORPUS), show_progress_bar=False)
    unmatched = []
    for c, scores in zip(TOY_LISTS, got):
        for d, s in zip(c.doc_ids, scores):
            if d in run[c.query_id]:
                assert s == run[c.query_id][d]  # same index, tokens and float32 sums: the very same number
            else:
                unmatched.append((c.query_id, s))
        if method == "lucene":  # Lucene's BM25 in float64, computed from the formula
            ref = naive_bm25(CORPUS, QUERIES[c.query_id], 1.2, 0.75)
            assert scores.tolist() == pytest.approx([ref.get(d, 0.0) for d in c.doc_ids], abs=1e-5, rel=1e-6)
    assert 0 < len(unmatched) < sum(len(c.doc_ids) for c in TOY_LISTS)  # the lists hold both kinds
    if method == "lucene":
        assert all(s == 0.0 for _, s in unmatched)
    else:  # bm25+ gives every document a query's constant non-occurrence score, as bm25s does
        index = teacher.retriever._bm25(TOY.corpus, False)
        for qid, s in unmatched:
            token_ids = teacher.retriever._query_token_ids(index, [QUERIES[qid]], False)[0]
            assert s == (float(index.get_scores_from_ids(token_ids)[list(CORPUS).index("u6")]) if token_ids else 0.0)
    assert got[1][0] == got[1][2]  # a repeated candidate gets its score twice
    with pytest.raises(ConfigError) as e:
        BM25Teacher(b=2.0)
    assert str(e.value) == "teachers.bm25.b must be in [0, 1], got 2.0"


# ------------------------------------------------------------------------------------------------------------ fusion
def hand_standardize(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0] * n if max(values) == min(values) else [(v - mean) / sd for v in values]


def test_fusion_equals_a_float64_hand_computation():
    g = np.random.default_rng(0)
    lengths = [4, 7, 1, 3]
    scores = {
        "ce": [g.normal(0, 5, n) for n in lengths],  # logits
        "bi": [np.tanh(g.normal(0, 1, n)).astype(np.float32) for n in lengths],  # cosines, float32
        "bm25": [np.abs(g.normal(10, 8, n)) for n in lengths],
    }
    scores["bm25"][3] = np.array([2.5, 2.5, 2.5])  # a list where a teacher sees no difference
    weights = {"ce": 1.0, "bi": 0.5, "bm25": 2.0}
    fused = fuse_scores(scores, weights)
    for i, n in enumerate(lengths):
        expected = [0.0] * n
        for name, w in weights.items():
            z = hand_standardize([float(v) for v in scores[name][i]])
            expected = [e + w * zj for e, zj in zip(expected, z)]
        assert fused[i].dtype == np.float64 and fused[i].tolist() == pytest.approx(expected, abs=1e-12)
    assert fused[2].tolist() == [0.0]  # one candidate: nothing to standardize
    # one teacher: its raw scores, weight unused
    assert [s.tolist() for s in fuse_scores({"ce": scores["ce"]}, {"ce": 3.0})] == [s.tolist() for s in scores["ce"]]
    z = standardize(np.array([1.0, 2.0, 4.0]))
    assert z.mean() == pytest.approx(0.0, abs=1e-15) and z.std() == pytest.approx(1.0)


class FixedTeacher:
    """Scores from a table, to check that score_lists fuses what each teacher returns."""

    def __init__(self, table):
        self.table = table

    def models(self):
        return []

    def score(self, task, lists, show_progress_bar=True):
        return [np.array([self.table[(c.query_id, d)] for d in c.doc_ids]) for c in lists]


def test_score_lists_fuses_the_teachers_and_checks_weights():
    lists = [CandidateList("a", ["1", "2", "3"]), CandidateList("b", ["2", "4"])]
    t1 = FixedTeacher({("a", "1"): 3.0, ("a", "2"): 1.0, ("a", "3"): 2.0, ("b", "2"): 0.0, ("b", "4"): 5.0})
    t2 = FixedTeacher({("a", "1"): 0.1, ("a", "2"): 0.3, ("a", "3"): 0.2, ("b", "2"): 1.0, ("b", "4"): 1.0})
    fused = score_lists({"t1": t1, "t2": t2}, TOY, lists, {"t1": 2.0}, show_progress_bar=False)  # t2 weighs 1
    z1a, z2a = hand_standardize([3.0, 1.0, 2.0]), hand_standardize([0.1, 0.3, 0.2])
    assert fused[0].tolist() == pytest.approx([2 * a + b for a, b in zip(z1a, z2a)], abs=1e-12)
    assert fused[1].tolist() == pytest.approx([-2.0, 2.0], abs=1e-12)  # t2 is constant on list b
    assert check_weights({"x": 0.0}, ["x"]) == {"x": 0.0}  # one teacher: its weight is unused
    errors = [
        ({"t1": -1.0}, "weights.t1 must be a finite number >= 0, got -1.0"),
        ({"t1": float("nan")}, "weights.t1 must be a finite number >= 0, got nan"),
        ({"t1": 0.0, "t2": 0.0}, "weights of the teachers t1, t2 are all 0: give at least one a positive weight"),
    ]
    for weights, message in errors:
        with pytest.raises(ConfigError) as e:
            score_lists({"t1": t1, "t2": t2}, TOY, lists, weights, show_progress_bar=False)
        assert str(e.value) == message


def test_teacher_selection_errors():
    available = ["cross_encoder", "bi_encoder", "bm25"]
    assert selected_teachers("bm25", available) == ["bm25"]
    assert selected_teachers(["bi_encoder", "bm25"], available) == ["bi_encoder", "bm25"]
    for selection, message in [
        ([], "teacher must name at least one entry of teachers (cross_encoder, bi_encoder, bm25), got []"),
        ("bm52", "teacher 'bm52' is not an entry of teachers (cross_encoder, bi_encoder, bm25)"),
        (["bm25", "bm25"], "teacher names a teacher twice: ['bm25', 'bm25']"),
    ]:
        with pytest.raises(ConfigError) as e:
            selected_teachers(selection, available)
        assert str(e.value) == message


# ------------------------------------------------------------------------------------------- the file, read back
def write_lines(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def mined_lines(task):
    """Two negatives per training query: its unrelated note, then another topic's document."""
    return [{"query_id": q, "negative_ids": [f"x{q[1:]}", "d0" if q != "q0" else "d1"], "negative_scores": [0.5, 0.4]}
            for q in task.qrels]


def test_candidate_lists_and_their_errors(tmp_path, tiny_data_root):
    task = load_beir(tiny_data_root / "scifact", split="train")
    lines = mined_lines(task)
    path = write_lines(tmp_path / "neg.jsonl", lines)
    lists = candidate_lists(task, read_hard_negatives(path))
    assert [c.query_id for c in lists] == [x["query_id"] for x in lines]
    assert [c.doc_ids for c in lists] == [[f"d{x['query_id'][1:]}", *x["negative_ids"]] for x in lines]
    # a negative that is also a positive (or repeated) is scored once, in its first place
    write_lines(path, [{"query_id": "q0", "negative_ids": ["x0", "d0", "x0"]}])
    assert candidate_lists(task, read_hard_negatives(path))[0].doc_ids == ["d0", "x0"]
    for rows, min_score, message in [
        # q3 is a test query: the file was mined on another split
        ([lines[0], {"query_id": "q3", "negative_ids": []}], 1,
         "line 2: query_id 'q3' is not a query of scifact with qrels in this split"),
        ([{"query_id": "q0", "negative_ids": ["x0"]}], 2, "line 1: query 'q0' has no qrels document with score >= 2 in scifact"),
        ([{"query_id": "q0", "negative_ids": ["x0", "nope"]}], 1,
         "line 1: query 'q0': document ids not in the corpus: ['nope']"),
    ]:
        write_lines(path, rows)
        with pytest.raises(DataError) as e:
            candidate_lists(task, read_hard_negatives(path), min_score)
        assert str(e.value) == f"{path} {message}"


def test_scored_file_sets_teacher_scores_in_candidate_order(tmp_path, tiny_data_root, caplog):
    folder = tiny_data_root / "scifact"
    task = load_beir(folder, split="train")
    lines = mined_lines(task)
    # scores that name their own position: positive 1.0, negatives 2.0, 3.0 (+ 10 x query number)
    for x in lines:
        base = 10.0 * int(x["query_id"][1:])
        x["teacher_scores"] = {f"d{x['query_id'][1:]}": base + 1, **{d: base + 2 + j for j, d in enumerate(x["negative_ids"])}}
    path = write_lines(tmp_path / "scored.jsonl", lines)
    for n in (1, 2):
        examples = BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=n).examples()
        for e in examples:
            base = 10.0 * int(e.query_id[1:])
            assert e.teacher_scores == [base + 1, *[base + 2 + j for j in range(n)]]
        batch = collate_examples(examples[:4])
        assert batch["teacher_scores"].shape == (4, 1 + n)
        assert batch["teacher_scores"].tolist() == [e.teacher_scores for e in examples[:4]]
    # an unscored file leaves teacher_scores unset, as before
    plain = write_lines(tmp_path / "plain.jsonl", mined_lines(task))
    assert all(e.teacher_scores is None for e in BeirSource(str(folder), split="train", hard_negatives=str(plain)).examples())
    # random negatives have no teacher score: the pairs lose theirs, with one warning
    with caplog.at_level(logging.WARNING, logger="embedlab.data.readers.hard_negatives"):
        mixed = BeirSource(str(folder), split="train", hard_negatives=str(path), random_negatives=1).examples()
    assert all(e.teacher_scores is None and len(e.negatives) == 2 for e in mixed)
    warnings = [r.getMessage() for r in caplog.records if "teacher score" in r.getMessage()]
    assert warnings == [
        f"random_negatives=1: random documents have no teacher score, so {len(mixed)} training pairs lose their "
        "teacher_scores (score-distillation losses need them: set random_negatives=0)"
    ]


def test_scored_file_errors(tmp_path, tiny_data_root):
    folder = tiny_data_root / "scifact"
    task = load_beir(folder, split="train")
    lines = mined_lines(task)
    scored = [{**x, "teacher_scores": {f"d{x['query_id'][1:]}": 1.0, **{d: 0.5 for d in x["negative_ids"]}}} for x in lines]
    path = tmp_path / "bad.jsonl"
    first = scored[0]["query_id"]
    read_errors = [
        ([scored[0], lines[1]], "line 2: lacks field 'teacher_scores' but line 1 has it: every line needs it or none "
                                "(score the whole file with python score.py)"),
        ([lines[0], scored[1]], "line 2: has field 'teacher_scores' but line 1 has none: every line needs it or none "
                                "(score the whole file with python score.py)"),
        ([{**scored[0], "teacher_scores": [1.0, 2.0]}], "line 1: field 'teacher_scores' must be an object "
                                                        "{document id: number}, got [1.0, 2.0]"),
        ([{**scored[0], "teacher_scores": {"d0": "high"}}], "line 1: field 'teacher_scores' must be an object "
                                                            "{document id: number}, got {'d0': 'high'}"),
        ([{**scored[0], "teacher_scores": {"d0": float("nan")}}], "line 1: field 'teacher_scores' has a non-finite "
                                                                  "score for document 'd0': nan"),
    ]
    for rows, message in read_errors:
        write_lines(path, rows)
        with pytest.raises(DataError) as e:
            read_hard_negatives(path)
        assert str(e.value) == f"{path} {message}"
    # the pair's positive or a kept negative without a score; a negative beyond num_negatives may lack one
    positive = f"d{first[1:]}"
    no_positive = {**scored[0], "teacher_scores": {d: 0.5 for d in scored[0]["negative_ids"]}}
    no_second = {**scored[0], "teacher_scores": {positive: 1.0, scored[0]["negative_ids"][0]: 0.5}}
    write_lines(path, [*scored[1:], no_positive])
    with pytest.raises(DataError) as e:
        BeirSource(str(folder), split="train", hard_negatives=str(path)).examples()
    assert str(e.value) == (f"{path} line {len(scored)}: query {first!r}: teacher_scores has no score for "
                            f"[{positive!r}] (score this file again with python score.py)")
    write_lines(path, [no_second, *scored[1:]])
    assert BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=1).examples()
    with pytest.raises(DataError) as e:
        BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=2).examples()
    assert str(e.value) == (f"{path} line 1: query {first!r}: teacher_scores has no score for "
                            f"[{scored[0]['negative_ids'][1]!r}] (score this file again with python score.py)")


# --------------------------------------------------------------------------------------------------- end to end
def test_score_py_fuses_a_bi_encoder_and_bm25_into_a_file_training_reads(tmp_path, tiny_data_root, capsys, monkeypatch):
    """The real score.py (configs/score.yaml) on the tiny BEIR folder; the file then feeds BeirSource."""
    folder = tiny_data_root / "scifact"
    task = load_beir(folder, split="train")
    lines = mined_lines(task)
    source = write_lines(tmp_path / "hard_negatives.jsonl", lines)
    model = tiny_bi_encoder(seed=7)
    model_dir = model.save(tmp_path / "teacher")
    out = tmp_path / "run" / "scored.jsonl"
    overrides = [f"paths.data_root={tiny_data_root}", f"hard_negatives={source}", f"out={out}", "device=cpu",
                 "progress_bar=false", "teacher=[bi_encoder,bm25]", f"teachers.bi_encoder.path={model_dir}",
                 "weights.bm25=0.5"]
    code, err = run_entry_point_in_process("score.py", overrides, tmp_path / "run", capsys, monkeypatch)
    assert code is None, err
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "teacher_scores"} for x in written] == lines  # input fields kept
    bm25 = BM25Retriever().retrieve(task, top_k=len(task.corpus), show_progress_bar=False)
    for x in written:
        qid = x["query_id"]
        docs = [f"d{qid[1:]}", *x["negative_ids"]]
        assert list(x["teacher_scores"]) == docs  # positive first, then the negatives in order
        q = model.encode([task.queries[qid]], kind="query")[0].double()
        cos = [float(torch.nn.functional.cosine_similarity(q, model.encode([task.corpus[d]])[0].double(), dim=0))
               for d in docs]
        lexical = [bm25[qid].get(d, 0.0) for d in docs]
        expected = [a + 0.5 * b for a, b in zip(hand_standardize(cos), hand_standardize(lexical))]
        assert list(x["teacher_scores"].values()) == pytest.approx(expected, abs=1e-5)

    examples = BeirSource(str(folder), split="train", hard_negatives=str(out), num_negatives=2).examples()
    by_query = {x["query_id"]: x["teacher_scores"] for x in written}
    for e in examples:
        assert e.teacher_scores == [by_query[e.query_id][d] for d in [e.positive_id, *e.negative_ids]]
    assert collate_examples(examples[:3])["teacher_scores"].shape == (3, 3)

    # the config alone (compose + score()): one teacher writes its raw scores, in place of the input file
    cfg = compose_config("score", [f"paths.data_root={tiny_data_root}", f"hard_negatives={out}", f"out={out}",
                                   "progress_bar=false", "teacher=bm25"], tmp_path / "compose")
    summary, objects = score(cfg)
    assert summary == {"queries": len(lines), "pairs": 3 * len(lines), "teachers": ["bm25"], "path": str(out)}
    for x in (json.loads(line) for line in out.read_text().splitlines()):
        assert x["teacher_scores"] == {d: bm25[x["query_id"]].get(d, 0.0) for d in x["teacher_scores"]}


def test_score_py_user_errors_are_one_line(tmp_path, tiny_data_root, capsys, monkeypatch):
    source = write_lines(tmp_path / "neg.jsonl", mined_lines(load_beir(tiny_data_root / "scifact", split="train")))
    base = [f"paths.data_root={tiny_data_root}", "progress_bar=false"]
    for overrides, message in [
        (base, "Missing mandatory value: hard_negatives"),
        ([*base, f"hard_negatives={source}"], "Missing mandatory value: teachers.cross_encoder.path"),
        ([*base, f"hard_negatives={source}", "teacher=[bm25,dense]"],
         "teacher 'dense' is not an entry of teachers (cross_encoder, bi_encoder, bm25)"),
    ]:
        code, err = run_entry_point_in_process("score.py", overrides, tmp_path / "run", capsys, monkeypatch)
        assert_one_line_error(code, err, message)
