"""The embedding cache (embedlab.cache) against live encoding: hits, misses, damaged shards, concurrent writers,
and its two users, evaluate() (eval.cache_dir) and the bi-encoder module's validation/test steps."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from embedlab.cache import KEY_BYTES, EmbeddingCache, cache_from_options, model_fingerprint, text_key
from embedlab.models import BiEncoder, tiny_bi_encoder
from tests.cache_writer import write_rounds
from tests.conftest import TOPICS, compose_config

TEXTS = [text for _, text in TOPICS] + [f"what do we know about {topic}?" for topic, _ in TOPICS]


class Calls:
    """Wrap a bound ``encode`` / ``embed``: count the calls and keep the texts each one got."""

    def __init__(self, fn) -> None:
        self.fn, self.texts = fn, []

    def __call__(self, texts, *args, **kwargs):
        self.texts.append(list(texts))
        return self.fn(texts, *args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.texts)


def counted(model: BiEncoder) -> Calls:
    """Count ``model.encode`` calls (an instance attribute shadows the method)."""
    calls = Calls(model.encode)
    model.encode = calls
    return calls


def shard_files(root: Path, fingerprint: str) -> dict[str, list[Path]]:
    folder = root / fingerprint
    return {part: sorted(folder.glob(f"*.{part}")) for part in ("data.npy", "keys.npy", "json")}


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "embedlab.cache" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------------------------
# hits and misses
# ------------------------------------------------------------------------------------------------------------
def test_cached_rows_equal_live_encoding_and_a_hit_calls_no_model(tmp_path):
    model = tiny_bi_encoder(seed=0)
    texts = TEXTS + TEXTS[:3]  # repeats: encoded once, returned at every position
    live = model.encode(texts, kind="document")
    calls = counted(model)
    first = EmbeddingCache(tmp_path).encode(model, texts, kind="document", batch_size=5)
    assert calls.count == 1 and sorted(calls.texts[0]) == sorted(set(texts))  # each distinct text once
    torch.testing.assert_close(first, live, rtol=0, atol=1e-6)

    again = EmbeddingCache(tmp_path).encode(model, texts, kind="document")  # a new instance: read from disk
    assert calls.count == 1  # no model call
    assert again.dtype == torch.float32 and torch.equal(again, first)  # the stored rows, bit for bit

    extra = ["a text the cache has not seen", "another new one"]
    mixed = EmbeddingCache(tmp_path).encode(model, [extra[0], texts[4], extra[1], texts[0]], kind="document")
    assert calls.count == 2 and calls.texts[1] == extra  # only the missing texts, in input order
    torch.testing.assert_close(mixed[[0, 2]], tiny_bi_encoder(seed=0).encode(extra), rtol=0, atol=1e-6)
    assert torch.equal(mixed[[1, 3]], first[[4, 0]])


def test_lookup_and_store(tmp_path):
    cache = EmbeddingCache(tmp_path)
    fp = "f" * 32
    assert cache.lookup(fp, ["a", "b"]) == (None, [0, 1])
    rows = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    cache.store(fp, ["a", "b", "a"], rows)  # the repeated "a" keeps its first row
    found, missing = EmbeddingCache(tmp_path).lookup(fp, ["c", "b", "a", "d"])
    assert missing == [0, 3]
    expected = torch.zeros(4, 4)
    expected[1], expected[2] = rows[1].float(), rows[0].float()
    assert found.dtype == torch.float32 and torch.equal(found, expected)
    (data,) = shard_files(tmp_path, fp)["data.npy"]
    assert np.load(data, mmap_mode="r").shape == (2, 4)
    keys = np.load(data.with_name(data.name.replace(".data.", ".keys.")))
    assert keys.shape == (2, KEY_BYTES) and keys[0].tobytes() == text_key("a") == hashlib.blake2b(b"a", digest_size=16).digest()
    cache.store(fp, ["b", "a"], rows[:2])  # all cached already: nothing written
    assert len(shard_files(tmp_path, fp)["json"]) == 1


def test_store_errors(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match=r"^store: 2 texts but embeddings of shape \(3, 4\)$"):
        cache.store("f" * 32, ["a", "b"], torch.zeros(3, 4))
    cache.store("f" * 32, ["a"], torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"^store: embeddings are 5-d, the cache holds 4-d rows for f{32}$"):
        cache.store("f" * 32, ["b"], torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"^kind must be 'query' or 'document', got 'doc'$"):
        model_fingerprint(tiny_bi_encoder(), "doc")


def _bump_one_weight(m):
    m.transformer.backbone.encoder.layer[1].output.dense.weight.data[3, 5] += 1e-3  # in place, via .data


def _add_token(m):
    m.transformer.tokenizer.add_tokens(["zzyzxword"])


CHANGES = {
    "one weight": _bump_one_weight,
    "a buffer": lambda m: m.transformer.backbone.embeddings.token_type_ids.fill_(1),
    "document max length": lambda m: setattr(m, "max_seq_length", {"query": 64, "document": 8}),
    "document prompt": lambda m: m.prompts.__setitem__("document", "passage: "),
    "pooling": lambda m: setattr(m.pooling, "mode", "cls"),
    "normalize": lambda m: setattr(m, "normalize", None),
    "tokenizer": _add_token,
    "lower-casing": lambda m: setattr(m.transformer, "do_lower_case", True),
    "dtype": lambda m: m.to(torch.float64),
    "backbone config": lambda m: setattr(m.transformer.backbone.config, "layer_norm_eps", 1e-5),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_fingerprint_changes_with_what_changes_embeddings(change):
    base = model_fingerprint(tiny_bi_encoder(seed=0), "document")
    model = tiny_bi_encoder(seed=0)
    CHANGES[change](model)
    assert model_fingerprint(model, "document") != base


@pytest.mark.parametrize("parse", [False, True], ids=["pattern", "json"])
def test_tokenizer_spec_ignores_the_state_calls_rewrite(parse, monkeypatch):
    """Both ways of cutting the truncation / padding state off a fast tokenizer's serialization."""
    from embedlab import cache

    if parse:
        monkeypatch.setattr(cache, "_TOKENIZER_STATE", re.compile(r"^(?!)"))  # never matches: the JSON path
    model = tiny_bi_encoder(seed=0)
    tokenizer = model.transformer.tokenizer
    base = cache._tokenizer_spec(tokenizer)
    model.transformer.tokenize(["a text"], max_length=7)  # truncation 7, padding to the longest
    assert cache._tokenizer_spec(tokenizer) == base
    model.transformer.tokenize(["a text"], max_length=9, padding=False)  # padding off (null)
    assert '"padding":null' in tokenizer.backend_tokenizer.to_str() and cache._tokenizer_spec(tokenizer) == base
    tokenizer.add_tokens(["zzyzxword"])
    assert cache._tokenizer_spec(tokenizer) != base


