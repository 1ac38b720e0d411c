"""ElmanRNN: the full-matrix recurrent network, beyond the simplified weight matrix of the theory.

Width N, parameters c (N,), w (N, d), A (N, N); memory S_0 = 0 (or a given h0):

    S_{k+1} = σ(w X_k + N^{-γ} A S_k),   Ŷ_k = N^{-β} c · S_{k+1}

γ = 1 for ``recurrent_scaling="mean_field"`` (the recurrence is an average over units, like
Model D's) and γ = 1/2 for ``"ntk"`` (standard parametrisation: N^{-1/2} A has O(1) spectrum).
Initial law: c and w as MeanFieldRNN's μ0 (c ~ U[-1, 1], w ~ N(0, I/d), `InitLaw`), A
i.i.d. entries with mean ``A_mean`` and standard deviation ``A_std`` (``A_law`` normal or uniform).
``ntk_scale`` = N^{2β-1} and ``learning_rate(α)`` = α N^{2β-2} as for MeanFieldRNN, so the
normalised kernel and the time t = k/N mean the same for both.

The memory interface used by `ntk_rnn.online.bptt.BPTTStepper` (``memory_dim`` and
``forward(x, h0=..., return_states=True)``) lets truncated BPTT start a window from a kept
memory instead of zero.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .activations import Activation, get_activation
from .init import KINDS, InitLaw
from .mean_field import check_hyper
from .scaling import RecurrentScaling

RECURRENT_SCALINGS = ("mean_field", "ntk")
A_LAWS = ("normal", "uniform")


def recurrent_exponent(recurrent_scaling: str) -> float:
    """γ of N^{-γ} A S: 1 for 'mean_field', 1/2 for 'ntk' (ConfigError otherwise)."""
    if recurrent_scaling not in RECURRENT_SCALINGS:
        raise ConfigError(
            f"model.recurrent_scaling={recurrent_scaling!r} is not known; choose one of "
            f"{list(RECURRENT_SCALINGS)}"
        )
    return 1.0 if recurrent_scaling == "mean_field" else 0.5


def check_law(key: str, kind: str, scale: float) -> None:
    """A c/w law as in `InitLaw`, with the error naming ``model.<key>``."""
    if kind not in KINDS:
        raise ConfigError(f"model.{key}={kind!r} is not a known law; choose one of {list(KINDS)}")
    if not float(scale) >= 0:
        raise ConfigError(f"model.{key.replace('law', 'scale')}={scale} must be >= 0")


def check_windows(model: nn.Module, x: Tensor, name: str = "x") -> None:
    """Windows must be (batch, L, d) or (L, d) with d = input_dim and L >= 1."""
    if not isinstance(x, Tensor) or x.dim() not in (2, 3) or x.shape[-1] != model.input_dim \
            or x.shape[-2] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(
            f"{name} has shape {shape}; expected windows (batch, L, {model.input_dim}) or "
            f"(L, {model.input_dim}) with L >= 1"
        )


def check_h0(h0: Tensor, batch: int, n: int, single: bool) -> Tensor:
    """h0 (n,) (shared by the batch) or (batch, n) → (batch, n)."""
    if h0.dim() == 1 and h0.shape[0] == n:
        return h0.expand(batch, n)
    if h0.dim() == 2 and tuple(h0.shape) == (batch, n) and not single:
        return h0
    raise ConfigError(f"h0 has shape {tuple(h0.shape)}; expected ({n},) or ({batch}, {n})")


class ElmanRNN(RecurrentScaling, nn.Module):
    """Full-matrix Elman network with mean-field readout (see the module docstring):
    S_{k+1} = σ(w X_k + N^{−γ} A S_k), Ŷ_k = N^{−β} c · S_{k+1}.

    `forward(x)` maps windows (B, L, d) → Ŷ (B, L) (and (L, d) → (L,)), from zero memory.
    `forward(x, h0=h, return_states=True)` starts from memory h ((N,) or (B, N)) and also
    returns the memories S_1..S_L, (B, L, N) (or (L, N)).

    Args:
        input_dim: d, the dimension of each input X_k (the trainer fills it in from the data).
        width: N, the number of units; the limit time is t = k / N.
        beta: β ∈ [0.5, 1] of the readout N^{−β} c · S and the learning rate α N^{2β−2}.
        recurrent_scaling: `mean_field` (γ = 1: the recurrence averages over units) or `ntk`
            (γ = 1/2: the standard parametrisation, N^{−1/2} A has an O(1) spectrum).
        activation: σ, a name (`ntk_rnn.ACTIVATIONS`) or an `Activation`.
        A_mean: Mean of the entries of A at initialisation.
        A_std: Standard deviation of the entries of A at initialisation.
        A_law: Law of the entries of A: `normal` or `uniform`.
        c_law: Law of c, as `InitLaw`'s: `uniform` (U[−c_scale, c_scale]), `normal`,
            `rademacher` or `constant`.
        c_scale: Scale of c's law.
        w_law: Law of w, as `InitLaw`'s (`normal`: N(0, w_scale² I/d)).
        w_scale: Scale of w's law.
        generator: The generator θ_0 is drawn from, as `MeanFieldRNN`'s.
        seed: Its seed when `generator` is None (None: 0), as `MeanFieldRNN`'s.
        dtype: The parameters' dtype.
        device: The parameters' device.

    Raises:
        ConfigError: A setting out of range (named as its `model.*` key).
    """

    def __init__(
        self,
        input_dim: int,
        width: int,
        beta: float = 0.75,
        recurrent_scaling: str = "mean_field",
        activation: str | Activation = "tanh",
        A_mean: float = 0.0,
        A_std: float = 1.0,
        A_law: str = "normal",
        c_law: str = "uniform",
        c_scale: float = 1.0,
        w_law: str = "normal",
        w_scale: float = 1.0,
        *,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_hyper(input_dim, width, beta)
        self.gamma = recurrent_exponent(recurrent_scaling)
        if A_law not in A_LAWS:
            raise ConfigError(f"model.A_law={A_law!r} is not known; choose one of {list(A_LAWS)}")
        if not (math.isfinite(float(A_mean)) and float(A_std) >= 0 and math.isfinite(A_std)):
            raise ConfigError(f"model.A_mean={A_mean}, model.A_std={A_std}: need a finite mean "
                              "and a finite standard deviation >= 0")
        check_law("c_law", c_law, c_scale)
        check_law("w_law", w_law, w_scale)
        self.input_dim, self.width, self.beta = int(input_dim), int(width), float(beta)
        self.recurrent_scaling = recurrent_scaling
        self.act = get_activation(activation)
        self.A_mean, self.A_std, self.A_law = float(A_mean), float(A_std), A_law
        self.init_cw = InitLaw(c=c_law, c_scale=c_scale, w=w_law, w_scale=w_scale,
                               b="constant", rho=0.0)
        N, d = self.width, self.input_dim
        self.c = nn.Parameter(torch.empty(N, dtype=dtype, device=device))
        self.w = nn.Parameter(torch.empty(N, d, dtype=dtype, device=device))
        self.A = nn.Parameter(torch.empty(N, N, dtype=dtype, device=device))
        self._seed = 0 if seed is None else int(seed)
        self.reset_parameters(generator)

    # --- initial law ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Redraw θ_0 = (c, w, A) from ``generator`` (default: a fresh one seeded with the
        constructor's ``seed``). Drawn on CPU in the model's dtype, in the order c, w, A (c and w
        exactly as MeanFieldRNN's), then moved: a seed gives the same network on every device."""
        if generator is None:
            generator = torch.Generator().manual_seed(self._seed)
        N, d, dt = self.width, self.input_dim, self.c.dtype
        c, w, _ = self.init_cw.sample(N, d, generator, dtype=dt)
        if self.A_law == "normal":
            A = torch.randn(N, N, generator=generator, dtype=dt) * self.A_std + self.A_mean
        else:
            half = math.sqrt(3.0) * self.A_std
            A = (2.0 * torch.rand(N, N, generator=generator, dtype=dt) - 1.0) * half + self.A_mean
        self.c.copy_(c)
        self.w.copy_(w)
        self.A.copy_(A)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, width={self.width}, beta={self.beta}, "
                f"recurrent_scaling={self.recurrent_scaling!r}, activation={self.act.name!r}, "
                f"A~{self.A_law}(mean={self.A_mean}, std={self.A_std})")

    # --- forward ----------------------------------------------------------------------------
    def check_windows(self, x: Tensor, name: str = "x") -> None:
        check_windows(self, x, name)

    def forward(self, x: Tensor, h0: Optional[Tensor] = None, return_states: bool = False,
                last_only: bool = False):
        """Ŷ_k for k = 1..L of each window, from memory h0 (default zero).

        ``last_only=True``: only Ŷ_L, shape (B,) (0-d for one (L, d) window) — what the NTK
        needs (``ntk_rnn.ntk.empirical_ntk`` asks for it). ``return_states=True``: also the
        memories S_1..S_L, (B, L, N) (or (L, N)).
        """
        self.check_windows(x)
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        u = (x @ self.w.T).unbind(1)  # L × (B, N); unbind: a cheap backward under torch.func
        if h0 is None:
            S = torch.zeros_like(u[0])
        else:
            S = check_h0(h0.to(u[0].dtype), u[0].shape[0], self.width, single)
        At, g = self.A.T, self.recurrent_scale
        states = []
        for uk in u:
            S = self.act(torch.addmm(uk, S, At, alpha=g))
            states.append(S)
        if last_only:
            y = (S @ self.c) * self.output_scale
            H = torch.stack(states, dim=1) if return_states else None
        else:
            H = torch.stack(states, dim=1)  # (B, L, N)
            y = (H @ self.c) * self.output_scale
        if single:
            y = y.squeeze(0)
            H = None if H is None else H.squeeze(0)
        return (y, H) if return_states else y
