"""Ergodic Markov chains as SequenceSources (theory §1): VAR(1), finite chains, threshold AR.

Each chain is simulated in batch (``windows``: n independent chains at once; ``stream``: one),
started from its stationary law (VAR1, MarkovChain: exactly; ThresholdAR: after ``burn_in``
steps), then ``target.burn`` more steps are run so the target has the history it needs.
The per-step random numbers are drawn in fixed blocks, so a stream does not depend on its
``chunk_size`` and everything is determined by the torch.Generator passed in.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from scipy.linalg import solve_discrete_lyapunov
from torch import Tensor

from ..errors import ConfigError
from .base import RecordsArgs, as_array, as_int, fork
from .targets import make_target

BLOCK = 256  # steps of random numbers drawn at a time
F64 = torch.float64
Chunk = tuple[Tensor, Tensor]


class _Noise:
    """Per-step random numbers (n, T, width), drawn BLOCK steps at a time (chunking invariance)."""

    def __init__(self, n: int, width: int, kind: str, generator: torch.Generator) -> None:
        self.shape, self.kind, self.gen = (n, BLOCK, width), kind, generator
        self.buf, self.pos = torch.empty(n, 0, width, dtype=F64), 0

    def take(self, T: int) -> Tensor:
        parts = []
        while T > 0:
            if self.pos == self.buf.shape[1]:
                draw = torch.randn if self.kind == "normal" else torch.rand
                self.buf, self.pos = draw(self.shape, generator=self.gen, dtype=F64), 0
            k = min(T, self.buf.shape[1] - self.pos)
            parts.append(self.buf[:, self.pos:self.pos + k])
            self.pos, T = self.pos + k, T - k
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Chain(RecordsArgs):
    """Shared driver. Subclasses set input_dim, target, _noise_width/_noise_kind, and implement
    ``_start(n, noise) -> state`` and ``_advance(state, T, noise) -> (X (n, T, d), state)``
    (X[:, 0] is the current state)."""

    num_steps: int | None = None
    burn_in: int = 0
    _noise_width = 1
    _noise_kind = "normal"

    def _run(self, n: int, generator: torch.Generator, chunk: int) -> Iterator[Chunk]:
        noise = _Noise(n, self._noise_width, self._noise_kind, generator)
        state, tstate = self._start(n, noise), self.target.init_state(n)
        skip = self.burn_in + int(getattr(self.target, "burn", 0))
        while skip > 0:
            X, state = self._advance(state, min(skip, BLOCK), noise)
            _, tstate = self.target(X, tstate)
            skip -= X.shape[1]
        while True:
            X, state = self._advance(state, chunk, noise)
            Y, tstate = self.target(X, tstate)
            yield X, Y

    def stream(self, generator: torch.Generator, chunk_size: int) -> Iterator[Chunk]:
        """One unbounded sequence, chunks X (T, d), Y (T,) with T = chunk_size."""
        run = self._run(1, fork(generator), as_int(chunk_size, "chunk_size", 1))
        return ((X[0], Y[0]) for X, Y in run)

    def windows(self, n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n independent stationary windows X (n, L, d) and the targets Y (n,) of their last
        step."""
        n, length = as_int(n, "n", 1), as_int(length, "length", 1)
        X, Y = next(self._run(n, generator, length))
        return X, Y[:, -1].contiguous()


