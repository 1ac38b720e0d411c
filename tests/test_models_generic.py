"""ElmanRNN and GRURNN: forward against independent loops, initial laws, scalings, errors."""

import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from ntk_rnn.errors import ConfigError
from ntk_rnn.models import GRURNN, ElmanRNN, MeanFieldRNN
from ntk_rnn.ntk import empirical_ntk

F64 = torch.float64
NP_ACT = {"tanh": np.tanh, "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)), "erf": erf}


def elman_numpy(m: ElmanRNN, x: np.ndarray, h0=None) -> tuple[np.ndarray, np.ndarray]:
    """Explicit loop over windows, steps and units:
    S_{k+1,i} = σ(Σ_p w_ip X_kp + N^-γ Σ_l A_il S_kl), Ŷ_k = N^-β Σ_i c_i S_{k+1,i}."""
    c, w, A = (p.detach().numpy() for p in (m.c, m.w, m.A))
    N, gam, beta = m.width, m.gamma, m.beta
    sig = NP_ACT[m.act.name]
    B, L, _ = x.shape
    Y, H = np.zeros((B, L)), np.zeros((B, L, N))
    for bi in range(B):
        S = np.zeros(N) if h0 is None else h0[bi].copy()
        for k in range(L):
            S_new = np.empty(N)
            for i in range(N):
                S_new[i] = sig(np.dot(w[i], x[bi, k]) + N ** (-gam) * np.dot(A[i], S))
            S = S_new
            H[bi, k] = S
            Y[bi, k] = N ** (-beta) * np.dot(c, S)
    return Y, H


@pytest.mark.parametrize("scaling", ["mean_field", "ntk"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_elman_forward_matches_explicit_loop(scaling, act):
    m = ElmanRNN(3, 9, beta=0.8, recurrent_scaling=scaling, activation=act, A_mean=0.4,
                 A_std=1.3, seed=2, dtype=F64)
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y, H = m(x, return_states=True)
    y_ref, H_ref = elman_numpy(m, x.numpy())
    assert y.shape == (4, 6) and H.shape == (4, 6, 9)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(H.detach().numpy(), H_ref, rtol=0, atol=1e-13)
    # from a given memory, and one unbatched window
    h0 = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=F64)
    y0_ref, _ = elman_numpy(m, x.numpy(), h0.numpy())
    np.testing.assert_allclose(m(x, h0=h0).detach().numpy(), y0_ref, atol=1e-13)
    np.testing.assert_allclose(m(x[1]).detach().numpy(), y_ref[1], atol=1e-13)
    y1, H1 = m(x[2], h0=h0[2], return_states=True)
    assert y1.shape == (6,) and H1.shape == (6, 9)
    np.testing.assert_allclose(y1.detach().numpy(), y0_ref[2], atol=1e-13)
    # last_only (what empirical_ntk asks for): Ŷ_L alone
    np.testing.assert_allclose(m(x, last_only=True).detach().numpy(), y_ref[:, -1], atol=1e-13)
    assert m(x[0], last_only=True).shape == ()


def gru_numpy(m: GRURNN, x: np.ndarray) -> np.ndarray:
    """Explicit gate equations, one window and step at a time."""
    cell = m.cell
    Wi, Wh = cell.weight_ih.detach().numpy(), cell.weight_hh.detach().numpy() * m.recurrent_scale
    bi, bh = cell.bias_ih.detach().numpy(), cell.bias_hh.detach().numpy()
    c, N = m.c.detach().numpy(), m.width
    sg = NP_ACT["sigmoid"]
    Y = np.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        h = np.zeros(N)
        for k in range(x.shape[1]):
            a, r_ = Wi @ x[b, k] + bi, Wh @ h + bh
            r = sg(a[:N] + r_[:N])
            z = sg(a[N:2 * N] + r_[N:2 * N])
            n = np.tanh(a[2 * N:] + r * r_[2 * N:])
            h = (1 - z) * n + z * h
            Y[b, k] = N ** (-m.beta) * c @ h
    return Y


@pytest.mark.parametrize("scaling", ["ntk", "mean_field"])
def test_gru_forward_matches_grucell_and_explicit_loop(scaling):
    m = GRURNN(2, 11, beta=0.7, recurrent_scaling=scaling, bias_std=0.5, seed=4, dtype=F64)
    x = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = m(x)
    # torch's own fused GRU cell, with the N^-γ folded into a copy of W_hh
    ref = torch.nn.GRUCell(2, 11, dtype=F64)
    with torch.no_grad():
        ref.weight_ih.copy_(m.cell.weight_ih)
        ref.weight_hh.copy_(m.cell.weight_hh * m.recurrent_scale)
        ref.bias_ih.copy_(m.cell.bias_ih)
        ref.bias_hh.copy_(m.cell.bias_hh)
        h, outs = torch.zeros(3, 11, dtype=F64), []
        for k in range(7):
            h = ref(x[:, k], h)
            outs.append(h @ m.c * 11 ** -0.7)
    torch.testing.assert_close(y, torch.stack(outs, 1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(y.detach().numpy(), gru_numpy(m, x.numpy()), atol=1e-13)
    y_s, H = m(x[0], return_states=True)
    assert y_s.shape == (7,) and H.shape == (7, 11)
    torch.testing.assert_close(y_s, y[0])
    torch.testing.assert_close(m(x, last_only=True), y[:, -1])


def test_gru_without_bias():
    m = GRURNN(2, 5, bias=False, seed=1, dtype=F64)
    assert m.cell.bias_ih is None
    x = torch.randn(2, 4, 2, dtype=F64)
    assert m(x).shape == (2, 4)


def test_initial_laws_and_reset_parameters():
    m = ElmanRNN(4, 300, A_mean=0.5, A_std=2.0, seed=3, dtype=F64)
    c, w, A = m.c.detach(), m.w.detach(), m.A.detach()
    assert c.abs().max() <= 1.0 and abs(float(c.mean())) < 0.1
    assert abs(float(w.std()) - 0.5) < 0.03  # N(0, I/d), d = 4
    assert abs(float(A.mean()) - 0.5) < 0.03 and abs(float(A.std()) - 2.0) < 0.03
    mu = ElmanRNN(4, 300, A_mean=-1.0, A_std=0.5, A_law="uniform", seed=3, dtype=F64).A.detach()
    assert float(mu.max()) <= -1.0 + 0.5 * math.sqrt(3) + 1e-12
    assert abs(float(mu.std()) - 0.5) < 0.01
    # c and w as MeanFieldRNN's μ0 with the same seed (same draws, same order)
    d = MeanFieldRNN(4, 300, seed=3, dtype=F64)
    torch.testing.assert_close(c, d.c.detach())
    torch.testing.assert_close(w, d.w.detach())
    # reset_parameters(generator) redraws θ_0 deterministically
    for model_cls in (ElmanRNN, GRURNN):
        a, b = model_cls(2, 8, seed=0), model_cls(2, 8, seed=99)
        a.reset_parameters(torch.Generator().manual_seed(7))
        b.reset_parameters(torch.Generator().manual_seed(7))
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), k
        before = [p.detach().clone() for p in a.parameters()]
        a.reset_parameters(torch.Generator().manual_seed(8))
        assert not torch.equal(before[0], a.c)
        a.reset_parameters()  # default: the constructor's seed
        ref = model_cls(2, 8, seed=0)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), ref.parameters()))


