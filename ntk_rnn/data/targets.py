"""Targets Y_k: bounded, causal functionals of the input history (X_k, X_{k-1}, ...) (theory §1).

A target is streamed chunk by chunk and carries its state across chunks::

    state = target.init_state(batch)          # None: no history seen yet
    Y, state = target(X, state)               # X (B, T, d) -> Y (B, T)

``target.burn`` is the number of history steps it needs before its output is exact (to
``tol``); sources discard that many steps before emitting, in ``stream`` and in ``windows``,
so Y_0 of a stream and the Y of every window are both functionals of a (burnt-in) history.

Weights ``a``, ``b`` are a scalar (the same weight on every coordinate: a·x = a Σ_j x_j) or a
length-d vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.signal import lfilter
from torch import Tensor

from ..errors import ConfigError
from .base import as_array, as_int


def _weight(value: Any, field: str) -> Tensor:
    w = as_array(value, field)
    if w.ndim > 1:
        raise ConfigError(f"{field}={value!r} must be a scalar or a list of length input_dim")
    return torch.as_tensor(w, dtype=torch.float64)


def _check_weight(w: Tensor, field: str, d: int) -> None:
    if w.dim() == 1 and w.numel() != d:
        raise ConfigError(f"{field} has {w.numel()} entries but the inputs have dimension {d}")


def _dot(X: Tensor, w: Tensor) -> Tensor:
    """a·x over the last axis (scalar a: a Σ_j x_j)."""
    return X.sum(-1) * w if w.dim() == 0 else (X * w).sum(-1)


class Target:
    """Base class: Y_k = F(X_k, X_{k-1}, ...)."""

    burn: int = 0

    def check_dim(self, d: int) -> None:
        """Raise ConfigError if the target cannot read inputs of dimension ``d``."""

    def init_state(self, batch: int) -> Tensor | None:
        return None

    def __call__(self, X: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class LagNonlinear(Target):
    """Y_k = tanh(a·X_k + b·X_{k-1} + c X_k[0] X_{k-1}[0])   (|Y_k| < 1; needs one lag)."""

    burn = 1

    def __init__(self, a: Any = 1.0, b: Any = -0.5, c: float = 0.0) -> None:
        self.a = _weight(a, "data.target.a")
        self.b = _weight(b, "data.target.b")
        self.c = float(as_array(c, "data.target.c"))

    def check_dim(self, d: int) -> None:
        _check_weight(self.a, "data.target.a", d)
        _check_weight(self.b, "data.target.b", d)

    def __call__(self, X: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        first = X[:, :1] if state is None else state[:, None]  # no history: X_{-1} := X_0
        prev = torch.cat([first, X[:, :-1]], dim=1)
        z = _dot(X, self.a) + _dot(prev, self.b) + self.c * X[..., 0] * prev[..., 0]
        return torch.tanh(z), X[:, -1].clone()


class FadingMemory(Target):
    """Y_k = λ Y_{k-1} + (1-λ) tanh(a·X_k),  i.e.  Y_k = (1-λ) Σ_{j>=0} λ^j tanh(a·X_{k-j}).

    |Y_k| <= 1. With no history the filter starts at Y_{-1} := tanh(a·X_0); after m steps that
    error is <= 2 λ^m, so ``burn`` = min(max_burn, ⌈log(tol/2) / log λ⌉).
    """

    def __init__(self, lam: float = 0.9, a: Any = 1.0, tol: float = 1e-12,
                 max_burn: int = 10_000) -> None:
        lam = float(as_array(lam, "data.target.lam"))
        if not 0.0 <= lam < 1.0:
            raise ConfigError(f"data.target.lam={lam} must be in [0, 1)")
        tol = float(as_array(tol, "data.target.tol"))
        if not 0.0 < tol < 1.0:
            raise ConfigError(f"data.target.tol={tol} must be in (0, 1)")
        max_burn = as_int(max_burn, "data.target.max_burn")
        self.lam, self.a, self.tol, self.max_burn = lam, _weight(a, "data.target.a"), tol, max_burn
        self.burn = 0 if lam == 0 else min(max_burn, math.ceil(math.log(tol / 2) / math.log(lam)))

    def check_dim(self, d: int) -> None:
        _check_weight(self.a, "data.target.a", d)

    def __call__(self, X: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        g = torch.tanh(_dot(X, self.a)).numpy()
        prev = g[:, 0] if state is None else state.numpy()
        Y, _ = lfilter([1.0 - self.lam], [1.0, -self.lam], g, axis=1,
                       zi=self.lam * prev[:, None])
        Y = torch.from_numpy(np.ascontiguousarray(Y))
        return Y, Y[:, -1].clone()


TARGETS = {"lag": LagNonlinear, "fading": FadingMemory}


def make_target(spec: Any, input_dim: int) -> Target:
    """A target from an object, a hydra config (``_target_``), a dict ``{kind: lag|fading, ...}``
    or None (the default LagNonlinear()); checked against the input dimension."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            spec = OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if spec is None:
        target = LagNonlinear()
    elif isinstance(spec, Mapping):
        spec = dict(spec)
        if "_target_" in spec:
            from hydra.utils import instantiate

            target = instantiate(spec)
        else:
            kind = spec.pop("kind", None)
            if kind not in TARGETS:
                raise ConfigError(f"data.target.kind={kind!r} is not known; choose one of "
                                  f"{list(TARGETS)} or give a _target_")
            try:
                target = TARGETS[kind](**spec)
            except TypeError as exc:
                raise ConfigError(f"data.target: {exc}") from None
    else:
        target = spec
    if not (callable(target) and hasattr(target, "init_state")):
        raise ConfigError(f"data.target={target!r} is not a target: it needs init_state(batch) and "
                          "__call__(X, state) -> (Y, state) (see ntk_rnn.data.targets)")
    if hasattr(target, "check_dim"):
        target.check_dim(input_dim)
    return target
