"""The closed-form Elman limit (ntk_rnn.limit.elman, theory §9): against the empirical kernel of
wide networks, an independent transcription of the published recurrent NTK recursion (ReLU), the
feed-forward kernel of the last input (mean-field, mean(A) = 0), its own error estimate, and the
cases it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from ntk_rnn.errors import ConfigError
from ntk_rnn.limit import elman_limit_ntk
from ntk_rnn.models import ElmanRNN, MeanFieldRNN
from ntk_rnn.models.activations import ACTIVATIONS
from ntk_rnn.ntk import empirical_ntk

F64 = torch.float64


def windows(n: int, L: int, d: int = 1, seed: int = 0) -> torch.Tensor:
    """Stationary VAR(1) windows X_{k+1} = 0.8 X_k + ε (as the default data)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, L, d, dtype=F64)
    x[:, 0] = torch.randn(n, d, generator=g, dtype=F64) / math.sqrt(1 - 0.64)
    for k in range(1, L):
        x[:, k] = 0.8 * x[:, k - 1] + torch.randn(n, d, generator=g, dtype=F64)
    return x


def block_ntk(model, x, x2=None) -> dict[str, torch.Tensor]:
    """The empirical kernel N^{2β−1} ∇Ŷ_L·∇Ŷ'_L per parameter (c, w, A), one backward pass per
    window (cheaper than torch.func at N = 2048); ``test_block_ntk_is_empirical_ntk`` ties it to
    ``ntk_rnn.ntk.empirical_ntk``."""
    def grads(xs):
        out = {k: [] for k in ("c", "w", "A")}
        for xi in xs:
            y = model(xi.unsqueeze(0), last_only=True)[0]
            for k, g in zip(out, torch.autograd.grad(y, [model.c, model.w, model.A])):
                out[k].append(g.reshape(-1))
        return {k: torch.stack(v) for k, v in out.items()}
    ga = grads(x)
    gb = ga if x2 is None else grads(x2)
    return {k: model.ntk_scale * ga[k] @ gb[k].T for k in ga}


def seed_mean(kw: dict, x, x2=None, N: int = 2048, seeds: int = 4):
    Ks = torch.stack([sum(block_ntk(ElmanRNN(x.shape[-1], N, seed=s, dtype=F64, **kw), x,
                                    x2).values()) for s in range(seeds)])
    return Ks.mean(0), Ks.std(0) / math.sqrt(seeds)


def test_block_ntk_is_empirical_ntk():
    x, x2 = windows(3, 5, seed=12), windows(2, 4, seed=13)
    m = ElmanRNN(1, 24, recurrent_scaling="ntk", activation="sigmoid", seed=3, dtype=F64)
    torch.testing.assert_close(sum(block_ntk(m, x, x2).values()), empirical_ntk(m, x, x2))


# --- (a) the empirical kernel of wide networks ------------------------------------------------
SLOW = pytest.mark.slow  # ~10-40 s each on a loaded 2-core machine
CASES = [
    dict(recurrent_scaling="ntk", activation="tanh"),
    pytest.param(dict(recurrent_scaling="ntk", activation="relu", A_std=0.8), marks=SLOW),
    pytest.param(dict(recurrent_scaling="ntk", activation="sigmoid", A_law="uniform",
                      c_law="normal"), marks=SLOW),
    pytest.param(dict(recurrent_scaling="ntk", activation="erf", w_scale=1.3), marks=SLOW),
    pytest.param(dict(recurrent_scaling="mean_field", activation="tanh"), marks=SLOW),
    pytest.param(dict(recurrent_scaling="mean_field", activation="sigmoid", A_mean=0.8),
                 marks=SLOW),
    pytest.param(dict(recurrent_scaling="mean_field", activation="relu", A_mean=0.5,
                      w_scale=0.7), marks=SLOW),
]


def _ids(kw):
    return "-".join(str(v) for v in kw.values())


@pytest.mark.parametrize("kw", CASES, ids=_ids)
def test_matches_wide_network(kw):
    x = windows(5, 8, seed=1)
    mean, se = seed_mean(kw, x)
    lim = elman_limit_ntk(ElmanRNN(1, 4, **kw), x)
    assert lim.converged and lim.error <= 1e-4 and lim.method == "elman_closed_form"
    # N^{-1/2} fluctuations (the standard error of 4 seeds) plus an O(1/N) bias
    assert torch.all((mean - lim.value).abs() <= 4 * se + 3e-3), (mean - lim.value, se)