def test_fingerprint_stays_for_what_does_not_change_document_embeddings():
    model = tiny_bi_encoder(seed=0)
    base = model_fingerprint(model, "document")
    model.transformer.tokenize(["tokenizer calls rewrite its truncation and padding state"], max_length=5, padding=False)
    model.max_seq_length = {"query": 7, "document": model.max_seq_length["document"]}  # the other kind's length
    model.prompts["query"] = "query: "
    model.similarity = "dot"  # how embeddings are compared, not what they are
    assert model_fingerprint(model, "document") == base == model_fingerprint(tiny_bi_encoder(seed=0), "document")
    assert model_fingerprint(model, "query") != model_fingerprint(tiny_bi_encoder(seed=0), "query")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # rows computed under autocast are other rows
        assert model_fingerprint(model, "document") != base


@pytest.mark.parametrize("change", ["one weight", "document max length", "document prompt"])
def test_a_change_misses_and_encodes_the_changed_model(change, tmp_path):
    """The acceptance check: after changing one weight, the max length or the prompt, the cache encodes again
    and returns the changed model's embeddings (never the old rows)."""
    texts = TEXTS[:8]
    old = EmbeddingCache(tmp_path).encode(tiny_bi_encoder(seed=0), texts)
    model = tiny_bi_encoder(seed=0)
    CHANGES[change](model)
    live = model.encode(texts)
    assert (live - old).abs().max() > 1e-5  # the change does change the embeddings
    calls = counted(model)
    got = EmbeddingCache(tmp_path).encode(model, texts)
    assert calls.count == 1 and calls.texts[0] == texts
    torch.testing.assert_close(got, live, rtol=0, atol=1e-6)


def test_a_full_hit_leaves_the_model_where_it_is(tmp_path):
    model = tiny_bi_encoder(seed=0)
    EmbeddingCache(tmp_path).encode(model, TEXTS[:4])
    moves = []
    model.to = lambda *a, **k: moves.append(a)  # noqa: E731  (what encode(device=...) calls on a miss)
    EmbeddingCache(tmp_path).encode(model, TEXTS[:4], device="cpu")
    assert moves == []
    EmbeddingCache(tmp_path).encode(model, TEXTS[:5], device="cpu")
    assert moves == [("cpu",)]


