"""ONNX export of a saved bi-encoder, and an ONNX Runtime backbone that encodes with it (``model.backend``).

A bi-encoder spends nearly all of its encoding time in the transformer backbone; pooling, the optional dense
layer and normalization are a few vector operations. So only the backbone is exported: the graph maps token ids
to token embeddings (``last_hidden_state``, (B, L, H) float32), and :class:`OnnxTransformer` runs it in ONNX
Runtime behind the interface of :class:`~embedlab.models.bi_encoder.Transformer` (``tokenize``, ``pad``,
``hidden_size``, ``forward``). :class:`~embedlab.models.BiEncoder` keeps its torch pooling / dense / normalize,
so every encoding path (``BiEncoder.encode``: evaluation, mining, distillation teachers, score.py's bi-encoder
teacher, the embedding cache) works unchanged with ``BiEncoder.from_pretrained(path, backend="onnx_int8")``.

Files, in the layout sentence-transformers' ONNX backend reads (``SentenceTransformer(path, backend="onnx")``,
``model_kwargs={"file_name": "onnx/model_quint8_avx2.onnx"}`` for the int8 one)::

    <model folder>/onnx/model.onnx                 float32 graph; inputs input_ids, attention_mask
                                                   [, token_type_ids], int64 (batch, sequence); output
                                                   last_hidden_state (batch, sequence, hidden) float32
    <model folder>/onnx/model_quint8_avx2.onnx     the same graph, dynamically quantized, unsigned 8-bit weights
    <model folder>/onnx/model_qint8_avx512_vnni.onnx  the same, signed 8-bit weights (for CPUs with VNNI)

**Export**: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``): it traces the model once on
a small batch and names the batch and sequence axes dynamic (``dynamic_axes``), which gives the graph that
optimum (and so sentence-transformers) exports for BERT-like encoders, in about a second for a small model.
The backbone is loaded in float32 with eager attention (plain MatMul / Softmax nodes, the pattern ONNX Runtime's
graph optimizer fuses into its attention kernel) whatever dtype the folder was saved in.

**int8** (``quantize=("int8",)`` / ``("int8_vnni",)``): ``onnxruntime.quantization.quantize_dynamic`` with
what sentence-transformers' ``export_dynamic_quantized_onnx_model(model, "avx2" / "avx512_vnni")`` passes
through optimum's ``AutoQuantizationConfig.avx2`` / ``.avx512_vnni(is_static=False)`` for the weights (per-channel, symmetric), applied to every MatMul with a
constant weight matrix only (the linear layers; optimum's default operator list also quantizes the attention
products, which costs time here, so this is not byte-for-byte its graph; the embedding tables stay float32) in 8 bits, symmetric, one scale per output column (``per_channel=True``: a column with large weights
does not coarsen the others'), full 8-bit range; activations unsigned, asymmetric. Weights are quantized once,
at export; activations per batch, at run time, from their observed range ("dynamic"), so no calibration data is
needed. The linear layers then run in 8-bit integer arithmetic (``DynamicQuantizeMatMul``): a quarter of the
weight bytes and more multiply-adds per instruction than float32. ``int8`` has unsigned weights (u8 x u8): on a
CPU without VNNI the u8 x s8 instruction's 16-bit intermediate sums can saturate, which u8 x u8 avoids;
``int8_vnni`` has signed weights (u8 x s8), which VNNI's instruction multiplies without that risk, faster
where it exists. Rounding each weight to one of 256 levels costs some precision: how much, per model and task,
is for measurement (docs/inference.md).

**Staleness**: a graph is a copy of the weights. :meth:`BiEncoder.save` replaces the whole folder (the old
``onnx/`` goes with it); weights changed by other means need ``python export.py FOLDER`` again. (Comparing file
times instead would re-export, or fail in a read-only folder, whenever a copy gives the weights a newer time.)
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import torch
from torch import nn

from embedlab.atomic import atomic_file
from embedlab.models.bi_encoder import Transformer, check_model_path
from embedlab.models.errors import ModelLoadError

log = logging.getLogger(__name__)

#: ``model.backend`` values: torch runs the backbone in PyTorch; the others run its exported graph in ONNX Runtime
BACKENDS = ("torch", "onnx", "onnx_int8", "onnx_int8_vnni")
#: quantized variants :func:`export_onnx` can add to the float32 graph (the module doc says what each is)
QUANTIZATIONS = ("int8", "int8_vnni")
#: the folder inside a model folder that holds the graphs (sentence-transformers' name)
ONNX_DIR = "onnx"
#: graph file per variant: sentence-transformers' names (``<weight type>_<optimum config>``)
FILE_NAMES = {"fp32": "model.onnx", "int8": "model_quint8_avx2.onnx", "int8_vnni": "model_qint8_avx512_vnni.onnx"}
#: the graph each ONNX backend runs
BACKEND_VARIANT = {"onnx": "fp32", "onnx_int8": "int8", "onnx_int8_vnni": "int8_vnni"}
#: backbone inputs a graph may take, in this order (token_type_ids only when the backbone's forward takes it)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: texts of the batch the exporter traces with: any two of different lengths (padding exercised)
_TRACE_TEXTS = ["a short text", "a somewhat longer text to trace the exported graph with padding"]


def require(package: str, who: str) -> ModuleType:
    """``import package``, or :class:`ModelLoadError` ``<who> needs the <package> package: pip install <package>``.

    ``who`` names what needs it, as the user set it (``model.backend=onnx``, ``ONNX export``).
    """
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ModelLoadError(f"{who} needs the {package} package: pip install {package}") from err


def onnx_paths(model_dir: str | Path) -> dict[str, Path]:
    """``{variant: <model_dir>/onnx/<file>}`` for every variant of :data:`FILE_NAMES` (existing or not)."""
    return {variant: Path(model_dir) / ONNX_DIR / name for variant, name in FILE_NAMES.items()}


# ---------------------------------------------------------------------------------------------- export
class _LastHiddenState(nn.Module):
    """The backbone as the graph's function: positional id tensors (B, L) -> ``last_hidden_state`` (B, L, H)."""

    def __init__(self, backbone: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(**dict(zip(self.input_names, inputs)), return_dict=True).last_hidden_state


def export_onnx(
    model_dir: str | Path, quantize: tuple[str, ...] | list[str] = (), opset: int = 17, trust_remote_code: bool = False
) -> dict[str, Path]:
    """Export the transformer backbone of the saved model folder ``model_dir`` to ``<model_dir>/onnx/``.

    Writes ``model.onnx`` (float32) and, per entry of ``quantize``, ``model_quint8_avx2.onnx`` (``int8``) /
    ``model_qint8_avx512_vnni.onnx`` (``int8_vnni``) (the module doc says what and how), each atomically (a crash
    leaves the old file or none, never half a graph). Existing files are replaced. Returns
    ``{"fp32": path, <each quantize entry>: path}``.

    ``model_dir``: any local folder ``AutoModel`` loads (a saved embedlab / sentence-transformers bi-encoder, or a
    plain Hugging Face encoder); ``opset``: the ONNX operator set (17: LayerNormalization is one node).
    """
    quantize = tuple(quantize)
    unknown = [q for q in quantize if q not in QUANTIZATIONS]
    if unknown:
        raise ModelLoadError(f"quantize must list values of {', '.join(QUANTIZATIONS)}, got {', '.join(map(repr, unknown))}")
    folder = _model_folder(model_dir)
    require("onnx", "ONNX export")
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    paths = onnx_paths(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a sentence-transformers folder has no pooler weights: transformers lists them
    try:
        backbone = AutoModel.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", trust_remote_code=trust_remote_code
        ).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    takes = inspect.signature(backbone.forward).parameters
    input_names = tuple(name for name in INPUT_NAMES if name in takes)
    batch = tokenizer(_TRACE_TEXTS, padding=True, return_tensors="pt")
    args = tuple(batch[name] if name in batch else torch.zeros_like(batch["input_ids"]) for name in input_names)
    axes = {0: "batch_size", 1: "sequence_length"}  # optimum's names; every other size is fixed by the weights
    with atomic_file(paths["fp32"]) as tmp, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about Python conditions on shapes (padding checks) that it freezes: none depends on
        # the batch or sequence size of an encoder's forward, which the checks in tests/test_onnx.py confirm
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LastHiddenState(backbone, input_names),
            args,
            str(tmp),
            dynamo=False,
            input_names=list(input_names),
            output_names=["last_hidden_state"],
            dynamic_axes={name: axes for name in (*input_names, "last_hidden_state")},
            opset_version=opset,
            do_constant_folding=True,
        )
    out = {"fp32": paths["fp32"]}
    for variant in quantize:
        out[variant] = quantize_graph(paths["fp32"], paths[variant], variant)
    return out


