"""MeanFieldRNN and the RTRL step against independent computations (theory §2, §3)."""

import math

import pytest
import torch

from ntk_rnn import ConfigError, InitLaw, MeanFieldRNN, OnlineState, rtrl_step

from .conftest import assert_forward_is_loop

f64 = torch.float64


def per_unit_loop(model, x):
    """Ŷ_k = N^{-β} Σ_i c_i S_{i,k+1}, written unit by unit, step by step (no vectorisation)."""
    N, L = model.width, x.shape[0]
    c, w, b = model.c.detach(), model.w.detach(), model.b.detach()
    out = torch.zeros(L, dtype=x.dtype)
    for i in range(N):
        s = 0.0
        for k in range(L):
            s = model.act(torch.dot(w[i], x[k]) + b[i] * s)
            out[k] += c[i] * s
    return out * N ** (-model.beta)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "erf"])
def test_forward_equals_per_unit_loop(activation):
    m = MeanFieldRNN(3, 17, beta=0.6, activation=activation, dtype=f64, seed=1)
    assert_forward_is_loop(m, torch.randn(2, 9, 3, dtype=f64), per_unit_loop)


def test_default_init_law_matches_theory():
    m = MeanFieldRNN(4, 200_000, seed=0, dtype=f64)
    c, w, b = m.c.detach(), m.w.detach(), m.b.detach()
    assert c.abs().max() <= 1 and b.abs().max() <= 0.5
    assert abs(float((c**2).mean()) - 1 / 3) < 5e-3  # U[-1, 1]
    assert abs(float(w.var()) - 1 / 4) < 5e-3  # N(0, I/d), d = 4
    assert abs(float((b**2).mean()) - 0.25 / 3) < 2e-3  # U[-ρ, ρ]


def test_seed_is_reproducible_and_dtype_device():
    a = MeanFieldRNN(2, 32, seed=5)
    b = MeanFieldRNN(2, 32, seed=5)
    assert torch.equal(a.w, b.w) and a.c.dtype == torch.float32
    assert MeanFieldRNN(2, 32, seed=5, dtype=f64).c.dtype == f64


@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
def test_rtrl_equals_autograd_through_window(gradient):
    """With θ frozen (lr = 0), G = N^{-β}(S, cP, cQ) equals ∇_θ Ŷ_L by autograd through the
    whole window (rtrl) or through the last step only, memory detached (truncated)."""
    d, N, L = 3, 23, 15
    m = MeanFieldRNN(d, N, beta=0.7, dtype=f64, seed=2, init=InitLaw(rho=0.9))
    x = torch.randn(L, d, dtype=f64)
    st = OnlineState.zeros(m)
    for k in range(L):
        rtrl_step(m, st, x[k], 0.0, lr=0.0, gradient=gradient)
    scale = m.output_scale
    G = [scale * st.S, scale * m.c.detach()[:, None] * st.P, scale * m.c.detach() * st.Q]

    c, w, b = (p.detach().clone().requires_grad_() for p in (m.c, m.w, m.b))
    S = torch.zeros(N, dtype=f64)
    for k in range(L):
        S_in = S.detach() if gradient == "one_step" else S
        S = m.act(w @ x[k] + b * S_in)
    y = scale * torch.dot(c, S)
    auto = torch.autograd.grad(y, (c, w, b))
    for g, a in zip(G, auto):
        rel = (g - a).norm() / a.norm()
        assert rel <= 1e-10, rel


def test_truncated_training_equals_naive_autograd_sgd():
    """Online truncated SGD equals nn.Module + backward() + torch.optim.SGD with the memory
    detached each step — an independent implementation of theory §3 — over 300 steps."""
    d, N, beta, alpha = 2, 40, 0.75, 3.0
    m = MeanFieldRNN(d, N, beta=beta, dtype=f64, seed=3)
    ref = MeanFieldRNN(d, N, beta=beta, dtype=f64, seed=3)
    opt = torch.optim.SGD(ref.parameters(), lr=m.learning_rate(alpha))
    st = OnlineState.zeros(m)
    X = torch.randn(300, d, dtype=f64)
    Y = torch.tanh(X[:, 0])
    S = torch.zeros(N, dtype=f64)
    for k in range(300):
        y_fast = rtrl_step(m, st, X[k], Y[k], m.learning_rate(alpha), "one_step")
        S = ref.act(X[k] @ ref.w.T + ref.b * S.detach())
        y_ref = ref.output_scale * S @ ref.c
        opt.zero_grad()
        (0.5 * (Y[k] - y_ref) ** 2).backward()
        opt.step()
        assert abs(float(y_fast - y_ref)) < 1e-12
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (p - q).norm() / q.norm() < 1e-12


def test_rtrl_first_step_equals_autograd_sgd():
    """From zero memory the first update is exactly θ ← θ − α_N ∇_θ ℓ_0 (autograd)."""
    d, N = 2, 30
    m = MeanFieldRNN(d, N, dtype=f64, seed=4)
    lr = m.learning_rate(2.0)
    X = torch.randn(2, d, dtype=f64)
    Y = torch.tensor([0.3, -0.2], dtype=f64)
    st = OnlineState.zeros(m)
    theta = [p.detach().clone() for p in m.parameters()]
    rtrl_step(m, st, X[0], Y[0], lr)
    c, w, b = (t.clone().requires_grad_() for t in theta)
    y0 = m.output_scale * torch.dot(c, m.act(w @ X[0]))
    grads = torch.autograd.grad(0.5 * (Y[0] - y0) ** 2, (c, w, b), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta)]
    for p, t, g in zip(m.parameters(), theta, grads):
        torch.testing.assert_close(p.detach(), t - lr * g, rtol=0, atol=1e-14)


def test_learning_rate_and_time_scaling():
    for N, beta in [(64, 0.6), (1024, 0.75), (4096, 1.0)]:
        m = MeanFieldRNN(1, N, beta=beta)
        assert math.isclose(m.learning_rate(2.5), 2.5 * N ** (2 * beta - 2))
        assert math.isclose(m.output_scale, N ** (-beta))
        assert math.isclose(m.ntk_scale, N ** (2 * beta - 1))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(width=0), "model.width"),
        (dict(beta=1.5), "model.beta"),
        (dict(beta=0.4), "model.beta"),
        (dict(init=InitLaw(rho=1.2)), "model.init.rho"),
        (dict(activation="erf", init=InitLaw(rho=0.9)), "model.init.rho"),
        (dict(activation="softplus"), "model.activation"),
        (dict(init=InitLaw(b="normal")), "model.init.b"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    args = dict(input_dim=2, width=8)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MeanFieldRNN(**args)


def test_sigmoid_allows_larger_rho():
    MeanFieldRNN(1, 4, activation="sigmoid", init=InitLaw(rho=3.9))  # 3.9 · 1/4 < 1


def test_bad_window_shapes():
    m = MeanFieldRNN(3, 8)
    for bad in (torch.zeros(4, 5, 2), torch.zeros(3), torch.zeros(1, 2, 3, 3)):
        with pytest.raises(ConfigError, match="expected windows"):
            m(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a = MeanFieldRNN(2, 64, seed=0, dtype=f64)
    g = MeanFieldRNN(2, 64, seed=0, dtype=f64, device="cuda")
    x = torch.randn(3, 7, 2, dtype=f64)
    torch.testing.assert_close(g(x.cuda()).cpu(), a(x))
