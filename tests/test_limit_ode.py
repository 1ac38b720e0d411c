"""LimitODE (theory §5) against closed forms, the ODE itself, and an exactly known π."""

import itertools

import pytest
import scipy.linalg
import torch

from ntk_rnn import MeanFieldRNN
from ntk_rnn.data import LagNonlinear, MarkovChain
from ntk_rnn.limit import KernelSolution, LimitODE
from ntk_rnn.limit.kernel import limit_ntk

f64 = torch.float64


def random_problem(M=40, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(M + n, 60, generator=g, dtype=f64)
    K = Z @ Z.T / 60 + 0.05 * torch.eye(M + n, dtype=f64)  # well conditioned PSD kernel
    Y = torch.randn(M, generator=g, dtype=f64)
    return K[:M, :M], K[M:, :M], Y


def test_t_to_infinity_is_kernel_regression():
    K_MM, K_xM, Y = random_problem()
    ode = LimitODE.from_kernels([K_MM], [Y], [K_xM], alpha=3.0)
    reg = K_xM @ torch.linalg.solve(K_MM, Y)
    torch.testing.assert_close(ode.h_inf(), reg, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ode.h(1e7)[0], reg, rtol=1e-8, atol=1e-9)


def test_reduced_solution_restores_the_same_h(tmp_path):
    """reduced()/from_reduced (λ, Vᵀ Y, K_xM V: what the output callback caches) give the same
    h_t, error and h_∞ as the full solution, through a checkpoint-format file."""
    from ntk_rnn.checkpoint import load_checkpoint, save_checkpoint

    probs = [random_problem(seed=s) for s in (3, 4)]
    ode = LimitODE.from_kernels([p[0] for p in probs], [p[2] for p in probs],
                                [p[1] for p in probs], alpha=2.5)
    save_checkpoint(tmp_path / "r.pt", ode.reduced())
    back = LimitODE.from_reduced(load_checkpoint(tmp_path / "r.pt"), alpha=2.5)
    t = torch.tensor([0.0, 0.1, 1.0, 30.0], dtype=f64)
    for f in ("h", "error"):
        torch.testing.assert_close(getattr(back, f)(t), getattr(ode, f)(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(back.h_inf(), ode.h_inf(), rtol=1e-12, atol=0)
    # and h_t equals the direct K_xM a_t of each sample
    direct = torch.stack([ode.solutions[r].coefficients(t) @ probs[r][1].T for r in range(2)])
    torch.testing.assert_close(back.h(t), direct.mean(0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="without V"):
        back.solutions[0].coefficients(t)


@pytest.mark.parametrize("t", [0.0, 0.3, 2.0])
def test_derivative_is_alpha_mean_residual_times_kernel(t):
    """∂_t h_t(x̄) = α mean_j (Y_j − h_t(X̄_j)) K(x̄, X̄_j), by central differences."""
    K_MM, K_xM, Y = random_problem(seed=1)
    alpha, eps = 2.5, 1e-5
    sol = KernelSolution(K_MM, Y, alpha)
    h_x = lambda s: sol.coefficients(s)[0] @ K_xM.T  # noqa: E731
    h_M = sol.coefficients(t)[0] @ K_MM.T
    fd = (h_x(t + eps) - h_x(max(t - eps, 0.0))) / (eps + min(eps, t))
    rhs = alpha * (K_xM @ (Y - h_M)) / Y.shape[0]
    torch.testing.assert_close(fd, rhs, rtol=1e-6 if t > 0 else 1e-4, atol=1e-8)
    assert torch.all(h_x(0.0) == 0)


def test_error_is_spread_of_samples():
    a = random_problem(seed=2)
    b = random_problem(seed=3)
    ode = LimitODE.from_kernels([a[0], b[0]], [a[2], b[2]], [a[1], b[1]], alpha=1.0)
    hs = ode.h_samples(1.0)
    torch.testing.assert_close(ode.error(1.0), (hs[0] - hs[1]).abs() / 2)


@pytest.mark.slow  # ~30 s on a quiet 2-core machine: `make test-full`, CI
def test_finite_chain_sampled_solution_converges_to_exact():
    """3-state chain, windows of length 2, target a function of the window: π over windows is
    known exactly, so h_t on the support solves du/dt = α K D (Y − u): u_t = (I − e^{−αtKD}) Y."""
    P = [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]]
    states = [[-1.0], [0.2], [1.0]]
    chain = MarkovChain(P, states, target=LagNonlinear(a=1.0, b=-0.8))
    pi = chain.stationary
    Pt = chain.transition
    L, alpha, t = 2, 2.0, 1.5
    support = list(itertools.product(range(3), repeat=L))
    Xs = torch.tensor([[states[i] for i in w] for w in support], dtype=f64)  # (9, 2, 1)
    p = torch.tensor([float(pi[w[0]] * Pt[w[0], w[1]]) for w in support], dtype=f64)
    Ys = torch.tanh(Xs[:, -1, 0] - 0.8 * Xs[:, -2, 0])
    model = MeanFieldRNN(1, 8, dtype=f64)
    K = limit_ntk(model, Xs, tol=1e-7, method="quadrature").value
    KD = (K * p).numpy()
    exact = torch.from_numpy(Ys.numpy() - scipy.linalg.expm(-alpha * t * KD) @ Ys.numpy())

    errors = []
    for M in (25, 160, 1000):
        errs = []
        for seed in range(5):
            X, Y = chain.windows(M, L, torch.Generator().manual_seed(seed))
            idx = torch.cdist(X.reshape(M, -1), Xs.reshape(9, -1)).argmin(1)
            torch.testing.assert_close(Y, Ys[idx])  # targets are a function of the window
            ode = LimitODE.from_kernels([K[idx][:, idx]], [Y], [K[:, idx]], alpha)
            errs.append(float((ode.h(t)[0] - exact).pow(2).mean().sqrt()))
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.35 * errors[0]  # ≈ M^{-1/2}: a factor 40 in M gives ~6
