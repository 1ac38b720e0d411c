"""The training loop's one stepper protocol, built by one factory from the model family.

A stepper moves E >= 1 networks along their streams, L online SGD steps per call (theory §3):

    Ŷ_k = f_θ(X_k),    θ ← θ + α_N (Y_k − Ŷ_k) ∂Ŷ_k/∂θ,    k = 0..L−1

    stepper.run_chunk(X, Y, out)   # X (E, L, d) a stream each, or (L, d) one stream they share;
                                   # Y (E, L) or (L,); Ŷ into out (E, L)
    stepper.backend                # kernel, eager, graphs, reference or bptt-<engine>

`make_stepper` picks it from the model family's online step (`family_of(model).online`, via
`resolve_gradient`) and the backend asked for:

- gradient `bptt`: each network's `BPTTStepper` (it is the network's online state: the window);
- backend `reference`: each network's `ReferenceStepper` (one `rtrl_step` per element);
- E = 1: `FastStepper` on the model's own tensors;
- E > 1: `EnsembleStepper` (the models and states become views of its stacks).

Each gives the reference's numbers (to round-off), and member e of an ensemble the single run's.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.family import family_of
from ..models.recurrence import ONLINE_GRADIENTS, OnlineState, online_gradient
from .bptt import BPTTStepper
from .ensemble import EnsembleStepper
from .fast import FastStepper
from .rtrl import ReferenceStepper


class Stepper(Protocol):
    """L online SGD steps of E networks per ``run_chunk`` call (see the module docstring)."""

    backend: str

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor) -> Tensor: ...


class PerNetwork:
    """E networks stepped one after another, each by its own one-network stepper
    (``run_chunk(X (L, d), Y (L,), out (L,))``); ``backend`` None: the first one's."""

    def __init__(self, steppers: Sequence[Any], backend: Optional[str] = None) -> None:
        self.steppers, self._backend = list(steppers), backend

    @property
    def backend(self) -> str:
        return self._backend or self.steppers[0].backend

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor) -> Tensor:
        shared = X.dim() == 2
        for e, s in enumerate(self.steppers):
            s.run_chunk(X if shared else X[e], Y if shared else Y[e], out=out[e])
        return out


def resolve_gradient(gradient: str, model: nn.Module) -> str:
    """``train.gradient=auto``: the model family's online step — exact RTRL for Models D and F,
    truncated BPTT for any other model; rtrl/one_step on a model without an exact online step
    is an error."""
    gradient = online_gradient(gradient, "train.gradient")
    exact = family_of(model).online == "rtrl"
    if gradient == "auto":
        return "rtrl" if exact else "bptt"
    if gradient in ONLINE_GRADIENTS and not exact:
        raise ConfigError(f"train.gradient={gradient}: {type(model).__qualname__} has no exact "
                          "online step (only MeanFieldRNN has); use train.gradient=auto or bptt "
                          "(truncated backpropagation through train.bptt_window elements)")
    return gradient


def online_state(model: nn.Module, lr: float, gradient: str, window: int) -> Any:
    """What carries one network's online gradient between steps (and into its checkpoints):
    RTRL's S, P, Q (Model F: its `FeedbackState`), or for ``bptt`` the network's `BPTTStepper`
    (its window of inputs and the memory at the window's start)."""
    if gradient == "bptt":
        return BPTTStepper(model, lr, window=window)
    return OnlineState.zeros(model)


def make_stepper(models: Sequence[nn.Module], lrs: Sequence[float], states: Sequence[Any],
                 gradient: str, backend: str = "auto") -> Stepper:
    """The stepper of ``models`` (E >= 1, one architecture) with step sizes ``lrs`` (α_N) and
    online states ``states`` (`online_state`'s), for a resolved ``gradient``."""
    if gradient == "bptt":
        return PerNetwork(states, f"bptt-{states[0].engine}")
    if family_of(models[0]).online != "rtrl":  # (resolve_gradient refused it already)
        raise ConfigError(f"train.gradient={gradient}: {type(models[0]).__qualname__} has no "
                          "exact online step")
    if backend == "reference":
        return PerNetwork([ReferenceStepper(m, s, lr, gradient)
                           for m, s, lr in zip(models, states, lrs, strict=True)], "reference")
    if len(models) == 1:
        return PerNetwork([FastStepper(models[0], lrs[0], gradient, state=states[0],
                                       backend=backend)])
    # one thread: segments between events are short, and a thread per call costs more than it
    # saves there
    return EnsembleStepper(models, lr=list(lrs), gradient=gradient, states=list(states),
                           backend=backend, bind=True, threads=1)


def stack_segments(segments: Sequence[tuple[Tensor, Tensor, Tensor]]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """One stepper call's (X, Y, out) from each network's segment (X (L, d), Y (L,), its Ŷ
    (L,)): X (L, d) and Y (L,) when all read one stream at one place, else stacked; out is the
    network's own Ŷ as (1, L) when E = 1, else a new (E, L)."""
    X0, Y0, out0 = segments[0]
    if len(segments) == 1:
        return X0, Y0, out0.unsqueeze(0)
    if all(X.data_ptr() == X0.data_ptr() and Y.data_ptr() == Y0.data_ptr()
           for X, Y, _ in segments):
        X, Y = X0, Y0
    else:
        X, Y = torch.stack([s[0] for s in segments]), torch.stack([s[1] for s in segments])
    return X, Y, out0.new_empty(len(segments), out0.shape[0])