@pytest.mark.parametrize("kw", [
    dict(recurrent_scaling="ntk", activation="sigmoid"),
    pytest.param(dict(recurrent_scaling="mean_field", activation="sigmoid", A_mean=0.8),
                 marks=SLOW)], ids=_ids)
def test_windows_of_different_lengths_pair_from_the_end(kw):
    """L ≠ L': the forward and backward recursions pair steps at the same distance from the
    windows' ends (sigmoid: σ(0) ≠ 0, so this differs from padding the shorter window)."""
    x, x2 = windows(4, 9, seed=2), windows(3, 5, seed=3)
    mean, se = seed_mean(kw, x, x2)
    lim = elman_limit_ntk(ElmanRNN(1, 4, **kw), x, x2)
    assert lim.value.shape == (4, 3)
    assert torch.all((mean - lim.value).abs() <= 4 * se + 3e-3), (mean - lim.value, se)
    # and K(x, x2) = K(x2, x)ᵀ
    back = elman_limit_ntk(ElmanRNN(1, 4, **kw), x2, x)
    torch.testing.assert_close(back.value.T, lim.value, atol=2 * lim.error, rtol=0)


# --- (b) the published recurrent NTK (ReLU), transcribed independently -------------------------
def _relu_k(s11, s22, s12):
    """Arc-cosine kernels: E[relu(u)relu(u')], E[1{u>0}1{u'>0}] for (u, u') ~ N(0, Σ)."""
    nrm = np.sqrt(s11 * s22)
    c = np.clip(np.where(nrm > 0, s12 / np.where(nrm > 0, nrm, 1.0), 0.0), -1.0, 1.0)
    th = np.arccos(c)
    return nrm / (2 * np.pi) * (np.sin(th) + (np.pi - th) * c), (np.pi - th) / (2 * np.pi)


def rntk_relu(x, x2, sw, su, sb, sv):
    """Alemohammad et al. (2021), Theorem 1, one layer, ReLU, h_0 = 0, in their notation: the
    forward covariances Σ_{t,t'} and K_{t,t'}, K'_{t,t'} on the full T × T' grid, Π from the end,
    τ = T' − T; returns the blocks (K_v, K_u, K_w, K_b). x (T, m), x2 (T', m)."""
    T, T2, m = len(x), len(x2), x.shape[1]

    def grid(a, b, Saa, Sbb):
        S, K, Kd = np.zeros((len(a) + 1, len(b) + 1)), np.zeros((len(a) + 1, len(b) + 1)), \
            np.zeros((len(a) + 1, len(b) + 1))
        for t in range(1, len(a) + 1):
            for u in range(1, len(b) + 1):
                S[t, u] = sw**2 * K[t - 1, u - 1] + su**2 / m * a[t - 1] @ b[u - 1] + sb**2
                K[t, u], Kd[t, u] = _relu_k(Saa[t, t], Sbb[u, u], S[t, u]) if Saa is not None \
                    else _relu_k(S[t, t] if t == u else 0, 0, 0)
        return S, K, Kd

    def self_grid(a):  # the diagonal Σ_{t,t}(x, x) first, then the grid
        S = np.zeros((len(a) + 1, len(a) + 1))
        Kdiag = np.zeros(len(a) + 1)
        for t in range(1, len(a) + 1):
            S[t, t] = sw**2 * Kdiag[t - 1] + su**2 / m * a[t - 1] @ a[t - 1] + sb**2
            Kdiag[t] = _relu_k(S[t, t], S[t, t], S[t, t])[0]
        return S

    Sxx, Syy = self_grid(x), self_grid(x2)
    S, K, Kd = grid(x, x2, Sxx, Syy)
    Tm, tau = min(T, T2), T2 - T
    Kv = sv**2 * K[T, T2]
    Ku = Kw = Kb = 0.0
    Pi = sv**2 * Kd[T, T2]
    for j in range(Tm):  # t = T − j, t' = T' − j = t + τ
        t, u = T - j, T2 - j
        if j > 0:
            Pi = sw**2 * Kd[t, u] * Pi
        Ku += Pi * su**2 / m * x[t - 1] @ x2[u - 1]
        Kw += Pi * sw**2 * K[t - 1, u - 1]
        Kb += Pi * sb**2
    assert tau == u - t
    return Kv, Ku, Kw, Kb


