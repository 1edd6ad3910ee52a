"""Pure maths on activations: contrast directions, sign fixing, normalising, combining.

No model and no I/O. Inputs are paired activations ``pos, neg: [pairs, ..., hidden]`` (any number
of middle axes, e.g. layers); outputs drop the pair axis. Computation is in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

METHODS = ("mean_diff", "svd", "pca")


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean of the positive activations minus mean of the negative ones: [..., hidden]."""
    _check(pos, neg)
    return pos.float().mean(0) - neg.float().mean(0)


def svd_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of the paired differences, signed and scaled like mean_diff.

    Same direction as PCA of pair-centred activations (each pair's rows are +-d/2 about its
    midpoint, which has the same right-singular vectors as the differences).
    """
    _check(pos, neg)
    diffs = (pos.float() - neg.float()).movedim(0, -2)  # [..., pairs, hidden]
    return _aligned(_top_right_singular(diffs), mean_diff(pos, neg))


def pca_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal component of all pos and neg activations pooled and centred on their mean,
    signed and scaled like mean_diff: the direction of greatest variance, which may or may not be
    the contrast (a useful check on it)."""
    _check(pos, neg)
    pooled = torch.cat([pos.float(), neg.float()], dim=0).movedim(0, -2)  # [..., 2*pairs, hidden]
    centred = pooled - pooled.mean(dim=-2, keepdim=True)
    return _aligned(_top_right_singular(centred), mean_diff(pos, neg))


DIRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean_diff": mean_diff,
    "svd": svd_direction,
    "pca": pca_direction,
}


def unit(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each vector (last axis) divided by its norm; zero vectors stay zero."""
    norms = vectors.norm(dim=-1, keepdim=True)
    return vectors / norms.clamp_min(eps)


def symmetric_orthogonalize(directions: torch.Tensor) -> torch.Tensor:
    """Löwdin's symmetric orthogonalisation D' = (D D^T)^(-1/2) D of rows ``directions`` [k, hidden].

    The orthonormal rows closest to D in the Frobenius norm: no row is privileged (unlike
    Gram-Schmidt, which keeps the first and bends the rest), and rows that are already
    orthonormal come back unchanged. Raises ValueError when the rows are linearly dependent.
    """
    d = directions.float()
    gram = d @ d.T  # [k, k]
    eigvals, eigvecs = torch.linalg.eigh(gram.double())
    if float(eigvals.min()) <= 1e-10 * max(float(eigvals.max()), 1e-30):
        raise ValueError("the directions are linearly dependent: they cannot be orthogonalised")
    inv_sqrt = eigvecs @ torch.diag(eigvals.rsqrt()) @ eigvecs.T  # [k, k]
    return (inv_sqrt @ d.double()).float()  # [k, hidden]


def combine(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i for one weight vector [k] or a batch of them [batch, k]; vectors [k, hidden]."""
    return weights.to(vectors.dtype) @ vectors


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[k, k] cosine similarities of k vectors [k, hidden]."""
    u = unit(vectors.float())
    return u @ u.T


def _top_right_singular(matrix: torch.Tensor) -> torch.Tensor:
    """[..., rows, hidden] -> [..., hidden]: the top right-singular vector (unit norm)."""
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[..., 0, :]


def _aligned(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``direction`` flipped to agree with ``reference`` and scaled to its projection on it."""
    proj = (direction * reference).sum(-1, keepdim=True)
    sign = torch.where(proj < 0, -1.0, 1.0)
    return direction * sign * proj.abs()


def _check(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.shape != neg.shape:
        raise ValueError(f"pos and neg activations differ in shape: {tuple(pos.shape)} vs {tuple(neg.shape)}")
    if pos.shape[0] < 1:
        raise ValueError("no activation pairs")
