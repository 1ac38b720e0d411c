"""Model F (output feedback, theory §6): online SGD with exact (RTRL) or truncated gradients,
and the empirical NTK of the cell f_θ(x, s) = N^{-β} Σ_i c_i σ(w_i·x + b_i s).

The network reads H_{i,k} = σ(z_{i,k}), z_{i,k} = w_i·X_k + b_i m_k, predicts Ŷ_k = f_θ(X_k, m_k)
and feeds it back, m_{k+1} = Ŷ_k, m_0 = 0. With θ = (c, w, b) the gradient of Ŷ_k is

    ∂Ŷ_k/∂θ = D_k + g_k ∂m_k/∂θ,    g_k = ∂f/∂s = N^{-β} Σ_i c_i σ'(z_{i,k}) b_i,
    D_k     = N^{-β} (H_{i,k},  c_i σ'(z_{i,k}) X_k,  c_i σ'(z_{i,k}) m_k)_i    (m held fixed),

and ∂m_{k+1}/∂θ = ∂Ŷ_k/∂θ, ∂m_0/∂θ = 0 (RTRL: one vector of size P carried, O(P) a step).
``gradient="truncated"`` uses D_k alone (the memory treated as an input). The SGD step of
theory §3 moves all groups at once, with values from before the step:

    θ ← θ + α_N (Y_k − Ŷ_k) G_k,   G_k = ∂Ŷ_k/∂θ (rtrl) or D_k (truncated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .activations import Activation
from .errors import ConfigError
from .model import MeanFieldRNN


@dataclass
class FeedbackState:
    """Memory m (0-dim) and the last gradient G = (dc (N,), dw (N, d), db (N,)).

    Under ``gradient="rtrl"`` G is ∂Ŷ_{k−1}/∂θ = ∂m_k/∂θ, the RTRL sensitivity of the memory;
    under ``"truncated"`` it is the truncated gradient of the last step (not carried over).
    """

    m: Tensor
    dc: Tensor
    dw: Tensor
    db: Tensor

    @classmethod
    def zeros(cls, model: MeanFieldRNN) -> "FeedbackState":
        c = model.c.detach()
        N, d = model.width, model.input_dim
        return cls(c.new_zeros(()), c.new_zeros(N), c.new_zeros(N, d), c.new_zeros(N))

    def state_dict(self) -> dict[str, Tensor]:
        return {"m": self.m, "dc": self.dc, "dw": self.dw, "db": self.db}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        for k, v in self.state_dict().items():
            v.copy_(d[k])


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


# --- the cell kernel ---------------------------------------------------------------------------
def check_cell_inputs(model: MeanFieldRNN, xs: Tensor, name: str = "xs") -> Tensor:
    """Augmented inputs (n, d+1): rows (x, s), s the memory. Returns them in the model's dtype."""
    d = model.input_dim
    if not isinstance(xs, Tensor) or xs.dim() != 2 or xs.shape[1] != d + 1:
        shape = tuple(xs.shape) if isinstance(xs, Tensor) else type(xs).__name__
        raise ConfigError(f"{name} has shape {shape}; expected augmented inputs (n, {d + 1}): "
                          f"rows (x, s) with x ∈ R^{d} and the memory s last")
    if xs.device != model.w.device:
        raise ConfigError(f"{name} is on {xs.device} but the model is on {model.w.device}")
    return xs.to(model.w.dtype)


def cell_gram(wb: Tensor, cfac, act: Activation, a: Tensor, a2: Optional[Tensor] = None) -> Tensor:
    """Σ_j [σ(z_j) σ(z'_j) + c_j² σ'(z_j) σ'(z'_j) (a·a')] over units j with (w_j, b_j) = wb[j]
    ((J, d+1)), z_j = (w_j, b_j)·a; ``cfac`` is c (J,) or a common float; a (n, d+1), a2 (m, d+1).
    """
    S, dS = act.value_and_deriv(a @ wb.T)  # (n, J)
    dS = dS * cfac
    if a2 is None:
        S2, dS2, a2 = S, dS, a
    else:
        S2, dS2 = act.value_and_deriv(a2 @ wb.T)
        dS2 = dS2 * cfac
    return S @ S2.T + (dS @ dS2.T) * (a @ a2.T)


@torch.no_grad()
def cell_ntk(model: MeanFieldRNN, xs: Tensor, xs2: Optional[Tensor] = None) -> Tensor:
    """Normalised empirical NTK of the cell on augmented inputs (theory §6), (n, m):

        K(a, a') = N^{2β−1} ∇_θ f_θ(a)·∇_θ f_θ(a')
                 = (1/N) Σ_i [σ(z_i)σ(z'_i) + c_i² σ'(z_i)σ'(z'_i)(x·x' + s s')],
        z_i = w_i·x + b_i s,

    for a = (x, s) rows of xs (n, d+1) and a' of xs2 (m, d+1) (default xs); one GEMM per term.
    """
    a = check_cell_inputs(model, xs)
    a2 = None if xs2 is None else check_cell_inputs(model, xs2, "xs2")
    wb = torch.cat([model.w.detach(), model.b.detach().unsqueeze(1)], 1)
    return cell_gram(wb, model.c.detach(), model.act, a, a2) / model.width
