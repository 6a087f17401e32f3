"""Cross-encoder: one transformer reads a (query, document) pair together and outputs relevance logits.

A bi-encoder embeds query and document apart and compares vectors; a cross-encoder feeds
``[CLS] query [SEP] document [SEP]`` through every layer, so each query token attends to each document
token. It scores better and cannot precompute anything: the usual second stage that reranks a first
stage's top candidates (Nogueira & Cho 2019, "Passage Re-ranking with BERT").

``CrossEncoder`` wraps a Hugging Face ``AutoModelForSequenceClassification`` (backbone + pooler +
linear head giving ``num_labels`` logits) and its tokenizer. ``forward`` returns raw logits (what the
score losses of :mod:`embedlab.losses` take); ``predict`` adds the activation (sigmoid for one label).
The on-disk format is a plain Hugging Face sequence-classification folder whose ``config.json`` carries
sentence-transformers' ``"sentence_transformers": {"activation_fn": ...}`` entry, so
``sentence_transformers.CrossEncoder(path).predict(pairs)`` gives the same scores. Truncation follows
sentence-transformers too: the pair is cut to ``max_length`` tokens, always from the longer of the two
texts (``truncation="longest_first"``).
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from embedlab.atomic import atomic_dir
from embedlab.models.bi_encoder import check_model_path, hub_error, model_load_kwargs
from embedlab.models.cpu_dropout import use_fast_cpu_dropout
from embedlab.models.errors import ModelLoadError

#: the ``_target_`` under which :meth:`CrossEncoder.from_pretrained` records itself in :attr:`CrossEncoder.config`
CROSS_ENCODER_TARGET = "embedlab.models.CrossEncoder.from_pretrained"
#: embedlab activation name -> the class path sentence-transformers stores as ``activation_fn``
ST_ACTIVATIONS = {"sigmoid": "torch.nn.modules.activation.Sigmoid", "identity": "torch.nn.modules.linear.Identity"}
#: truncation length when neither the caller nor the folder's tokenizer gives a usable one
DEFAULT_MAX_LENGTH = 512
#: tokenizers without a length limit report ``model_max_length`` as a huge sentinel (about 1e30)
_NO_LIMIT = 1_000_000
#: inputs the sequence-classification models take from the tokenizer
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_activation(num_labels: int) -> str:
    """sentence-transformers' default: ``sigmoid`` for one label (a relevance probability), else ``identity``."""
    return "sigmoid" if num_labels == 1 else "identity"