def test_a_cache_that_cannot_be_written_still_returns_the_rows(tmp_path, monkeypatch, caplog):
    def refuse(self, fingerprint, texts, embeddings):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EmbeddingCache, "store", refuse)
    model = tiny_bi_encoder(seed=0)
    with caplog.at_level(logging.WARNING, logger="embedlab.cache"):
        got = EmbeddingCache(tmp_path).encode(model, TEXTS[:3])
    fp = model_fingerprint(model, "document")
    assert cache_warnings(caplog) == [
        f"embedding cache: could not store 3 rows under {tmp_path / fp} ([Errno 28] No space left on device)"
    ]
    torch.testing.assert_close(got, model.encode(TEXTS[:3]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# damaged shards: detected, never read, rebuilt
# ------------------------------------------------------------------------------------------------------------
def _damage_truncate(files):
    data = files["data.npy"][0]
    data.write_bytes(data.read_bytes()[:-100])  # cut off mid-write
    return "has {size} bytes, the manifest says {bytes} (cut off mid-write?)"


def _damage_flip(files):
    data = files["data.npy"][0]
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF  # same size, one byte of one row changed
    data.write_bytes(bytes(raw))
    return "does not match its checksum"


def _damage_manifest(files):
    files["json"][0].unlink()
    return "has no manifest (a write that did not finish, or one in progress): ignored; its texts are encoded again"


def _damage_bad_json(files):
    files["json"][0].write_text('{"format": 1, "rows": ')
    return "unreadable manifest (JSONDecodeError"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_manifest, _damage_bad_json])
def test_a_damaged_shard_is_detected_and_rebuilt_never_read(damage, tmp_path, caplog):
    texts = TEXTS[:10]
    model = tiny_bi_encoder(seed=0)
    fp = model_fingerprint(model, "document")
    EmbeddingCache(tmp_path).encode(model, texts)
    files = shard_files(tmp_path, fp)
    size = files["data.npy"][0].stat().st_size
    message = damage(files).format(size=size - 100, bytes=size)
    calls = counted(model)
    with caplog.at_level(logging.WARNING, logger="embedlab.cache"):
        got = EmbeddingCache(tmp_path).encode(model, texts)
    (warning,) = cache_warnings(caplog)
    assert message in warning and str(tmp_path / fp) in warning
    assert calls.count == 1 and calls.texts[0] == texts  # every text encoded again, no row read from the shard
    torch.testing.assert_close(got, tiny_bi_encoder(seed=0).encode(texts), rtol=0, atol=1e-6)

    caplog.clear()  # rebuilt: a new reader finds valid rows and nothing to warn about
    with caplog.at_level(logging.WARNING, logger="embedlab.cache"):
        assert torch.equal(EmbeddingCache(tmp_path).encode(model, texts), got)
    assert calls.count == 1 and cache_warnings(caplog) == []