@pytest.mark.parametrize("lengths", [(7, 7), (7, 4), (3, 6)])
def test_relu_equals_published_rntk_block_by_block(lengths):
    d, sA, sc = 2, 0.9, 1.3
    x, x2 = windows(3, lengths[0], d, seed=4), windows(2, lengths[1], d, seed=5)
    model = ElmanRNN(d, 4, recurrent_scaling="ntk", activation="relu", A_std=sA,
                     c_law="normal", c_scale=sc)
    ours = elman_limit_ntk(model, x, x2, blocks=True)
    assert set(ours) == {"c", "w", "A"}
    for i in range(x.shape[0]):
        for j in range(x2.shape[0]):
            Kv, Ku, Kw, Kb = rntk_relu(x[i].numpy(), x2[j].numpy(), sw=sA, su=1.0, sb=0.0, sv=sc)
            assert Kb == 0.0
            assert ours["c"].value[i, j].item() == pytest.approx(Kv / sc**2, rel=1e-10, abs=1e-12)
            assert ours["w"].value[i, j].item() == pytest.approx(d * Ku, rel=1e-10, abs=1e-12)
            assert ours["A"].value[i, j].item() == pytest.approx(Kw / sA**2, rel=1e-10, abs=1e-12)
    total = elman_limit_ntk(model, x, x2).value
    torch.testing.assert_close(total, sum(b.value for b in ours.values()))


# --- (c) mean-field scaling: the feed-forward kernel of the last input --------------------------
def _gauss(f, s):
    """E[f(sZ)] by adaptive quadrature (scipy), Z ~ N(0, 1)."""
    return integrate.quad(lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                          -12, 12, limit=400, epsabs=1e-12)[0]


def _ff(f, a, b, s, ma=0.0, mb=0.0):
    """E_w[f(w a + ma) f(w b + mb)], w ~ N(0, s²)."""
    return _gauss(lambda w: f(w * a + ma) * f(w * b + mb), s)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_mean_field_memoryless_is_feed_forward(act):
    """With mean(A) = 0 (d = 1, w ~ N(0, s²)): K = E[σ(w x_L)σ(w x'_L)] + σ_c² E[σ'σ'] x_L x'_L,
    a one-dimensional integral over w, done here by scipy's adaptive quadrature."""
    s, sc = 1.2, 0.8
    x = windows(4, 6, seed=6)
    model = ElmanRNN(1, 4, recurrent_scaling="mean_field", activation=act, w_scale=s,
                     c_scale=sc)
    lim = elman_limit_ntk(model, x)
    f = ACTIVATIONS[act]
    sig = lambda v: float(f(torch.tensor(v, dtype=F64)))  # noqa: E731
    dsig = lambda v: float(f.deriv(torch.tensor(v, dtype=F64)))  # noqa: E731
    xl = x[:, -1, 0].tolist()
    for i, a in enumerate(xl):
        for j, b in enumerate(xl):
            want = _ff(sig, a, b, s) + sc**2 / 3 * _ff(dsig, a, b, s) * a * b
            assert lim.value[i, j].item() == pytest.approx(want, abs=2e-6)
    # the earlier inputs do not matter
    y = x.clone()
    y[:, :-1] = windows(4, 5, seed=7)
    torch.testing.assert_close(elman_limit_ntk(model, y).value, lim.value, atol=1e-12, rtol=0)


