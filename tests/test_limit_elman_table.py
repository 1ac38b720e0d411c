"""The interpolation table of tanh/sigmoid pair moments (ntk_rnn.limit.gauss_table) and the Elman
limit's fast path: against the independent 2-D quadrature (float64), every activation and both
scalings, windows of different lengths, variances outside the table, and the stated error
covering the true one."""

from __future__ import annotations

import math

import pytest
import torch

from ntk_rnn.limit import elman_limit_ntk, gauss_table
from ntk_rnn.limit.elman import _mapped2, _whiten
from ntk_rnn.models import ElmanRNN
from ntk_rnn.models.activations import ACTIVATIONS

from .test_limit_elman import windows

F64 = torch.float64


def _points(P: int = 600, amax: float = 16.0, seed: int = 0):
    """(a, b, ρ) spread over the table, a third with ρ within 1e-3 of ±1 (the layer at ρ = 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(P, generator=g, dtype=F64) * amax
    b = torch.rand(P, generator=g, dtype=F64) * amax
    a[: P // 3] = torch.rand(P // 3, generator=g, dtype=F64) * 3  # the usual range
    rho = torch.rand(P, generator=g, dtype=F64) * 2 - 1
    k = P // 3
    rho[-k:] = torch.sign(rho[-k:]) * (1 - torch.rand(k, generator=g, dtype=F64) ** 2 * 1e-3)
    rho[0], a[1], b[2] = 1.0, 0.0, 1e-3
    return a, b, rho


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_table_against_2d_quadrature(act):
    """V, V̇ at stride 1 to ~1e-6 of the sinh-mapped 2-D quadrature at 97² nodes (itself good to
    ~1e-8 here); sigmoid through σ = ½ + ½ tanh(u/2) against sigmoid integrated directly."""
    a, b, rho = _points(seed=1 if act == "sigmoid" else 0)
    q11, q22, q12 = a * a, b * b, rho * a * b
    want = _mapped2(ACTIVATIONS[act], *_whiten(q11, q22, q12), 48, None, None)
    from ntk_rnn.limit.elman import Table, pair_moments
    fine = pair_moments(ACTIVATIONS[act], q11, q22, q12, Table(1))
    coarse = pair_moments(ACTIVATIONS[act], q11, q22, q12, Table(2))
    for f, c, w in zip(fine, coarse, want):
        assert float((f - w).abs().max()) < 1e-6
        assert float((c - w).abs().max()) < 2e-5
        # the coarse stride is the worse one, by ~2⁴ on average (cubic interpolation)
        assert float((c - w).abs().mean()) > 4 * float((f - w).abs().mean())


def test_polar_form_against_quadrature_at_nodes():
    """The table's values (polar/FFT form) equal the 2-D quadrature to ~1e-10."""
    a = torch.tensor([0.3, 2.0, 9.0], dtype=F64)
    theta = torch.tensor([0.0, 0.02, 0.9, 1.5], dtype=F64)
    V, Vd = gauss_table.polar_moments(a, a, theta)
    A, B, T = torch.meshgrid(a, a, theta, indexing="ij")
    want = _mapped2(ACTIVATIONS["tanh"], A.reshape(-1), B.reshape(-1),
                    torch.cos(T).reshape(-1), 64, None, None)
    assert torch.allclose(V.reshape(-1), want[0], atol=1e-9, rtol=0)
    assert torch.allclose(Vd.reshape(-1), want[1], atol=1e-9, rtol=0)


def test_spot_check_rejects_a_wrong_table():
    T = gauss_table.table()
    assert gauss_table._spot_check(T)
    assert not gauss_table._spot_check(T * (1 + 1e-8))
    assert not gauss_table._spot_check(T[:-1])


# --- the Elman limit: fast path against the fine quadrature ---------------------------------
ACTS = sorted(ACTIVATIONS)


@pytest.mark.parametrize("scaling", ["ntk", "mean_field"])
@pytest.mark.parametrize("act", ACTS)
def test_fast_path_within_its_error_of_fine_quadrature(act, scaling):
    """Windows of lengths 9 and 5 (x2), inputs ×1.5; the default (table for tanh/sigmoid,
    closed forms for erf/relu) against the quadrature to 1e-8: the stated per-entry error
    covers the difference, and the error meets tol."""
    kw = dict(recurrent_scaling=scaling, activation=act)
    if scaling == "mean_field" and act in ("sigmoid", "relu"):
        kw["A_mean"] = 0.6  # memory through mean(A): means ≠ 0 (the quadrature ladder)
    model = ElmanRNN(1, 4, **kw)
    x, x2 = windows(4, 9, seed=20) * 1.5, windows(3, 5, seed=21) * 1.5
    fast = elman_limit_ntk(model, x, x2, tol=1e-4)
    fine = elman_limit_ntk(model, x, x2, tol=1e-8, max_res=128, method="quadrature")
    assert fast.converged and fast.error <= 1e-4 and fine.converged
    assert torch.all((fast.value - fine.value).abs() <= fast.error_entries + 1e-10), \
        ((fast.value - fine.value).abs().max(), fast.error)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_table_error_estimate_is_tight_and_covers(act):
    """NTK scaling, L = 24, larger variances (A_std = 1.3, inputs ×2): the table's two strides
    state an error that covers the true one (quadrature at tol 1e-9) and is not wildly
    pessimistic; the symmetric path equals the general one."""
    model = ElmanRNN(1, 4, recurrent_scaling="ntk", activation=act, A_std=1.3)
    x = windows(5, 24, seed=22) * 2.0
    fast = elman_limit_ntk(model, x, tol=1e-4)
    assert fast.n_points == 64  # every pair met tol in the table
    fine = elman_limit_ntk(model, x, tol=1e-9, max_res=128, method="quadrature")
    assert fine.converged
    diff = (fast.value - fine.value).abs()
    assert torch.all(diff <= fast.error_entries + 1e-12)
    assert fast.error < 1e-4 and float(diff.max()) > 0
    general = elman_limit_ntk(model, x, x.clone(), tol=1e-4)
    torch.testing.assert_close(general.value, fast.value, atol=1e-12, rtol=0)


