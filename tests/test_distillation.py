"""Distillation: the losses against float64 hand computations, layer-reduced students, text collections, the
teacher's embedding table (live == cached), and module=distillation end to end on tiny data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from embedlab.data.collate import collate_examples
from embedlab.data.errors import DataError
from embedlab.data.records import Example
from embedlab.data.texts import BeirTexts, FileTexts, STSTexts, TextCollection
from embedlab.errors import ConfigError
from embedlab.lightning.distillation import DistillationModule, teacher_texts
from embedlab.losses import DistillationLoss, EmbeddedBatch, EmbeddingMSELoss, KLDivergenceLoss, MultipleNegativesRankingLoss
from embedlab.losses.distillation import DistillationBatch, candidate_scores
from embedlab.losses.ranking import ScoredCandidates
from embedlab.models import BiEncoder, layer_reduced, tiny_bi_encoder
from embedlab.models.errors import ModelLoadError
from embedlab.training import train
from tests.conftest import compose_config

G = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- losses
def test_embedding_mse_equals_hand_computation():
    s, t = randn(5, 7), randn(5, 7)
    want = sum((float(s[i, j]) - float(t[i, j])) ** 2 for i in range(5) for j in range(7)) / 35
    got = EmbeddingMSELoss()(s, t)
    assert float(got["loss"]) == pytest.approx(want, rel=1e-12) and set(got) == {"loss", "embedding_mse"}
    with pytest.raises(ConfigError, match=r"student embeddings \(5, 7\) and teacher embeddings \(5, 6\) differ in shape"):
        EmbeddingMSELoss()(s, randn(5, 6))


def _kl_by_hand(teacher, student, temperature, mask=None):
    rows = []
    for b in range(teacher.shape[0]):
        keep = [j for j in range(teacher.shape[1]) if mask is None or mask[b, j]]
        zt = sum(math.exp(float(teacher[b, j]) / temperature) for j in keep)
        zs = sum(math.exp(float(student[b, j]) / temperature) for j in keep)
        kl = 0.0
        for j in keep:
            p = math.exp(float(teacher[b, j]) / temperature) / zt
            q = math.exp(float(student[b, j]) / temperature) / zs
            kl += p * math.log(p / q)
        rows.append(kl)
    return sum(rows) / len(rows) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_divergence_equals_hand_computation(temperature):
    s, t = randn(4, 5), randn(4, 5) * 3
    batch = ScoredCandidates(scores=s, labels=torch.zeros_like(s), teacher_scores=t)
    got = KLDivergenceLoss(temperature)(batch)
    assert float(got["kl"]) == pytest.approx(_kl_by_hand(t, s, temperature), rel=1e-10)
    # masked candidates leave both softmaxes
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    masked = KLDivergenceLoss(temperature)(ScoredCandidates(scores=s, labels=torch.zeros_like(s), teacher_scores=t, mask=mask))
    assert float(masked["loss"]) == pytest.approx(_kl_by_hand(t, s, temperature, mask), rel=1e-10)


def test_kl_needs_teacher_scores_and_a_positive_temperature():
    s = randn(2, 3)
    with pytest.raises(ConfigError, match="KLDivergenceLoss needs teacher scores for every candidate"):
        KLDivergenceLoss()(ScoredCandidates(scores=s, labels=torch.zeros_like(s)))
    with pytest.raises(ConfigError, match="temperature must be > 0, got 0"):
        KLDivergenceLoss(0)


def test_candidate_scores_are_each_querys_own_candidates():
    q, p, n = randn(3, 4), randn(3, 4), randn(3, 2, 4)
    scored = candidate_scores(EmbeddedBatch(query=q, positive=p, negatives=n), "cos", scale=20.0)
    for b in range(3):
        docs = [p[b], n[b, 0], n[b, 1]]
        want = [20.0 * float(F.cosine_similarity(q[b], d, dim=0)) for d in docs]
        assert scored.scores[b].tolist() == pytest.approx(want, rel=1e-12)
    assert scored.labels[:, 0].tolist() == [1.0] * 3 and float(scored.labels[:, 1:].abs().sum()) == 0
    with pytest.raises(ConfigError, match=r"teacher scores have shape \(3, 2\), the batch's candidates \(3, 3\)"):
        candidate_scores(EmbeddedBatch(query=q, positive=p, negatives=n), teacher_scores=randn(3, 2))


def test_distillation_loss_is_the_weighted_sum_of_its_terms_by_hand():
    q, p, n = randn(4, 6), randn(4, 6), randn(4, 2, 6)
    q.requires_grad_(True)
    teacher_scores = randn(4, 3) * 5
    student, teacher = randn(12, 6), randn(12, 6)
    batch = DistillationBatch(
        embedded=EmbeddedBatch(query=q, positive=p, negatives=n), student=student, teacher=teacher, teacher_scores=teacher_scores
    )
    loss = DistillationLoss(embedding=2.0, margin_mse=0.5, kl=0.25, contrastive=MultipleNegativesRankingLoss(), contrastive_weight=3.0,
                            temperature=2.0, score_scale=10.0)  # fmt: skip
    terms = loss(batch)
    # by hand: the student's scores 10 * cos(q_b, candidates), margins and distributions against the teacher's
    s = torch.stack([torch.stack([10 * F.cosine_similarity(q[b], d, dim=0) for d in (p[b], n[b, 0], n[b, 1])]) for b in range(4)])
    s = s.detach()
    mse = float(((student - teacher) ** 2).mean())
    margin = sum(
        ((float(s[b, 0]) - float(s[b, j])) - (float(teacher_scores[b, 0]) - float(teacher_scores[b, j]))) ** 2
        for b in range(4) for j in (1, 2)
    ) / 8  # fmt: skip
    kl = _kl_by_hand(teacher_scores, s, 2.0)
    mnrl = float(MultipleNegativesRankingLoss()(EmbeddedBatch(query=q, positive=p, negatives=n))["loss"])
    assert float(terms["embedding_mse"]) == pytest.approx(mse, rel=1e-10)
    assert float(terms["margin_mse"]) == pytest.approx(margin, rel=1e-10)
    assert float(terms["kl"]) == pytest.approx(kl, rel=1e-10)
    assert float(terms["mnrl"]) == pytest.approx(mnrl, rel=1e-10)
    assert float(terms["loss"]) == pytest.approx(2 * mse + 0.5 * margin + 0.25 * kl + 3 * mnrl, rel=1e-10)
    terms["loss"].backward()
    assert float(q.grad.abs().sum()) > 0


def test_distillation_loss_skips_pair_terms_for_unlabelled_texts_and_names_what_is_missing():
    student, teacher = randn(5, 4), randn(5, 4)
    both = DistillationLoss(embedding=1.0, kl=1.0, contrastive=MultipleNegativesRankingLoss())
    terms = both(DistillationBatch(student=student, teacher=teacher))
    assert set(terms) == {"loss", "embedding_mse"}
    with pytest.raises(ConfigError, match="no term applies to this batch"):
        DistillationLoss(kl=1.0)(DistillationBatch(student=student, teacher=teacher))
    pairs = DistillationBatch(embedded=EmbeddedBatch(query=randn(2, 4), positive=randn(2, 4), negatives=randn(2, 1, 4)))
    with pytest.raises(ConfigError, match="margin_mse / kl need the teacher's score of every candidate"):
        DistillationLoss(kl=1.0)(pairs)
    with pytest.raises(ConfigError, match="every term has weight 0"):
        DistillationLoss()
    with pytest.raises(ConfigError, match="DistillationLoss kl must be >= 0, got -1"):
        DistillationLoss(kl=-1)


# ----------------------------------------------------------------------------------------------- students
def test_layer_reduced_student_keeps_the_teachers_layers_and_saves_a_normal_folder(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = tiny_bi_encoder(num_layers=4, seed=5).save(tmp_path / "teacher")
    teacher = BiEncoder.from_pretrained(str(folder))
    student = layer_reduced(str(folder), layers=[0, 2, 3])
    t_layers, s_layers = teacher.transformer.backbone.encoder.layer, student.transformer.backbone.encoder.layer
    assert len(s_layers) == 3 and student.transformer.backbone.config.num_hidden_layers == 3
    for kept, original in zip(s_layers, [0, 2, 3]):
        for (name, a), (_, b) in zip(kept.state_dict().items(), t_layers[original].state_dict().items()):
            assert torch.equal(a, b), name
    emb_s, emb_t = student.transformer.backbone.embeddings.state_dict(), teacher.transformer.backbone.embeddings.state_dict()
    assert all(torch.equal(emb_s[k], emb_t[k]) for k in emb_t)
    texts = ["a short text", "another, slightly longer text about proteins"]
    saved = student.save(tmp_path / "student")
    reloaded = BiEncoder.from_pretrained(str(saved))
    assert len(reloaded.transformer.backbone.encoder.layer) == 3
    torch.testing.assert_close(reloaded.encode(texts), student.encode(texts), rtol=0, atol=1e-6)
    st = SentenceTransformer(str(saved), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode(texts)), student.encode(texts), rtol=0, atol=1e-5)
    with pytest.raises(ModelLoadError, match=r"layer numbers in \[0, 3\] \(the teacher has 4 layers\), got \[0, 4\]"):
        layer_reduced(str(folder), layers=[0, 4])
    with pytest.raises(ModelLoadError, match=r"layers lists a layer twice: \[1, 1\]"):
        layer_reduced(str(folder), layers=[1, 1])


# ----------------------------------------------------------------------------------------------- text collections
def test_text_collection_joins_parts_once_each_with_kinds(tiny_data_root, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first line\n\nsecond line\nfirst line\n")
    collection = TextCollection(
        [BeirTexts(tiny_data_root / "scifact"), STSTexts(tiny_data_root / "stsbenchmark" / "sts-train.csv"), FileTexts(lines)], seed=1
    )
    rows = collection.rows()
    from embedlab.data.readers.beir import load_beir

    train = load_beir(tiny_data_root / "scifact", split="train")
    assert {t for k, t in rows if k == "query"} == set(train.queries.values())
    documents = {t for k, t in rows if k == "document"}
    assert set(train.corpus.values()) <= documents and {"first line", "second line"} <= documents
    assert len(rows) == len(set(rows))  # each (kind, text) once
    examples = collection.examples()
    assert all((e.query is None) != (e.positive is None) for e in examples)
    assert TextCollection([FileTexts(lines)], max_texts=1).rows() in ([("document", "first line")], [("document", "second line")])


def test_hugging_face_column_and_jsonl_field_give_the_same_texts(tmp_path):
    from embedlab.data.texts import HFTexts

    rows = [{"text": f"sentence number {i}", "other": i} for i in range(5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = HFTexts("json", column="text", data_files=str(path), kind="query").texts()
    assert hf == [("query", r["text"]) for r in rows] and FileTexts(path, kind="query").texts() == hf
    with pytest.raises(DataError, match="no column 'body'; columns: text, other"):
        HFTexts("json", column="body", data_files=str(path)).texts()


def test_text_sources_refuse_test_queries_and_name_bad_lines(tiny_data_root, tmp_path):
    with pytest.raises(ConfigError, match="query_split=test would distill on the test queries"):
        BeirTexts(tiny_data_root / "scifact", query_split="test")
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"texts.jsonl line 2: field 'text' must be a string, got None"):
        FileTexts(bad).texts()
    with pytest.raises(DataError, match="a text collection has no labels to hold out for validation"):
        TextCollection([FileTexts(bad)]).carve(0.1, 0)


def test_collate_keeps_unlabelled_texts_apart_from_pairs():
    texts = [Example(query="a question", positive=None), Example(query=None, positive="a document")]
    batch = collate_examples(texts)
    assert batch["query"] == ["a question"] and batch["positive"] == ["a document"] and batch["paired"] is False
    with pytest.raises(DataError, match="a batch mixes unlabelled texts"):
        collate_examples(texts + [Example(query="q", positive="p")])


# ----------------------------------------------------------------------------------------------- the teacher's table
def test_teacher_table_equals_live_teacher_embeddings_and_the_cache_serves_the_second_run(tmp_path):
    teacher = tiny_bi_encoder(hidden_size=48, seed=3, query_prompt="q: ")
    examples = [
        Example(query="what is a protein", positive="Proteins are chains of amino acids.", negatives=["Rain falls."]),
        Example(query=None, positive="A lone document."),
        Example(query="what is a protein", positive="Proteins fold."),
    ]
    texts = teacher_texts(examples)
    assert texts == {
        "query": ["what is a protein"],
        "document": ["Proteins are chains of amino acids.", "Rain falls.", "A lone document.", "Proteins fold."],
    }

    def module(cache):
        m = DistillationModule(tiny_bi_encoder(), DistillationLoss(embedding=1.0), torch.optim.SGD, teacher=teacher,
                               teacher_cache_dir=cache)  # fmt: skip
        m.prepare_teacher_embeddings(texts)
        return m

    live = module(None)
    got = live.teacher_embeddings(["what is a protein"], ["Rain falls.", "Proteins fold."])
    want = torch.cat([teacher.encode(["what is a protein"], kind="query"), teacher.encode(["Rain falls.", "Proteins fold."], kind="document")])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert live.projection.weight.shape == (48, 32)  # 32-d student, 48-d teacher
    # with a cache: the first module encodes, the second reads the same rows without calling the teacher
    first = module(str(tmp_path / "cache"))
    calls = []
    original = teacher.encode
    teacher.encode = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        second = module(str(tmp_path / "cache"))
    finally:
        teacher.encode = original
    assert calls == []
    torch.testing.assert_close(second._teacher_table, first._teacher_table, rtol=0, atol=0)
    torch.testing.assert_close(second._teacher_table, live._teacher_table, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="a training text has no teacher embedding"):
        second.teacher_embeddings(["never seen"], [])


def test_distillation_module_refuses_what_it_cannot_train():
    with pytest.raises(ConfigError, match="module=distillation trains with a distillation loss"):
        DistillationModule(tiny_bi_encoder(), MultipleNegativesRankingLoss(), torch.optim.SGD)
    with pytest.raises(ConfigError, match="loss.embedding > 0 needs a teacher model"):
        DistillationModule(tiny_bi_encoder(), DistillationLoss(embedding=1.0), torch.optim.SGD)
    with pytest.raises(ConfigError, match="the student embeds in 32 dimensions, the teacher in 48"):
        DistillationModule(tiny_bi_encoder(), DistillationLoss(embedding=1.0), torch.optim.SGD,
                           teacher=tiny_bi_encoder(hidden_size=48), projection=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------- end to end
TINY_TEACHER = ["~module.teacher", "+module.teacher={_target_:embedlab.models.tiny_bi_encoder,hidden_size:48,seed:3}"]
FAST = ["model=tiny", "module=distillation", "trainer.max_epochs=2", "trainer.accelerator=cpu", "logger=csv", "trainer.log_every_n_steps=1"]


def test_embedding_distillation_trains_a_student_toward_its_teacher(tmp_path, tiny_data_root):
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        FAST + TINY_TEACHER + ["loss=distill_mse", "data=distill_texts", f"data.root={tiny_data_root}", "data.batch_size=8",
                               "module.optimizer.lr=1e-2", f"module.teacher_cache_dir={tmp_path / 'cache'}"],
        out,
    )  # fmt: skip
    metrics, objects = train(cfg)
    module = objects["module"]
    assert {"train/embedding_mse", "test/ndcg@10", "val/ndcg@10"} <= set(json.loads((out / "metrics.json").read_text()))
    # the student moved toward the teacher: the MSE over every training text is lower than at the start
    texts = teacher_texts(objects["datamodule"].train_examples)
    queries, docs = texts["query"], texts["document"]
    target = module.teacher_embeddings(queries, docs)
    before = tiny_bi_encoder(seed=cfg.seed)
    projection = module.projection

    def mse(model):
        with torch.no_grad():
            return float(((projection(torch.cat([model.encode(queries, kind="query"), model.encode(docs)])) - target) ** 2).mean())

    assert mse(module.model) < 0.7 * mse(before)
    # the saved student is the student alone (its own width, no projection)
    saved = BiEncoder.from_pretrained(str(objects["model_dir"]))
    assert saved.embedding_dim == 32


def test_score_distillation_reads_teacher_scores_from_the_training_file(tmp_path, tiny_data_root):
    from embedlab.data.readers.beir import load_beir

    task = load_beir(tiny_data_root / "scifact", split="train")
    docs = sorted(task.corpus)
    lines = []
    for i, qid in enumerate(sorted(task.queries)):
        negatives = [d for d in docs if d not in task.qrels[qid]][i % 3 : i % 3 + 2]
        scores = {d: float(j) for j, d in enumerate(negatives)} | {d: 5.0 for d in task.qrels[qid]}
        lines.append(json.dumps({"query_id": qid, "negative_ids": negatives, "teacher_scores": scores}))
    scored = tmp_path / "scored.jsonl"
    scored.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        FAST + ["loss=distill_kl", "~module.teacher", f"data.root={tiny_data_root}", "data.batch_size=3",
                f"data.train.hard_negatives={scored}", "data.train.num_negatives=2", "data.val_fraction=0.3"],
        out,
    )  # fmt: skip
    metrics, objects = train(cfg)
    written = json.loads((out / "metrics.json").read_text())
    assert {"train/kl", "train/mnrl", "train/loss", "test/ndcg@10"} <= set(written)
    example = objects["datamodule"].train_examples[0]
    line = next(json.loads(x) for x in lines if json.loads(x)["query_id"] == example.query_id)
    assert example.teacher_scores == [line["teacher_scores"][example.positive_id]] + [line["teacher_scores"][d] for d in example.negative_ids]


def test_group_by_length_sorts_each_run_of_texts_longest_first(tmp_path):
    lines = tmp_path / "texts.txt"
    texts = [("x" * (i * 7 % 23 + 1)) + f" {i}" for i in range(40)]
    lines.write_text("\n".join(texts) + "\n")
    plain = TextCollection([FileTexts(lines)], seed=3).rows()
    grouped = TextCollection([FileTexts(lines)], seed=3, group_by_length=16).rows()
    # the same shuffled runs of 16, each sorted by length, longest first
    for start in range(0, 40, 16):
        run = grouped[start : start + 16]
        assert sorted(run) == sorted(plain[start : start + 16])
        assert [len(t) for _, t in run] == sorted((len(t) for _, t in run), reverse=True)
    with pytest.raises(ConfigError, match="group_by_length must be >= 1 or null, got 0"):
        TextCollection([FileTexts(lines)], group_by_length=0)
