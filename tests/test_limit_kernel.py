"""The limit kernel K = E[S S'] + E[c²] E[P·P' + Q Q'] (theory §5) and its error estimate."""

from __future__ import annotations

import math

import pytest
import torch

from ntk_rnn import ConfigError, InitLaw, MeanFieldRNN
from ntk_rnn.limit.kernel import LimitAccuracyWarning, LimitKernel, limit_ntk

F64 = torch.float64


def ar1_windows(n: int, L: int, d: int = 1, a: float = 0.8, seed: int = 0) -> torch.Tensor:
    """n windows of length L of a stationary AR(1) chain X_k = a X_{k-1} + √(1-a²) ε_k."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n + L + 50, d, generator=g, dtype=F64)
    X = torch.zeros_like(eps)
    for k in range(1, X.shape[0]):
        X[k] = a * X[k - 1] + math.sqrt(1 - a * a) * eps[k]
    return torch.stack([X[50 + i: 50 + i + L] for i in range(n)])


def model(d: int = 1, dtype=F64, **law) -> MeanFieldRNN:
    return MeanFieldRNN(d, 4, init=InitLaw(**law), dtype=dtype)


def empirical(net: MeanFieldRNN, x: torch.Tensor) -> torch.Tensor:
    """K^N_θ = (1/N) Σ_i φ_i·φ_i', φ_i = (S_i, c_i P_i, c_i Q_i) (theory §4), from the model."""
    S, P, Q = net.unit_features(x)
    c = net.c.detach()[:, None]
    phi = torch.cat([S.unsqueeze(-1), c * torch.cat([P, Q.unsqueeze(-1)], -1)], -1)
    phi = phi.reshape(x.shape[0], -1)
    return phi @ phi.T / net.width


def independent_mc(x, widths_seeds, **law):
    """Plain Monte Carlo through MeanFieldRNN's own sampling: one batch per network; returns the
    mean and the 95% half-width t·std/√R of the batch means."""
    from scipy import stats

    ks = torch.stack([empirical(MeanFieldRNN(x.shape[-1], N, init=InitLaw(**law), dtype=F64,
                                             seed=s), x) for N, s in widths_seeds])
    R = ks.shape[0]
    return ks.mean(0), stats.t.ppf(0.975, R - 1) * ks.std(0) / math.sqrt(R)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These problems are small: one intra-op thread is as fast and immune to a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def x16():
    return ar1_windows(16, 16)


@pytest.fixture(scope="module")
def ref16(x16):
    """High-accuracy reference for the default law (quadrature to 1e-9)."""
    return limit_ntk(model(), x16, tol=1e-9, method="quadrature")


# --- building blocks -----------------------------------------------------------------------------
def test_unit_features_are_the_gradients_of_the_output():
    """The features the sampler integrates (``spq_features``, via ``unit_features``) against
    autograd of the forward: ∂Ŷ_L/∂(c, w, b) = N^{-β} (S, c P, c Q) per window (the truncated
    features: ``test_ntk_empirical.test_truncated_training_kernel``)."""
    net = MeanFieldRNN(2, 16, dtype=F64, seed=3)
    x = ar1_windows(3, 9, d=2)
    S, P, Q = net.unit_features(x)
    c, s = net.c.detach(), net.output_scale
    for i in range(x.shape[0]):
        gc, gw, gb = torch.autograd.grad(net(x[i])[-1], [net.c, net.w, net.b])
        for a, ref in ((gc, s * S[i]), (gw, s * c[:, None] * P[i]), (gb, s * c * Q[i])):
            assert torch.allclose(a, ref, rtol=0, atol=1e-14)


def test_result_type_symmetric_psd(x16, ref16):
    assert isinstance(ref16, LimitKernel) and ref16.converged and ref16.method == "quadrature"
    K = ref16.value
    assert K.dtype == F64 and K.shape == (16, 16) and ref16.error_entries.shape == (16, 16)
    assert torch.equal(K, K.T)
    ev = torch.linalg.eigvalsh(K)
    assert float(ev.min()) > -1e-10 * float(ev.max())
    rq = limit_ntk(model(), x16, tol=5e-4, method="rqmc")
    assert torch.equal(rq.value, rq.value.T)
    assert float(torch.linalg.eigvalsh(rq.value).min()) > -1e-10
    assert rq.error == float(rq.error_entries.max()) <= 5e-4


def test_cross_kernel_is_a_block(x16, ref16):
    idx = torch.tensor([1, 4, 9])
    cross = limit_ntk(model(), x16, x16[idx], tol=1e-9, method="quadrature")
    assert cross.value.shape == (16, 3)
    assert torch.allclose(cross.value, ref16.value[:, idx], atol=1e-9, rtol=0)
    # windows of another length, and a single (L, d) window
    single = limit_ntk(model(), x16[0], ar1_windows(1, 7)[0], tol=1e-6)
    assert single.value.shape == (1, 1)