def test_variances_outside_the_table_and_tol_below_the_table():
    """a > A_MAX (inputs ×12: q up to ~10³) go to the 2-D quadrature inside the table rule;
    tol below the table's accuracy sends pairs on to the quadrature ladder (32, 64)."""
    model = ElmanRNN(1, 4, recurrent_scaling="ntk", activation="tanh")
    x = windows(3, 6, seed=23) * 12.0
    assert float((x * x).max()) > gauss_table.A_MAX ** 2
    fast = elman_limit_ntk(model, x, tol=1e-4)
    fine = elman_limit_ntk(model, x, tol=1e-9, max_res=128, method="quadrature")
    assert fine.converged and fast.converged
    assert torch.all((fast.value - fine.value).abs() <= fast.error_entries + 1e-12)
    y = windows(3, 6, seed=24)
    tight = elman_limit_ntk(model, y, tol=1e-8, max_res=128)
    assert tight.n_points > 64  # some pairs went on to the quadrature
    ref = elman_limit_ntk(model, y, tol=1e-9, max_res=128, method="quadrature")
    assert ref.converged
    assert torch.all((tight.value - ref.value).abs() <= tight.error_entries + 1e-12)
    assert tight.error <= 1e-8


def test_method_table_refused_where_it_does_not_apply():
    from ntk_rnn.errors import ConfigError
    x = windows(2, 3)
    with pytest.raises(ConfigError, match="method='table'"):
        elman_limit_ntk(ElmanRNN(1, 4, activation="erf"), x, method="table")
    with pytest.raises(ConfigError, match="method"):
        elman_limit_ntk(ElmanRNN(1, 4), x, method="fast")
    mf = ElmanRNN(1, 4, activation="tanh", recurrent_scaling="mean_field")
    assert elman_limit_ntk(mf, x, method="table").n_points == 64
    assert math.isfinite(elman_limit_ntk(mf, x, method="quadrature").error)


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "erf"])
def test_mean_field_rank_one_rule_against_pair_quadrature(act):
    """d = 1, means ≠ 0 (mean-field, mean(A) ≠ 0): the shared 1-D rule over w, as matrix
    products, against the 2-D pair quadrature with means (ρ = ±1) at a high resolution."""
    from ntk_rnn.limit.elman import _rank_one, pair_moments
    g = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(5, generator=g, dtype=F64) * 2, torch.randn(4, generator=g, dtype=F64)
    ma, mb = torch.randn(5, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    s = 1.3
    ia, ib = torch.arange(5).repeat_interleave(4), torch.arange(4).repeat(5)
    f = ACTIVATIONS[act]
    want = pair_moments(f, s * s * xa[ia] ** 2, s * s * xb[ib] ** 2, s * s * xa[ia] * xb[ib], 64,
                        ma[ia], mb[ib])
    for sub in (slice(None), slice(0, 3)):  # all pairs (GEMM) and a few (row sums)
        got = _rank_one(f, xa, xb, ma, mb, ia[sub], ib[sub], s, 16)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_[sub], atol=1e-9, rtol=0)


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    """A garbage or wrong table in the cache is not used: the table is rebuilt and rewritten."""
    good = gauss_table.table()
    monkeypatch.setenv("NTK_RNN_TABLE_CACHE", str(tmp_path))
    path = gauss_table._cache_path()
    built = []
    monkeypatch.setattr(gauss_table, "build", lambda: built.append(1) or good.clone())
    for junk in (b"not a tensor", None):
        if junk is None:
            torch.save(good * 1.001, path)
        else:
            with open(path, "wb") as f:
                f.write(junk)
        gauss_table.table.cache_clear()
        try:
            assert torch.equal(gauss_table.table(), good)
        finally:
            gauss_table.table.cache_clear()
        assert gauss_table._spot_check(torch.load(path, weights_only=True))
    assert len(built) == 2
