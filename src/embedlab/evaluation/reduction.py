"""Dimension reduction for the evaluation grid: Matryoshka truncation and PCA.

Both take float ``(N, D)`` embeddings (CPU or GPU) and return ``(N, dim)`` ones that the searches and quantizers
then treat like any other embedding: :func:`truncate` keeps the first ``dim`` coordinates (only meaningful for
Matryoshka-trained models, Kusupati et al. 2022, "Matryoshka Representation Learning"), and :func:`fit_pca`
learns a ``dim``-dimensional projection on the corpus itself, for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedlab.evaluation.search import ROW_CHUNK_SIZE, check_2d


def truncate(emb: torch.Tensor, dim: int, renormalize: bool = True) -> torch.Tensor:
    """Keep the first ``dim`` coordinates of each embedding (Matryoshka truncation).

    Matryoshka-trained models put the most information in the leading coordinates, so ``emb[:, :dim]`` is a
    usable ``dim``-dimensional embedding and storage shrinks by ``D / dim``. Truncation breaks unit norm, so
    with ``renormalize=True`` (the default) rows are L2-normalised again, making dot product = cosine.

    Args:
        emb: ``(N, D)`` float embeddings.
        dim: number of leading coordinates to keep, ``1 <= dim <= D``.
        renormalize: L2-normalise the truncated rows (returns a new ``(N, dim)`` tensor); when ``False`` the
            result is a view of ``emb`` (no copy).

    Raises:
        ValueError: ``"dim must satisfy 1 <= dim <= {D} (the embedding width), got {dim}"``.
    """
    check_2d("emb", emb)
    width = emb.shape[1]
    if not 1 <= dim <= width:
        raise ValueError(f"dim must satisfy 1 <= dim <= {width} (the embedding width), got {dim}")
    out = emb[:, :dim]
    if renormalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=1)
    return out


@dataclass
class PCA:
    """A fitted ``dim``-component PCA: ``transform(x) = (x - mean) @ components.T``.

    Unlike truncation, PCA works for any model: it rotates the corpus onto its directions of largest variance
    and keeps the top ``dim``, so ``4 * dim`` bytes (float32) remain, and composes with the quantizers.

    Attributes:
        mean: ``(D,)`` float32 corpus mean.
        components: ``(dim, D)`` float32 orthonormal principal axes, by decreasing variance; each is signed so its
            largest-magnitude coefficient is positive (deterministic across runs and devices).
        explained_variance: ``(dim,)`` float32 variance along each axis (sample covariance, ``N - 1``).
        explained_variance_ratio: ``(dim,)`` float32 share of the total variance kept by each axis.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def transform(
        self, emb: torch.Tensor, renormalize: bool = False, chunk_size: int = ROW_CHUNK_SIZE
    ) -> torch.Tensor:
        """``(N, D)`` -> ``(N, dim)`` centred projection, ``chunk_size`` rows at a time (no centred ``(N, D)`` copy).
        With ``renormalize=True`` rows are L2-normalised afterwards (dot product = cosine)."""
        check_2d("emb", emb)
        if emb.shape[1] != self.components.shape[1]:
            raise ValueError(f"emb has width {emb.shape[1]}, the PCA was fitted on width {self.components.shape[1]}")
        mean = self.mean.to(emb.device)
        components = self.components.to(emb.device)
        out = torch.empty((emb.shape[0], self.dim), dtype=torch.float32, device=emb.device)
        for start in range(0, emb.shape[0], chunk_size):
            projected = (emb[start : start + chunk_size].float() - mean) @ components.t()  # (n, dim)
            if renormalize:
                projected = torch.nn.functional.normalize(projected, p=2.0, dim=1)
            out[start : start + chunk_size] = projected
        return out


def fit_pca(emb: torch.Tensor, dim: int, chunk_size: int = ROW_CHUNK_SIZE) -> PCA:
    """Fit a ``dim``-component PCA on ``emb`` ``(N, D)`` (usually the corpus embeddings).

    The ``(D, D)`` covariance is accumulated in float64, ``chunk_size`` centred rows at a time (two passes: mean,
    then scatter), and diagonalised with ``torch.linalg.eigh``. This equals the SVD of the centred data
    (right singular vectors = eigenvectors, ``S**2 / (N - 1)`` = eigenvalues) without the ``(N, D)`` centred copy
    or ``U`` factor a data SVD needs; float64 accumulation keeps the precision a float32 SVD would have.

    Raises:
        ValueError: ``dim`` outside ``[1, D]`` or fewer than 2 rows.
    """
    check_2d("emb", emb)
    num, width = emb.shape
    if not 1 <= dim <= width:
        raise ValueError(f"dim must satisfy 1 <= dim <= {width} (the embedding width), got {dim}")
    if num < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {num}")
    total = torch.zeros(width, dtype=torch.float64, device=emb.device)
    for start in range(0, num, chunk_size):
        total += emb[start : start + chunk_size].double().sum(dim=0)
    mean = total / num  # (D,) float64
    scatter = torch.zeros((width, width), dtype=torch.float64, device=emb.device)
    for start in range(0, num, chunk_size):
        centred = emb[start : start + chunk_size].double() - mean  # (n, D)
        scatter += centred.t() @ centred
    covariance = scatter / (num - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending, columns are eigenvectors
    eigenvalues = eigenvalues.flip(0).clamp_min(0)  # descending; round-off can make null ones slightly negative
    components = eigenvectors.flip(1)[:, :dim].t()  # (dim, D)
    # sign convention: the largest-|coefficient| of each component is positive
    pivots = components.abs().argmax(dim=1, keepdim=True)  # (dim, 1)
    components = components * torch.sign(components.gather(1, pivots))
    total_variance = eigenvalues.sum()
    ratio = eigenvalues[:dim] / total_variance if total_variance > 0 else torch.zeros_like(eigenvalues[:dim])
    return PCA(
        mean=mean.float(),
        components=components.float().contiguous(),
        explained_variance=eigenvalues[:dim].float(),
        explained_variance_ratio=ratio.float(),
    )
