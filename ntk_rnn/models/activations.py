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


@dataclass(frozen=True)
class Activation:
    """An activation σ, its derivative σ', and sup_z |σ'(z)| (used by the contraction check)."""

    name: str
    fn: Callable[[Tensor], Tensor]
    deriv: Callable[[Tensor], Tensor]
    sup_deriv: float

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z)

    def value_and_deriv(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(σ(z), σ'(z)) sharing work where the derivative is a function of the value."""
        if self.name == "tanh":
            s = torch.tanh(z)
            return s, 1.0 - s * s
        if self.name == "sigmoid":
            s = torch.sigmoid(z)
            return s, s * (1.0 - s)
        return self.fn(z), self.deriv(z)


TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2, 1.0),
    "sigmoid": Activation(
        "sigmoid", torch.sigmoid, lambda z: torch.sigmoid(z) * (1.0 - torch.sigmoid(z)), 0.25
    ),
    "erf": Activation(
        "erf", torch.erf, lambda z: TWO_OVER_SQRT_PI * torch.exp(-z * z), TWO_OVER_SQRT_PI
    ),
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
