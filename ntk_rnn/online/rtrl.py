"""Online RTRL state and the exact SGD step of theory §3 for Model D.

    P_{i,k+1} = σ'(z_{i,k}) (X_k + b_i P_{i,k}),   Q_{i,k+1} = σ'(z_{i,k}) (S_{i,k} + b_i Q_{i,k})
    θ_i ← θ_i + α_N (Y_k − Ŷ_k) N^{-β} (S_{i,k+1}, c_i P_{i,k+1}, c_i Q_{i,k+1})

``gradient="one_step"`` (formerly ``"truncated"``) drops the b_i P and b_i Q terms (memory
treated as an input).
Model F (``recurrence="feedback"``) dispatches to `ntk_rnn.online.feedback`:
``OnlineState.zeros`` then returns a `FeedbackState` and ``rtrl_step`` runs
``feedback_step``. The states and the recursion itself (`spq_step`, shared with the K_∞
sampler and the compiled kernels' C twin) live in `ntk_rnn.models.recurrence`, the seam
between the two models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import (
    FeedbackState,
    OnlineGradient,
    OnlineState,
    online_gradient,
    spq_step,
)
from .feedback import feedback_step

__all__ = ["rtrl_step", "ReferenceStepper"]


@torch.no_grad()
def rtrl_step(
    model: MeanFieldRNN, state: OnlineState | FeedbackState, x: Tensor, y: Tensor | float,
    lr: float, gradient: OnlineGradient = "rtrl",
) -> Tensor:
    """One online SGD step on (X_k = x (d,), Y_k = y); updates ``model`` and ``state`` in place.

    Returns the prediction Ŷ_k (0-dim tensor), made with the parameters before the step.
    """
    gradient = online_gradient(gradient)
    if isinstance(state, FeedbackState):
        return feedback_step(model, state, x, y, lr, gradient)
    c, w, b = model.c, model.w, model.b
    spq_step(model.act, w, b, x, state.S, state.P, state.Q, gradient != "rtrl")
    S_new = state.S
    scale = model.output_scale
    y_hat = torch.dot(c, S_new) * scale
    g = (y - y_hat) * (lr * scale)  # α_N (Y − Ŷ) N^{-β}
    gc = g * c  # uses c before the step (simultaneous update)
    w.addcmul_(state.P, gc.unsqueeze(1))
    b.addcmul_(state.Q, gc)
    c.add_(S_new * g)
    return y_hat


class ReferenceStepper:
    """The reference loop (``train.backend=reference``): one `rtrl_step` per element,
    with the same ``run_chunk`` interface as `ntk_rnn.online.fast.FastStepper`."""

    def __init__(self, model: MeanFieldRNN, state, lr: float, gradient: OnlineGradient = "rtrl"):
        self.model, self.state, self.lr = model, state, lr
        self.gradient = online_gradient(gradient)

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor | None = None) -> Tensor:
        out = torch.empty_like(Y) if out is None else out
        for j in range(X.shape[0]):
            out[j] = rtrl_step(self.model, self.state, X[j], Y[j], self.lr, self.gradient)
        return out
