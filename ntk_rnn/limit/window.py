"""Model F's window NTK in the limit, at any time t of the coupled limit (theory §6; issue 15).

The window map of Model F reads a window x̄ = (x_1, ..., x_L) from zero memory and returns the
last output, F_θ(x̄) = f_θ(A_L), with A_k = (x_k, m_k), m_1 = 0, m_{k+1} = f_θ(A_k). Its exact
gradient unrolls the memory (``ntk_rnn.online.feedback``):

    ∇_θ F(x̄) = Σ_{k=1}^{L} c_k(x̄) D_k,   D_k = ∇_θ f_θ(a)|_{a = A_k} (memory held fixed),
    c_k = Π_{l=k+1}^{L} ∂_s f_θ(A_l)      (c_L = 1).

Hence, exactly at every width, the normalised window NTK is a weighted sum of cell kernels along
the two windows' memory paths:

    K^N_win(x̄, x̄') = N^{2β−1} ∇F(x̄)·∇F(x̄') = Σ_{k,k'} c_k c'_{k'} K^N_cell,θ(A_k, A'_{k'}).

Limit at time t (N → ∞, fixed t). Along training, f_{θ_t} → h_t on augmented inputs, uniformly on
compacts together with ∂_s (the coupled limit, ``solve_feedback_limit``), so the memory path
A_k → A^t_k (m^t_{k+1} = h_t(A^t_k)) and c_k → c^t_k = Π_{l>k} ∂_s h_t(A^t_l). The cell itself is a
two-layer network whose parameters move by O(t N^{β−1}) per unit (theory §3), so its kernel stays
at its initial limit: K^N_cell,θ_t → K_cell (the μ0 kernel, ``limit_cell_ntk``). Therefore

    K^∞_win,t(x̄, x̄') = Σ_{k,k'} c^t_k(x̄) c^t_{k'}(x̄') K_cell(A^t_k, A'^t_{k'}).

At t = 0 (h_0 = 0): A^0_k = (x_k, 0), c^0_k = 1{k = L}, and K^∞_win,0 = K_cell((x_L, 0), (x'_L, 0)),
the reference the NTK callback uses. For t > 0 the window kernel moves by O(1) because the memory
m^t and the weights c^t move with h_t, not because the cell's kernel moves: the window map is
not lazy, its cell is. Finite-N corrections are O(N^{1/2−β}) (the initial output and ∂_s f_θ0 in m
and c) plus O(N^{β−1}) and O(N^{-1/2}) (cell-kernel drift and fluctuation).

``limit_window_ntk(lim, X, X2, cell=...)`` evaluates K^∞_win,t for the FeedbackLimit ``lim`` (the
state h_t of a ``solve_feedback_limit`` run at time t): ``cell="quadrature"`` uses the accurate
limit cell kernel (``limit_cell_ntk`` on all the A^t_k; needs ``model``), ``cell="features"`` the
quadrature kernel K_J that the flow itself uses (consistent with ``lim``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from .feedback import FeedbackLimit, limit_cell_ntk

_F64 = torch.float64


def memory_paths(lim: FeedbackLimit, X: Tensor) -> tuple[Tensor, Tensor]:
    """The limit memory path A^t (L, n, d+1) and weights c^t (L, n) of windows X (n, L, d)."""
    A, _, _, c = lim.run(X.to(_F64), "rtrl")
    return A, c


@torch.no_grad()
def limit_window_ntk(lim: FeedbackLimit, X: Tensor, X2: Optional[Tensor] = None,
                     cell: str = "features", model=None, tol: float = 1e-6) -> Tensor:
    """K^∞_win,t on windows X (n, L, d) × X2 (m, L', d) (default X), float64 (module docstring).

    ``cell``: "features" (the quadrature kernel K_J of ``lim``) or "quadrature" (the limit cell
    kernel of ``model``'s μ0 and activation to ``tol``, :func:`limit_cell_ntk`).
    """
    if X.dim() != 3 or (X2 is not None and X2.dim() != 3):
        raise ConfigError("X, X2: windows (n, L, d) expected")
    if cell not in ("features", "quadrature"):
        raise ConfigError(f"cell={cell!r}: choose 'features' or 'quadrature'")
    if cell == "quadrature" and model is None:
        raise ConfigError("cell='quadrature' needs the model (its μ0 and activation)")
    A, c = memory_paths(lim, X)
    sym = X2 is None
    A2, c2 = (A, c) if sym else memory_paths(lim, X2)
    L, n, d1 = A.shape
    L2, m = A2.shape[:2]
    a, a2 = A.reshape(L * n, d1), A2.reshape(L2 * m, d1)
    # keep only the steps with nonzero weight (at t = 0: the last one)
    keep = c.reshape(-1) != 0
    keep2 = c2.reshape(-1) != 0
    if cell == "features":
        Kc = lim.kernel(a[keep], a2[keep2])
    else:
        Kc = limit_cell_ntk(model, a[keep].to(model.w.dtype), a2[keep2].to(model.w.dtype),
                            tol=tol).value.to(_F64)
    W = torch.zeros(L * n, n, dtype=_F64)
    W[torch.arange(L * n), torch.arange(n).repeat(L)] = c.reshape(-1)
    W2 = torch.zeros(L2 * m, m, dtype=_F64)
    W2[torch.arange(L2 * m), torch.arange(m).repeat(L2)] = c2.reshape(-1)
    K = W[keep].T @ Kc @ W2[keep2]
    return 0.5 * (K + K.T) if sym else K


def window_drift_curve(model, X: Tensor, Y: Tensor, probes: Tensor, alpha: float,
                       times: list[float], dt: float = 0.05, n_features: int = 2 ** 11,
                       seed: int = 0, cell: str = "quadrature", tol: float = 1e-6
                       ) -> dict[str, list[float]]:
    """Solve the coupled limit (rtrl) and return, at ``times``, the limit window kernel's drift
    ‖K^∞_t − K^∞_0‖_F / ‖K^∞_0‖_F on ``probes`` and sup|∂_s h_t| on the π_t sample.

    X (M, L, d), Y (M,): the π sample of ``solve_feedback_limit``; the Euler steps are those of
    ``solve_feedback_limit`` (dt), advanced here between the requested times."""
    from .feedback import solve_feedback_limit

    lim = FeedbackLimit.from_model(model, n_features, seed)
    K0 = limit_window_ntk(lim, probes, cell=cell, model=model, tol=tol)
    out = {"t": [], "drift": [], "contraction": [], "kernel_norm": []}
    t_now = 0.0
    for t in sorted(times):
        if t > t_now:
            sol = solve_feedback_limit(model, X, Y, alpha, t - t_now, dt, limit=lim,
                                       n_features=n_features, seed=seed)
            # solve_feedback_limit's last Euler step is not applied (it records the state at the
            # horizon): lim now holds h at t
            out["contraction"].append(float(sol.contraction[-1]))
            t_now = t
        else:
            out["contraction"].append(0.0)
        K = limit_window_ntk(lim, probes, cell=cell, model=model, tol=tol)
        out["t"].append(t)
        out["drift"].append(float((K - K0).norm() / K0.norm()))
        out["kernel_norm"].append(float(K.norm()))
    return out
