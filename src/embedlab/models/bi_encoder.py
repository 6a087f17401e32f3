"""Bi-encoder: transformer backbone -> pooling -> optional L2 normalization.

``BiEncoder`` is a plain ``nn.Module`` (no Lightning): the LightningModules in ``embedlab.lightning`` own
steps and logging, this owns tokenization, the forward pass and the on-disk format. The format is
sentence-transformers' (``modules.json``, ``1_Pooling/``, optional ``2_Dense/``, then ``Normalize``), so
``SentenceTransformer(path)`` loads a saved embedlab model and gives the same embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from embedlab.models.cpu_dropout import use_fast_cpu_dropout
from embedlab.models.dense import Dense
from embedlab.models.pooling import ST_POOLING_FLAGS, Pooling

KINDS = ("query", "document")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded (missing folder, not a model, hub unreachable)."""


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
    """

    def __init__(
        self,
        transformer: Transformer,
        pooling: Pooling | str = "mean",
        normalize: bool = True,
        query_max_seq_length: int = 256,
        document_max_seq_length: int = 256,
        query_prompt: str = "",
        document_prompt: str = "",
        dense: Dense | None = None,
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
        self.max_seq_length = {"query": int(query_max_seq_length), "document": int(document_max_seq_length)}
        self.prompts = {"query": query_prompt or "", "document": document_prompt or ""}

    # ------------------------------------------------------------------ forward
    @property
    def embedding_dim(self) -> int:
        return self.dense.out_features if self.dense is not None else self.transformer.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

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
        """Embed ``texts`` without gradients; returns a float32 CPU tensor (N, D) in input order.

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
        """Write a sentence-transformers folder: backbone + tokenizer at the root, pooling, normalize."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.backbone.save_pretrained(path, safe_serialization=True)
        self.transformer.tokenizer.save_pretrained(path)
        # sentence-transformers has one max_seq_length: the document one (the longer side, usually)
        _write_json(
            path / "sentence_bert_config.json",
            {"max_seq_length": self.max_seq_length["document"], "do_lower_case": self.transformer.do_lower_case},
        )
        pooling_cfg = {"word_embedding_dimension": self.transformer.hidden_size, "include_prompt": True}
        pooling_cfg.update({flag: mode == self.pooling.mode for mode, flag in ST_POOLING_FLAGS.items()})
        pooling_cfg["pooling_mode_mean_sqrt_len_tokens"] = False
        (path / "1_Pooling").mkdir(exist_ok=True)
        _write_json(path / "1_Pooling" / "config.json", pooling_cfg)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.dense is not None:
            self.dense.save(path / "2_Dense")
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize is not None:
            idx = len(modules)
            (path / f"{idx}_Normalize").mkdir(exist_ok=True)
            modules.append(
                {"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
        _write_json(path / "modules.json", modules)
        prompts = {k: v for k, v in self.prompts.items() if v}
        _write_json(
            path / "config_sentence_transformers.json",
            {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        )
        _write_json(
            path / "embedlab_config.json",
            {
                "pooling": self.pooling.mode,
                "normalize": self.normalize is not None,
                "query_max_seq_length": self.max_seq_length["query"],
                "document_max_seq_length": self.max_seq_length["document"],
                "query_prompt": self.prompts["query"],
                "document_prompt": self.prompts["document"],
            },
        )
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        pooling: str | None = "auto",
        normalize: bool | str | None = "auto",
        max_seq_length: int | None = None,
        query_max_seq_length: int | None = None,
        document_max_seq_length: int | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        projection_dim: int | None = None,
        fast_cpu_dropout: bool = True,
    ) -> "BiEncoder":
        """Load a Hugging Face / sentence-transformers folder, a Hub id, or an embedlab ``.ckpt``.

        ``"auto"`` (or ``None``) for pooling/normalize and unset lengths/prompts take what the folder's
        sentence-transformers / embedlab config says, falling back to mean pooling, normalization,
        length 256 and no prompt. A ``Dense`` module in the folder is loaded; ``projection_dim`` adds a new
        bias-free linear layer after pooling, initialized to the identity (square) or its first rows, when
        the folder has none (a folder's own layer must then have that output width).
        ``fast_cpu_dropout`` switches the backbone's dropout and sdpa attention to
        :mod:`embedlab.models.cpu_dropout` (faster CPU training, same function; no effect elsewhere).
        """
        if not isinstance(fast_cpu_dropout, bool):
            raise ValueError(f"model.fast_cpu_dropout must be true or false, got {fast_cpu_dropout!r}")
        path = str(path)
        if path.endswith(".ckpt"):
            return load_checkpoint(path)
        folder = Path(path)
        saved = _read_saved_config(folder) if folder.is_dir() else {}
        pooling = saved.get("pooling", "mean") if pooling in (None, "auto") else pooling
        normalize = saved.get("normalize", True) if normalize in (None, "auto") else bool(normalize)
        default_len = max_seq_length or saved.get("max_seq_length", 256)
        transformer = load_transformer(path, torch_dtype=torch_dtype, attn_implementation=attn_implementation)
        if fast_cpu_dropout:
            use_fast_cpu_dropout(transformer.backbone)
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
        return cls(
            transformer,
            pooling=pooling,
            normalize=normalize,
            query_max_seq_length=query_max_seq_length or saved.get("query_max_seq_length", default_len),
            document_max_seq_length=document_max_seq_length or saved.get("document_max_seq_length", default_len),
            query_prompt=saved.get("query_prompt", "") if query_prompt is None else query_prompt,
            document_prompt=saved.get("document_prompt", "") if document_prompt is None else document_prompt,
            dense=dense,
        )


def load_transformer(path: str, torch_dtype: str | None = None, attn_implementation: str | None = None) -> Transformer:
    """``AutoModel`` + ``AutoTokenizer`` from a local folder or Hub id, with one clear error when neither works."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    looks_local = folder.is_absolute() or path.startswith((".", "~")) or folder.exists() or path.count("/") > 1
    if looks_local and not folder.is_dir():
        raise ModelLoadError(f"model path {path!r} does not exist (expected a model folder, a .ckpt file or a Hub id)")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {path!r} has no config.json: it is not a Hugging Face model folder")
    kwargs = {}
    if torch_dtype:
        kwargs["torch_dtype"] = getattr(torch, torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        backbone = AutoModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {path!r}: not a local folder, and the Hugging Face Hub did not provide it "
            f"(offline? set HF_HUB_OFFLINE=0 and check the id). Cause: {str(err).splitlines()[0]}"
        ) from err
    return Transformer(backbone, tokenizer)


def load_checkpoint(path: str) -> BiEncoder:
    """Rebuild the bi-encoder of an embedlab Lightning checkpoint (its model config + trained weights)."""
    from hydra.utils import instantiate

    if not Path(path).is_file():
        raise ModelLoadError(f"checkpoint {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model_cfg = ckpt.get("embedlab_model_cfg")
    if model_cfg is None:
        raise ModelLoadError(f"checkpoint {path!r} was not written by embedlab train.py (no embedlab_model_cfg)")
    model = instantiate(model_cfg)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model


def _read_saved_config(folder: Path) -> dict:
    """Pooling / normalize / length / prompts recorded in an embedlab or sentence-transformers folder."""
    cfg: dict = {}
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        cfg.update(json.loads(st_cfg.read_text()))
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        cfg["normalize"] = any(m["type"].endswith("Normalize") for m in modules)
        dense = [m for m in modules if m["type"].endswith("Dense")]
        if len(dense) > 1:
            raise ModelLoadError(f"{modules_file}: more than one Dense module; embedlab supports one")
        if dense:
            cfg["dense_path"] = dense[0]["path"]
        for m in modules:
            if m["type"].endswith("Pooling"):
                pcfg = json.loads((folder / m["path"] / "config.json").read_text())
                for mode, flag in ST_POOLING_FLAGS.items():
                    if pcfg.get(flag):
                        cfg["pooling"] = mode
                        break
    st_main = folder / "config_sentence_transformers.json"
    if st_main.is_file():
        prompts = json.loads(st_main.read_text()).get("prompts") or {}
        if "query" in prompts:
            cfg["query_prompt"] = prompts["query"]
        if "document" in prompts:
            cfg["document_prompt"] = prompts["document"]
    embedlab_cfg = folder / "embedlab_config.json"
    if embedlab_cfg.is_file():
        cfg.update(json.loads(embedlab_cfg.read_text()))
    return cfg


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")

