"""GRURNN: a GRU of width N with the mean-field readout Ŷ_k = N^{-β} c · h_{k+1}.

The recurrent cell is a `torch.nn.GRUCell` (its parameters ``cell.weight_ih`` (3N, d),
``cell.weight_hh`` (3N, N), ``cell.bias_ih``, ``cell.bias_hh``, gates in PyTorch's order r, z, n),
with the hidden-to-hidden weights entering as N^{-γ} W_hh:

    r = σ(W_ir x + b_ir + N^{-γ} W_hr h + b_hr),   z = σ(W_iz x + b_iz + N^{-γ} W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (N^{-γ} W_hn h + b_hn)),   h' = (1 − z) ⊙ n + z ⊙ h

γ = 1/2 (``recurrent_scaling="ntk"``, the default: with W_hh ~ N(0, 1) entries this is the
standard GRU with N^{-1/2}-sized recurrent weights) or 1 (``"mean_field"``). The step is written
out (the same formulas as ``nn.GRUCell``; the tests check it against the cell) rather than
calling the fused ``torch.gru_cell``, which has no vmap rule — torch.func's NTK and the ensemble
stepper need one. Initial law: c ~ U[-c_scale, c_scale], W_ih rows ~ N(0, w_scale² I/d),
W_hh ~ N(0, hh_std²), biases ~ N(0, bias_std²) (default 0). ``ntk_scale`` = N^{2β-1},
``learning_rate(α)`` = α N^{2β-2}, as MeanFieldRNN and ElmanRNN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .elman import check_h0, check_law, check_windows, recurrent_exponent
from .init import InitLaw
from .mean_field import check_hyper
from .scaling import RecurrentScaling


class GRURNN(RecurrentScaling, nn.Module):
    """GRU network of width N with the readout Ŷ_k = N^{−β} c · h_{k+1} (see the module
    docstring); `forward` as `ElmanRNN`'s.

    Args:
        input_dim: d, the dimension of each input X_k (the trainer fills it in from the data).
        width: N, the number of units; the limit time is t = k / N.
        beta: β ∈ [0.5, 1] of the readout N^{−β} c · h and the learning rate α N^{2β−2}.
        recurrent_scaling: `ntk` (γ = 1/2, default: the standard GRU with N^{−1/2}-sized
            recurrent weights) or `mean_field` (γ = 1); the hidden-to-hidden weights enter as
            N^{−γ} W_hh.
        bias: Whether the cell has biases b_ih, b_hh.
        c_law: Law of c, as `InitLaw`'s: `uniform` (U[−c_scale, c_scale]), `normal`,
            `rademacher` or `constant`.
        c_scale: Scale of c's law.
        w_scale: The rows of W_ih are N(0, w_scale² I/d).
        hh_std: The entries of W_hh are N(0, hh_std²).
        bias_std: The biases are N(0, bias_std²) (0: zero).
        generator: The generator θ_0 is drawn from, as `MeanFieldRNN`'s (and `seed` its seed
            when it is None; None: 0).
        seed: See `generator`.
        dtype: The dtype of the parameters.
        device: The device of the parameters.

    Raises:
        ConfigError: A setting out of range, named as its `model.*` key.
    """

    def __init__(
        self,
        input_dim: int,
        width: int,
        beta: float = 0.75,
        recurrent_scaling: str = "ntk",
        bias: bool = True,
        c_law: str = "uniform",
        c_scale: float = 1.0,
        w_scale: float = 1.0,
        hh_std: float = 1.0,
        bias_std: float = 0.0,
        *,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_hyper(input_dim, width, beta)
        self.gamma = recurrent_exponent(recurrent_scaling)
        check_law("c_law", c_law, c_scale)
        for key, v in (("w_scale", w_scale), ("hh_std", hh_std), ("bias_std", bias_std)):
            if not float(v) >= 0:
                raise ConfigError(f"model.{key}={v} must be >= 0")
        self.input_dim, self.width, self.beta = int(input_dim), int(width), float(beta)
        self.recurrent_scaling, self.bias = recurrent_scaling, bool(bias)
        self.init_c = InitLaw(c=c_law, c_scale=c_scale, b="constant", rho=0.0)
        self.w_scale, self.hh_std, self.bias_std = float(w_scale), float(hh_std), float(bias_std)
        self.c = nn.Parameter(torch.empty(self.width, dtype=dtype, device=device))
        self.cell = nn.GRUCell(self.input_dim, self.width, bias=self.bias, dtype=dtype,
                               device=device)
        self._seed = 0 if seed is None else int(seed)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Redraw θ_0 from ``generator`` (default: seeded with the constructor's ``seed``), on
        CPU in the order c, W_ih, W_hh, b_ih, b_hh, then moved to the model's device."""
        if generator is None:
            generator = torch.Generator().manual_seed(self._seed)
        N, d, dt = self.width, self.input_dim, self.c.dtype
        c, _, _ = self.init_c.sample(N, d, generator, dtype=dt)
        self.c.copy_(c)
        self.cell.weight_ih.copy_(
            torch.randn(3 * N, d, generator=generator, dtype=dt) * (self.w_scale / d**0.5))
        self.cell.weight_hh.copy_(torch.randn(3 * N, N, generator=generator, dtype=dt)
                                  * self.hh_std)
        if self.bias:
            for p in (self.cell.bias_ih, self.cell.bias_hh):
                p.copy_(torch.randn(3 * N, generator=generator, dtype=dt) * self.bias_std)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, width={self.width}, beta={self.beta}, "
                f"recurrent_scaling={self.recurrent_scaling!r}, bias={self.bias}")

    def check_windows(self, x: Tensor, name: str = "x") -> None:
        check_windows(self, x, name)

    def forward(self, x: Tensor, h0: Optional[Tensor] = None, return_states: bool = False,
                last_only: bool = False):
        """Ŷ_k for k = 1..L of each window from memory h0 (default zero); ``last_only``: Ŷ_L
        only, (B,); ``return_states``: also the memories h_1..h_L, (B, L, N) (or (L, N))."""
        self.check_windows(x)
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        cell, N, g = self.cell, self.width, self.recurrent_scale
        gi = x @ cell.weight_ih.T  # (B, L, 3N)
        if self.bias:
            gi = gi + cell.bias_ih
        gi = gi.unbind(1)
        if h0 is None:
            h = torch.zeros_like(gi[0][:, :N])
        else:
            h = check_h0(h0.to(gi[0].dtype), gi[0].shape[0], N, single)
        Wt = cell.weight_hh.T
        states = []
        for gk in gi:
            gh = h @ Wt * g
            if self.bias:
                gh = gh + cell.bias_hh
            i_r, i_z, i_n = gk.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = n + z * (h - n)
            states.append(h)
        if last_only:
            y = (h @ self.c) * self.output_scale
            H = torch.stack(states, dim=1) if return_states else None
        else:
            H = torch.stack(states, dim=1)
            y = (H @ self.c) * self.output_scale
        if single:
            y = y.squeeze(0)
            H = None if H is None else H.squeeze(0)
        return (y, H) if return_states else y
