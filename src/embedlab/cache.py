"""A disk cache of embeddings: encode a text once per model, read it back (memory-mapped) every later time.

Re-evaluating the same weights on the same corpus (the zero-shot baseline of every sweep job, a test step after
validation encoded the corpus with the same weights, teacher embeddings for distillation) need not encode again.
A row is found by two keys:

- the **model fingerprint** (:func:`model_fingerprint`): a hash of everything that changes an embedding: every
  parameter and buffer (name, dtype, shape, bytes), the tokenizer (its serialized vocabulary and rules), the
  backbone's config, pooling, the dense layer's activation, normalization, and the kind's truncation length and
  prompt, plus the numerics the rows are computed under (autocast dtype; on CUDA the float32 matmul precision).
  Queries and documents share rows when their length and prompt agree (the kind itself is not hashed). The device
  is not hashed either: the same weights on CPU and GPU agree to float round-off, so they share rows;
- the **text key** (:func:`text_key`): 16 bytes of BLAKE2b of the UTF-8 text (never Python's ``hash``, which is
  salted per process).

Layout: ``<root>/<fingerprint>/`` holds shards, each three files:

- ``<shard>.data.npy``: float32 ``(rows, dim)``, read with ``np.load(mmap_mode="r")``;
- ``<shard>.keys.npy``: uint8 ``(rows, 16)``, the text keys of the rows, in order;
- ``<shard>.json``: the manifest (rows, dim, each file's size and BLAKE2b), written LAST.

A shard is named by a hash of its content, so two writers (two DDP ranks, two sweep jobs) storing the same rows
write the same three files, byte for byte, and rows that differ go to different names: no interleaving of their
renames mixes two contents. Each file is written to a unique temporary sibling and renamed into place
(:func:`embedlab.atomic.atomic_file`): a crash leaves a ``.*.tmp`` file, never a cut-off file under a shard's
name. A shard is read only when its manifest is valid and both files match it (size and checksum, verified once
per :class:`EmbeddingCache` instance); otherwise it is ignored with one warning, its texts are encoded again, and
a damaged shard (manifest present, files not matching) is deleted. Files without a manifest may belong to a
writer still at work: they are left alone, and deleted once older than :data:`STALE_SECONDS`.

Docs: ``docs/cache.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from embedlab.atomic import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

#: manifest format; a manifest of another format is ignored (its rows are encoded again)
FORMAT = 1
#: bytes of BLAKE2b per text key: 128 bits keep a collision (a wrong row read back) out of reach for any corpus
KEY_BYTES = 16
#: files of a shard without a manifest, and temporary files, older than this are a crashed writer's: deleted
STALE_SECONDS = 3600
#: backbone config entries that name, version or describe a model without changing what it computes
_CONFIG_NOISE = (
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "id2label", "label2id",
)


def text_key(text: str) -> bytes:
    """The 16-byte key of one text: BLAKE2b of its UTF-8 bytes (the same in every process and run)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=KEY_BYTES).digest()


# ---------------------------------------------------------------------------------------------- fingerprints
def weights_digest(model) -> str:
    """A hex hash of what a :class:`~embedlab.models.BiEncoder` computes, whatever the kind: parameters and
    buffers, tokenizer, backbone config, pooling, dense activation, normalization.

    Each tensor contributes its name, dtype, shape and contiguous CPU bytes, in ``named_parameters`` then
    ``named_buffers`` order: one pass over the weights (a copy to CPU for weights on a GPU). A cast to another
    dtype changes the bytes and the dtype, so precision is covered too.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"embedlab-cache-weights\0")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        t = tensor.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # (numel * itemsize,) bytes; .view(uint8) reinterprets any dtype, bfloat16 included (numpy has none)
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    transformer = model.transformer
    h.update(_tokenizer_spec(transformer.tokenizer).encode())
    settings = {
        "backbone": type(transformer.backbone).__name__,
        "config": _backbone_config(transformer.backbone),
        "do_lower_case": bool(transformer.do_lower_case),
        "pooling": model.pooling.mode,
        "dense_activation": getattr(model.dense, "activation_name", None),
        "normalize": model.normalize is not None,
    }
    h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _backbone_config(backbone) -> dict[str, Any]:
    """The backbone's Hugging Face config without names, versions and flags that change no output."""
    config = getattr(backbone, "config", None)
    if config is None:
        return {}
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}


