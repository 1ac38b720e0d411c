"""Online RTRL state and the exact SGD step of theory §3 for Model D.

    P_{i,k+1} = σ'(z_{i,k}) (X_k + b_i P_{i,k}),   Q_{i,k+1} = σ'(z_{i,k}) (S_{i,k} + b_i Q_{i,k})
    θ_i ← θ_i + α_N (Y_k − Ŷ_k) N^{-β} (S_{i,k+1}, c_i P_{i,k+1}, c_i Q_{i,k+1})

``gradient="truncated"`` drops the b_i P and b_i Q terms (memory treated as an input).
Model F (``recurrence="feedback"``) dispatches to :mod:`ntk_rnn.feedback`: ``OnlineState.zeros``
then returns a :class:`~ntk_rnn.feedback.FeedbackState` and ``rtrl_step`` runs ``feedback_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .feedback import FeedbackState, feedback_step
from .model import MeanFieldRNN

Gradient = Literal["rtrl", "truncated"]
GRADIENTS = ("rtrl", "truncated")


@dataclass
class OnlineState:
    """Memory S (N,) and its forward derivatives P = ∂S/∂w (N, d), Q = ∂S/∂b (N,)."""

    S: Tensor
    P: Tensor
    Q: Tensor

    @classmethod
    def zeros(cls, model: MeanFieldRNN) -> "OnlineState | FeedbackState":
        """The zero state of ``model``'s recurrence (a FeedbackState for Model F)."""
        if model.recurrence == "feedback":
            return FeedbackState.zeros(model)
        c = model.c.detach()
        return cls(c.new_zeros(model.width), c.new_zeros(model.width, model.input_dim),
                   c.new_zeros(model.width))

    def state_dict(self) -> dict[str, Tensor]:
        return {"S": self.S, "P": self.P, "Q": self.Q}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.S.copy_(d["S"])
        self.P.copy_(d["P"])
        self.Q.copy_(d["Q"])


@torch.no_grad()
def rtrl_step(
    model: MeanFieldRNN, state: OnlineState | FeedbackState, x: Tensor, y: Tensor | float,
    lr: float, gradient: Gradient = "rtrl",
) -> Tensor:
    """One online SGD step on (X_k = x (d,), Y_k = y); updates ``model`` and ``state`` in place.

    Returns the prediction Ŷ_k (0-dim tensor), made with the parameters before the step.
    """
    if isinstance(state, FeedbackState):
        return feedback_step(model, state, x, y, lr, gradient)
    c, w, b = model.c, model.w, model.b
    S_new, ds = model.act.value_and_deriv(torch.mv(w, x).add_(b * state.S))
    if gradient == "rtrl":
        # P ← σ'(z)(x + b P), Q ← σ'(z)(S + b Q), in place
        state.P.mul_(b.unsqueeze(1)).add_(x).mul_(ds.unsqueeze(1))
        state.Q.mul_(b).add_(state.S).mul_(ds)
    else:
        torch.outer(ds, x, out=state.P)
        torch.mul(ds, state.S, out=state.Q)
    state.S.copy_(S_new)
    scale = model.output_scale
    y_hat = torch.dot(c, S_new) * scale
    g = (y - y_hat) * (lr * scale)  # α_N (Y − Ŷ) N^{-β}
    gc = g * c  # uses c before the step (simultaneous update)
    w.addcmul_(state.P, gc.unsqueeze(1))
    b.addcmul_(state.Q, gc)
    c.add_(S_new * g)
    return y_hat


class ReferenceStepper:
    """The reference loop (``train.backend=reference``): one :func:`rtrl_step` per element,
    with the same ``run_chunk`` interface as :class:`ntk_rnn.fast.FastStepper`."""

    def __init__(self, model: MeanFieldRNN, state, lr: float, gradient: Gradient = "rtrl"):
        self.model, self.state, self.lr, self.gradient = model, state, lr, gradient

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor | None = None) -> Tensor:
        out = torch.empty_like(Y) if out is None else out
        for j in range(X.shape[0]):
            out[j] = rtrl_step(self.model, self.state, X[j], Y[j], self.lr, self.gradient)
        return out
