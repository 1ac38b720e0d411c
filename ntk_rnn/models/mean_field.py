"""MeanFieldRNN: the recurrent network with a simplified weight matrix (theory §2, §6).

Model D (``recurrence="diagonal"``), unit i = 1..N with parameters c_i, w_i ∈ R^d, b_i:

    z_{i,k} = w_i · X_k + b_i S_{i,k},   S_{i,k+1} = σ(z_{i,k}),   S_{i,0} = 0
    Ŷ_k     = N^{-β} Σ_i c_i S_{i,k+1}

Model F (``recurrence="feedback"``): the hidden-to-hidden matrix is rank one, N^{-β} b cᵀ, so the
output is the memory (``cell`` is f_θ(x, s) = N^{-β} Σ_i c_i σ(w_i·x + b_i s)):

    H_{i,k} = σ(w_i · X_k + b_i m_k),   Ŷ_k = f_θ(X_k, m_k),   m_{k+1} = Ŷ_k,   m_0 = 0

Model F places no contraction condition on μ0 (b may be Gaussian): the contraction it needs is
sup|∂_s h_t| < 1 of the learnt function (theory §6).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .activations import Activation, get_activation
from .init import InitLaw, generator_from_seed
from .recurrence import RecurrenceName, recurrence_of, spq_features
from .scaling import MeanFieldScaling


def check_hyper(input_dim: int, width: int, beta: float) -> None:
    """Validate the shape and scaling hyper-parameters with one clear message each."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.width={width!r} must be an integer >= 1")
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise ConfigError(f"model.input_dim={input_dim!r} must be an integer >= 1")
    if not (0.5 <= float(beta) <= 1.0):
        raise ConfigError(
            f"model.beta={beta} is outside [0.5, 1] (0.5 = NTK scaling, 1 = mean-field)"
        )


