"""The Elman limit ODE (theory §9): LimitODE with the closed-form Elman kernel against a direct
solve, the truncated-BPTT kernel, and the output callback on an Elman run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from ntk_rnn import ElmanRNN, Trainer
from ntk_rnn.callbacks import OutputTrackingCallback
from ntk_rnn.callbacks.base import Callback
from ntk_rnn.data import VAR1
from ntk_rnn.limit import LimitODE, elman_limit_ntk

F64 = torch.float64


@pytest.mark.parametrize("scaling", ["ntk", "mean_field"])
def test_elman_ode_matches_a_direct_solve(scaling):
    """h_t(probes) from LimitODE (eigen-decomposition) against scipy's ODE solver on
    dh_M/dt = (α/M) K_MM (Y − h_M), dh_x/dt = (α/M) K_xM (Y − h_M)."""
    model = ElmanRNN(1, 8, recurrent_scaling=scaling, activation="sigmoid", A_mean=0.0)
    src, gen = VAR1(), torch.Generator().manual_seed(0)
    probes, _ = src.windows(5, 10, torch.Generator().manual_seed(1))
    alpha, M = 2.0, 40
    kern = lambda m, x, x2=None, tol=1e-3: elman_limit_ntk(m, x, x2, tol=tol, window=6)  # noqa
    ode = LimitODE.from_source(model, src, probes, alpha, M=M, samples=1, length=14,
                               generator=gen, tol=1e-3, kernel=kern)
    K, Kx, Y = ode.K_MM[0], ode.K_xM[0], ode.Y_M[0]
    assert K.shape == (M, M) and Kx.shape == (5, M)

    def rhs(_, h):
        r = Y.numpy() - h[:M]
        return np.concatenate([alpha / M * K.numpy() @ r, alpha / M * Kx.numpy() @ r])

    ts = [0.5, 1.0, 3.0]
    sol = solve_ivp(rhs, (0, 3.0), np.zeros(M + 5), t_eval=ts, rtol=1e-10, atol=1e-12)
    got = ode.h(torch.tensor(ts, dtype=F64))
    np.testing.assert_allclose(got.numpy(), sol.y[M:].T, atol=1e-7)


def test_truncated_kernel():
    x, x2 = VAR1().windows(4, 9, torch.Generator().manual_seed(2))[0], \
        VAR1().windows(3, 12, torch.Generator().manual_seed(3))[0]
    m = ElmanRNN(1, 8, recurrent_scaling="ntk", activation="erf")
    full = elman_limit_ntk(m, x, x2, blocks=True)
    same = elman_limit_ntk(m, x, x2, blocks=True, window=9)  # W ≥ min(L, L'): no truncation
    one = elman_limit_ntk(m, x, x2, blocks=True, window=1)
    for k in ("c", "w", "A"):
        torch.testing.assert_close(same[k].value, full[k].value)
    torch.testing.assert_close(one["c"].value, full["c"].value)  # the forward is unchanged
    assert torch.all(one["w"].value.abs() <= full["w"].value.abs() + 1.0)
    # W = 1: the last step's backward term alone, σ_c² V̇_L (x_L·x'_L + V_{L-1})
    assert not torch.allclose(one["A"].value, full["A"].value)
    mf = ElmanRNN(1, 8, recurrent_scaling="mean_field", activation="tanh")
    torch.testing.assert_close(elman_limit_ntk(mf, x, x2, window=1).value,
                               elman_limit_ntk(mf, x, x2).value)


@pytest.mark.parametrize("scaling", ["ntk", "mean_field"])
def test_output_callback_runs_for_elman(scaling):
    cb = OutputTrackingCallback(every_n_steps=16, n_probes=6, M=48, samples=2, cache_dir=None,
                                train_length=16)
    tr = Trainer(model=ElmanRNN(1, 32, recurrent_scaling=scaling, activation="erf"),
                 data=VAR1(), alpha=1.0, horizon=1.0, callbacks=[cb], seed=0, run_dir=None,
                 bptt_window=8)
    metrics = tr.fit()
    rmse = tr.history["output/rmse_to_limit"]
    assert len(rmse) >= 2 and all(math.isfinite(v) for _, v in rmse)
    assert math.isfinite(metrics["limit_ode_kernel_error"])
    assert metrics["limit_ode_kernel_error"] <= 5e-4
    assert "output/limit_error" in tr.history


def test_output_callback_refuses_a_model_without_closed_form():
    from ntk_rnn import GRURNN
    from ntk_rnn.errors import ConfigError
    cb = OutputTrackingCallback(n_probes=4, M=8, cache_dir=None)
    with pytest.raises(ConfigError, match="no closed-form limit"):
        Trainer(model=GRURNN(1, 8), data=VAR1(), alpha=1.0, horizon=0.5, callbacks=[cb],
                seed=0, run_dir=None).fit()


class _Ends(Callback):
    """θ_0 and θ_T of a run (copies of the model at train start and end)."""

    name = "ends"

    def on_train_start(self, state):
        self.start = copy.deepcopy(state.model)

    def on_train_end(self, state):
        self.end = copy.deepcopy(state.model)


@pytest.mark.slow
def test_wide_elman_network_follows_its_limit_ode():
    """NTK-scaled Elman, erf, α = 1, T = 0.25, BPTT window 24: the network's output on 16 probes
    against the limit ODE started from the network's own initial function f_0 (the ODE is
    linear, so h_T[f_0] = f_0 + the LimitODE solution for targets Y − f_0 on the π-sample).
    Started from h_0 = 0 instead, the difference is the random initial output, O(N^{1/2−β}) with
    a large seed-to-seed spread (measured rms 0.08 at N = 2^7 and 2^11 alike: no ordering). From
    f_0, what is left is O(N^{−1/2}) at fixed T — the stream's sampling noise over N T correlated
    steps, K^N_0 − K_∞, the drift — stated as rms ≤ sqrt(α T / N); measured over 6 seeds: 0.020,
    0.015, 0.0069 at N = 2^7, 2^9, 2^11 (0.46, 0.66, 0.50 × the bound). The limit's π-sample
    error is ≈ 7e−4."""
    alpha, T, W, L, M = 1.0, 0.25, 24, 24, 256
    src = VAR1()
    probes, _ = src.windows(16, L, torch.Generator().manual_seed(12345))
    gen = torch.Generator().manual_seed(7)
    pi = [src.windows(M, L, gen) for _ in range(2)]
    kernels = []

    def err(N, seed):
        ends = _Ends()
        Trainer(model=ElmanRNN(1, N, recurrent_scaling="ntk", activation="erf"), data=src,
                alpha=alpha, horizon=T, callbacks=[ends], seed=seed, run_dir=None,
                bptt_window=W).fit()
        m0, m1 = ends.start, ends.end
        if not kernels:  # the limit depends on μ0, not on N or the seed
            kernels.extend(([elman_limit_ntk(m0, X, tol=1e-3, window=W).value for X, _ in pi],
                            [elman_limit_ntk(m0, probes, X, tol=1e-3, window=W).value
                             for X, _ in pi]))
        dt = next(m0.parameters()).dtype
        with torch.no_grad():
            f0 = [m0(X.to(dt), last_only=True).double() for X, _ in pi]
            f0x = m0(probes.to(dt), last_only=True).double()
            yT = m1(probes.to(dt), last_only=True).double()
        ode = LimitODE.from_kernels(kernels[0], [Y.double() - f for (_, Y), f in zip(pi, f0)],
                                    kernels[1], alpha)
        assert float(ode.error(T).pow(2).mean().sqrt()) < 2e-3
        return float((yT - f0x - ode.h(T)[0]).pow(2).mean())

    narrow = math.sqrt(np.mean([err(128, s) for s in range(6)]))
    wide = math.sqrt(np.mean([err(2048, s) for s in range(3)]))
    assert wide <= math.sqrt(alpha * T / 2048)
    assert wide <= 0.5 * narrow