def test_float32_model_returns_float64(x16, ref16):
    K32 = limit_ntk(model(dtype=torch.float32), x16.float(), tol=1e-9, method="quadrature")
    assert K32.value.dtype == F64
    assert torch.allclose(K32.value, ref16.value, atol=1e-6, rtol=0)


def test_chunking_does_not_change_the_result(x16):
    a = limit_ntk(model(), x16, tol=1e-3, method="rqmc", seed=5)
    b = limit_ntk(model(), x16, tol=1e-3, method="rqmc", seed=5, chunk_size=100)
    assert a.n_points == b.n_points
    assert torch.allclose(a.value, b.value, atol=1e-12, rtol=0)


# --- accuracy ------------------------------------------------------------------------------------
def test_rqmc_and_quadrature_agree_d1(x16, ref16):
    rq = limit_ntk(model(), x16, tol=1e-4, method="rqmc", seed=1)
    q = limit_ntk(model(), x16, tol=1e-4, method="quadrature")
    assert rq.converged and q.converged and q.error <= 1e-4
    assert float((rq.value - q.value).abs().max()) <= 2 * (rq.error + q.error)
    assert float((q.value - ref16.value).abs().max()) <= q.error  # an upper estimate


@pytest.mark.parametrize("law", [
    dict(w="uniform", w_scale=2.0, b="rademacher", rho=0.6),
    dict(w="normal", w_scale=1.5, b="constant", rho=0.4, c="normal", c_scale=0.7),
    dict(w="rademacher", b="uniform", rho=0.9),
])
def test_other_laws_rqmc_matches_quadrature(law):
    x = ar1_windows(8, 12)
    rq = limit_ntk(model(**law), x, tol=2e-4, method="rqmc")
    q = limit_ntk(model(**law), x, tol=1e-8, method="quadrature")
    assert float((rq.value - q.value).abs().max()) <= 2 * (rq.error + q.error)


def test_quadrature_d2_matches_rqmc():
    x = ar1_windows(6, 8, d=2)
    q = limit_ntk(model(d=2), x, tol=2e-4, method="quadrature")
    rq = limit_ntk(model(d=2), x, tol=2e-4, method="rqmc")
    assert q.converged and rq.converged
    assert float((rq.value - q.value).abs().max()) <= 2 * (rq.error + q.error)


def test_auto_method_choice(x16):
    assert limit_ntk(model(), x16[:2], tol=1e-3).method == "quadrature"  # d = 1
    assert limit_ntk(model(d=3), ar1_windows(2, 5, d=3), tol=1e-3).method == "rqmc"


def test_rqmc_converges_as_points_grow(x16, ref16):
    errs, true = [], []
    for budget in (2**11, 2**14, 2**17):
        with pytest.warns(LimitAccuracyWarning, match="max_points"):
            r = limit_ntk(model(), x16, tol=1e-12, method="rqmc", max_points=budget, seed=2)
        assert not r.converged and r.n_points == budget
        errs.append(r.error)
        true.append(float((r.value - ref16.value).abs().max()))
    assert errs[0] > errs[1] > errs[2] and true[0] > true[2]
    assert errs[2] < errs[0] / 8  # faster than Monte Carlo's √(64) = 8


def test_quadrature_budget_warns(x16):
    with pytest.warns(LimitAccuracyWarning, match="quadrature"):
        r = limit_ntk(model(), x16, tol=1e-14, method="quadrature", max_points=600)
    assert not r.converged and r.n_points <= 600 and math.isfinite(r.error)


def test_rqmc_error_estimate_is_honest(x16, ref16):
    """Over 20 seeds the true max error rarely exceeds the reported max error (a 95% bound)."""
    ratios = []
    for s in range(20):
        r = limit_ntk(model(), x16, tol=1e-3, method="rqmc", seed=s)
        ratios.append(float((r.value - ref16.value).abs().max()) / r.error)
    assert sum(q > 3 for q in ratios) <= 1
    assert sum(q > 1 for q in ratios) <= 6
    assert sorted(ratios)[10] > 0.05  # and not absurdly pessimistic


def test_mc_error_estimate_is_honest(x16, ref16):
    ratios = []
    for s in range(8):
        r = limit_ntk(model(), x16, tol=5e-3, method="iid", seed=s)
        assert r.method == "iid"
        ratios.append(float((r.value - ref16.value).abs().max()) / r.error)
    assert max(ratios) <= 3 and sum(q > 1 for q in ratios) <= 3


def test_against_independent_monte_carlo_fast(x16, ref16):
    mc, hw = independent_mc(x16, [(2**14, s) for s in range(8)])  # 1.3e5 units
    lim = limit_ntk(model(), x16, tol=5e-4)
    combined = torch.sqrt(hw**2 + lim.error_entries**2)
    assert float(((mc - lim.value).abs() / combined).max()) <= 3


@pytest.mark.slow
def test_against_independent_monte_carlo_1e6():
    x = ar1_windows(32, 24, seed=7)
    mc, hw = independent_mc(x, [(2**15, 100 + s) for s in range(31)])  # 1.02e6 units
    for method in ("quadrature", "rqmc"):
        lim = limit_ntk(model(), x, tol=1e-5, method=method)
        combined = torch.sqrt(hw**2 + lim.error_entries**2)
        assert float(((mc - lim.value).abs() / combined).max()) <= 3
    assert float(hw.max()) < 2e-3  # the check has teeth: K's entries are O(0.1 - 1)


