"""Model F (output feedback, theory §6): forward, online gradients, training, cell kernel and
its limit, and the coupled limit solver, each against an independent computation."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntk_rnn import ConfigError, InitLaw, MeanFieldRNN, OnlineState, rtrl_step
from ntk_rnn.data import VAR1
from ntk_rnn.limit import limit_cell_ntk, solve_feedback_limit
from ntk_rnn.limit.feedback import ContractionWarning, FeedbackLimit
from ntk_rnn.ntk import cell_ntk
from ntk_rnn.online.feedback import FeedbackState, feedback_step
from ntk_rnn.run import Trainer

from .conftest import CALLBACKS_OFF, assert_forward_is_loop, make_cfg

f64 = torch.float64
GAUSS = InitLaw(b="normal", rho=1.0)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed inputs; one intra-op thread: these tests run many small ops, which on a shared,
    busy machine are ~10× slower with two contending OpenMP threads than with one."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fmodel(d=2, N=19, beta=0.7, act="tanh", init=GAUSS, seed=2, dtype=f64):
    return MeanFieldRNN(d, N, beta=beta, activation=act, recurrence="feedback", init=init,
                        dtype=dtype, seed=seed)


def per_unit_loop(model, x):
    """Ŷ_k = N^{-β} Σ_i c_i σ(w_i·X_k + b_i m_k), m_{k+1} = Ŷ_k, unit by unit, step by step."""
    c, w, b = model.c.detach(), model.w.detach(), model.b.detach()
    m, out = 0.0, []
    for k in range(x.shape[0]):
        y = sum(c[i] * model.act(torch.dot(w[i], x[k]) + b[i] * m) for i in range(model.width))
        m = y * model.width ** (-model.beta)
        out.append(m)
    return torch.stack(out)


def autograd_last(model, x, detach_memory=False):
    """∇_θ Ŷ_L by autograd through the whole window (or through the last step, m_L detached)."""
    c, w, b = (p.detach().clone().requires_grad_() for p in (model.c, model.w, model.b))
    m = torch.zeros((), dtype=x.dtype)
    for k in range(x.shape[0]):
        s = m.detach() if detach_memory and k == x.shape[0] - 1 else m
        m = model.output_scale * torch.dot(c, model.act(w @ x[k] + b * s))
    return torch.autograd.grad(m, (c, w, b))


# --- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_forward_equals_per_unit_loop(act):
    m = fmodel(act=act, init=InitLaw(b="normal", rho=2.0))
    assert_forward_is_loop(m, torch.randn(2, 7, 2, dtype=f64), per_unit_loop)
    a = torch.randn(5, 3, dtype=f64)  # the cell f_θ(x, s)
    ref = torch.stack([m.output_scale * torch.dot(
        m.c.detach(), m.act(m.w.detach() @ r[:2] + m.b.detach() * r[2])) for r in a])
    torch.testing.assert_close(m.cell(a[:, :2], a[:, 2]).detach(), ref, rtol=1e-12, atol=1e-14)


def test_feedback_init_and_errors():
    m = fmodel(N=50_000, d=4, seed=0)  # Gaussian b is allowed for Model F
    assert abs(float(m.b.detach().var()) - 1.0) < 0.03 and m.b.detach().abs().max() > 3
    fmodel(init=InitLaw(w="uniform", b="uniform", rho=5.0))  # no contraction check on b
    with pytest.raises(ConfigError, match="unit_features"):
        m.unit_features(torch.zeros(1, 3, 4))
    with pytest.raises(ConfigError, match=r"model\.init\.b"):  # Model D unchanged
        MeanFieldRNN(2, 8, init=InitLaw(b="normal"))
    with pytest.raises(ConfigError, match="augmented inputs"):
        cell_ntk(fmodel(), torch.zeros(3, 2, dtype=f64))


# --- online gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
def test_online_gradient_equals_autograd(gradient):
    """With θ frozen (lr = 0) the gradient the step uses equals ∇_θ Ŷ_L by autograd through the
    whole window (rtrl) or through the last step with m_L detached (truncated); Ŷ = forward."""
    d, L = 3, 15
    m = fmodel(d=d, N=23, init=InitLaw(b="normal", rho=2.0))
    x = torch.randn(L, d, dtype=f64)
    st = OnlineState.zeros(m)
    assert isinstance(st, FeedbackState)
    y = torch.stack([rtrl_step(m, st, x[k], 0.0, lr=0.0, gradient=gradient) for k in range(L)])
    torch.testing.assert_close(y, m(x).detach(), rtol=0, atol=1e-14)
    for g, a in zip((st.dc, st.dw, st.db), autograd_last(m, x, gradient == "one_step")):
        assert float((g - a).norm() / a.norm()) <= 1e-10


def test_window_jacobian_by_torch_func():
    """forward is torch.func-compatible: vmap(jacrev) over single windows gives the RTRL
    gradients, and the normalised window NTK N^{2β−1} J Jᵀ (the generic engine when present)."""
    m = fmodel(d=2, N=17)
    X = torch.randn(4, 9, 2, dtype=f64)
    params = {k: p.detach() for k, p in m.named_parameters()}
    one = lambda p, xi: functional_call(m, p, (xi,))[-1]  # noqa: E731
    J = vmap(jacrev(one), in_dims=(None, 0))(params, X)
    G = []
    for n in range(4):
        st = OnlineState.zeros(m)
        for k in range(9):
            rtrl_step(m, st, X[n, k], 0.0, 0.0)
        G.append(torch.cat([st.dc, st.dw.reshape(-1), st.db]))
    G = torch.stack(G)
    Jm = torch.cat([J["c"], J["w"].reshape(4, -1), J["b"]], 1)
    torch.testing.assert_close(Jm, G, rtol=1e-10, atol=1e-14)
    try:
        from ntk_rnn.ntk import empirical_ntk
    except ImportError:
        return
    K = empirical_ntk(m, X, method="jacobian")
    torch.testing.assert_close(K, m.ntk_scale * G @ G.T, rtol=1e-10, atol=1e-14)


def test_truncated_training_equals_naive_autograd_sgd():
    """Online truncated SGD equals backward() + torch.optim.SGD with the fed-back memory
    detached, over 200 steps (an independent implementation of theory §3 for Model F)."""
    d, N, alpha = 2, 30, 3.0
    m, ref = fmodel(d=d, N=N, seed=3), fmodel(d=d, N=N, seed=3)
    lr = m.learning_rate(alpha)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    st = OnlineState.zeros(m)
    X = torch.randn(200, d, dtype=f64)
    Y = torch.tanh(X[:, 0] - 0.5 * torch.roll(X[:, 0], 1))
    mem = torch.zeros((), dtype=f64)
    for k in range(200):
        y_fast = rtrl_step(m, st, X[k], Y[k], lr, "one_step")
        y_ref = ref.cell(X[k], mem)
        opt.zero_grad()
        (0.5 * (Y[k] - y_ref) ** 2).backward()
        opt.step()
        mem = y_ref.detach()
        assert abs(float(y_fast - y_ref.detach())) < 1e-12
    for p, q in zip(m.parameters(), ref.parameters()):
        assert (p - q).norm() / q.norm() < 1e-12


def test_rtrl_step_is_simultaneous_sgd():
    """One step with carried sensitivity: θ ← θ + α_N (Y − Ŷ) ∂Ŷ_k/∂θ (autograd, θ before)."""
    m = fmodel(d=2, N=21)
    x = torch.randn(6, 2, dtype=f64)
    st = OnlineState.zeros(m)
    for k in range(5):
        rtrl_step(m, st, x[k], 0.0, 0.0)
    theta = [p.detach().clone() for p in m.parameters()]
    grads = autograd_last(m, x)
    y_hat = m(x).detach()[-1]
    lr = m.learning_rate(2.0)
    rtrl_step(m, st, x[5], 0.4, lr)
    for p, t, g in zip(m.parameters(), theta, grads):
        torch.testing.assert_close(p.detach(), t + lr * (0.4 - y_hat) * g, rtol=0, atol=1e-13)
    saved = {k: v.clone() for k, v in st.state_dict().items()}
    st2 = FeedbackState.zeros(m)
    st2.load_state_dict(saved)
    assert all(torch.equal(st2.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(feedback_step(m, st, x[0], 0.0, 0.0), feedback_step(m, st2, x[0], 0.0, 0.0))


@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
def test_trainer_runs_feedback_and_learns(tmp_path, gradient):
    cfg = make_cfg("model=feedback", CALLBACKS_OFF, "model.width=256", "train.horizon=4",
                   "dtype=float64", "train.mse_window=128", f"train.gradient={gradient}",
                   "logger.tensorboard=false")
    tr = Trainer.from_config(cfg, tmp_path)
    out = tr.fit()
    first = next(v for k, v in tr.history["train/running_mse"] if k >= 128)  # the first window
    assert out["status"] == "completed" and out["steps"] == 1024
    assert out["running_mse"] < 0.5 * first, (first, out["running_mse"])
    assert set(tr.online.state_dict()) == {"m", "dc", "dw", "db"}


# --- the cell kernel and its limit ---------------------------------------------------------------
class _Cell(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, a):
        return self.m.cell(a[..., :-1], a[..., -1])


@pytest.mark.parametrize("act", ["tanh", "erf"])
def test_cell_ntk_equals_torch_func_jacobian(act):
    m = fmodel(d=3, N=37, act=act)
    a, a2 = torch.randn(6, 4, dtype=f64), torch.randn(5, 4, dtype=f64)
    cell = _Cell(m)
    params = {k: p.detach() for k, p in cell.named_parameters()}

    def jac(z):  # per-row Jacobians of the cell, flattened over (c, w, b)
        J = vmap(jacrev(lambda p, r: functional_call(cell, p, (r,))), in_dims=(None, 0))(params, z)
        return torch.cat([v.reshape(z.shape[0], -1) for v in J.values()], 1)

    K = m.ntk_scale * jac(a) @ jac(a2).T
    torch.testing.assert_close(cell_ntk(m, a, a2), K, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(cell_ntk(m, a), m.ntk_scale * jac(a) @ jac(a).T, rtol=1e-10,
                               atol=1e-14)


def _mc_cell_kernel(model, a, n=2**17, reps=8, seed=1):
    """Plain Monte Carlo of K_cell over θ ~ μ0 (R batch means) → (mean, standard error)."""
    g = torch.Generator().manual_seed(seed)
    ests = []
    for _ in range(reps):
        c, w, b = model.init_law.sample(n, model.input_dim, g, dtype=f64)
        S, dS = model.act.value_and_deriv(a[:, :-1] @ w.T + a[:, -1:] * b)
        ests.append((S @ S.T + ((c * dS) @ (c * dS).T) * (a @ a.T)) / n)
    E = torch.stack(ests)
    return E.mean(0), E.std(0) / math.sqrt(reps)


@pytest.mark.parametrize("act, method", [("erf", "closed"), ("tanh", "quadrature"),
                                         ("sigmoid", "quadrature")])
def test_limit_cell_kernel_against_monte_carlo(act, method):
    m = fmodel(d=2, act=act, init=InitLaw(b="normal", rho=0.7, w_scale=1.5))
    a = torch.cat([torch.randn(6, 2, dtype=f64) * 1.5, torch.rand(6, 1, dtype=f64) * 2 - 1], 1)
    lim = limit_cell_ntk(m, a, tol=1e-5)
    assert lim.method == method and lim.error <= 1e-5 and lim.converged
    mc, se = _mc_cell_kernel(m, a)
    z = (lim.value - mc).abs() / se
    assert float(z.max()) < 4.0, z
    if act == "erf":  # the 2-D quadrature reproduces the closed form
        a = a / 3  # small Σ: the quadratures resolve erf' = e^{-z²} quickly (Gauss–Hermite too)
        for rule in ("trapezoid", "hermite"):
            q = limit_cell_ntk(m, a, method="quadrature", rule=rule, tol=1e-9, max_nodes=300)
            assert q.converged
            torch.testing.assert_close(q.value, limit_cell_ntk(m, a).value, rtol=0, atol=1e-9)


def test_limit_cell_kernel_quadrature_reaches_tol_on_wide_inputs():
    """Probes as far out as a VAR(1) stationary sample reaches (|x| = 6): the trapezoid rule
    must use its whole node budget (513 per axis), reach tol, and its error estimate must bound
    the true error against the erf closed form (regression: it stopped at 257 nodes, 6e-3)."""
    m = fmodel(d=1, act="erf", init=InitLaw(b="normal", rho=1.0))
    x = torch.linspace(-6, 6, 13, dtype=f64)[:, None]
    a = torch.cat([x, torch.zeros_like(x)], 1)
    exact = limit_cell_ntk(m, a, method="closed").value
    q = limit_cell_ntk(m, a, method="quadrature", tol=2e-4)
    assert q.converged and q.n_points == 513**2
    assert float((q.value - exact).abs().max()) <= q.error


def test_limit_cell_kernel_rqmc_for_uniform_law():
    m = fmodel(d=2, init=InitLaw(w="uniform", b="uniform", rho=2.0))
    a = torch.randn(5, 3, dtype=f64)
    with pytest.raises(ConfigError, match="Gaussian"):
        limit_cell_ntk(m, a, method="quadrature")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lim = limit_cell_ntk(m, a, n_points=2**12)
    assert lim.method == "rqmc" and 0 < lim.error < 1e-3
    mc, se = _mc_cell_kernel(m, a)
    assert float(((lim.value - mc).abs() / (se + lim.error_entries / 2)).max()) < 4.0


def test_empirical_cell_kernel_approaches_limit():
    """‖K^N − K‖/‖K‖ falls like N^{-1/2} (law of large numbers over units, theory §5)."""
    a = torch.cat([torch.randn(8, 1, dtype=f64), torch.rand(8, 1, dtype=f64) * 2 - 1], 1)
    err = {}
    for N in (2**8, 2**16):
        errs = []
        for seed in range(4):
            m = fmodel(d=1, N=N, act="erf", seed=seed)
            K = limit_cell_ntk(m, a).value
            errs.append(float((cell_ntk(m, a) - K).norm() / K.norm()))
        err[N] = sum(errs) / len(errs)
    assert err[2**16] < 1e-2
    assert 0.25 / 16 < err[2**16] / err[2**8] < 4.0 / 16, err  # expected ratio 1/16


# --- the coupled limit ----------------------------------------------------------------------------
def _sample(M, L, seed=0):
    src = VAR1(dim=1, A=0.8, noise_scale=0.6,
               target=dict(_target_="ntk_rnn.data.LagNonlinear", a=1.0, b=-0.5))
    g = torch.Generator().manual_seed(seed)
    return src.windows(M, L, g), src.windows(16, L, g)[0]


def test_coupled_limit_without_memory_is_the_kernel_recursion():
    """L = 1 (m ≡ 0): Euler on the sampled flow gives h_n(A) = Y − (I − α dt K/M)^n Y exactly,
    with K the solver's quadrature kernel, which is close to the analytic K_cell."""
    m = fmodel(d=1, act="erf")
    (X, Y), _ = _sample(64, 1)
    sol = solve_feedback_limit(m, X, Y, alpha=3.0, horizon=1.0, dt=0.1, gradient="one_step",
                               n_features=1024)
    A = torch.cat([X[:, 0], torch.zeros(64, 1, dtype=f64)], 1)
    K = sol.limit.kernel(A)
    step = torch.eye(64, dtype=f64) - 3.0 * 0.1 * K / 64
    h = Y - torch.linalg.matrix_power(step, 10) @ Y
    torch.testing.assert_close(sol.limit.h(A), h, rtol=0, atol=1e-10)
    exact = limit_cell_ntk(m, A).value
    assert float((K - exact).norm() / exact.norm()) < 2e-3