class CrossEncoder(nn.Module):
    """Score (query, document) pairs jointly with a sequence-classification transformer.

    Args:
        model: a transformers ``AutoModelForSequenceClassification`` model (``num_labels`` outputs).
        tokenizer: its tokenizer; pairs become ``[CLS] q [SEP] d [SEP]`` with segment ids 0 / 1.
        max_length: truncation length of the whole pair, in tokens (special tokens included).
        activation: ``sigmoid`` or ``identity``, applied by :meth:`predict` only (training losses take
            the raw logits); ``None``: sigmoid for one label, identity otherwise.
        config: how the model was built, ``{"_target_": <builder>, <its arguments>}`` (set by
            :meth:`from_pretrained` and :func:`~embedlab.models.tiny.tiny_cross_encoder`); :attr:`config`
            adds the current settings so a checkpoint that stores it can rebuild the model.
    """

    def __init__(
        self, model: nn.Module, tokenizer, max_length: int, activation: str | None = None, config: dict | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.activation = default_activation(self.num_labels) if activation is None else activation
        self.build_args = dict(config) if config is not None else None

    # ------------------------------------------------------------------ settings
    @property
    def num_labels(self) -> int:
        """Logits per pair: 1 for a relevance score, more for classification (e.g. NLI)."""
        return int(self.model.config.num_labels)

    @property
    def max_length(self) -> int:
        """Truncation length of a tokenized pair, special tokens included."""
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"model.max_length must be a positive integer, got {value!r}")
        limit = _position_limit(self.model.config)
        if limit is not None and value > limit:
            raise ModelLoadError(
                f"model.max_length={value} exceeds the model's {limit} position embeddings; use at most {limit}"
            )
        self._max_length = value

    @property
    def activation(self) -> str:
        """``sigmoid`` or ``identity``: what :meth:`predict` applies to the logits."""
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        if value not in ST_ACTIVATIONS:
            raise ModelLoadError(f"model.activation must be one of {', '.join(ST_ACTIVATIONS)}, got {value!r}")
        self._activation = value

    @property
    def config(self) -> dict | None:
        """A plain dict that rebuilds this model: ``{"_target_": ..., **args}``; ``None`` if built directly."""
        if self.build_args is None:
            return None
        return {
            **self.build_args,
            "num_labels": self.num_labels,
            "max_length": self.max_length,
            "activation": self.activation,
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ forward
    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize pairs ``[CLS] q [SEP] d [SEP]``, truncated to :attr:`max_length` longest-first and
        padded to the longest pair; tensors (B, L) on :attr:`device`."""
        if len(queries) != len(documents):
            raise ValueError(f"got {len(queries)} queries but {len(documents)} documents: they must pair up")
        features = self.tokenizer(
            list(queries),
            list(documents),
            padding=True,
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in features.items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized pairs -> raw logits (B, num_labels), in the model's dtype."""
        inputs = {k: v for k, v in features.items() if k in _MODEL_INPUTS}
        return self.model(**inputs, return_dict=True).logits

    @torch.inference_mode()
    def predict(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int = 32,
        apply_activation: bool = True,
        show_progress_bar: bool = False,
        desc: str = "score",
    ) -> torch.Tensor:
        """Score ``pairs`` without gradients: float32 CPU tensor (P,) for one label, else (P, num_labels),
        in input order; :attr:`activation` applied unless ``apply_activation=False``.

        All pairs are tokenized in one call without padding, then batched by exact token count, longest
        first, so each batch pads as little as possible (padding never changes a score). Eval mode for
        the call; the training flag is restored afterwards.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        pairs = pairs if isinstance(pairs, list) else list(pairs)
        count = len(pairs)
        logits = torch.empty(count, self.num_labels, dtype=torch.float32)
        if count:
            was_training = self.training
            self.eval()
            try:
                self._score_into(logits, pairs, batch_size, show_progress_bar, desc)
            finally:
                self.train(was_training)
        if apply_activation:
            logits = self.activate(logits)
        return logits.squeeze(1) if self.num_labels == 1 else logits

    def head_parameter_prefixes(self) -> list[str]:
        """Name prefixes (as in ``named_parameters()``) of the scoring head: every parameter outside the
        backbone (e.g. ``model.classifier``) and the backbone's pooler when the head reads it (BERT's
        ``model.bert.pooler``). A head started on an encoder folder is new, so training can give these a larger
        learning rate than the pretrained backbone (``module.head_lr_multiplier``)."""
        backbone = self.model.base_model_prefix
        outside = sorted({name.split(".")[1] for name, _ in self.named_parameters() if name.split(".")[1] != backbone})
        prefixes = [f"model.{name}" for name in outside]
        if any(name.startswith(f"model.{backbone}.pooler.") for name, _ in self.named_parameters()):
            prefixes.append(f"model.{backbone}.pooler")
        return prefixes

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores ``predict`` returns from raw logits: :attr:`activation` applied (sigmoid or identity)."""
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits

    def _score_into(self, out: torch.Tensor, pairs: list, batch_size: int, show_progress_bar: bool, desc: str) -> None:
        """Fill ``out`` (P, num_labels) with the raw logits of ``pairs``."""
        encodings = self.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation="longest_first",
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )
        lengths = [len(ids) for ids in encodings["input_ids"]]
        order = sorted(range(len(pairs)), key=lengths.__getitem__, reverse=True)  # stable: ties keep input order
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0, "token_type_ids": self.tokenizer.pad_token_type_id}
        left = self.tokenizer.padding_side == "left"
        device = self.device
        # logits in sorted order, kept on the device until the end: no host sync per batch on a GPU
        ranked = torch.empty(len(pairs), self.num_labels, dtype=torch.float32, device=device)
        starts = range(0, len(pairs), batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress_bar, leave=False):
            idx = order[start : start + batch_size]
            features = _pad(encodings, idx, [lengths[i] for i in idx], pad_values, left)
            features = {k: v.to(device, non_blocking=True) for k, v in features.items()}
            ranked[start : start + len(idx)] = self(features)
        out[order] = ranked.cpu()

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write a Hugging Face sequence-classification folder that sentence-transformers loads as is.

        Files: ``config.json`` (with ``"sentence_transformers": {"activation_fn", "version"}``),
        ``model.safetensors``, the tokenizer files with ``model_max_length`` = :attr:`max_length`. Written
        next to ``path`` and renamed onto it when complete (:func:`embedlab.atomic.atomic_dir`).
        """
        path = Path(path)
        saved_limit = self.tokenizer.model_max_length
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            try:
                self.tokenizer.model_max_length = self.max_length
                self.tokenizer.save_pretrained(tmp)
            finally:
                self.tokenizer.model_max_length = saved_limit
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            config["sentence_transformers"] = {"activation_fn": ST_ACTIVATIONS[self.activation], "version": _st_version()}
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        num_labels: int | None = None,
        max_length: int | None = None,
        activation: str | None = None,
        require_head: bool = False,
        torch_dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        fast_cpu_dropout: bool = False,
        seed: int | None = None,
    ) -> "CrossEncoder":
        """Load a cross-encoder folder, start one from an encoder folder, or rebuild an embedlab ``.ckpt``.

        ``path``:

        - a sequence-classification folder (saved by embedlab, by sentence-transformers 4-6, or a Hub
          reranker such as ``cross-encoder/ms-marco-MiniLM-L6-v2``): its trained head is loaded;
        - a plain encoder or sentence-transformers bi-encoder folder (``BertModel``, e.g. all-MiniLM-L6-v2):
          the backbone is loaded and a new head with ``num_labels`` outputs (default 1) is initialised,
          from ``seed`` when given (same seed, same head); ``require_head=True`` refuses such a folder
          (a reranker must have a trained head);
        - a ``.ckpt`` of an embedlab cross-encoder run (:func:`embedlab.models.checkpoint.load_checkpoint`).

        ``max_length``: ``None`` takes the folder tokenizer's ``model_max_length`` (512 when it sets no
        limit), capped at the model's position embeddings, as sentence-transformers does. ``activation``:
        ``None`` takes the folder's sentence-transformers ``activation_fn``, else sigmoid for one label and
        identity otherwise. ``torch_dtype``, ``attn_implementation``, ``trust_remote_code`` and
        ``fast_cpu_dropout`` mean what they mean in :meth:`embedlab.models.BiEncoder.from_pretrained`.
        """
        options = {k: v for k, v in locals().items() if k not in ("cls", "path")}
        for name in ("require_head", "trust_remote_code", "fast_cpu_dropout"):
            if not isinstance(options[name], bool):
                raise ModelLoadError(f"model.{name} must be true or false, got {options[name]!r}")
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
            raise ModelLoadError(f"model.num_labels must be a positive integer, got {num_labels!r}")
        if activation is not None and activation not in ST_ACTIVATIONS:
            raise ModelLoadError(f"model.activation must be one of {', '.join(ST_ACTIVATIONS)}, got {activation!r}")
        path = str(path)
        if path.endswith(".ckpt"):
            from embedlab.models.checkpoint import load_checkpoint

            return load_checkpoint(path, model_class=cls, **options)
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        check_model_path(path)
        kwargs = model_load_kwargs(torch_dtype, attn_implementation, trust_remote_code)
        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise hub_error(path, err) from err
        architectures = list(getattr(hf_config, "architectures", None) or [])
        has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
        if require_head and not has_head:
            raise ModelLoadError(_no_head_message(path, architectures))
        if has_head and num_labels is not None and num_labels != hf_config.num_labels:
            raise ModelLoadError(
                f"model folder {path!r} has a trained head with {hf_config.num_labels} labels, but num_labels="
                f"{num_labels} was asked for (a new head would discard it); remove num_labels or pick another folder"
            )
        labels = hf_config.num_labels if has_head else (num_labels or 1)
        with torch.random.fork_rng(devices=[]):  # a seeded head leaves the caller's random stream untouched
            if seed is not None:
                torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels, **kwargs)
        if fast_cpu_dropout:
            use_fast_cpu_dropout(model)
        if max_length is None:
            max_length = _folder_max_length(tokenizer, model.config)
        if activation is None:
            activation = _folder_activation(Path(path), hf_config) or default_activation(labels)
        build_args = {
            "_target_": CROSS_ENCODER_TARGET,
            "path": path,
            "torch_dtype": torch_dtype,
            "attn_implementation": attn_implementation,
            "trust_remote_code": trust_remote_code,
            "fast_cpu_dropout": fast_cpu_dropout,
            "seed": seed,
        }
        return cls(model, tokenizer, max_length=max_length, activation=activation, config=build_args)


def _pad(
    encodings: dict[str, list[list[int]]], idx: list[int], lengths: list[int], pad_values: dict[str, int], left: bool
) -> dict[str, torch.Tensor]:
    """Unpadded token lists of the pairs ``idx`` -> padded (B, L) tensors and the attention mask.

    The mask's True cells, read row by row, are exactly the tokens of the pairs in order (right padding
    puts each row's tokens first, left padding last), so one flat tensor fills every input at once.
    """
    width = max(lengths)
    n_tokens = torch.tensor(lengths)
    positions = torch.arange(width)
    mask = positions >= (width - n_tokens)[:, None] if left else positions < n_tokens[:, None]  # (B, L)
    features = {"attention_mask": mask.long()}
    for key, pad in pad_values.items():
        if key in encodings:
            values = torch.full((len(idx), width), pad, dtype=torch.long)
            values[mask] = torch.tensor(list(chain.from_iterable(encodings[key][i] for i in idx)), dtype=torch.long)
            features[key] = values
    return features


def _position_limit(config) -> int | None:
    """The model's number of position embeddings, or None when it has no fixed limit."""
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def _folder_max_length(tokenizer, config) -> int:
    """The tokenizer's ``model_max_length`` (512 if unlimited), capped at the position embeddings."""
    length = tokenizer.model_max_length
    if not isinstance(length, int) or length < 1 or length > _NO_LIMIT:
        length = DEFAULT_MAX_LENGTH
    limit = _position_limit(config)
    return min(length, limit) if limit is not None else length