#: the head of a fast tokenizer's serialization: its truncation and padding state, which every call rewrites
_TOKENIZER_STATE = re.compile(
    r'^\{"version":"[^"]*",'
    r'"truncation":(?:null|\{[^{}]*\}),'
    r'"padding":(?:null|\{(?:[^{}]|\{[^{}]*\})*\}),'  # padding's strategy may be {"Fixed": n}
    r'(?="added_tokens":)'
)


def _tokenizer_spec(tokenizer) -> str:
    """A stable text of the tokenizer's vocabulary and rules.

    A fast tokenizer serializes its whole pipeline (normalizer, pre-tokenizer, vocabulary, added tokens); its
    ``truncation`` / ``padding`` entries are cut off (every call rewrites them): by a pattern on the head of the
    text (the serialization's fixed field order), else by parsing the JSON (slower: the whole vocabulary is
    serialized again). A slow tokenizer gives its vocabulary and scalar init options (paths left out: a copy elsewhere is
    the same tokenizer).
    """
    sides = f"{type(tokenizer).__name__}\0{getattr(tokenizer, 'padding_side', None)}\0"
    sides += f"{getattr(tokenizer, 'truncation_side', None)}\0"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        head = _TOKENIZER_STATE.match(text)
        if head is not None:
            return sides + text[head.end():]
        spec = json.loads(text)
        spec.pop("truncation", None)
        spec.pop("padding", None)
        return sides + json.dumps(spec, sort_keys=True, ensure_ascii=False)
    options = {
        k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
        if isinstance(v, (str, int, float, bool, type(None))) and k != "name_or_path" and not k.endswith("_file")
    }
    spec = {"vocab": sorted(tokenizer.get_vocab().items()), "options": options}
    return sides + json.dumps(spec, sort_keys=True, ensure_ascii=False)


def numerics(device_type: str) -> dict[str, Any]:
    """The numeric settings embeddings computed now on ``device_type`` depend on besides the weights: the
    autocast dtype (when autocast is on there) and, on CUDA, the float32 matmul precision (TF32 or not)."""
    out: dict[str, Any] = {"autocast": None}
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): nothing to record
        enabled = False
    if enabled:
        out["autocast"] = str(torch.get_autocast_dtype(device_type))
    if device_type == "cuda":
        out["float32_matmul"] = torch.get_float32_matmul_precision()
    return out


