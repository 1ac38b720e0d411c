"""The empirical NTK of Model F's cell f_θ(x, s) = N^{-β} Σ_i c_i σ(w_i·x + b_i s) (theory §6)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.activations import Activation
from ..models.mean_field import MeanFieldRNN


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
