"""Kernel metrics against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ntk_rnn import ConfigError
from ntk_rnn.ntk.metrics import (
    effective_rank,
    intrinsic_dimension,
    kernel_distance,
    kernel_velocity,
    relative_frobenius,
    target_alignment,
    top_eigenvalues,
)


def spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T


def test_relative_frobenius_and_distance_by_hand():
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert relative_frobenius(A, B) == pytest.approx(math.sqrt(2) / 2)  # ‖A−B‖=√2, ‖B‖=2
    assert kernel_distance(A, B) == pytest.approx(1 - 2 / (math.sqrt(2) * 2))
    K = spd(5)
    assert relative_frobenius(K, K) == 0.0
    assert kernel_distance(K, K) == pytest.approx(0.0, abs=1e-15)
    assert kernel_distance(3.0 * K, K) == pytest.approx(0.0, abs=1e-15)  # scale-invariant
    assert kernel_distance(-K, K) == pytest.approx(2.0)


def test_kernel_velocity():
    K_s = spd(4, 1)
    K_t = K_s + 0.1 * spd(4, 2)
    v = kernel_velocity(K_s, K_t, dt=0.5)
    assert v == pytest.approx(float((K_t - K_s).norm() / K_s.norm()) / 0.5)
    assert kernel_velocity(K_s, K_s, 1.0) == 0.0
    for dt in (0, -1.0, float("nan"), "soon"):
        with pytest.raises(ConfigError, match="dt="):
            kernel_velocity(K_s, K_t, dt)


def test_target_alignment():
    y = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert target_alignment(torch.outer(y, y), y) == pytest.approx(1.0)
    assert target_alignment(torch.outer(y, y), y[:, None]) == pytest.approx(1.0)
    I3 = torch.eye(3, dtype=torch.float64)
    assert target_alignment(I3, y) == pytest.approx(1 / math.sqrt(3))  # yᵀy/(√3 ‖y‖²)
    assert target_alignment(I3.float(), y) == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    with pytest.raises(ConfigError, match="y must have shape"):
        target_alignment(I3, torch.ones(4))


def test_eigen_metrics():
    D = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.allclose(top_eigenvalues(D, 2), torch.tensor([5.0, 3.0], dtype=torch.float64))
    assert top_eigenvalues(D, 4)[-1] == 0.0
    for k in (1, 4, 10):
        assert effective_rank(torch.eye(k)) == pytest.approx(k, rel=1e-6)
        assert intrinsic_dimension(torch.eye(k)) == pytest.approx(k, rel=1e-6)
    y = torch.randn(6, dtype=torch.float64)
    assert effective_rank(torch.outer(y, y)) == pytest.approx(1.0)  # rank one (zeros dropped)
    assert intrinsic_dimension(torch.outer(y, y)) == pytest.approx(1.0)
    p = torch.tensor([5.0, 3.0, 1.0]) / 9
    assert effective_rank(D) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    # non-symmetric input: the symmetric part is used
    N = torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(top_eigenvalues(N, 2), torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_shape_checks():
    K = spd(3)
    with pytest.raises(ConfigError, match="same shape"):
        relative_frobenius(K, spd(4))
    with pytest.raises(ConfigError, match="same shape"):
        kernel_distance(K, K[:2])
    with pytest.raises(ConfigError, match="square"):
        top_eigenvalues(K[:2], 1)
    with pytest.raises(ConfigError, match="square"):
        effective_rank(torch.ones(3))
    with pytest.raises(ConfigError, match="k=4"):
        top_eigenvalues(K, 4)
