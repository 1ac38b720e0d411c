"""Kernel metrics: small pure functions on kernel matrices (tensors in, Python floats out).

All norms are Frobenius norms ‖A‖_F = (Σ_ij A_ij²)^{1/2}, ⟨A, B⟩_F = Σ_ij A_ij B_ij. Shapes are
checked (ConfigError); a zero reference norm gives inf or nan, as the formula does.

These need the kernel as a matrix. For probe sets too large to form it, ``ntk.large`` has
matrix-free versions on kernel-vector products (trace, Frobenius norm, top eigenvalues,
target alignment, intrinsic dimension), each with its error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "relative_frobenius", "kernel_distance", "kernel_velocity", "target_alignment",
    "top_eigenvalues", "effective_rank", "intrinsic_dimension",
]


def _same_shape(A: Tensor, B: Tensor, names: str = "A, B") -> None:
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        raise ConfigError(f"{names} must be tensors")
    if A.shape != B.shape:
        raise ConfigError(
            f"{names} must have the same shape; got {tuple(A.shape)} and {tuple(B.shape)}"
        )


def _square(K: Tensor, name: str = "K") -> None:
    if not isinstance(K, Tensor) or K.dim() != 2 or K.shape[0] != K.shape[1]:
        shape = tuple(K.shape) if isinstance(K, Tensor) else type(K).__name__
        raise ConfigError(f"{name} must be a square matrix (n, n); got {shape}")


def eigvals(K: Tensor) -> Tensor:
    """Eigenvalues of the symmetric part (K + Kᵀ)/2, descending."""
    _square(K)
    return torch.linalg.eigvalsh((K + K.T) / 2).flip(0)


def relative_frobenius(A: Tensor, B: Tensor) -> float:
    """‖A − B‖_F / ‖B‖_F  (B the reference)."""
    _same_shape(A, B)
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


def kernel_distance(A: Tensor, B: Tensor) -> float:
    """1 − ⟨A, B⟩_F / (‖A‖_F ‖B‖_F): 0 for proportional kernels, in [0, 2]."""
    _same_shape(A, B)
    return float(1.0 - (A * B).sum() / (torch.linalg.norm(A) * torch.linalg.norm(B)))


def kernel_velocity(K_s: Tensor, K_t: Tensor, dt: float) -> float:
    """‖K_t − K_s‖_F / (‖K_s‖_F · dt): relative change of the kernel per unit training time,
    from time s to time t = s + dt (dt > 0, in the units of t = k/N)."""
    _same_shape(K_s, K_t, "K_s, K_t")
    try:
        step = float(dt)
    except (TypeError, ValueError):
        step = math.nan
    if not (math.isfinite(step) and step > 0):
        raise ConfigError(f"dt={dt!r} must be a finite number > 0")
    return float(torch.linalg.norm(K_t - K_s) / torch.linalg.norm(K_s)) / step


def target_alignment(K: Tensor, y: Tensor) -> float:
    """yᵀ K y / (‖K‖_F ‖y‖²): 1 for K ∝ y yᵀ; y of shape (n,) or (n, 1)."""
    _square(K)
    if not isinstance(y, Tensor) or y.numel() != K.shape[0] or y.dim() > 2:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"y must have shape ({K.shape[0]},) to match K; got {shape}")
    y = y.reshape(-1).to(K.dtype)
    return float(y @ K @ y / (torch.linalg.norm(K) * (y @ y)))


def top_eigenvalues(K: Tensor, k: int) -> Tensor:
    """The k largest eigenvalues of (K + Kᵀ)/2, descending (eigvalsh), shape (k,)."""
    _square(K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K.shape[0]:
        raise ConfigError(f"k={k!r} must be an integer in [1, {K.shape[0]}]")
    return eigvals(K)[:k]


def effective_rank(K: Tensor) -> float:
    """exp(−Σ_j p_j log p_j), p_j = λ_j / Σ λ over the positive eigenvalues of (K + Kᵀ)/2.

    Eigenvalues ≤ n·eps·λ_max count as zero. k for the identity of size k; 1 for rank one.
    """
    lam = eigvals(K)
    if lam.numel() == 0 or lam[0] <= 0:
        return 0.0
    lam = lam[lam > lam.shape[0] * torch.finfo(lam.dtype).eps * lam[0]]
    p = lam / lam.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def intrinsic_dimension(K: Tensor) -> float:
    """tr(K) / ‖K‖_op = Σ λ / λ_max (for positive semidefinite K): k for the identity of size k."""
    lam = eigvals(K)
    return float(torch.trace(K) / lam.abs().max())