def test_wide_network_at_init_is_close_to_the_limit():
    x = ar1_windows(32, 24, seed=3)
    lim = limit_ntk(model(), x, tol=1e-6)
    N = 2**14
    Kn = empirical(MeanFieldRNN(1, N, dtype=F64, seed=11), x)
    rel = float(torch.linalg.norm(Kn - lim.value) / torch.linalg.norm(lim.value))
    assert rel * math.sqrt(N) < 4.0  # measured ≈ 0.5 on average, 1.4 at most over 24 draws


@pytest.mark.slow
def test_empirical_kernel_converges_at_rate_n_minus_half():
    x = ar1_windows(64, 24, seed=4)
    lim = limit_ntk(model(), x, tol=1e-7).value
    scaled = []
    for N in (2**8, 2**10, 2**12, 2**14):
        r = [float(torch.linalg.norm(empirical(MeanFieldRNN(1, N, dtype=F64, seed=200 + s), x)
                                     - lim) / torch.linalg.norm(lim)) for s in range(8)]
        scaled.append(sum(r) / len(r) * math.sqrt(N))
    assert max(scaled) / min(scaled) < 2.5, scaled


# --- laws and validation -------------------------------------------------------------------------
def _default_like_sampler(width, d, gen, dtype):
    c = (2 * torch.rand(width, generator=gen, dtype=dtype) - 1)
    w = torch.randn(width, d, generator=gen, dtype=dtype) / math.sqrt(d)
    b = (2 * torch.rand(width, generator=gen, dtype=dtype) - 1) * 0.5
    return c, w, b


def _sign_c_sampler(width, d, gen, dtype):
    """c = sign(w_1): c depends on w but c² = 1, so K equals that of c ~ rademacher."""
    _, w, b = _default_like_sampler(width, d, gen, dtype)
    return torch.sign(w[:, 0]), w, b


def test_custom_sampler_uses_monte_carlo(x16, ref16):
    net = model(sampler=_default_like_sampler)
    r = limit_ntk(net, x16, tol=2e-3, seed=3)
    assert r.method == "iid" and r.converged
    assert float((r.value - ref16.value).abs().max()) <= 2 * (r.error + ref16.error)
    r = limit_ntk(model(sampler=_sign_c_sampler), x16, tol=2e-3, method="iid")
    ref = limit_ntk(model(c="rademacher"), x16, tol=1e-8)
    assert float((r.value - ref.value).abs().max()) <= 2 * (r.error + ref.error)


@pytest.mark.parametrize("method", ["rqmc", "quadrature"])
def test_custom_sampler_needs_mc(x16, method):
    with pytest.raises(ConfigError, match=r"method='iid' \(i.i.d. draws\)"):
        limit_ntk(model(sampler=_default_like_sampler), x16, method=method)


def test_truncated_kernel():
    x = ar1_windows(6, 10)
    full = limit_ntk(model(), x, tol=1e-9)
    tr = limit_ntk(model(), x, tol=1e-9, truncated=True)
    assert not torch.allclose(tr.value, tr.value.T, atol=1e-6)  # ∇f(x)·g(x') is not symmetric
    assert not torch.allclose(tr.value, full.value, atol=1e-3)
    one = x[:, -1:]  # L = 1: the truncated and full gradients coincide
    assert torch.allclose(limit_ntk(model(), one, tol=1e-9, truncated=True).value,
                          limit_ntk(model(), one, tol=1e-9).value, atol=1e-12, rtol=0)
    rq = limit_ntk(model(), x, tol=2e-4, method="rqmc", truncated=True)
    assert float((rq.value - tr.value).abs().max()) <= 2 * (rq.error + tr.error)


def test_validation(x16):
    net = model()
    with pytest.raises(ConfigError, match="expected windows"):
        limit_ntk(net, torch.zeros(3, 5, 2, dtype=F64))
    with pytest.raises(ConfigError, match="x2 has shape"):
        limit_ntk(net, x16, torch.zeros(4, dtype=F64))
    with pytest.raises(ConfigError, match="same dtype and device"):
        limit_ntk(net, x16, x16.float())
    with pytest.raises(ConfigError, match="same dtype and device"):
        limit_ntk(net, x16, torch.empty(2, 5, 1, dtype=F64, device="meta"))
    with pytest.raises(ConfigError, match="method='simpson'"):
        limit_ntk(net, x16, method="simpson")
    with pytest.raises(ConfigError, match="input_dim <= 2"):
        limit_ntk(model(d=3), ar1_windows(2, 4, d=3), method="quadrature")
    with pytest.raises(ConfigError, match="tol"):
        limit_ntk(net, x16, tol=0.0)
    with pytest.raises(ConfigError, match="replicates"):
        limit_ntk(net, x16, method="rqmc", replicates=1)
