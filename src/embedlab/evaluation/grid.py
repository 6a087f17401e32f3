"""Compression grid: retrieval quality, bytes per vector and search time for every (space, precision) cell.

The corpus and queries are embedded once; every cell only transforms those embeddings:

- space: the first ``d`` dimensions (Matryoshka truncation, re-normalized) for each ``d`` in ``dims``, or a
  PCA to ``k`` dimensions fitted on the corpus for each ``k`` in ``pca``;
- precision: ``float32``, ``float16``, ``int8`` / ``uint8`` (scalar quantization calibrated on the corpus),
  ``binary`` (sign bits, Hamming search) or ``binary_rescore`` (Hamming search for
  ``top_k * rescore_multiplier`` candidates, rescored with the float query against ``rescore_with``
  documents: int8 by default, as in Shakir et al. 2024, "Binary and Scalar Embedding Quantization").

Each cell reports the bytes it stores per document (:mod:`embedlab.evaluation.storage`): ``index_bytes`` (what is
searched), ``rescore_bytes`` (the rescoring copy of ``binary_rescore``; 0 otherwise) and their sum,
``bytes_per_vector``, which the plot's x axis shows.

Metric keys (``prefix`` = ``val/`` or ``test/``): ``{prefix}{metric}@{k}@{space}`` for float32 and
``{prefix}{metric}@{k}@{space}@{precision}`` otherwise, where space is ``dim{d}`` or ``pca{k}``; the same
suffixes on ``{prefix}index_bytes``, ``{prefix}rescore_bytes``, ``{prefix}bytes_per_vector`` and
``{prefix}search_seconds``. For example ``test/ndcg@10@dim64``, ``test/ndcg@10@dim384@binary_rescore``,
``test/bytes_per_vector@pca128@int8``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from embedlab.errors import ConfigError
from embedlab.evaluation.quantize import binary_quantize, fit_scalar_quantizer
from embedlab.evaluation.quantized_search import binary_rescore_search, hamming_search, scalar_search
from embedlab.evaluation.reduction import fit_pca, truncate
from embedlab.evaluation.search import (
    DEFAULT_CORPUS_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    SEARCHES,
    check_similarity,
)
from embedlab.evaluation.storage import PRECISIONS, RESCORE_WITH, index_bytes, rescore_bytes


@dataclass
class GridCell:
    space: str  # "dim64" / "pca128"
    precision: str
    dim: int
    index_bytes: int  # bytes per document of the searched index
    rescore_bytes: int  # bytes per document of the rescoring copy (binary_rescore), else 0
    search_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # unprefixed: {"ndcg@10": ...}

    @property
    def bytes_per_vector(self) -> int:
        """Everything stored per document: index + rescoring copy."""
        return self.index_bytes + self.rescore_bytes

    @property
    def suffix(self) -> str:
        return f"@{self.space}" if self.precision == "float32" else f"@{self.space}@{self.precision}"

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}{name}{self.suffix}": value for name, value in self.metrics.items()}
        out[f"{prefix}index_bytes{self.suffix}"] = float(self.index_bytes)
        out[f"{prefix}rescore_bytes{self.suffix}"] = float(self.rescore_bytes)
        out[f"{prefix}bytes_per_vector{self.suffix}"] = float(self.bytes_per_vector)
        out[f"{prefix}search_seconds{self.suffix}"] = self.search_seconds
        return out


class CompressionGrid:
    """Evaluate every (space, precision) cell from one pair of query / corpus embeddings.

    Args:
        dims: Matryoshka truncation sizes (``None``/empty: the full size only).
        precisions: any of :data:`embedlab.evaluation.storage.PRECISIONS`.
        pca: PCA sizes (fitted on the corpus embeddings).
        rescore_multiplier: candidates per query kept by the binary stage of ``binary_rescore``, as a
            multiple of ``top_k``.
        rescore_with: ``int8`` (default), ``float32`` or ``binary`` documents for rescoring.
        similarity: ``cos`` re-normalizes each transformed space; ``dot`` keeps raw values.
        search: ``exact`` or ``faiss``: the search of the float32 and float16 cells
            (:data:`embedlab.evaluation.search.SEARCHES`); quantized cells have their own exact searches.
        query_chunk_size / corpus_chunk_size: bound every search's memory.
    """

    def __init__(
        self,
        dims: Sequence[int] | None = None,
        precisions: Sequence[str] = ("float32",),
        pca: Sequence[int] | None = None,
        rescore_multiplier: int = 4,
        rescore_with: str = "int8",
        similarity: str = "cos",
        search: str = "exact",
        query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
        corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
    ) -> None:
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise ConfigError(f"unknown precision(s) {unknown}; valid: {', '.join(PRECISIONS)}")
        if rescore_with not in RESCORE_WITH:
            raise ConfigError(f"rescore_with must be one of {', '.join(RESCORE_WITH)}, got {rescore_with!r}")
        check_similarity(similarity)
        if search not in SEARCHES:
            raise ConfigError(f"search must be one of {', '.join(map(repr, SEARCHES))}, got {search!r}")
        self.dims = [int(d) for d in dims or []]
        self.pca = [int(k) for k in pca or []]
        self.precisions = list(precisions)
        self.rescore_multiplier = int(rescore_multiplier)
        self.rescore_with = rescore_with
        self.similarity = similarity
        self.float_search = SEARCHES[search]
        self.query_chunk_size = query_chunk_size
        self.corpus_chunk_size = corpus_chunk_size

    @property
    def enabled(self) -> bool:
        return bool(self.dims or self.pca or set(self.precisions) - {"float32"})

    def spaces(self, query: torch.Tensor, corpus: torch.Tensor):
        """Yield (name, dim, query, corpus) for each transformed space."""
        full = corpus.shape[1]
        renorm = self.similarity == "cos"
        for d in self.dims or [full]:
            yield f"dim{d}", d, truncate(query, d, renorm), truncate(corpus, d, renorm)
        for k in self.pca:
            pca = fit_pca(corpus, k)
            yield f"pca{k}", k, pca.transform(query, renormalize=renorm), pca.transform(corpus, renormalize=renorm)

    def run(
        self, query: torch.Tensor, corpus: torch.Tensor, top_k: int, score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    ) -> list[GridCell]:
        """Evaluate every cell; ``score(scores, indices)`` turns a search result into unprefixed metrics."""
        cells = []
        for space, dim, q, c in self.spaces(query, corpus):
            for precision in self.precisions:
                start = time.perf_counter()
                scores, indices = self._search(q, c, precision, top_k)
                seconds = time.perf_counter() - start
                stored = index_bytes(dim, precision), rescore_bytes(dim, precision, self.rescore_with)
                cells.append(GridCell(space, precision, dim, *stored, seconds, score(scores, indices)))
        return cells

    def _search(self, q: torch.Tensor, c: torch.Tensor, precision: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = {"query_chunk_size": self.query_chunk_size, "corpus_chunk_size": self.corpus_chunk_size}
        # q and c are already normalized for cos: plain inner products from here on
        if precision in ("float32", "float16"):
            docs = c if precision == "float32" else c.half()  # float16 storage; chunks are upcast to q's float32
            return self.float_search(q, docs, top_k, "dot", **chunks)
        if precision in ("int8", "uint8"):
            quantizer = fit_scalar_quantizer(c, precision)
            return scalar_search(q, quantizer, quantizer.quantize(c), top_k, **chunks)
        bits = binary_quantize(c)
        if precision == "binary":
            distances, indices = hamming_search(binary_quantize(q), bits, top_k, **chunks)
            return -distances.float(), indices  # higher is better for the run
        rescore = None
        if self.rescore_with == "int8":
            quantizer = fit_scalar_quantizer(c, "int8")
            rescore = (quantizer, quantizer.quantize(c))
        elif self.rescore_with == "float32":
            rescore = c
        return binary_rescore_search(
            q, bits, top_k, rescore_multiplier=self.rescore_multiplier, corpus_rescore=rescore, **chunks
        )


def grid_rows(cells: list[GridCell], metric_names: Sequence[str]) -> tuple[list[str], list[list]]:
    """Columns and rows of the grid as a table (W&B table, CSV)."""
    columns = [
        "space", "dim", "precision", "index_bytes", "rescore_bytes", "bytes_per_vector", "search_seconds",
        *metric_names,
    ]
    rows = [
        [c.space, c.dim, c.precision, c.index_bytes, c.rescore_bytes, c.bytes_per_vector, round(c.search_seconds, 6),
         *(c.metrics.get(m) for m in metric_names)]
        for c in cells
    ]
    return columns, rows


def plot_grid(cells: list[GridCell], path: str | Path, metric: str = "ndcg@10", title: str = "") -> Path:
    """PNG of ``metric`` vs bytes stored per vector (index + rescoring copy, log scale): one line per precision
    (and per PCA/Matryoshka family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[GridCell]] = {}
    for c in cells:
        family = c.precision if c.space.startswith("dim") else f"{c.precision} (PCA)"
        families.setdefault(family, []).append(c)
    for family, group in families.items():
        group = sorted(group, key=lambda c: c.bytes_per_vector)
        ax.plot([c.bytes_per_vector for c in group], [c.metrics[metric] for c in group], marker="o",
                linestyle="--" if "PCA" in family else "-", label=family)
        for c in group:
            ax.annotate(str(c.dim), (c.bytes_per_vector, c.metrics[metric]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes stored per vector: index + rescoring copy (log scale; labels: dimensions)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs bytes per vector")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def report_grid(cells: list[GridCell], folder: str | Path, stem: str, loggers=(), metric_names: Sequence[str] = ("ndcg@10", "map@100", "mrr@10", "recall@100")) -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.png`` into ``folder``; log both to loggers that take tables/images (W&B)."""
    import csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the preferred metrics the run has; with other k_values (no @10 / @100), the ones it has
    names = [m for m in metric_names if m in cells[0].metrics] or list(cells[0].metrics)
    columns, rows = grid_rows(cells, names)
    csv_path = folder / f"{stem}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    png_path = plot_grid(cells, folder / f"{stem}.png", metric=names[0], title=stem)
    for lg in loggers:
        if hasattr(lg, "log_table") and hasattr(lg, "log_image"):
            lg.log_table(key=f"{stem}/table", columns=columns, data=rows)
            lg.log_image(key=f"{stem}/plot", images=[str(png_path)])
    return {"csv": csv_path, "png": png_path}