def model_fingerprint(model, kind: str, weights: str | None = None, device_type: str | None = None) -> str:
    """The hex fingerprint of ``model``'s ``kind`` (``query`` / ``document``) embeddings: equal strings mean
    equal embeddings (up to float round-off between devices), in any process.

    Args:
        model: a :class:`~embedlab.models.BiEncoder`.
        kind: whose truncation length and prompt count.
        weights: :func:`weights_digest` of ``model`` when the caller already has it (one pass over the weights
            for several kinds); computed here otherwise.
        device_type: the device the rows are (or will be) computed on, for :func:`numerics` (default: the
            model's). Called inside an autocast region (a Lightning ``*-mixed`` evaluation step) it sees that.
    """
    if kind not in ("query", "document"):
        raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
    weights = weights or weights_digest(model)
    device_type = device_type or model.device.type  # (an ONNX Runtime backbone has no parameter)
    side = {
        "format": FORMAT,
        "weights": weights,
        "max_seq_length": model.max_seq_length[kind],
        "prompt": model.prompts[kind],
        "numerics": numerics(device_type),
    }
    return hashlib.blake2b(json.dumps(side, sort_keys=True).encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------- the cache
class _Index:
    """What one process knows of one fingerprint's folder: readable shards and where each key's row is."""

    def __init__(self) -> None:
        self.data: list[np.ndarray] = []  # per shard: (rows, dim) float32, memory-mapped
        self.where: dict[bytes, int] = {}  # text key -> shard << 32 | row (first shard, by name, wins)
        self.dim: int | None = None
        self.loaded: set[str] = set()
        self.rejected: dict[str, tuple[int, int]] = {}  # shard -> its manifest's (mtime_ns, size) when rejected
        self.orphans_warned: set[str] = set()


class EmbeddingCache:
    """Embeddings on disk under ``root``, by model fingerprint and text key (see the module doc).

    Safe for several processes on one folder (DDP ranks, sweep jobs, a shared filesystem with atomic rename).
    An instance keeps, per fingerprint, an index of the shards it has read; it looks for new shards (another
    writer's) at each :meth:`lookup` with one folder listing.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._indexes: dict[str, _Index] = {}

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def __getstate__(self) -> dict:
        # memory maps do not travel to another process: a copy rebuilds its indexes from disk
        return {"root": self.root, "_indexes": {}}

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        model,
        texts: Sequence[str],
        kind: str = "document",
        batch_size: int = 64,
        show_progress_bar: bool = False,
        desc: str | None = None,
        fingerprint: str | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """``model.encode(texts, kind, ...)`` through the cache: float32 CPU ``(N, D)`` in input order.

        Rows already cached under the fingerprint are read; the missing texts (each distinct text once) are
        encoded by ``model.encode`` and stored as one new shard (a folder that cannot be written is a warning:
        the rows are returned all the same).

        ``fingerprint``: :func:`model_fingerprint` when the caller has it (computed here otherwise).
        ``device``: move the model there before encoding the missing texts, so that a full hit never touches the
        device (no CUDA start-up for a cached evaluation).
        """
        if fingerprint is None:
            device_type = torch.device(device).type if device is not None else None
            fingerprint = model_fingerprint(model, kind, device_type=device_type)
        keys = [text_key(t) for t in texts]
        found, missing = self._lookup_keys(fingerprint, keys)
        if not missing:
            return found if found is not None else model.encode([], kind=kind)
        first: dict[bytes, int] = {}  # a missing text's key -> its row in `new`
        for pos in missing:
            first.setdefault(keys[pos], pos)
        todo = list(first.values())
        if device is not None:
            model.to(device)
        new = model.encode(
            [texts[p] for p in todo], kind=kind, batch_size=batch_size, show_progress_bar=show_progress_bar, desc=desc
        )  # (M, D)
        try:
            self.store(fingerprint, [texts[p] for p in todo], new)
        except OSError as err:  # a read-only or full cache folder: the rows are still good, only not kept
            log.warning("embedding cache: could not store %d rows under %s (%s)", len(todo), self.root / fingerprint, err)
        out = found if found is not None else torch.zeros(len(texts), new.shape[1], dtype=torch.float32)
        row_of = {keys[p]: i for i, p in enumerate(todo)}
        out[missing] = new[[row_of[keys[p]] for p in missing]].float()
        return out

    # ------------------------------------------------------------------ read
    def lookup(self, fingerprint: str, texts: Sequence[str]) -> tuple[torch.Tensor | None, list[int]]:
        """The cached rows of ``texts`` under ``fingerprint``.

        Returns ``(rows, missing)``: ``rows`` is float32 CPU ``(N, D)`` with the cached texts' embeddings at
        their positions and zeros at the missing ones, or ``None`` when no text is cached; ``missing`` lists the
        positions (ascending) whose texts are not cached.
        """
        return self._lookup_keys(fingerprint, [text_key(t) for t in texts])

    def _lookup_keys(self, fingerprint: str, keys: Sequence[bytes]) -> tuple[torch.Tensor | None, list[int]]:
        index = self._refresh(fingerprint)
        where = index.where
        # (N,) shard << 32 | row of each key; -1: missing
        packed = np.fromiter((where.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(packed < 0).tolist()
        if len(missing) == len(keys):
            return None, missing
        out = np.zeros((len(keys), index.dim), dtype=np.float32)
        hit = np.flatnonzero(packed >= 0)
        shards, rows = packed[hit] >> 32, packed[hit] & 0xFFFFFFFF
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            sel = sel[np.argsort(rows[sel], kind="stable")]  # ascending rows: sequential reads of the map
            out[hit[sel]] = index.data[int(shard)][rows[sel]]
        return torch.from_numpy(out), missing

    def _refresh(self, fingerprint: str) -> _Index:
        """The fingerprint's index, with any shard that appeared since the last call read in."""
        index = self._indexes.setdefault(fingerprint, _Index())
        folder = self.root / fingerprint
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return index
        manifests = {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}
        for shard in sorted(manifests - index.loaded):
            if shard in index.rejected and index.rejected[shard] == _stat_of(folder / f"{shard}.json"):
                continue  # the same bad manifest as before: warned about already
            self._load_shard(index, folder, shard)
        self._sweep(index, folder, names, manifests)
        return index

    def _load_shard(self, index: _Index, folder: Path, shard: str) -> None:
        manifest_path = folder / f"{shard}.json"
        stat = _stat_of(manifest_path)
        problem = None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            problem = _check_manifest(manifest, folder, shard, index.dim)
        except (OSError, ValueError) as err:
            problem = f"unreadable manifest ({type(err).__name__}: {err})"
        if problem is None:
            try:
                data = np.load(folder / f"{shard}.data.npy", mmap_mode="r")
                keys = np.load(folder / f"{shard}.keys.npy")
            except (OSError, ValueError) as err:
                problem = f"unreadable array ({type(err).__name__}: {err})"
        if problem is None:
            if data.shape != (manifest["rows"], manifest["dim"]) or data.dtype != np.float32:
                expected = (manifest["rows"], manifest["dim"])
                problem = f"data holds {data.dtype} {data.shape}, manifest says float32 {expected}"
            elif keys.shape != (manifest["rows"], KEY_BYTES) or keys.dtype != np.uint8:
                problem = f"keys hold {keys.dtype} {keys.shape}, manifest says uint8 ({manifest['rows']}, {KEY_BYTES})"
        if problem is not None:
            log.warning(
                "embedding cache: shard %s ignored (%s); its texts are encoded again and the shard is deleted",
                folder / shard, problem,
            )
            index.rejected[shard] = stat
            _delete_shard(folder, shard)
            return
        number = len(index.data)
        index.data.append(data)
        index.dim = manifest["dim"]
        index.loaded.add(shard)
        for row, key in enumerate(keys):
            index.where.setdefault(key.tobytes(), number << 32 | row)

    def _sweep(self, index: _Index, folder: Path, names: list[str], manifests: set[str]) -> None:
        """Warn once about shard files without a manifest; delete them, and temporary files, once stale."""
        now = time.time()
        for name in names:
            path = folder / name
            if name.startswith("."):
                if name.endswith(".tmp") and _age(path, now) > STALE_SECONDS:
                    path.unlink(missing_ok=True)
                continue
            shard, _, part = name.partition(".")
            if part not in ("data.npy", "keys.npy") or shard in manifests:
                continue  # a manifest, a complete shard's file, or no file of the cache
            if _age(path, now) > STALE_SECONDS:
                path.unlink(missing_ok=True)
            elif shard not in index.orphans_warned:
                index.orphans_warned.add(shard)
                log.warning(
                    "embedding cache: shard %s has no manifest (a write that did not finish, or one in progress): "
                    "ignored; its texts are encoded again", folder / shard,
                )

    # ------------------------------------------------------------------ write
    def store(self, fingerprint: str, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store ``embeddings`` ``(N, D)`` (row i embeds ``texts[i]``) under ``fingerprint`` as one new shard.

        Texts already cached, and repeats within ``texts`` (first row kept), are left out; nothing is written
        when none is left. Raises ``ValueError`` when the shape does not match ``texts`` or the cached rows' width.
        """
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"store: {len(texts)} texts but embeddings of shape {tuple(embeddings.shape)}")
        index = self._refresh(fingerprint)
        if index.dim is not None and embeddings.shape[1] != index.dim:
            raise ValueError(
                f"store: embeddings are {embeddings.shape[1]}-d, the cache holds {index.dim}-d rows for {fingerprint}"
            )
        keep: dict[bytes, int] = {}
        for i, text in enumerate(texts):
            key = text_key(text)
            if key not in index.where:
                keep.setdefault(key, i)
        if not keep:
            return
        rows = list(keep.values())
        data = np.ascontiguousarray(embeddings.detach()[rows].float().cpu().numpy())  # (M, D) float32
        keys = np.frombuffer(b"".join(keep), dtype=np.uint8).reshape(len(keep), KEY_BYTES)  # (M, 16)
        name = hashlib.blake2b(keys.tobytes() + data.tobytes(), digest_size=12).hexdigest()
        folder = self.root / fingerprint
        files = {}
        for part, array in (("data", data), ("keys", keys)):
            with atomic_file(folder / f"{name}.{part}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, array)
                files[part] = {"bytes": tmp.stat().st_size, "blake2b": _file_digest(tmp)}
        manifest = {"format": FORMAT, "fingerprint": fingerprint, "rows": len(rows), "dim": data.shape[1], **files}
        atomic_write_text(folder / f"{name}.json", json.dumps(manifest, indent=1) + "\n")
        # read back through the same checks as any other shard (and memory-mapped, not held in memory twice)
        index.rejected.pop(name, None)
        if name not in index.loaded:
            self._load_shard(index, folder, name)


def cache_from_options(options: Mapping[str, Any]) -> tuple[EmbeddingCache | None, dict[str, Any]]:
    """Split the ``eval`` options: ``(EmbeddingCache(eval.cache_dir) or None, the evaluator options)``.

    ``cache_dir`` is no evaluator option (``build_evaluator`` rejects unknown names), so callers build the
    evaluator from the second element.
    """
    rest = dict(options)
    root = rest.pop("cache_dir", None)
    return (EmbeddingCache(root) if root else None), rest


# ---------------------------------------------------------------------------------------------- file checks
def _check_manifest(manifest: Any, folder: Path, shard: str, dim: int | None) -> str | None:
    """Why the manifest or its files cannot be read (``None``: they can): fields, sizes, then checksums."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT}"
    if manifest.get("fingerprint") != folder.name:
        return f"manifest fingerprint {manifest.get('fingerprint')!r} is not its folder's"
    for field in ("rows", "dim"):
        value = manifest.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"manifest {field} is {value!r}, expected a positive integer"
    if dim is not None and manifest["dim"] != dim:
        return f"{manifest.get('dim')}-d rows, the other shards hold {dim}-d"
    for part in ("data", "keys"):
        path = folder / f"{shard}.{part}.npy"
        expected = manifest.get(part) or {}
        if not path.is_file():
            return f"{path.name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{path.name} has {size} bytes, the manifest says {expected.get('bytes')} (cut off mid-write?)"
        if _file_digest(path) != expected.get("blake2b"):
            return f"{path.name} does not match its checksum"
    return None


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _stat_of(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _delete_shard(folder: Path, shard: str) -> None:
    """Remove a damaged shard, manifest first (a reader then sees files without a manifest, never the reverse)."""
    for suffix in (".json", ".data.npy", ".keys.npy"):
        (folder / f"{shard}{suffix}").unlink(missing_ok=True)
