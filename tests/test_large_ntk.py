"""ntk.large: blocked kernels equal the full ones; matrix-free metrics within their stated error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ntk_rnn import ConfigError, MeanFieldRNN
from ntk_rnn.ntk import KernelOperator, blocked_ntk, empirical_ntk, footprint, large
from ntk_rnn.ntk import metrics as M

F64 = torch.float64


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def windows(n, L, d, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, d, generator=g, dtype=dtype)


class Elman(nn.Module):
    """User-style Elman loop, last output (B,)."""

    def __init__(self, d: int, H: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(0.5 * torch.randn(H, H, generator=g, dtype=F64) / math.sqrt(H))
        self.U = nn.Parameter(torch.randn(H, d, generator=g, dtype=F64))
        self.v = nn.Parameter(torch.randn(H, generator=g, dtype=F64) / math.sqrt(H))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.W.shape[0])
        for k in range(x.shape[1]):
            h = torch.tanh(h @ self.W.T + x[:, k] @ self.U.T)
        return h @ self.v


def models():
    return {
        "D": MeanFieldRNN(3, 40, dtype=F64, seed=1),
        "F": MeanFieldRNN(3, 12, recurrence="feedback", dtype=F64, seed=2),
        "elman": Elman(3, 6),
    }


def methods_of(model):
    return ("structured", "jacobian", "ntk_vp") if isinstance(model, MeanFieldRNN) and \
        model.recurrence == "diagonal" else ("jacobian", "ntk_vp")


# --- blocked == full -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["D", "F", "elman"])
def test_blocked_equals_full(name):
    model = models()[name]
    x, x2 = windows(11, 6, 3, 0), windows(7, 5, 3, 1)
    fp = footprint(model, x)
    for method in methods_of(model):
        K_full, K_sym = (empirical_ntk(model, x, x2, method=method),
                         empirical_ntk(model, x, method=method))
        # a budget so small that rows, columns and units all come in several blocks
        tiny = 6 * (fp.param_bytes + fp.act_bytes) + 2 * 11 * 11 * 8
        for budget in (tiny, large.DEFAULT_MEMORY_BUDGET):
            out = torch.full((11, 7), float("nan"), dtype=F64)
            K = blocked_ntk(model, x, x2, method=method, memory_budget=budget, out=out)
            assert K is out and rel(K, K_full) <= 1e-10, (method, budget)
            Ks = blocked_ntk(model, x, method=method, memory_budget=budget,
                             out=torch.full((11, 11), float("nan"), dtype=F64))
            assert rel(Ks, K_sym) <= 1e-10, (method, budget)
            assert torch.allclose(Ks, Ks.T, rtol=0, atol=1e-12)
        assert rel(blocked_ntk(model, x, x2, method=method), K_full) <= 1e-10


def test_structured_blocks_over_units_and_windows(monkeypatch):
    model = models()["D"]
    x, x2 = windows(9, 6, 3, 2), windows(8, 6, 3, 3)
    K = empirical_ntk(model, x, x2)
    calls = []
    real = large.emp.structured_kernel
    monkeypatch.setattr(large.emp, "structured_kernel",
                        lambda m, a, b, units: calls.append((a.shape[0], units)) or real(m, a, b,
                                                                                         units))
    monkeypatch.setattr(large, "MIN_UNITS", 4)
    per = (3 + 2) * 8  # bytes per unit and window (not factorised: L·L' > d)
    out = torch.empty(9, 8, dtype=F64)
    K_b = blocked_ntk(model, x, x2, method="structured", memory_budget=100 * per,
                      out=out)
    assert rel(K_b, K) <= 1e-12
    assert len(calls) > 1 and all(u < model.width and r < 9 for r, u in calls)  # both blocked


def test_blocked_frozen_parameters_and_errors():
    model = MeanFieldRNN(2, 30, dtype=F64, seed=4)
    model.b.requires_grad_(False)
    x = windows(6, 4, 2, 5)
    assert rel(blocked_ntk(model, x, memory_budget=4000, out=torch.empty(6, 6, dtype=F64)),
               empirical_ntk(model, x)) <= 1e-12
    with pytest.raises(ConfigError, match="pass out="):
        blocked_ntk(model, x, memory_budget=200)
    with pytest.raises(ConfigError, match="out must be"):
        blocked_ntk(model, x, out=torch.empty(5, 6, dtype=F64))
    with pytest.raises(ConfigError, match="memory_budget"):
        blocked_ntk(model, x, memory_budget=0)


# --- matrix-free operator and metrics -------------------------------------------------------------
@pytest.mark.parametrize("name", ["D", "F", "elman"])
def test_kernel_operator_products_and_diagonal(name):
    model = models()[name]
    x = windows(13, 6, 3, 6)
    V = torch.randn(13, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    for method in methods_of(model):
        K = empirical_ntk(model, x, method=method)
        fp = footprint(model, x)
        for budget in (8 * (fp.param_bytes + fp.act_bytes), large.DEFAULT_MEMORY_BUDGET):
            op = KernelOperator(model, x, method=method, memory_budget=budget)
            assert rel(op.matmat(V), K @ V) <= 1e-10, (method, budget)
            assert rel(op.matmat(V[:, 0]), K @ V[:, 0]) <= 1e-10
            assert rel(op.matmat(V), K @ V) <= 1e-10  # again: from the cache where it fits
            assert rel(op.diagonal(), K.diagonal()) <= 1e-10
            assert op.matvecs == 7
            lin = op.as_linear_operator()
            assert rel(torch.as_tensor(lin.matmat(V.numpy())), K @ V) <= 1e-10


def test_kernel_operator_structured_several_unit_blocks():
    model = MeanFieldRNN(3, 50, dtype=F64, seed=7)
    x = windows(10, 5, 3, 8)
    op = KernelOperator(model, x, memory_budget=4 * 10 * 5 * 8 * 7)  # 7 units per block
    assert op._units == 7 and len(op._spans) == 8
    K = empirical_ntk(model, x)
    v = torch.randn(10, dtype=F64)
    assert rel(op.matmat(v), K @ v) <= 1e-12
    model.w.requires_grad_(False)  # frozen block: its features drop out
    assert rel(KernelOperator(model, x, memory_budget=2000).matmat(v),
               empirical_ntk(model, x) @ v) <= 1e-12


def spectrum_kernel(n=60, seed=0, decay=0.7):
    """PSD kernel with a decaying spectrum (like an NTK's) and known eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = 10.0 * decay ** torch.arange(n, dtype=F64)
    return (Q * lam) @ Q.T, lam


def test_trace_exact_and_hutchpp():
    K, lam = spectrum_kernel()
    assert large.trace(K).value == pytest.approx(float(lam.sum()), rel=1e-12)
    errs = []
    for seed in range(20):
        est = large.trace(K, "hutchpp", num_matvecs=15, seed=seed)
        assert est.kind == "stderr" and est.matvecs == 15
        errs.append((est.value - float(lam.sum())) / est.error)
    errs = torch.tensor(errs)
    assert (errs.abs() <= 3).float().mean() >= 0.9  # standardized errors of a few sigma
    assert large.trace(K, "hutchpp", num_matvecs=15, seed=3).value == \
        large.trace(K, "hutchpp", num_matvecs=15, seed=3).value  # seeded
    full = large.trace(K, "hutchpp", num_matvecs=200)  # ≥ n products: exact
    assert full.value == pytest.approx(float(lam.sum()), rel=1e-12) and full.error == 0


def test_frobenius_alignment_eigenvalues_vs_exact():
    K, lam = spectrum_kernel()
    fro = float(torch.linalg.norm(K))
    y = torch.randn(60, dtype=F64, generator=torch.Generator().manual_seed(1))
    ok = 0
    for seed in range(10):
        est = large.frobenius_norm(K, num_matvecs=18, seed=seed)
        assert est.matvecs == 36
        ok += abs(est.value - fro) <= 3 * est.error + 1e-12 * fro
        a = large.target_alignment(K, y, frobenius=est)
        exact = M.target_alignment(K, y)
        ok += abs(a.value - exact) <= 3 * a.error + 1e-12
    assert ok >= 18
    assert large.target_alignment(K, y, frobenius=fro).value == pytest.approx(
        M.target_alignment(K, y), rel=1e-12)
    top = large.top_eigenvalues(K, 5)
    exact = M.top_eigenvalues(K, 5)
    assert top.kind == "bound"
    assert torch.all((top.value - exact).abs() <= top.error + 1e-9)
    assert torch.allclose(top.value, exact, rtol=1e-9, atol=0)
    idim = large.intrinsic_dimension(K)
    assert abs(idim.value - M.intrinsic_dimension(K)) <= idim.error + 1e-9


def test_matrix_free_metrics_on_an_ntk_operator():
    model = MeanFieldRNN(2, 64, dtype=F64, seed=9)
    x = windows(40, 8, 2, 10)
    K = empirical_ntk(model, x)
    op = KernelOperator(model, x)
    assert large.trace(op).value == pytest.approx(float(torch.trace(K)), rel=1e-12)
    tr = large.trace(op, "hutchpp", num_matvecs=12)
    assert abs(tr.value - float(torch.trace(K))) <= 4 * tr.error + 1e-9
    top = large.top_eigenvalues(op, 3)
    assert torch.all((top.value - M.top_eigenvalues(K, 3)).abs() <= top.error + 1e-9)
    fro = large.frobenius_norm(op, num_matvecs=12)
    assert abs(fro.value - float(torch.linalg.norm(K))) <= 4 * fro.error + 1e-9


def test_metric_errors():
    K, _ = spectrum_kernel(8)
    with pytest.raises(ConfigError, match="Lanczos needs k < n"):
        large.top_eigenvalues(K, 8)
    with pytest.raises(ConfigError, match="square"):
        large.trace(torch.zeros(3, 4), "hutchpp")
    with pytest.raises(ConfigError, match="'exact' or 'hutchpp'"):
        large.trace(K, "magic")
    with pytest.raises(ConfigError, match="y must have shape"):
        large.target_alignment(K, torch.zeros(5))