def test_leftover_temporary_files_are_ignored_silently(tmp_path, caplog):
    """What a writer killed mid-write leaves: a partial ``.<name>.tmp`` next to nothing under a shard's name."""
    model = tiny_bi_encoder(seed=0)
    fp = model_fingerprint(model, "document")
    (tmp_path / fp).mkdir()
    (tmp_path / fp / ".0123abcd.data.npy.x1y2.tmp").write_bytes(b"\x93NUMPY partial")
    calls = counted(model)
    with caplog.at_level(logging.WARNING, logger="embedlab.cache"):
        got = EmbeddingCache(tmp_path).encode(model, TEXTS[:3])
    assert calls.count == 1 and cache_warnings(caplog) == []
    torch.testing.assert_close(got, tiny_bi_encoder(seed=0).encode(TEXTS[:3]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# two writers at once (two processes, as two DDP ranks or two sweep jobs)
# ------------------------------------------------------------------------------------------------------------
ROUNDS = [TEXTS[:6], TEXTS[4:14], TEXTS[10:], TEXTS]


def test_two_processes_writing_the_same_rows_leave_a_correct_cache(tmp_path, caplog):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=write_rounds, args=(str(tmp_path), ROUNDS, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    fingerprints = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model = tiny_bi_encoder(seed=0)
    fp = model_fingerprint(model, "document")
    assert fingerprints == [fp, fp]  # the same model gives the same fingerprint in every process
    for manifest in shard_files(tmp_path, fp)["json"]:  # every shard is complete and matches its manifest
        assert json.loads(manifest.read_text())["fingerprint"] == fp
    live = model.encode(TEXTS)
    calls = counted(model)
    with caplog.at_level(logging.WARNING, logger="embedlab.cache"):
        got = EmbeddingCache(tmp_path).encode(model, TEXTS)
    assert calls.count == 0 and cache_warnings(caplog) == []
    torch.testing.assert_close(got, live, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# evaluate.py (eval.cache_dir)
# ------------------------------------------------------------------------------------------------------------
TIMINGS = ("test/eval_seconds", "test/search_seconds")


@pytest.mark.parametrize("data", ["scifact", "stsb"])
def test_evaluate_twice_gives_identical_metrics_and_the_second_encodes_nothing(data, tmp_path, tiny_data_root, monkeypatch):
    from embedlab.evaluating import evaluate

    calls = []
    encode = BiEncoder.encode
    monkeypatch.setattr(BiEncoder, "encode", lambda self, texts, *a, **k: calls.append(len(texts)) or encode(self, texts, *a, **k))

    def run(name: str, cache: bool) -> dict[str, float]:
        overrides = ["model=tiny", f"data={data}", f"data.root={tiny_data_root}", "logger=none", "progress_bar=false"]
        overrides += [f"eval.cache_dir={tmp_path / 'cache'}"] if cache else []
        metrics, _ = evaluate(compose_config("evaluate", overrides, tmp_path / name))
        return {k: v for k, v in metrics.items() if k not in TIMINGS}

    reference = run("plain", cache=False)
    assert calls and sum(calls) > 0
    calls.clear()
    first = run("first", cache=True)
    assert calls  # the cache was empty
    calls.clear()
    second = run("second", cache=True)
    assert calls == []  # every row read from the cache
    assert second == first  # identical, not merely close: the same rows
    written = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert {k: v for k, v in written.items() if k not in TIMINGS} == second
    assert first.keys() == reference.keys()
    for name, value in reference.items():  # the cache changes no metric
        assert first[name] == pytest.approx(value, abs=1e-6), name


def test_cache_dir_is_off_by_default_and_no_evaluator_option(tmp_path, tiny_data_root):
    cfg = compose_config("evaluate", ["model=tiny", f"data.root={tiny_data_root}"], tmp_path)
    assert cfg.eval.cache_dir is None
    cache, options = cache_from_options({"cache_dir": str(tmp_path / "c"), "batch_size": 8})
    assert isinstance(cache, EmbeddingCache) and cache.root == tmp_path / "c" and options == {"batch_size": 8}
    assert cache_from_options({"cache_dir": None, "top_k": 5}) == (None, {"top_k": 5})


# ------------------------------------------------------------------------------------------------------------
# the bi-encoder module: validation then test
# ------------------------------------------------------------------------------------------------------------
def _module(cache_dir: Path | None):
    from embedlab.lightning import BiEncoderModule
    from embedlab.losses import MultipleNegativesRankingLoss

    evaluation = {"batch_size": 5, "similarity": None, "k_values": [1, 3, 10]}
    evaluation |= {"cache_dir": str(cache_dir)} if cache_dir else {}
    return BiEncoderModule(
        model=tiny_bi_encoder(seed=0), loss=MultipleNegativesRankingLoss(), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        evaluation=evaluation,
    )


def _datamodule(data_root: Path):
    from embedlab.data import BeirSource, EmbeddingDataModule

    folder = str(data_root / "scifact")
    return EmbeddingDataModule(
        train=BeirSource(folder, split="train"), val=BeirSource(folder, split="test"), test=BeirSource(folder, split="test")
    )


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )


def _scores(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics without timings, named without the stage prefix."""
    return {k.removeprefix(prefix): v for k, v in metrics.items() if not k.endswith("_seconds")}


def _embed_calls(module) -> Calls:
    calls = Calls(module.embed)
    module.embed = calls
    return calls


def test_module_validation_then_test_reads_the_cache(tmp_path, tiny_data_root):
    dm = _datamodule(tiny_data_root)
    plain = _module(None)
    trainer = _trainer(tmp_path / "plain")
    reference = _scores(trainer.validate(plain, datamodule=dm, verbose=False)[0], "val/")

    module = _module(tmp_path / "cache")
    calls = _embed_calls(module)
    trainer = _trainer(tmp_path / "run")
    val = _scores(trainer.validate(module, datamodule=dm, verbose=False)[0], "val/")
    n_texts = sum(len(t) for t in calls.texts)
    assert n_texts == sum(len(req.texts) for req in module.val_evaluator.encode_plan())  # each text embedded once
    assert val.keys() == reference.keys()
    for name, value in reference.items():
        assert val[name] == pytest.approx(value, abs=1e-6), name

    calls.texts.clear()
    test = _scores(trainer.test(module, datamodule=dm, verbose=False)[0], "test/")
    assert calls.count == 0  # unchanged weights: every row read
    assert test == val  # the same task, the same rows

    _bump_one_weight(module.model)  # a weight change must miss
    plain_changed = _module(None)
    _bump_one_weight(plain_changed.model)
    expected = _scores(_trainer(tmp_path / "plain2").test(plain_changed, datamodule=dm, verbose=False)[0], "test/")
    changed = _scores(trainer.test(module, datamodule=dm, verbose=False)[0], "test/")
    assert sum(len(t) for t in calls.texts) == n_texts
    assert changed.keys() == expected.keys()
    for name, value in expected.items():
        assert changed[name] == pytest.approx(value, abs=1e-6), name
