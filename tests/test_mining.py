"""Hard-negative mining against a naive full-matrix reference; the file format; BeirSource attaching negatives."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from embedlab.data import BeirSource
from embedlab.data.errors import DataError
from embedlab.data.readers import load_beir, read_hard_negatives
from embedlab.mining import MinedNegatives, mine, mine_hard_negatives, select_negatives, write_hard_negatives
from tests.conftest import compose_config


class TableModel:
    """``encode`` looks texts up in a fixed table, so the reference can score the same vectors."""

    similarity = "cos"  # mining with similarity=None scores with the model's own

    def __init__(self, vectors: dict[str, torch.Tensor]):
        self.vectors = vectors

    def encode(self, texts, kind="document", batch_size=64, show_progress_bar=False, desc=None):
        return torch.stack([self.vectors[t] for t in texts])


def random_task(num_docs=60, num_queries=12, dim=8, seed=0):
    from embedlab.data.records import RetrievalTask

    g = torch.Generator().manual_seed(seed)
    corpus = {f"d{i}": f"doc {i}" for i in range(num_docs)}
    queries = {f"q{i}": f"query {i}" for i in range(num_queries)}
    qrels = {}
    for i in range(num_queries):
        picks = torch.randperm(num_docs, generator=g)[:3].tolist()
        # two positives (grades 1, 2) and one judged non-relevant (0): all three are excluded from negatives
        qrels[f"q{i}"] = {f"d{picks[0]}": 1, f"d{picks[1]}": 2, f"d{picks[2]}": 0}
    vectors = {t: torch.randn(dim, generator=g) for t in [*corpus.values(), *queries.values()]}
    return RetrievalTask(corpus, queries, qrels, name="random"), TableModel(vectors)


def naive_mine(task, model, num_negatives, range_min, range_max, relative_margin):
    """The whole Q x N cosine matrix, one full sort per query."""
    ids = list(task.corpus)
    docs = torch.nn.functional.normalize(model.encode([task.corpus[d] for d in ids], kind="document"), dim=-1)
    out = {}
    for qid in sorted(task.qrels):
        q = torch.nn.functional.normalize(model.encode([task.queries[qid]], kind="query"), dim=-1)[0]
        scores = {d: float(docs[i] @ q) for i, d in enumerate(ids)}
        ceiling = float("inf")
        if relative_margin is not None:
            ceiling = (1 - relative_margin) * min(scores[d] for d, s in task.qrels[qid].items() if s >= 1)
        ranked = sorted((d for d in ids if d not in task.qrels[qid]), key=lambda d: -scores[d])[:range_max]
        out[qid] = [d for d in ranked[range_min:] if scores[d] <= ceiling][:num_negatives]
    return out


@pytest.mark.parametrize("range_min, range_max, margin", [(0, 100, 0.05), (3, 20, 0.0), (2, 10, 0.5)])
def test_mining_equals_the_naive_reference(range_min, range_max, margin):
    task, model = random_task()
    mined = mine_hard_negatives(model, task, num_negatives=5, range_min=range_min, range_max=range_max,
                                relative_margin=margin, query_chunk_size=5, corpus_chunk_size=7,
                                show_progress_bar=False)
    expected = naive_mine(task, model, 5, range_min, range_max, margin)
    assert {m.query_id: m.negative_ids for m in mined} == expected
    # scores are the cosine of each kept negative, best first
    for m in mined:
        assert m.negative_scores == sorted(m.negative_scores, reverse=True)
        q = torch.nn.functional.normalize(model.vectors[task.queries[m.query_id]], dim=0)
        for d, s in zip(m.negative_ids, m.negative_scores):
            assert s == pytest.approx(float(torch.nn.functional.normalize(model.vectors[task.corpus[d]], dim=0) @ q),
                                      abs=1e-6)
    # the margin filter really removed candidates in the strict case
    if margin == 0.5:
        assert any(len(m.negative_ids) < 5 for m in mined)


def test_select_negatives_filters_in_order():
    ids = ["p", "a", "b", "c", "d", "e"]
    scores = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    # known positive removed, then 1 skipped (a), then the margin drops b (0.8 > 0.95 * 0.8 = 0.76)
    assert select_negatives(ids, scores, [0.8], {"p"}, 2, range_min=1, relative_margin=0.05) == (["c", "d"], [0.7, 0.6])
    assert select_negatives(ids, scores, [0.8], {"p"}, 10, range_min=0, relative_margin=None)[0] == list("abcde")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_negatives": 0}, "num_negatives must be >= 1, got 0"),
    ({"range_min": -1}, "range_min must be >= 0, got -1"),
    ({"range_min": 5, "range_max": 6, "num_negatives": 2}, "range_max must be >= range_min + num_negatives (5 + 2), got 6"),
    ({"relative_margin": 1.0}, "relative_margin must be in [0, 1) or null, got 1.0"),
])
def test_mining_argument_errors(kwargs, message):
    task, model = random_task()
    with pytest.raises(ValueError) as e:
        mine_hard_negatives(model, task, show_progress_bar=False, **kwargs)
    assert str(e.value) == message


def test_file_round_trip_and_errors(tmp_path):
    path = write_hard_negatives([MinedNegatives("q1", ["d1", "d2"], [0.5, 0.4]), MinedNegatives("q2", [], [])],
                                tmp_path / "neg.jsonl")
    assert read_hard_negatives(path) == {"q1": ["d1", "d2"], "q2": []}
    cases = [
        ('{"query_id": "q1", "negative_ids": ["d1"]}\nnot json\n', "line 2: invalid JSON: Expecting value (column 1)"),
        ('{"query_id": "q1"}\n', "line 1: field 'negative_ids' must be a list of document ids, got None"),
        ('{"negative_ids": []}\n', "line 1: field 'query_id' must be a string, got None"),
        ('{"query_id": "q1", "negative_ids": []}\n{"query_id": "q1", "negative_ids": []}\n',
         "line 2: query_id 'q1' appears twice"),
        ('[1, 2]\n', "line 1: expected a JSON object, found list"),
    ]
    for text, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(DataError) as e:
            read_hard_negatives(bad)
        assert str(e.value) == f"{bad} {message}"
    with pytest.raises(DataError, match="hard-negatives file not found"):
        read_hard_negatives(tmp_path / "missing.jsonl")


def test_beir_source_attaches_negatives(tmp_path, tiny_data_root):
    folder = tiny_data_root / "scifact"
    task = load_beir(folder, split="train")
    lines = [{"query_id": q, "negative_ids": [f"x{q[1:]}", "d0" if q != "q0" else "d1"]} for q in task.qrels]
    path = tmp_path / "neg.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    examples = BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=2).examples()
    plain = BeirSource(str(folder), split="train").examples()
    assert [(e.query_id, e.positive_id) for e in examples] == [(e.query_id, e.positive_id) for e in plain]
    for e in examples:
        want = lines[[x["query_id"] for x in lines].index(e.query_id)]["negative_ids"]
        assert e.negative_ids == want and e.negatives == [task.corpus[d] for d in want]
    # carving keeps the same validation queries and attaches negatives to the training part
    train, val = BeirSource(str(folder), split="train", hard_negatives=str(path)).carve(0.3, seed=1)
    _, val_plain = BeirSource(str(folder), split="train").carve(0.3, seed=1)
    assert val.queries == val_plain.queries and all(len(e.negatives) == 1 for e in train)

    errors = [
        (lines[1:], f"{path}: no line for training query {lines[0]['query_id']!r}"),
        ([{**lines[0], "negative_ids": ["x0"]}, *lines[1:]],
         f"{path}: query {lines[0]['query_id']!r} has 1 negative_ids, num_negatives asks for 2 "
         "(mine again with a larger mining.range_max or a smaller mining.relative_margin, or drop such queries: "
         "data.train.too_few_negatives=drop)"),
        ([{**lines[0], "negative_ids": ["nope", "x0"]}, *lines[1:]],
         f"{path}: query {lines[0]['query_id']!r}: negative_ids not in the corpus: ['nope']"),
    ]
    for rows, message in errors:
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
        with pytest.raises(DataError) as e:
            BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=2).examples()
        assert str(e.value) == message
    with pytest.raises(ValueError, match="num_negatives must be >= 1, got 0"):
        BeirSource(str(folder), num_negatives=0)
    # too_few_negatives=drop: the short query's pairs leave the training set, every other pair keeps its negatives
    path.write_text("".join(json.dumps(x) + "\n" for x in [{**lines[0], "negative_ids": ["x0"]}, *lines[1:]]))
    kept = BeirSource(str(folder), split="train", hard_negatives=str(path), num_negatives=2, too_few_negatives="drop").examples()
    assert {e.query_id for e in kept} == {x["query_id"] for x in lines[1:]} and all(len(e.negatives) == 2 for e in kept)


def test_mine_config_writes_a_file_training_reads(tmp_path, tiny_data_root):
    """configs/mine.yaml end to end with the tiny model; the file then feeds data.train.hard_negatives."""
    cfg = compose_config("mine", ["model=tiny", f"paths.data_root={tiny_data_root}", "progress_bar=false",
                                  "mining.num_negatives=3", "mining.relative_margin=null"], tmp_path)
    summary, objects = mine(cfg)
    assert summary["queries"] == len(objects["task"].qrels) and summary["negatives_min"] == 3
    expected = naive_mine(objects["task"], objects["model"], 3, 0, 100, None)
    assert read_hard_negatives(cfg.out) == expected

    train_cfg = compose_config("train", ["model=tiny", f"data.root={tiny_data_root}",
                                         f"data.train.hard_negatives={cfg.out}", "data.train.num_negatives=2"],
                               tmp_path / "train")
    dm = instantiate(train_cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_negatives"] == 2 and len(batch["negatives"]) == 2 * len(batch["query"])


def test_mining_through_the_cache_encodes_once_and_mines_the_same(tmp_path, tiny_data_root):
    """cache_dir: the second mining of the same model reads the corpus and queries from the cache (no encode)."""
    overrides = ["model=tiny", f"paths.data_root={tiny_data_root}", "progress_bar=false", "mining.num_negatives=3",
                 "mining.relative_margin=null", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    first_summary, first = mine(compose_config("mine", overrides, tmp_path / "a"))
    from embedlab.models import BiEncoder

    calls = []
    original = BiEncoder.encode
    try:
        BiEncoder.encode = lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
        again_summary, again = mine(compose_config("mine", overrides, tmp_path / "b"))
    finally:
        BiEncoder.encode = original
    assert calls == []
    assert [m.negative_ids for m in again["mined"]] == [m.negative_ids for m in first["mined"]]
    assert read_hard_negatives(again_summary["path"]) == naive_mine(first["task"], first["model"], 3, 0, 100, None)