def quantize_graph(fp32_path: Path, out_path: Path, variant: str = "int8", who: str = "ONNX export") -> Path:
    """Write the dynamically quantized copy (``variant`` ``int8`` / ``int8_vnni``, the module doc) of the float32
    graph ``fp32_path`` to ``out_path``, atomically. ``who``: what needs it, for the missing-package message."""
    require("onnx", who)
    require("onnxruntime", who)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = {"int8": QuantType.QUInt8, "int8_vnni": QuantType.QInt8}[variant]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs a line per tensor (and advice) to the root logger
    try:
        with atomic_file(out_path) as tmp:
            quantize_dynamic(
                str(fp32_path),
                str(tmp),
                # optimum's "fully connected" operators; ONNX Runtime's dynamic mode quantizes the MatMuls among them
                op_types_to_quantize=["MatMul", "Add"],
                per_channel=True,
                reduce_range=False,
                weight_type=weight_type,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "EnableSubgraph": False},
            )
    finally:
        root.setLevel(level)
    return out_path


def _model_folder(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path when it is a local Hugging Face model folder, else :class:`ModelLoadError`."""
    path = str(model_dir)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {path!r} does not exist (ONNX export needs a saved model folder)")
    check_model_path(str(folder))  # a folder without config.json is not a model folder
    return folder


def ensure_onnx(model_dir: str | Path, backend: str, trust_remote_code: bool = False) -> Path:
    """The graph ``backend`` (``onnx`` / ``onnx_int8`` / ``onnx_int8_vnni``) runs for ``model_dir``, exported (one log line) when it is
    missing; a missing int8 graph is quantized from the float32 one (exported first when missing too)."""
    who = f"model.backend={backend}"
    folder = _model_folder(model_dir)
    paths = onnx_paths(folder)
    wanted = paths[BACKEND_VARIANT[backend]]
    if wanted.is_file():
        return wanted
    require("onnx", who)
    require("onnxruntime", who)
    if not paths["fp32"].is_file():
        log.info("%s: exporting %s to %s", who, folder, paths["fp32"])
        export_onnx(folder, trust_remote_code=trust_remote_code)
    if wanted != paths["fp32"]:
        log.info("%s: quantizing %s to %s", who, paths["fp32"], wanted)
        quantize_graph(paths["fp32"], wanted, BACKEND_VARIANT[backend], who=who)
    return wanted


# ---------------------------------------------------------------------------------------------- runtime
class OnnxBackbone(nn.Module):
    """An exported backbone graph run by ONNX Runtime, called like a Hugging Face ``AutoModel``:
    ``backbone(input_ids=..., attention_mask=..., return_dict=True).last_hidden_state`` (B, L, H) float32.

    It holds no torch parameter. Its one buffer, ``graph_digest`` (16 bytes of BLAKE2b of the graph file), is what
    the embedding cache's fingerprint (:func:`embedlab.cache.weights_digest`, which hashes every buffer) sees of
    the weights, so float32 and int8 graphs, and graphs of different weights, never share cached rows. It also
    gives the model a device: inputs may arrive on any device; the graph runs on the CPU and the output goes back
    to the inputs' device.

    The ONNX Runtime session is created at the first call (and again after a copy or unpickling, which drop it):
    all graph optimizations on (``ORT_ENABLE_ALL``: fused attention, layer norm and GELU kernels), the CPU
    execution provider, ``threads`` intra-op threads (``None``: ONNX Runtime's default, one per physical core).

    Inference only: ``train(True)`` raises :class:`ModelLoadError` (there are no torch weights to train).
    """

    def __init__(self, graph: str | Path, config, backend: str = "onnx", threads: int | None = None) -> None:
        super().__init__()
        self.graph = Path(graph)
        self.config = config
        self.backend = backend
        self.threads = threads
        digest = hashlib.blake2b(digest_size=16)
        with open(self.graph, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.register_buffer("graph_digest", torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8), persistent=False)
        self._session = None
        self.training = False

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_session"] = None  # an ONNX Runtime session neither pickles nor copies: rebuilt at the next call
        return state

    @property
    def session(self):
        """The ``onnxruntime.InferenceSession`` (created on first use)."""
        if self._session is None:
            ort = require("onnxruntime", f"model.backend={self.backend}")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads is not None:
                options.intra_op_num_threads = int(self.threads)
            self._session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        return self._session

    def train(self, mode: bool = True) -> "OnnxBackbone":
        if mode:
            raise ModelLoadError(
                f"model.backend={self.backend} is for inference only (evaluation, mining, teachers): "
                "train with model.backend=torch"
            )
        return super().train(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                return_dict: bool = True) -> SimpleNamespace:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = {}
        for spec in self.session.get_inputs():
            tensor = given.get(spec.name)
            if tensor is None and spec.name == "token_type_ids":
                tensor = torch.zeros_like(input_ids)  # a tokenizer without segments: all text is segment 0
            if tensor is None:
                raise ModelLoadError(f"ONNX graph {str(self.graph)!r} takes an input {spec.name!r} the tokenizer does not give")
            feeds[spec.name] = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.int64)  # (B, L)
        hidden = self.session.run(["last_hidden_state"], feeds)[0]  # (B, L, H) float32
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden).to(input_ids.device))

    def save_pretrained(self, *args, **kwargs) -> None:
        raise ModelLoadError(
            f"a model with model.backend={self.backend} cannot be saved (its weights are an ONNX graph): "
            "load it with model.backend=torch to save it"
        )


class OnnxTransformer(Transformer):
    """:class:`~embedlab.models.bi_encoder.Transformer` whose backbone is an :class:`OnnxBackbone`: the same
    tokenizer, ``tokenize`` / ``pad`` / ``hidden_size``, and ``forward(features)`` -> (B, L, H) float32."""


def load_onnx_transformer(
    path: str, backend: str, threads: int | None = None, trust_remote_code: bool = False
) -> OnnxTransformer:
    """The :class:`OnnxTransformer` of the local model folder ``path`` for ``backend`` (an ONNX one of :data:`BACKENDS`),
    exporting its graph first when missing (:func:`ensure_onnx`); ``threads``: ONNX Runtime intra-op threads."""
    from transformers import AutoConfig, AutoTokenizer

    if backend not in BACKEND_VARIANT:
        raise ModelLoadError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ModelLoadError(f"model.onnx_threads must be a positive integer or null, got {threads!r}")
    if not Path(path).expanduser().is_dir():
        raise ModelLoadError(
            f"model.backend={backend} needs a local model folder (python export.py FOLDER), got {path!r}"
        )
    require("onnxruntime", f"model.backend={backend}")
    graph = ensure_onnx(path, backend, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return OnnxTransformer(OnnxBackbone(graph, config, backend=backend, threads=threads), tokenizer)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``python export.py MODEL_DIR [--quantize int8 [int8_vnni]] [--opset 17]``: :func:`export_onnx`, then one
    ``<variant>: <path>`` line per written graph on stdout; a user error prints ``error: <message>`` and exits 1."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a saved bi-encoder's transformer to <MODEL_DIR>/onnx/ (sentence-transformers' layout), "
        "for model.backend=onnx / onnx_int8 / onnx_int8_vnni (docs/inference.md).",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model folder (BiEncoder.save, sentence-transformers)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="the export format (onnx only)")
    parser.add_argument(
        "--quantize", nargs="+", choices=QUANTIZATIONS, default=[],
        help="also write the dynamically quantized graph(s): int8 = model_quint8_avx2.onnx, "
        "int8_vnni = model_qint8_avx512_vnni.onnx",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX operator set (default 17)")
    parser.add_argument("--trust-remote-code", action="store_true", help="let transformers run the folder's modelling code")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = export_onnx(args.model_dir, quantize=args.quantize, opset=args.opset, trust_remote_code=args.trust_remote_code)
    except ModelLoadError as err:
        from embedlab.cli import exit_with_error

        exit_with_error(err)
    for variant, path in paths.items():
        print(f"{variant}: {path}")
    return paths