def test_coupled_limit_converges_under_refinement():
    """dt halved and M doubled: the probe outputs at t = 1 settle (Euler O(dt) + sample
    O(M^{-1/2})); at fixed M the dt-differences halve (first order)."""
    (X, Y), P = _sample(512, 8)
    m = fmodel(d=1)
    lim = lambda: FeedbackLimit.from_model(m, n_features=256)  # same quadrature K_J  # noqa: E731
    run = lambda dt, M: solve_feedback_limit(  # noqa: E731
        m, X[:M], Y[:M], alpha=4.0, horizon=1.0, dt=dt, probes=P, limit=lim())
    rms = lambda a, b: float((a.h_probes[-1] - b.h_probes[-1]).pow(2).mean().sqrt())  # noqa: E731
    s0, s1, s2 = run(0.25, 128), run(0.125, 256), run(0.0625, 512)
    assert rms(s1, s2) < 0.8 * rms(s0, s2)
    assert rms(s1, s2) < 0.1 * float(s2.h_probes[-1].pow(2).mean().sqrt())
    t1, t2 = run(0.125, 128), run(0.0625, 128)
    d0, d1 = rms(s0, t1), rms(t1, t2)
    assert 1.6 < d0 / d1 < 2.6, (d0, d1)
    assert s2.mse[-1] < 0.3 * s2.mse[0] and 0 < float(s2.contraction[-1]) < 1
    assert torch.all(torch.diff(s2.mse) < 0)  # the sampled loss decreases along the flow


