"""Bi-encoder: transformer backbone -> pooling -> optional L2 normalization.

``BiEncoder`` is a plain ``nn.Module`` (no Lightning): the LightningModules in ``embedlab.lightning`` own
steps and logging, this owns tokenization, the forward pass and the on-disk format. The format is
sentence-transformers' (``modules.json``, ``1_Pooling/``, optional ``2_Dense/``, then ``Normalize``), so
``SentenceTransformer(path)`` loads a saved embedlab model and gives the same embeddings.

Query and document truncation lengths may differ. sentence-transformers 6 keeps both
(``query_length`` / ``document_length`` in ``sentence_bert_config.json``) and applies them in
``encode_query`` / ``encode_document``; a plain ``encode`` (no task) truncates at ``max_seq_length``, which
is the document length (see :meth:`BiEncoder.save`).
"""

from __future__ import annotations

import itertools
import os
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from packaging.version import Version
from tqdm.auto import tqdm

from embedlab.atomic import atomic_dir
from embedlab.models.cpu_dropout import use_fast_cpu_dropout
from embedlab.models.dense import Dense
from embedlab.models.errors import ModelLoadError
from embedlab.models.pooling import AUTO, Pooling
from embedlab.models.st_format import KINDS, ST_SIMILARITY, read_folder_config, similarity_from_st_name, write_folder

#: truncation length when neither the caller nor the model folder gives one
DEFAULT_MAX_SEQ_LENGTH = 256
#: the ``_target_`` under which :meth:`BiEncoder.from_pretrained` records itself in :attr:`BiEncoder.config`
FROM_PRETRAINED_TARGET = "embedlab.models.BiEncoder.from_pretrained"
#: ``torch_dtype`` values a model may be loaded in
DTYPES = ("float32", "float16", "bfloat16")
#: ``from_pretrained``'s dtype argument: transformers 4.56 renamed ``torch_dtype`` to ``dtype``
_DTYPE_KWARG = "dtype" if Version(version("transformers")) >= Version("4.56") else "torch_dtype"


class Normalize(nn.Module):
    """L2-normalize embeddings so that dot product equals cosine similarity."""

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, p=2, dim=-1)


