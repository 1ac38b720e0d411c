"""Activations σ with their derivative σ' and the bound sup|σ'| (theory §2 contraction).

tanh, sigmoid and erf have compiled kernels (``ntk_rnn.csrc``); relu (max(z, 0), σ' = 1{z > 0})
runs on the torch paths everywhere (the kernels' loaders report "no compiled kernel" and fall
back without a warning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

#: in-place σ and σ' for the fast paths: ``fused(like)`` → ``into(z, s, ds)``, which writes
#: s ← σ(z), ds ← σ'(z) into preallocated tensors shaped like ``like``, allocating nothing
Fused = Callable[[Tensor], Callable[[Tensor, Tensor, Tensor], None]]


@dataclass(frozen=True)
class Activation:
    """An activation σ, its derivative σ', and sup_z |σ'(z)| (used by the contraction check),
    with the fused forms the fast paths use instead of asking for σ by name:

    - ``deriv_of_value``: σ' as a function of s = σ(z) where there is one (tanh: 1 − s²,
      sigmoid: s(1 − s)), so that σ and σ' share one transcendental;
    - ``sigmoid_form``: (k, a, c) with σ(z) = a·sigmoid(k z) + c where σ is one (tanh: (2, 2,
      −1), sigmoid: (1, 1, 0)); σ'(z) = a k s(1 − s), s = sigmoid(k z) (the structured NTK's
      torch path, ``ntk.structured``, runs sigmoid: several times faster than tanh on CPU);
    - ``fused``: the in-place ``(z, s, ds)`` writer (`Fused`); the generic one (σ and σ'
      evaluated, then copied) where it is None.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    sup_deriv: float
    deriv_of_value: Callable[[Tensor], Tensor] | None = None
    sigmoid_form: tuple[float, float, float] | None = None
    fused: Fused | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z)

    def value_and_deriv(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(σ(z), σ'(z)), σ' from σ where it is a function of it (``deriv_of_value``)."""
        s = self.fn(z)
        return s, (self.deriv(z) if self.deriv_of_value is None else self.deriv_of_value(s))

    def into(self, like: Tensor) -> Callable[[Tensor, Tensor, Tensor], None]:
        """``into(z, s, ds)``: s ← σ(z), ds ← σ'(z) in place, for tensors shaped like ``like``
        (``fused``; else `value_and_deriv` copied over)."""
        if self.fused is not None:
            return self.fused(like)
        vd = self.value_and_deriv

        def into(z: Tensor, s: Tensor, ds: Tensor) -> None:
            v, dv = vd(z)
            s.copy_(v)
            ds.copy_(dv)
        return into


def _tanh_into(like: Tensor) -> Callable[[Tensor, Tensor, Tensor], None]:
    ones = torch.ones_like(like)

    def into(z: Tensor, s: Tensor, ds: Tensor) -> None:
        torch.tanh(z, out=s)
        torch.addcmul(ones, s, s, value=-1.0, out=ds)  # 1 − s²
    return into


def _sigmoid_into(like: Tensor) -> Callable[[Tensor, Tensor, Tensor], None]:
    def into(z: Tensor, s: Tensor, ds: Tensor) -> None:
        torch.sigmoid(z, out=s)
        torch.addcmul(s, s, s, value=-1.0, out=ds)  # s − s²
    return into


def _erf_into(like: Tensor) -> Callable[[Tensor, Tensor, Tensor], None]:
    def into(z: Tensor, s: Tensor, ds: Tensor) -> None:
        torch.erf(z, out=s)
        torch.mul(z, z, out=ds).neg_().exp_().mul_(TWO_OVER_SQRT_PI)  # 2/√π e^{−z²}
    return into


TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2, 1.0,
                       deriv_of_value=lambda s: 1.0 - s * s, sigmoid_form=(2.0, 2.0, -1.0),
                       fused=_tanh_into),
    "sigmoid": Activation(
        "sigmoid", torch.sigmoid, lambda z: torch.sigmoid(z) * (1.0 - torch.sigmoid(z)), 0.25,
        deriv_of_value=lambda s: s * (1.0 - s), sigmoid_form=(1.0, 1.0, 0.0),
        fused=_sigmoid_into),
    "erf": Activation(
        "erf", torch.erf, lambda z: TWO_OVER_SQRT_PI * torch.exp(-z * z), TWO_OVER_SQRT_PI,
        fused=_erf_into),
    # σ'(0) = 0, as torch's autograd of relu: the empirical kernel and the limit agree at u = 0
    "relu": Activation("relu", torch.relu, lambda z: (z > 0).to(z.dtype), 1.0),
}


def get_activation(name: str | Activation) -> Activation:
    """Look an activation up by name ('tanh', 'sigmoid', 'erf', 'relu')."""
    if isinstance(name, Activation):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"model.activation={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        ) from None