class MeanFieldRNN(MeanFieldScaling, nn.Module):
    """Mean-field scaled RNN (Models D and F); parameters `c` (N,), `w` (N, d), `b` (N,).

    `forward(x)` maps windows (batch, L, d) (or (L, d)) to the outputs Ŷ at every step,
    (batch, L) (or (L,)), starting from zero memory. `init` (μ0) defaults to each model's
    usual law: Model D c ~ U[-1, 1], w ~ N(0, I/d), b ~ U[-ρ, ρ] with ρ = 0.5; Model F the
    same but b ~ N(0, 1) (no contraction bound on b there, theory §6).

    Args:
        input_dim: d, the dimension of each input X_k (the trainer fills it in from the data).
        width: N, the number of units; the limit time is t = k / N.
        beta: β ∈ [0.5, 1]: the output is N^{−β} Σ_i c_i S_i (0.5: NTK scaling, 1:
            mean-field) and the learning rate α N^{2β−2}.
        activation: σ, a name (`tanh`, `sigmoid`, `erf`: `ntk_rnn.ACTIVATIONS`) or an
            `Activation`.
        recurrence: `diagonal` (Model D: S_{i,k+1} = σ(w_i · X_k + b_i S_{i,k})) or `feedback`
            (Model F: the memory is the previous output, theory §6).
        init: The initial law μ0, an `InitLaw` or a dict of its fields (None: the model's
            usual law, above). Model D needs the contraction ρ · sup|σ'| < 1.
        generator: The generator θ_0 is drawn from (None: a fresh one seeded with `seed`).
        seed: The seed of that fresh generator (None: 0). The trainer redraws θ_0 from the
            run's seed anyway, with `reset_parameters(generator)`.
        dtype: The parameters' dtype.
        device: The parameters' device (θ_0 is drawn on the CPU and moved, so a seed gives
            the same network on every device).

    Raises:
        ConfigError: A setting out of range (named as its `model.*` key).
    """

    def __init__(
        self,
        input_dim: int,
        width: int,
        beta: float = 0.75,
        activation: str | Activation = "tanh",
        recurrence: RecurrenceName = "diagonal",
        init: Optional[InitLaw | dict] = None,
        *,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_hyper(input_dim, width, beta)
        rec = recurrence_of(recurrence)
        if init is None:  # each model's usual μ0 (as conf/model/{diagonal,feedback}.yaml)
            init = InitLaw(**rec.default_b)
        elif isinstance(init, dict):
            init = InitLaw(**init)
        self.input_dim = int(input_dim)
        self.width = int(width)
        self.beta = float(beta)
        self.recurrence = recurrence
        self.act = get_activation(activation)
        self.init_law = init
        if rec.contraction:
            if init.b == "normal":
                raise ConfigError(
                    "model.init.b='normal' is unbounded, so the contraction ρ·sup|σ'| < 1 of "
                    "Model D cannot hold; use b='uniform' (or 'constant', 'rademacher')"
                )
            bound = init.b_bound * self.act.sup_deriv
            if not init.is_custom and not bound < 1.0:
                raise ConfigError(
                    f"model.init.rho={init.rho} violates the contraction ρ·sup|σ'| < 1 for "
                    f"activation={self.act.name!r} (sup|σ'| = {self.act.sup_deriv:.4g}, product "
                    f"{bound:.4g}); choose rho < {1.0 / self.act.sup_deriv:.4g}"
                )
        if generator is None:
            generator = generator_from_seed(0 if seed is None else seed)
        self.c, self.w, self.b = (nn.Parameter(t) for t in self._draw(generator, dtype, device))

    def _draw(self, generator: torch.Generator, dtype: torch.dtype,
              device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """θ_0 = (c, w, b) ~ μ0 (theory §2), with Model D's contraction checked on a custom draw."""
        c, w, b = self.init_law.sample(self.width, self.input_dim, generator, dtype=dtype,
                                       device=device)
        if recurrence_of(self.recurrence).contraction and self.init_law.is_custom:
            bound = float(b.abs().max()) * self.act.sup_deriv
            if not bound < 1.0:
                raise ConfigError(
                    f"model.init.sampler drew max|b|·sup|σ'| = {bound:.4g} >= 1: the contraction "
                    "of Model D fails; draw |b| < 1/sup|σ'|"
                )
        return c, w, b

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw θ_0 ~ μ0 from ``generator`` in place (the trainer does this with the run's model
        seed, so a run is determined by its seed whichever way the model was built)."""
        for p, v in zip((self.c, self.w, self.b),
                        self._draw(generator, self.c.dtype, self.c.device), strict=True):
            p.copy_(v)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, width={self.width}, beta={self.beta}, "
            f"activation={self.act.name!r}, recurrence={self.recurrence!r}"
        )

    # --- forward --------------------------------------------------------------------------
    def check_windows(self, x: Tensor, name: str = "x") -> None:
        """Windows must be (batch, L, d) or (L, d) with d = input_dim and L >= 1."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_dim or x.shape[-2] < 1:
            raise ConfigError(
                f"{name} has shape {tuple(x.shape)}; expected windows (batch, L, "
                f"{self.input_dim}) or (L, {self.input_dim}) with L >= 1"
            )

    def cell(self, x: Tensor, s: Tensor) -> Tensor:
        """f_θ(x, s) = N^{-β} Σ_i c_i σ(w_i·x + b_i s) for x (..., d), s (...) → (...)."""
        return self.act(x @ self.w.T + s.unsqueeze(-1) * self.b) @ self.c * self.output_scale

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        """Ŷ_k for k = 1..L from zero memory: Model D Ŷ_k = N^{-β} Σ_i c_i S_{i,k+1} (S_0 = 0),
        Model F Ŷ_k = f_θ(X_k, m_k), m_{k+1} = Ŷ_k (m_0 = 0).

        ``last_only=True``: only Ŷ_L, shape (batch,) (a 0-d tensor for one (L, d) window) — what
        the NTK needs; Model D then skips the other L − 1 read-outs.

        Written for torch.func (``vmap(jacrev)``, ``jvp``): w·X_k for all steps comes from one
        GEMM split by ``unbind`` (one backward node that stacks the step gradients), no in-place
        ops. Indexing the (B, L, N) product per step instead, ``u[:, k]``, made every step's
        backward build a zero-filled gradient of all of u and add it up — O(L²·N) per window,
        14× slower than a plain loop under vmap(jacrev).
        """
        self.check_windows(x)
        single = x.dim() == 2
        u = torch.matmul(x.unsqueeze(0) if single else x, self.w.T).unbind(-2)  # L × (B, N)
        y = getattr(self, f"_forward_{self.recurrence}")(u, last_only)
        return y.squeeze(0) if single else y

    def _forward_diagonal(self, u: tuple[Tensor, ...], last_only: bool) -> Tensor:
        """Model D on the input drives u_k = w·X_k (B, N): (B,) or (B, L)."""
        S = self.act(u[0])  # S_0 = 0
        outs = [] if last_only else [S @ self.c]
        for uk in u[1:]:
            S = self.act(uk + self.b * S)
            if not last_only:
                outs.append(S @ self.c)
        if last_only:
            return (S @ self.c) * self.output_scale
        return torch.stack(outs, dim=-1) * self.output_scale

    def _forward_feedback(self, u: tuple[Tensor, ...], last_only: bool) -> Tensor:
        """Model F on u_k = w·X_k (B, N): m_{k+1} = N^{-β} Σ_i c_i σ(u_{i,k} + b_i m_k)."""
        scale = self.output_scale
        m = (self.act(u[0]) @ self.c) * scale  # m_0 = 0
        outs = [m]
        for uk in u[1:]:
            m = (self.act(uk + m.unsqueeze(-1) * self.b) @ self.c) * scale
            outs.append(m)
        return m if last_only else torch.stack(outs, dim=-1)

    def unit_features(
        self, x: Tensor, truncated: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(S, P, Q) of every unit at the last step of each window, θ frozen (theory §3, §4).

        P_{k+1} = σ'(z_k)(X_k + b P_k),  Q_{k+1} = σ'(z_k)(S_k + b Q_k), P_0 = Q_0 = 0;
        ``truncated=True`` drops the b P and b Q terms (`spq_features`, the recursion
        ``spq_step``). Shapes (B, N), (B, N, d), (B, N).
        Model D only (Model F's per-window gradients are not per-unit: see
        ``ntk_rnn.online.feedback``).
        """
        if not recurrence_of(self.recurrence).unit_features:
            raise ConfigError("unit_features needs model.recurrence='diagonal' (Model D)")
        self.check_windows(x)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        with torch.no_grad():
            return spq_features(self.act, self.w.detach(), self.b.detach(), x, truncated)
