"""ONNX export and the ONNX Runtime backends (embedlab.models.onnx): the exported graph computes the torch backbone's
function for any batch and length, the onnx backend's embeddings equal torch's, the int8 ones are close but really
quantized, the exact errors, and every encoding path's config accepts the backend (tiny model, saved to tmp)."""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from embedlab.cache import EmbeddingCache, model_fingerprint
from embedlab.models import BiEncoder, ModelLoadError, tiny_bi_encoder
from embedlab.models.onnx import FILE_NAMES, OnnxBackbone, export_onnx, main
from tests.conftest import compose_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

#: texts from 1 to ~60 tokens (the tiny model truncates at 64): batches pad, and one text is cut
TEXTS = [
    "x",
    "what do we know about proteins?",
    "Proteins fold into three dimensional structures that determine their function.",
    "Vaccines train the immune system to recognise a pathogen before infection. " * 3,
    "Rising carbon dioxide levels warm the climate and acidify the oceans. " * 6,
    "Neurons transmit signals.",
    "Galaxies contain billions of stars bound together by gravity, and some of them collide.",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny bi-encoder (with a query prompt and a dense layer: the torch parts after the graph) saved and
    exported with both int8 variants; returns (torch model, folder)."""
    model = tiny_bi_encoder(seed=3, query_prompt="query: ", projection_dim=16).eval()
    with torch.no_grad():
        model.dense.linear.weight.normal_(0, 0.2)  # not the identity: the dense layer must really run
    folder = model.save(tmp_path_factory.mktemp("onnx") / "model")
    export_onnx(folder, quantize=("int8", "int8_vnni"))
    return model, folder


def test_export_writes_dynamic_graphs_that_compute_the_backbone(saved):
    import onnxruntime as ort

    model, folder = saved
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == sorted(FILE_NAMES.values())
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        (name, ["batch_size", "sequence_length"]) for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("last_hidden_state", ["batch_size", "sequence_length", 32])]
    g = torch.Generator().manual_seed(0)
    for batch, length in ((1, 5), (7, 40)):  # neither is the traced (2, L) shape
        ids = torch.randint(1000, 20000, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # a padded row
        types = torch.zeros_like(ids)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()})
        with torch.no_grad():
            want = model.transformer.backbone(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert got.shape == (batch, length, 32)
        assert np.abs(got - want.numpy()).max() <= 1e-5


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_onnx_backend_embeddings_equal_torch(saved, batch_size):
    model, folder = saved
    onnx = BiEncoder.from_pretrained(str(folder), backend="onnx")
    assert isinstance(onnx.transformer.backbone, OnnxBackbone) and not list(onnx.transformer.parameters())
    for kind in ("query", "document"):
        want = model.encode(TEXTS, kind=kind, batch_size=batch_size)
        got = onnx.encode(TEXTS, kind=kind, batch_size=batch_size)
        assert got.dtype == torch.float32 and got.shape == want.shape == (len(TEXTS), 16)
        assert float((got - want).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", ["onnx_int8", "onnx_int8_vnni"])
def test_int8_backends_are_close_to_float32_but_quantized(saved, backend):
    model, folder = saved
    want = model.encode(TEXTS)
    got = BiEncoder.from_pretrained(str(folder), backend=backend, onnx_threads=1).encode(TEXTS, batch_size=4)
    cosine = torch.nn.functional.cosine_similarity(got, want)  # (N,)
    assert float(cosine.min()) > 0.9999  # the tiny random model; real models: docs/inference.md
    assert float((got - want).abs().max()) > 1e-5  # not the float32 graph: the weights really are 8-bit


def test_backend_exports_a_missing_graph_once_with_a_log_line(tmp_path, caplog):
    folder = tiny_bi_encoder(seed=1).save(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="embedlab.models.onnx"):
        model = BiEncoder.from_pretrained(str(folder), backend="onnx_int8")
    assert [r.getMessage() for r in caplog.records] == [
        f"model.backend=onnx_int8: exporting {folder} to {folder}/onnx/model.onnx",
        f"model.backend=onnx_int8: quantizing {folder}/onnx/model.onnx to {folder}/onnx/model_quint8_avx2.onnx",
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedlab.models.onnx"):
        BiEncoder.from_pretrained(str(folder), backend="onnx")  # the float32 graph is there now: nothing exported
    assert caplog.records == []
    assert model.config["backend"] == "onnx_int8" and not model.training
    assert model.transformer.backbone.session.get_session_options().intra_op_num_threads == 0  # ORT's default


def test_cache_fingerprint_tells_the_backends_apart_and_cached_rows_equal_live_ones(saved, tmp_path):
    model, folder = saved
    models = {b: BiEncoder.from_pretrained(str(folder), backend=b) for b in ("onnx", "onnx_int8", "onnx_int8_vnni")}
    models["torch"] = BiEncoder.from_pretrained(str(folder))
    prints = {b: model_fingerprint(m, "document") for b, m in models.items()}
    assert len(set(prints.values())) == 4
    assert model_fingerprint(BiEncoder.from_pretrained(str(folder), backend="onnx_int8"), "document") == prints["onnx_int8"]
    cache = EmbeddingCache(tmp_path / "cache")
    int8 = models["onnx_int8"]
    assert torch.equal(cache.encode(int8, TEXTS), int8.encode(TEXTS))
    assert torch.equal(cache.encode(int8, TEXTS), int8.encode(TEXTS))  # read back
    assert int8.device == torch.device("cpu")


def test_a_copy_rebuilds_its_session(saved):
    _, folder = saved
    model = BiEncoder.from_pretrained(str(folder), backend="onnx")
    first = model.encode(TEXTS)
    assert torch.equal(copy.deepcopy(model).encode(TEXTS), first)


def test_missing_packages_give_the_exact_error(saved, tmp_path, monkeypatch):
    _, folder = saved
    bare = tiny_bi_encoder().save(tmp_path / "bare")  # no onnx/ folder: loading must export
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ModelLoadError) as e:
        export_onnx(bare)
    assert str(e.value) == "ONNX export needs the onnx package: pip install onnx"
    with pytest.raises(ModelLoadError) as e:
        BiEncoder.from_pretrained(str(bare), backend="onnx")
    assert str(e.value) == "model.backend=onnx needs the onnx package: pip install onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError) as e:
        BiEncoder.from_pretrained(str(folder), backend="onnx")  # exported already: only the runtime is missing
    assert str(e.value) == "model.backend=onnx needs the onnxruntime package: pip install onnxruntime"


@pytest.mark.parametrize(
    "path, options, message",
    [
        ("run/last.ckpt", {"backend": "onnx_int8"},
         "model.backend=onnx_int8 needs a saved model folder (python export.py FOLDER), not a checkpoint"),
        ("{folder}", {"backend": "tensorrt"}, "model.backend must be one of torch, onnx, onnx_int8, onnx_int8_vnni, got 'tensorrt'"),
        ("{folder}", {"backend": "onnx", "onnx_threads": 0}, "model.onnx_threads must be a positive integer or null, got 0"),
        ("{folder}", {"backend": "onnx", "torch_dtype": "bfloat16"},
         "model.torch_dtype=bfloat16 applies to model.backend=torch only (ONNX graphs run in float32)"),
        ("sentence-transformers/all-MiniLM-L6-v2", {"backend": "onnx"},
         "model.backend=onnx needs a local model folder (python export.py FOLDER), got 'sentence-transformers/all-MiniLM-L6-v2'"),
    ],
)
def test_load_errors(saved, path, options, message):
    with pytest.raises(ModelLoadError) as e:
        BiEncoder.from_pretrained(path.format(folder=saved[1]), **options)
    assert str(e.value) == message


def test_onnx_models_are_inference_only(saved, tmp_path):
    model = BiEncoder.from_pretrained(str(saved[1]), backend="onnx_int8")
    with pytest.raises(ModelLoadError) as e:
        model.train()  # what the training modules do first (BiEncoderModule: self.model = model.train())
    assert str(e.value) == (
        "model.backend=onnx_int8 is for inference only (evaluation, mining, teachers): train with model.backend=torch"
    )
    with pytest.raises(ModelLoadError) as e:
        BiEncoder.from_pretrained(str(saved[1]), backend="onnx").save(tmp_path / "copy")
    assert str(e.value) == (
        "a model with model.backend=onnx cannot be saved (its weights are an ONNX graph): load it with model.backend=torch to save it"
    )


def test_export_py(saved, tmp_path, capsys):
    _, folder = saved
    paths = main([str(folder), "--quantize", "int8"])
    assert capsys.readouterr().out.splitlines() == [f"fp32: {folder}/onnx/model.onnx", f"int8: {folder}/onnx/model_quint8_avx2.onnx"]
    assert paths == {"fp32": folder / "onnx" / "model.onnx", "int8": folder / "onnx" / "model_quint8_avx2.onnx"}
    (tmp_path / "empty").mkdir()
    for bad, message in (
        (tmp_path / "nope", f"model folder '{tmp_path / 'nope'}' does not exist (ONNX export needs a saved model folder)"),
        (tmp_path / "empty", f"model folder '{tmp_path / 'empty'}' has no config.json: it is not a Hugging Face model folder"),
    ):
        with pytest.raises(SystemExit) as e:
            main([str(bad)])
        assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"


# ------------------------------------------------------------------ every encoding path's config takes the backend
def test_every_encoding_path_accepts_the_backend(saved, tmp_path, tiny_data_root):
    from embedlab.lightning.distillation import DistillationModule

    _, folder = saved
    model_options = ["model=hf", f"model.path={folder}", "model.backend=onnx_int8", "model.onnx_threads=1"]
    for entry in ("evaluate", "mine"):  # evaluate.py (and two-stage retrieval's dense first stage), mine.py
        cfg = compose_config(entry, model_options + [f"paths.data_root={tiny_data_root}"], tmp_path)
        model = instantiate(cfg.model)
        assert isinstance(model.transformer.backbone, OnnxBackbone) and model.transformer.backbone.threads == 1
    # score.py's bi-encoder teacher
    cfg = compose_config("score", ["hard_negatives=x.jsonl", "teacher=bi_encoder", f"teachers.bi_encoder.path={folder}",
                                   "teachers.bi_encoder.backend=onnx_int8"], tmp_path)
    teacher = instantiate(cfg.teachers.bi_encoder)
    assert teacher.model.transformer.backbone.backend == "onnx_int8"
    # the distillation teacher (the student trains in torch)
    cfg = compose_config("train", ["model=tiny", "module=distillation", "loss=distill_mse", f"data.root={tiny_data_root}",
                                   f"module.teacher.path={folder}", "module.teacher.backend=onnx_int8",
                                   f"module.teacher_cache_dir={tmp_path / 'cache'}"], tmp_path)
    module = instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
    assert isinstance(module, DistillationModule) and module.teacher.transformer.backbone.backend == "onnx_int8"
    # training the model itself with an ONNX backend: the exact error, before any step
    cfg = compose_config("train", model_options + [f"data.root={tiny_data_root}"], tmp_path)
    with pytest.raises(Exception) as e:
        instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
    from embedlab.cli import error_message, user_error

    assert error_message(user_error(e.value)) == (
        "model.backend=onnx_int8 is for inference only (evaluation, mining, teachers): train with model.backend=torch"
    )
