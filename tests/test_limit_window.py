"""Model F's limit window NTK (ntk_rnn/limit/window.py) against independent computations."""

import math

import torch

from ntk_rnn import MeanFieldRNN
from ntk_rnn.limit import limit_cell_ntk
from ntk_rnn.limit.feedback import FeedbackLimit
from ntk_rnn.limit.window import limit_window_ntk

F64 = torch.float64


def _model():
    # μ0 of conf/model/feedback.yaml (Gaussian w, b: the quadrature cell kernel applies)
    init = dict(c="uniform", w="normal", b="normal", rho=1.0)
    return MeanFieldRNN(input_dim=1, width=8, beta=0.75, recurrence="feedback", init=init,
                        dtype=F64)


def _limit(J=48, seed=0, scale=0.6):
    lim = FeedbackLimit.from_model(_model(), n_features=J, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lim.u = scale * torch.randn(J, dtype=F64, generator=g) * math.sqrt(J) / 4
    lim.v = scale * torch.randn(J, 2, dtype=F64, generator=g) * math.sqrt(J) / 4
    return lim


def _autograd_window_ntk(lim, X, X2):
    """J · ∇_{u,v} F(x̄) · ∇_{u,v} F(x̄'), F the window map of h_{u,v} with memory fed back:
    the NTK of the window map of the linear-in-(u, v) model whose feature kernel is K_J."""
    wb, gam, act = lim.wb, lim.cfac, lim.act
    J = wb.shape[0]

    def h(u, v, a):  # (n, d+1) -> (n,)
        z = a @ wb.T
        S, dS = act.value_and_deriv(z)
        return (S @ u + (gam * dS * (a @ v.T)).sum(1)) / J

    def F(u, v, X):
        m = X.new_zeros(X.shape[0])
        for k in range(X.shape[1]):
            m = h(u, v, torch.cat([X[:, k], m[:, None]], 1))
        return m

    jac = torch.func.jacrev(F, argnums=(0, 1))
    ju, jv = jac(lim.u, lim.v, X)
    ju2, jv2 = jac(lim.u, lim.v, X2)
    G = torch.cat([ju, jv.reshape(X.shape[0], -1)], 1)
    G2 = torch.cat([ju2, jv2.reshape(X2.shape[0], -1)], 1)
    return J * G @ G2.T


def test_window_ntk_matches_autograd_through_the_memory():
    lim = _limit()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(5, 7, 1, dtype=F64, generator=g)
    X2 = torch.randn(4, 6, 1, dtype=F64, generator=g)
    # the memory really feeds back (nonzero weights on earlier steps)
    c = lim.run(X, "rtrl")[3]
    assert c[:-1].abs().max() > 1e-2
    K = limit_window_ntk(lim, X, X2, cell="features")
    ref = _autograd_window_ntk(lim, X, X2)
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-12)
    Ks = limit_window_ntk(lim, X, cell="features")
    torch.testing.assert_close(Ks, _autograd_window_ntk(lim, X, X), rtol=1e-10, atol=1e-12)


def test_t0_is_the_cell_kernel_at_zero_memory():
    model = _model()
    lim = FeedbackLimit.from_model(model, n_features=64)  # u = v = 0: h_0 = 0
    X = torch.randn(6, 5, 1, dtype=F64, generator=torch.Generator().manual_seed(2))
    K = limit_window_ntk(lim, X, cell="quadrature", model=model, tol=1e-8)
    a = torch.cat([X[:, -1], torch.zeros(6, 1, dtype=F64)], 1)
    torch.testing.assert_close(K, limit_cell_ntk(model, a, tol=1e-8).value, rtol=1e-7, atol=1e-8)


def test_quadrature_cell_agrees_with_many_features():
    """cell='quadrature' (limit cell kernel) and cell='features' (K_J) agree as J grows."""
    model = _model()
    lim = _limit(J=2 ** 14, scale=0.3)
    X = torch.randn(4, 6, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    Kq = limit_window_ntk(lim, X, cell="quadrature", model=model, tol=1e-8)
    Kf = limit_window_ntk(lim, X, cell="features")
    assert float((Kq - Kf).norm() / Kq.norm()) < 2e-3
