"""Model F (output feedback, theory §6): online SGD with exact (RTRL) or one-step gradients,


The network reads H_{i,k} = σ(z_{i,k}), z_{i,k} = w_i·X_k + b_i m_k, predicts Ŷ_k = f_θ(X_k, m_k)
and feeds it back, m_{k+1} = Ŷ_k, m_0 = 0. With θ = (c, w, b) the gradient of Ŷ_k is

    ∂Ŷ_k/∂θ = D_k + g_k ∂m_k/∂θ,    g_k = ∂f/∂s = N^{-β} Σ_i c_i σ'(z_{i,k}) b_i,
    D_k     = N^{-β} (H_{i,k},  c_i σ'(z_{i,k}) X_k,  c_i σ'(z_{i,k}) m_k)_i    (m held fixed),

and ∂m_{k+1}/∂θ = ∂Ŷ_k/∂θ, ∂m_0/∂θ = 0 (RTRL: one vector of size P carried, O(P) a step).
``gradient="one_step"`` (formerly ``"truncated"``) uses D_k alone (the memory treated as an
input). The SGD step of theory §3 moves all groups at once, with values from before the step:

    θ ← θ + α_N (Y_k − Ŷ_k) G_k,   G_k = ∂Ŷ_k/∂θ (rtrl) or D_k (one_step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import FeedbackState

__all__ = ["FeedbackState", "feedback_step"]


@torch.no_grad()
def feedback_step(
    model: MeanFieldRNN, state: FeedbackState, x: Tensor, y: Tensor | float, lr: float,
    gradient: str = "rtrl",
) -> Tensor:
    """One online SGD step of Model F on (X_k = x (d,), Y_k = y); ``model`` and ``state`` are
    updated in place. Returns Ŷ_k (0-dim), made with the parameters before the step."""
    c, w, b = model.c, model.w, model.b
    scale = model.output_scale
    s = state.m
    H, dH = model.act.value_and_deriv(torch.mv(w, x).add_(b * s))
    y_hat = torch.dot(c, H) * scale
    cd = c * dH * scale  # N^{-β} c_i σ'(z_i)
    if gradient == "rtrl":  # G = D + g · ∂m/∂θ, g = N^{-β} Σ c_i σ'(z_i) b_i
        g = torch.dot(cd, b)
        state.dc.mul_(g).add_(H, alpha=scale)
        state.dw.mul_(g).addr_(cd, x)
        state.db.mul_(g).addcmul_(cd, s)
    else:
        torch.mul(H, scale, out=state.dc)
        torch.outer(cd, x, out=state.dw)
        torch.mul(cd, s, out=state.db)
    state.m.copy_(y_hat)
    err = (y - y_hat) * lr  # α_N (Y − Ŷ)
    c.addcmul_(state.dc, err)
    w.addcmul_(state.dw, err)
    b.addcmul_(state.db, err)
    return y_hat
