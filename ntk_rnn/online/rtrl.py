"""Online RTRL state and the exact SGD step of theory §3 for Model D.

    P_{i,k+1} = σ'(z_{i,k}) (X_k + b_i P_{i,k}),   Q_{i,k+1} = σ'(z_{i,k}) (S_{i,k} + b_i Q_{i,k})
    θ_i ← θ_i + α_N (Y_k − Ŷ_k) N^{-β} (S_{i,k+1}, c_i P_{i,k+1}, c_i Q_{i,k+1})

``gradient="truncated"`` drops the b_i P and b_i Q terms (memory treated as an input).
Model F (``recurrence="feedback"``) dispatches to :mod:`ntk_rnn.online.feedback`:
``OnlineState.zeros`` then returns a :class:`~ntk_rnn.online.feedback.FeedbackState` and
``rtrl_step`` runs ``feedback_step``. :func:`spq_step` is the recursion itself, shared with the
K_∞ sampler (:mod:`ntk_rnn.limit.kernel`) and the compiled features' self-check; its C twin is
``spq_step`` in ``ntk_rnn/csrc/ntk_rnn.h``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..models.activations import Activation
from ..models.mean_field import MeanFieldRNN
from .feedback import FeedbackState, feedback_step

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


def spq_step(act: Activation, w: Tensor, b: Tensor, x: Tensor, S: Tensor, P: Tensor, Q: Tensor,
             truncated: bool = False) -> Tensor:
    """Model D's forward step and its RTRL recursion, in place (theory §3) — the torch form of
    ``spq_step`` in ``ntk_rnn/csrc/ntk_rnn.h``:

        z = w·x + b S,  S ← σ(z),  P ← σ'(z)(x + b P),  Q ← σ'(z)(S + b Q)   (old S on the right)

    ``truncated`` drops the b P and b Q terms. Units w (M, d), b (M,); batched over leading
    dims: x (..., d), S and Q (..., M), P (..., M, d). Returns σ'(z) (..., M)."""
    S_new, ds = act.value_and_deriv(torch.addcmul(x @ w.T, b, S))
    if truncated:
        torch.mul(ds.unsqueeze(-1), x.unsqueeze(-2), out=P)
        torch.mul(ds, S, out=Q)
    else:
        P.mul_(b.unsqueeze(-1)).add_(x.unsqueeze(-2)).mul_(ds.unsqueeze(-1))
        Q.mul_(b).add_(S).mul_(ds)
    S.copy_(S_new)
    return ds


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
    """The reference loop (``train.backend=reference``): one :func:`rtrl_step` per element,
    with the same ``run_chunk`` interface as :class:`ntk_rnn.online.fast.FastStepper`."""

    def __init__(self, model: MeanFieldRNN, state, lr: float, gradient: Gradient = "rtrl"):
        self.model, self.state, self.lr, self.gradient = model, state, lr, gradient

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor | None = None) -> Tensor:
        out = torch.empty_like(Y) if out is None else out
        for j in range(X.shape[0]):
            out[j] = rtrl_step(self.model, self.state, X[j], Y[j], self.lr, self.gradient)
        return out