def _folder_activation(folder: Path, hf_config) -> str | None:
    """The activation a sentence-transformers cross-encoder folder records, as an embedlab name.

    sentence-transformers 6 writes ``activation_fn`` to ``config_sentence_transformers.json``; versions 4-5
    wrote it to ``config.json`` under ``sentence_transformers``, before that ``sbert_ce_default_activation_function``.
    """
    recorded = None
    st_file = folder / "config_sentence_transformers.json"
    if st_file.is_file():
        recorded = json.loads(st_file.read_text()).get("activation_fn")
    if recorded is None:
        recorded = (getattr(hf_config, "sentence_transformers", None) or {}).get("activation_fn")
    if recorded is None:
        recorded = getattr(hf_config, "sbert_ce_default_activation_function", None)
    if recorded is None:
        return None
    names = {v: k for k, v in ST_ACTIVATIONS.items()}
    if recorded not in names:
        raise ModelLoadError(
            f"model folder {str(folder)!r} records activation_fn {recorded!r}; embedlab supports "
            f"{', '.join(ST_ACTIVATIONS.values())}: set model.activation to sigmoid or identity"
        )
    return names[recorded]


def _no_head_message(path: str, architectures: list[str]) -> str:
    """Why a folder without a sequence-classification head cannot serve as a cross-encoder."""
    folder = Path(path)
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        if any(m.get("type", "").endswith("Pooling") for m in modules):
            looks = "a bi-encoder folder (modules.json with Pooling)"
        else:
            looks = "a sentence-transformers folder without a scoring head"
    else:
        looks = "a plain encoder folder (no modules.json)"
    return (
        f"{path} is not a cross-encoder: no sequence-classification head in its config.json (architectures: "
        f"{', '.join(architectures) or 'none'}); it looks like {looks}. rerank.model needs a cross-encoder "
        "(e.g. the model/ folder of a train.py experiment=cross_encoder_scifact run)"
    )


def _st_version() -> str:
    """The version string sentence-transformers writes into a saved cross-encoder's config.json."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sentence-transformers")
    except PackageNotFoundError:  # any string will do: sentence-transformers only records it
        return "embedlab"