class VAR1(_Chain):
    """X_{k+1} = A X_k + ε_k,  ε_k ~ N(0, Q),  X_0 ~ N(0, Σ)  with  Σ = A Σ Aᵀ + Q.

    ``A``: scalar (A·I) or d×d; ``noise_scale``: scalar s (Q = s² I), length-d vector (diagonal
    of standard deviations) or d×d covariance Q. ``dim`` is inferred from A / noise_scale when
    None. Needs spectral radius ρ(A) < 1 (stable, ergodic).
    """

    def __init__(self, dim: int | None = None, A: Any = 0.8, noise_scale: Any = 1.0,
                 target: Any = None) -> None:
        A_, s = as_array(A, "data.A"), as_array(noise_scale, "data.noise_scale")
        shapes = [x.shape[0] for x in (A_, s) if x.ndim >= 1]
        d = as_int(dim, "data.dim", 1) if dim is not None else (shapes[0] if shapes else 1)
        if A_.ndim == 0:
            A_ = A_ * np.eye(d)
        if A_.shape != (d, d):
            raise ConfigError(f"data.A has shape {A_.shape}; expected a scalar or ({d}, {d}) "
                              f"for data.dim={d}")
        if s.ndim <= 1:
            if s.ndim == 1 and s.shape != (d,):
                raise ConfigError(f"data.noise_scale has {s.size} entries; expected {d}")
            if (s <= 0).any():
                raise ConfigError(f"data.noise_scale={noise_scale!r} must be > 0")
            Q = np.diag(np.broadcast_to(s, (d,)) ** 2)
        else:
            Q = s
            if Q.shape != (d, d) or not np.allclose(Q, Q.T) or np.linalg.eigvalsh(Q).min() <= 0:
                raise ConfigError(f"data.noise_scale as a matrix must be a symmetric positive-"
                                  f"definite ({d}, {d}) covariance")
        rho = float(np.abs(np.linalg.eigvals(A_)).max())
        if rho >= 1:
            raise ConfigError(f"data.A has spectral radius {rho:.4g} >= 1: the VAR(1) chain is not "
                              "stable/ergodic; scale A down")
        sigma = solve_discrete_lyapunov(A_, Q)
        self.input_dim = d
        self.A = torch.as_tensor(A_, dtype=F64)
        self.noise_cov = torch.as_tensor(Q, dtype=F64)
        self.stationary_cov = torch.as_tensor((sigma + sigma.T) / 2, dtype=F64)
        self._chol_q = torch.linalg.cholesky(self.noise_cov)
        self._chol_s = torch.linalg.cholesky(self.stationary_cov)
        self._noise_width = d
        self.target = make_target(target, d)

    def _start(self, n: int, noise: _Noise) -> Tensor:
        return noise.take(1)[:, 0] @ self._chol_s.T

    def _advance(self, x: Tensor, T: int, noise: _Noise) -> tuple[Tensor, Tensor]:
        E = (noise.take(T) @ self._chol_q.T).numpy()
        out, At, x = np.empty(E.shape), self.A.T.numpy(), x.numpy()
        for t in range(T):  # numpy: far less per-step overhead than torch on tiny arrays
            out[:, t] = x
            x = x @ At + E[:, t]
        return torch.from_numpy(out), torch.from_numpy(x)


def _inverse_cdf(probs: np.ndarray) -> Tensor:
    """Rows of thresholds c (.., S-1) such that index = #{j : u >= c_j} ~ probs for u ~ U[0, 1);
    thresholds at and after a row's last positive entry are +inf (never overshoot)."""
    c = np.cumsum(probs, axis=-1)[..., :-1]
    last = probs.shape[-1] - 1 - np.argmax(probs[..., ::-1] > 0, axis=-1)
    c = np.where(np.arange(probs.shape[-1] - 1) >= np.expand_dims(last, -1), np.inf, c)
    return torch.as_tensor(c, dtype=F64)


def _bool_power(M: np.ndarray, k: int) -> np.ndarray:
    """Support of M^k (M boolean), by repeated squaring."""
    R, B = np.eye(len(M), dtype=bool), M.copy()
    while k:
        if k & 1:
            R = (R.astype(float) @ B.astype(float)) > 0
        B, k = (B.astype(float) @ B.astype(float)) > 0, k >> 1
    return R


def _period(M: np.ndarray) -> int:
    """Period of an irreducible chain: gcd over edges u->v of level(u) + 1 - level(v) (BFS)."""
    level, frontier, g = {0: 0}, [0], 0
    while frontier:
        nxt = []
        for u in frontier:
            for v in np.flatnonzero(M[u]):
                if v not in level:
                    level[v] = level[u] + 1
                    nxt.append(v)
                g = math.gcd(g, level[u] + 1 - level[v])
        frontier = nxt
    return g