class Transformer(nn.Module):
    """A Hugging Face ``AutoModel`` backbone and its tokenizer; returns token embeddings (B, L, H)."""

    def __init__(self, backbone: nn.Module, tokenizer, do_lower_case: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.do_lower_case = do_lower_case

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def tokenize(self, texts: Sequence[str], max_length: int, padding: bool = True):
        """Padded tensors for a batch; with ``padding=False``, per-text id lists (to sort and batch later)."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt" if padding else None
        )

    def pad(self, encodings: dict[str, list]) -> dict[str, torch.Tensor]:
        """Per-text id lists -> padded tensors (B, L) for the longest in the batch."""
        return self.tokenizer.pad(encodings, padding=True, return_tensors="pt")

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.backbone(**inputs, return_dict=True).last_hidden_state  # (B, L, H)


class BiEncoder(nn.Module):
    """Encode queries and documents into one vector space: transformer -> pooling -> [dense] -> [normalize].

    Args:
        transformer: backbone + tokenizer.
        pooling: a :class:`Pooling` or its mode name.
        dense: an optional linear layer after pooling (:class:`~embedlab.models.dense.Dense`), e.g. the
            rotation that Matryoshka training starts from PCA.
        normalize: L2-normalize the output (cosine similarity == dot product).
        query_max_seq_length / document_max_seq_length: truncation length per side, in tokens.
        query_prompt / document_prompt: text prepended before tokenization, e.g. ``"query: "`` for E5.
        similarity: the score the model is trained and evaluated with, ``cos`` (cosine) or ``dot`` (dot
            product); saved as sentence-transformers' ``similarity_fn_name`` (``cosine`` / ``dot``).

    :attr:`build_args` records how the model was built (``{"_target_": <builder>, <its arguments>}``);
    :meth:`from_pretrained` and :func:`~embedlab.models.tiny.tiny_bi_encoder` set it, and :attr:`config`
    adds the current settings, so a checkpoint that stores ``config`` can rebuild the model.
    """

    def __init__(
        self,
        transformer: Transformer,
        pooling: Pooling | str = "mean",
        normalize: bool = True,
        query_max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        document_max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        query_prompt: str = "",
        document_prompt: str = "",
        dense: Dense | None = None,
        similarity: str = "cos",
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling if isinstance(pooling, Pooling) else Pooling(pooling)
        if dense is not None and dense.in_features != transformer.hidden_size:
            raise ValueError(
                f"dense layer takes {dense.in_features} features, the backbone gives {transformer.hidden_size}"
            )
        self.dense = dense
        self.normalize = Normalize() if normalize else None
        self.max_seq_length = {"query": query_max_seq_length, "document": document_max_seq_length}
        self.prompts = {"query": query_prompt or "", "document": document_prompt or ""}
        self.similarity = similarity
        self.build_args: dict | None = None

    @property
    def max_seq_length(self) -> dict[str, int]:
        """Truncation length per side, ``{"query": int, "document": int}``, in tokens (special tokens included)."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, lengths: dict[str, int]) -> None:
        for kind in KINDS:
            value = lengths[kind]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"{kind}_max_seq_length must be a positive integer, got {value!r}")
        self._max_seq_length = {kind: lengths[kind] for kind in KINDS}

    @property
    def similarity(self) -> str:
        """``cos`` or ``dot``: the similarity the model is trained for (losses and evaluators default to it)."""
        return self._similarity

    @similarity.setter
    def similarity(self, value: str) -> None:
        if value not in ST_SIMILARITY:
            raise ModelLoadError(f"similarity must be one of {', '.join(ST_SIMILARITY)}, got {value!r}")
        self._similarity = value

    @property
    def config(self) -> dict | None:
        """A plain dict that rebuilds this model's architecture and settings: ``{"_target_": ..., **args}``.

        ``None`` for a model built directly with the constructor (nothing records its backbone's origin).
        """
        if self.build_args is None:
            return None
        return {
            **self.build_args,
            "pooling": self.pooling.mode,
            "normalize": self.normalize is not None,
            "query_max_seq_length": self.max_seq_length["query"],
            "document_max_seq_length": self.max_seq_length["document"],
            "query_prompt": self.prompts["query"],
            "document_prompt": self.prompts["document"],
            "similarity": self.similarity,
            "projection_dim": self.dense.out_features if self.dense is not None else None,
        }

    # ------------------------------------------------------------------ forward
    @property
    def embedding_dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.transformer.hidden_size

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are: its first parameter's device, else its first buffer's (an ONNX backbone
        has no parameter, see :mod:`embedlab.models.onnx`), else the CPU."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def tokenize(self, texts: Sequence[str], kind: str = "document", padding: bool = True):
        """Prompt + tokenize ``texts`` as queries or documents (padding to the longest in the batch)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        prompt = self.prompts[kind]
        if prompt:
            texts = [prompt + t for t in texts]
        return self.transformer.tokenize(texts, self.max_seq_length[kind], padding=padding)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized batch -> embeddings (B, D)."""
        tokens = self.transformer(features)  # (B, L, H)
        emb = self.pooling(tokens, features["attention_mask"])  # (B, H)
        if self.dense is not None:
            emb = self.dense(emb)  # (B, D)
        return self.normalize(emb) if self.normalize is not None else emb

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        kind: str = "document",
        batch_size: int = 64,
        show_progress_bar: bool = False,
        desc: str | None = None,
    ) -> torch.Tensor:
        """Embed ``texts`` without gradients; returns a float32 CPU tensor (N, D) in input order, whatever
        the backbone's dtype.

        All texts are tokenized in one call (the fast tokenizer batches it), then batched by token count,
        longest first, so each batch pads as little as possible; padding never changes an embedding.
        """
        if len(texts) == 0:
            return torch.empty(0, self.embedding_dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        device = self.device
        encodings = self.tokenize(texts, kind, padding=False)  # {"input_ids": [[...], ...], ...}
        lengths = [len(ids) for ids in encodings["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=desc or f"encode {kind}s", disable=not show_progress_bar, leave=False):
            idx = order[start : start + batch_size]
            features = self.transformer.pad({k: [v[i] for i in idx] for k, v in encodings.items()})
            features = {k: v.to(device) for k, v in features.items()}
            out[idx] = self(features).float().cpu()
        self.train(was_training)
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write a sentence-transformers folder: backbone + tokenizer at the root, pooling, [dense], [normalize].

        The folder is written next to ``path`` and renamed onto it when complete
        (:func:`embedlab.atomic.atomic_dir`): ``path`` is the old folder or the new one, never half of each,
        and whatever else it held is replaced.

        The files and how sentence-transformers reads the two lengths: :mod:`embedlab.models.st_format`.
        """
        path = Path(path)
        with atomic_dir(path) as tmp:
            write_folder(self, tmp)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        pooling: Pooling | str | None = AUTO,
        normalize: bool | str | None = AUTO,
        max_seq_length: int | None = None,
        query_max_seq_length: int | None = None,
        document_max_seq_length: int | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        similarity: str | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        projection_dim: int | None = None,
        fast_cpu_dropout: bool = True,
        trust_remote_code: bool = False,
        backend: str = "torch",
        onnx_threads: int | None = None,
    ) -> "BiEncoder":
        """Load a Hugging Face / sentence-transformers folder, a Hub id, or an embedlab ``.ckpt``.

        ``"auto"`` (or ``None``) for pooling/normalize and unset lengths/prompts/similarity take what the
        folder's sentence-transformers / embedlab config says, falling back to mean pooling, normalization,
        length 256, no prompt and cosine similarity. Lengths, first match wins: the explicit per-side length,
        the explicit ``max_seq_length``, the folder's per-side length, the folder's ``max_seq_length``, 256.
        ``pooling`` may be a :class:`Pooling` object (what the ``pooling`` config group instantiates).
        A ``Dense`` module in the folder is loaded; ``projection_dim`` adds a new bias-free linear layer after
        pooling, initialized to the identity (square) or its first rows, when the folder has none (a
        folder's own layer must then have that output width).
        ``fast_cpu_dropout`` switches the backbone's dropout and sdpa attention to
        :mod:`embedlab.models.cpu_dropout` (faster CPU training, same function; no effect elsewhere).
        ``trust_remote_code`` lets transformers run the modelling code a Hub repository ships; off unless
        set, as that code runs with the user's rights.
        ``backend``: ``torch`` runs the backbone in PyTorch; ``onnx`` / ``onnx_int8`` / ``onnx_int8_vnni`` run the
        folder's exported float32 / int8 graph (``onnx/model.onnx`` / ``onnx/model_quint8_avx2.onnx`` /
        ``onnx/model_qint8_avx512_vnni.onnx``, exported first when missing) in ONNX Runtime with ``onnx_threads`` intra-op threads (``None``: ONNX Runtime's default); pooling, dense
        and normalization stay torch modules (:mod:`embedlab.models.onnx`). Inference only, float32 graphs
        (``torch_dtype`` must be unset or float32), local folders only (not a Hub id or a ``.ckpt``).
        For a ``.ckpt``, :func:`embedlab.models.checkpoint.load_checkpoint` says which options apply.
        """
        # as given, for a .ckpt (whose model always runs in torch)
        options = {k: v for k, v in locals().items() if k not in ("cls", "path", "backend", "onnx_threads")}
        if not isinstance(fast_cpu_dropout, bool):
            raise ModelLoadError(f"model.fast_cpu_dropout must be true or false, got {fast_cpu_dropout!r}")
        if not isinstance(trust_remote_code, bool):
            raise ModelLoadError(f"model.trust_remote_code must be true or false, got {trust_remote_code!r}")
        from embedlab.models.onnx import BACKENDS, load_onnx_transformer

        if backend not in BACKENDS:
            raise ModelLoadError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = str(path)
        if path.endswith(".ckpt"):
            if backend != "torch":
                raise ModelLoadError(
                    f"model.backend={backend} needs a saved model folder (python export.py FOLDER), not a checkpoint"
                )
            from embedlab.models.checkpoint import load_checkpoint

            return load_checkpoint(path, model_class=cls, **options)
        folder = Path(path)
        saved = read_folder_config(folder) if folder.is_dir() else {}
        if isinstance(pooling, str) and pooling != AUTO:
            pooling = Pooling(pooling)  # an unknown mode fails before the backbone loads
        if backend == "torch":
            transformer = load_transformer(
                path, torch_dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
            if fast_cpu_dropout:
                use_fast_cpu_dropout(transformer.backbone)
        else:
            if torch_dtype not in (None, "float32"):
                raise ModelLoadError(
                    f"model.torch_dtype={torch_dtype} applies to model.backend=torch only (ONNX graphs run in float32)"
                )
            transformer = load_onnx_transformer(path, backend, threads=onnx_threads, trust_remote_code=trust_remote_code)
        transformer.do_lower_case = bool(saved.get("do_lower_case", False))
        dense = Dense.load(folder / saved["dense_path"]) if "dense_path" in saved else None
        if projection_dim is not None:
            if dense is None:
                dense = Dense(transformer.hidden_size, int(projection_dim))
            elif dense.out_features != int(projection_dim):
                raise ModelLoadError(
                    f"model folder {path!r} has a Dense layer with {dense.out_features} outputs, "
                    f"but projection_dim={projection_dim} was asked for"
                )
        lengths = resolve_lengths(max_seq_length, query_max_seq_length, document_max_seq_length, saved)
        model = cls(
            transformer,
            pooling=saved.get("pooling", "mean") if pooling in (None, AUTO) else pooling,
            normalize=saved.get("normalize", True) if normalize in (None, AUTO) else bool(normalize),
            query_max_seq_length=lengths["query"],
            document_max_seq_length=lengths["document"],
            query_prompt=saved.get("query_prompt", "") if query_prompt is None else query_prompt,
            document_prompt=saved.get("document_prompt", "") if document_prompt is None else document_prompt,
            dense=dense,
            similarity=similarity or similarity_from_st_name(saved.get("similarity_fn_name", "cosine"), path),
        )
        model.build_args = {
            "_target_": FROM_PRETRAINED_TARGET,
            "path": path,
            "torch_dtype": torch_dtype,
            "attn_implementation": attn_implementation,
            "fast_cpu_dropout": fast_cpu_dropout,
            "trust_remote_code": trust_remote_code,
        }
        if backend != "torch":  # recorded for inspection only: such a model never trains, so never checkpoints
            model.build_args.update(backend=backend, onnx_threads=onnx_threads)
            model.eval()
        return model


def resolve_lengths(
    max_seq_length: int | None,
    query_max_seq_length: int | None,
    document_max_seq_length: int | None,
    saved: dict,
) -> dict[str, int]:
    """Per-side truncation lengths; first match wins: the explicit per-side length, the explicit
    ``max_seq_length``, ``saved["<side>_max_seq_length"]``, ``saved["max_seq_length"]``, 256.

    ``saved`` is what a model folder records (or a rebuilt checkpoint model's own lengths).
    """
    explicit = {"query": query_max_seq_length, "document": document_max_seq_length}
    lengths = {}
    for kind in KINDS:
        candidates = (explicit[kind], max_seq_length, saved.get(f"{kind}_max_seq_length"), saved.get("max_seq_length"))
        lengths[kind] = next((n for n in candidates if n is not None), DEFAULT_MAX_SEQ_LENGTH)
    return lengths


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, for the names in :data:`DTYPES` only."""
    if name not in DTYPES:
        raise ModelLoadError(f"torch_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def load_transformer(
    path: str, torch_dtype: str | None = None, attn_implementation: str | None = None, trust_remote_code: bool = False
) -> Transformer:
    """``AutoModel`` + ``AutoTokenizer`` from a local folder or Hub id, with one clear error when neither works."""
    from transformers import AutoModel, AutoTokenizer

    check_model_path(path)
    kwargs = model_load_kwargs(torch_dtype, attn_implementation, trust_remote_code)
    try:
        backbone = AutoModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise hub_error(path, err) from err
    return Transformer(backbone, tokenizer)


def check_model_path(path: str) -> None:
    """Raise :class:`ModelLoadError` for a local path that does not exist or is not a Hugging Face folder."""
    folder = Path(path)
    looks_local = folder.is_absolute() or path.startswith((".", "~")) or folder.exists() or path.count("/") > 1
    if looks_local and not folder.is_dir():
        raise ModelLoadError(f"model path {path!r} does not exist (expected a model folder, a .ckpt file or a Hub id)")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {path!r} has no config.json: it is not a Hugging Face model folder")


def model_load_kwargs(
    torch_dtype: str | None, attn_implementation: str | None, trust_remote_code: bool
) -> dict[str, object]:
    """Keyword arguments for a transformers ``from_pretrained`` (dtype under this transformers' name)."""
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if torch_dtype:
        kwargs[_DTYPE_KWARG] = dtype_from_name(torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def hub_error(path: str, err: OSError) -> ModelLoadError:
    """The one-line error for a model that is neither a local folder nor available from the Hub."""
    return ModelLoadError(
        f"could not load model {path!r}: not a local folder, and the Hugging Face Hub did not provide it "
        f"(offline? set HF_HUB_OFFLINE=0 and check the id). Cause: {str(err).splitlines()[0]}"
    )