@pytest.mark.parametrize("beta", [0.5, 0.75, 1.0])
def test_scalings_match_mean_field_rnn(beta):
    ref = MeanFieldRNN(1, 64, beta=beta)
    for m in (ElmanRNN(1, 64, beta=beta), GRURNN(1, 64, beta=beta)):
        assert m.ntk_scale == ref.ntk_scale and m.output_scale == ref.output_scale
        assert m.learning_rate(2.5) == ref.learning_rate(2.5)
        assert m.width == 64 and m.input_dim == 1 and m.memory_dim == 64
    assert ElmanRNN(1, 64).recurrent_scale == 1 / 64
    assert ElmanRNN(1, 64, recurrent_scaling="ntk").recurrent_scale == 1 / 8


def test_bad_arguments_name_the_config_key():
    with pytest.raises(ConfigError, match=r"model\.recurrent_scaling='xavier'.*choose one of"):
        ElmanRNN(1, 4, recurrent_scaling="xavier")
    with pytest.raises(ConfigError, match=r"model\.recurrent_scaling"):
        GRURNN(1, 4, recurrent_scaling="both")
    with pytest.raises(ConfigError, match=r"model\.width"):
        ElmanRNN(1, 0)
    with pytest.raises(ConfigError, match=r"model\.input_dim"):
        GRURNN(0, 4)
    with pytest.raises(ConfigError, match=r"model\.beta"):
        ElmanRNN(1, 4, beta=1.5)
    with pytest.raises(ConfigError, match=r"model\.activation"):
        ElmanRNN(1, 4, activation="relu6")
    with pytest.raises(ConfigError, match=r"model\.A_law"):
        ElmanRNN(1, 4, A_law="cauchy")
    with pytest.raises(ConfigError, match=r"model\.A_std"):
        ElmanRNN(1, 4, A_std=-1.0)
    with pytest.raises(ConfigError, match=r"model\.c_law"):
        ElmanRNN(1, 4, c_law="gamma")
    with pytest.raises(ConfigError, match=r"model\.hh_std"):
        GRURNN(1, 4, hh_std=-0.1)
    m = ElmanRNN(2, 4)
    with pytest.raises(ConfigError, match=r"expected windows"):
        m(torch.zeros(3, 5, 3))
    with pytest.raises(ConfigError, match=r"h0 has shape"):
        m(torch.zeros(3, 5, 2), h0=torch.zeros(2, 4))


@pytest.mark.parametrize("model_cls", [ElmanRNN, GRURNN])
def test_empirical_ntk_generic_path(model_cls):
    """torch.func (vmap + jacrev, and vjp + jvp) runs through both models and agrees."""
    m = model_cls(2, 12, seed=1, dtype=F64)
    x = torch.randn(5, 6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    K1 = empirical_ntk(m, x, method="jacobian")
    K2 = empirical_ntk(m, x, method="ntk_vp")
    torch.testing.assert_close(K1, K2, rtol=1e-12, atol=1e-12)
    # normalised: s ∇f·∇f with s = N^{2β-1}, checked on one entry by autograd
    y = m(x[2:3])[0, -1]
    g = torch.autograd.grad(y, list(m.parameters()))
    k22 = sum(float((gi * gi).sum()) for gi in g) * m.ntk_scale
    assert abs(float(K1[2, 2]) - k22) < 1e-12 * max(1.0, k22)