class MarkovChain(_Chain):
    """Finite chain: P(I_{k+1} = j | I_k = i) = transition[i][j],  X_k = states[I_k] ∈ R^d.

    ``transition`` must be row-stochastic and primitive (irreducible and aperiodic:
    P^{(S-1)^2+1} > 0, Wielandt's bound). Starts from the stationary law π = π P
    (``stationary``). ``states`` (S, d) defaults to the one-hot embedding (d = S).
    """

    _noise_kind = "uniform"

    def __init__(self, transition: Any = ((0.9, 0.1), (0.2, 0.8)), states: Any = None,
                 target: Any = None) -> None:
        P = as_array(transition, "data.transition")
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.size == 0:
            raise ConfigError(f"data.transition has shape {P.shape}; it must be a square matrix")
        S = P.shape[0]
        if (P < 0).any():
            i, j = np.argwhere(P < 0)[0]
            raise ConfigError(f"data.transition[{i}][{j}]={P[i, j]} is negative; transition "
                              "probabilities must be >= 0")
        bad = np.flatnonzero(np.abs(P.sum(1) - 1) > 1e-8)
        if bad.size:
            i = bad[0]
            raise ConfigError(f"data.transition row {i} sums to {P[i].sum():.10g}, not 1: the "
                              "matrix must be row-stochastic")
        M = P > 0
        reach = _bool_power(M | np.eye(S, dtype=bool), S - 1)
        if not reach.all():
            i, j = np.argwhere(~reach)[0]
            raise ConfigError(f"data.transition is reducible: state {j} cannot be reached from "
                              f"state {i}, so the chain is not ergodic")
        if not _bool_power(M, (S - 1) ** 2 + 1).all():
            raise ConfigError(f"data.transition is periodic (period {_period(M)}): the chain is "
                              "irreducible but not aperiodic; add self-loops (P[i][i] > 0)")
        X = np.eye(S) if states is None else as_array(states, "data.states")
        X = X[:, None] if X.ndim == 1 else X
        if X.ndim != 2 or X.shape[0] != S:
            raise ConfigError(f"data.states has shape {X.shape}; expected one row per state, "
                              f"({S}, d)")
        lhs = np.vstack([P.T - np.eye(S), np.ones((1, S))])
        pi = np.clip(np.linalg.lstsq(lhs, np.r_[np.zeros(S), 1.0], rcond=None)[0], 0, None)
        self.input_dim = X.shape[1]
        self.transition = torch.as_tensor(P, dtype=F64)
        self.states = torch.as_tensor(X, dtype=F64)
        self.stationary = torch.as_tensor(pi / pi.sum(), dtype=F64)
        self._cum = _inverse_cdf(P)
        self._cum_pi = _inverse_cdf(pi / pi.sum())
        self.target = make_target(target, self.input_dim)

    def _start(self, n: int, noise: _Noise) -> Tensor:
        return (noise.take(1)[:, 0] >= self._cum_pi).sum(-1)

    def _advance(self, i: Tensor, T: int, noise: _Noise) -> tuple[Tensor, Tensor]:
        U, cum, i = noise.take(T).numpy(), self._cum.numpy(), i.numpy()
        idx = np.empty((i.shape[0], T), dtype=np.int64)
        for t in range(T):
            idx[:, t] = i
            i = (U[:, t] >= cum[i]).sum(-1)
        return self.states[torch.from_numpy(idx)], torch.from_numpy(i)


class ThresholdAR(_Chain):
    """Self-exciting threshold AR (1-d):
    X_{k+1} = a_low X_k + s ε_k if X_k <= threshold, else a_high X_k + s ε_k;  ε_k ~ N(0, 1).

    max(|a_low|, |a_high|) < 1 is required (sufficient for geometric ergodicity). Starts at
    X = 0 and discards ``burn_in`` steps to approach the stationary law.
    """

    input_dim = 1

    def __init__(self, a_low: float = 0.9, a_high: float = -0.5, threshold: float = 0.0,
                 noise_scale: float = 1.0, burn_in: int = 500, target: Any = None) -> None:
        self.a_low = float(as_array(a_low, "data.a_low"))
        self.a_high = float(as_array(a_high, "data.a_high"))
        self.threshold = float(as_array(threshold, "data.threshold"))
        self.noise_scale = float(as_array(noise_scale, "data.noise_scale"))
        if max(abs(self.a_low), abs(self.a_high)) >= 1:
            raise ConfigError(f"data.a_low={self.a_low}, data.a_high={self.a_high}: need "
                              "max(|a_low|, |a_high|) < 1 (sufficient for the threshold AR chain "
                              "to be ergodic)")
        if self.noise_scale <= 0:
            raise ConfigError(f"data.noise_scale={self.noise_scale} must be > 0")
        self.burn_in = as_int(burn_in, "data.burn_in")
        self.target = make_target(target, 1)

    def _start(self, n: int, noise: _Noise) -> Tensor:
        return torch.zeros(n, 1, dtype=F64)

    def _advance(self, x: Tensor, T: int, noise: _Noise) -> tuple[Tensor, Tensor]:
        E = self.noise_scale * noise.take(T).numpy()
        out, x = np.empty(E.shape), x.numpy()
        for t in range(T):
            out[:, t] = x
            x = np.where(x <= self.threshold, self.a_low, self.a_high) * x + E[:, t]
        return torch.from_numpy(out), torch.from_numpy(x)