def test_mean_field_memory_through_mean_of_A():
    """sigmoid, mean(A) = 0.8: S̄_k by scipy quadrature, then the last step's kernel."""
    mA = 0.8
    x = windows(3, 5, seed=8)
    model = ElmanRNN(1, 4, recurrent_scaling="mean_field", activation="sigmoid", A_mean=mA)
    lim = elman_limit_ntk(model, x)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    dsig = lambda v: sig(v) * (1 - sig(v))  # noqa: E731
    mu = []
    for xs in x[:, :, 0].tolist():
        S = 0.0
        for xk in xs[:-1]:
            S = _gauss(lambda w, xk=xk, m=mA * S: sig(w * xk + m), 1.0)
        mu.append(mA * S)
    xl = x[:, -1, 0].tolist()
    for i in range(3):
        for j in range(3):
            want = _ff(sig, xl[i], xl[j], 1.0, mu[i], mu[j]) \
                + _ff(dsig, xl[i], xl[j], 1.0, mu[i], mu[j]) * xl[i] * xl[j] / 3
            assert lim.value[i, j].item() == pytest.approx(want, abs=2e-6)
    # odd σ: S̄ ≡ 0, so mean(A) changes nothing
    t0 = ElmanRNN(1, 4, recurrent_scaling="mean_field", activation="tanh")
    t1 = ElmanRNN(1, 4, recurrent_scaling="mean_field", activation="tanh", A_mean=1.5)
    torch.testing.assert_close(elman_limit_ntk(t1, x).value, elman_limit_ntk(t0, x).value)


# --- (d) the error estimate covers the error ----------------------------------------------------
@pytest.mark.parametrize("kw", [dict(recurrent_scaling="ntk", activation="tanh", A_std=1.2),
                                dict(recurrent_scaling="ntk", activation="sigmoid"),
                                dict(recurrent_scaling="mean_field", activation="relu",
                                     A_mean=0.7)])
def test_error_estimate_covers_a_finer_quadrature(kw):
    x = windows(6, 12, seed=9) * 1.5  # larger variances: harder integrands
    model = ElmanRNN(1, 4, **kw)
    fine = elman_limit_ntk(model, x, tol=1e-8, max_res=128, method="quadrature")
    for method in ("auto", "quadrature"):  # auto: the table for tanh/sigmoid
        coarse = elman_limit_ntk(model, x, tol=1e-3, method=method)
        assert coarse.error <= 1e-3
        assert torch.all((coarse.value - fine.value).abs() <= coarse.error_entries + 1e-12)


def test_blocks_sum_and_errors():
    x = windows(3, 5, seed=10)
    model = ElmanRNN(1, 4, recurrent_scaling="ntk", activation="erf")
    b = elman_limit_ntk(model, x, blocks=True)
    k = elman_limit_ntk(model, x)
    torch.testing.assert_close(k.value, b["c"].value + b["w"].value + b["A"].value)
    assert k.value.dtype == F64 and torch.allclose(k.value, k.value.T)
    assert all(v.error >= 0 for v in b.values())


# --- (e) what has no limit here -----------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(recurrent_scaling="ntk", A_mean=0.5), "model.A_mean"),
    (dict(w_law="uniform"), "model.w_law"),
    (dict(recurrent_scaling="ntk", c_law="constant"), "model.c_law"),
    (dict(recurrent_scaling="mean_field", c_law="constant", A_mean=0.5), "model.c_law"),
])
def test_refused(kw, words):
    model = ElmanRNN(1, 4, **kw)  # the constructor accepts them
    with pytest.raises(ConfigError, match=words):
        elman_limit_ntk(model, windows(2, 3))


def test_refuses_other_models_and_bad_tol():
    with pytest.raises(ConfigError, match="ElmanRNN"):
        elman_limit_ntk(MeanFieldRNN(1, 4), windows(2, 3))
    with pytest.raises(ConfigError, match="tol"):
        elman_limit_ntk(ElmanRNN(1, 4), windows(2, 3), tol=0)
    # mean-field with E[c] != 0 but mean(A) = 0 has the plain limit
    lim = elman_limit_ntk(ElmanRNN(1, 4, c_law="constant"), windows(2, 3))
    assert lim.converged


def test_relu_runs_on_the_torch_paths():
    """relu has no compiled kernel: forward, the empirical kernel and a BPTT step fall back."""
    from ntk_rnn.online.bptt import BPTTStepper
    m = ElmanRNN(1, 16, activation="relu", recurrent_scaling="ntk", seed=0, dtype=F64)
    x = windows(3, 5, seed=11)
    assert torch.isfinite(empirical_ntk(m, x)).all()
    step = BPTTStepper(m, lr=1e-2, window=4)  # engine auto: autograd (no compiled relu)
    y = step.run_chunk(x[0], torch.zeros(5, dtype=F64))
    assert y.shape == (5,) and torch.isfinite(y).all()
    assert ACTIVATIONS["relu"].sup_deriv == 1.0
    MeanFieldRNN(1, 8, activation="relu")  # Model D's contraction check uses sup_deriv