def test_rtrl_and_truncated_limits_differ_by_the_memory_terms():
    (X, Y), P = _sample(128, 8)
    m = fmodel(d=1)
    sols = {g: solve_feedback_limit(m, X, Y, 4.0, 1.0, 0.125, probes=P, gradient=g,
                                    n_features=256) for g in ("rtrl", "one_step")}
    d = float((sols["rtrl"].h_probes - sols["one_step"].h_probes).abs().max())
    assert 1e-4 < d < 0.2  # equal at first order; apart once ∂_s h_t = O(1)
    torch.testing.assert_close(sols["rtrl"].h_probes[:2], sols["one_step"].h_probes[:2])


def test_contraction_failure_warns():
    (X, Y), _ = _sample(32, 6)
    m = fmodel(d=1)
    lim = FeedbackLimit.from_model(m, n_features=256)
    lim.v[:, -1] = 50.0  # h(x, s) ≈ κ s with κ ≫ 1
    A = torch.cat([X[:, -1], torch.zeros(32, 1, dtype=f64)], 1)
    assert float(lim.dh_ds(A).abs().min()) > 1
    e = torch.zeros_like(A)
    e[:, -1] = 1e-6
    torch.testing.assert_close(lim.dh_ds(A), (lim.h(A + e) - lim.h(A - e)) / 2e-6, rtol=1e-7,
                               atol=0)
    with pytest.warns(ContractionWarning, match="need not contract"):
        solve_feedback_limit(m, X, Y, 1.0, 0.0, 0.1, limit=lim)
