"""One object per recurrence of `MeanFieldRNN`: the seam between
Model D (``recurrence="diagonal"``) and Model F (``recurrence="feedback"``).

Code that treats the two models differently asks ``family_of(model).recurrence`` (the model-family
seam, ``models.family``; ``recurrence_of(name)`` for a config's name) instead of comparing
strings; the object knows

- ``state_class``: the online (RTRL) state it carries along the stream, `OnlineState`
  (S, P = ∂S/∂w, Q = ∂S/∂b per unit, theory §3) or `FeedbackState` (the memory m and the
  last gradient, theory §6), with ``zeros(model)``; ``state_names`` are its tensors;
- ``unit_features``: whether the NTK has per-unit features (the structured NTK, theory §4) — Model
  D's come from `spq_step`, the torch form of the recursion (its C twin is ``spq_step`` in
  ``csrc/ntk_rnn.h``);
- the reference step: `ntk_rnn.online.rtrl.rtrl_step` (Model D) and
  `ntk_rnn.online.feedback.feedback_step` (Model F); ``rtrl_step`` runs either.

How the compiled training kernel lays a recurrence's state out is the kernel's business:
``ntk_rnn.online.fast.LAYOUTS``, keyed by the recurrence's name.

``model.recurrence`` stays the string of the configs; ``recurrence_of`` maps it to the object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..errors import ConfigError, renamed_value
from .activations import Activation

# the gradients an online step carries forward along the stream: exact RTRL (∂S/∂θ through the
# whole past) or one_step (the gradient of the last step, the memory taken as an input); BPTT is
# not online (run/config.py's TRAIN_GRADIENTS, online/bptt.py)
OnlineGradient = Literal["rtrl", "one_step"]
ONLINE_GRADIENTS: tuple[str, ...] = get_args(OnlineGradient)
#: deprecated spellings → their names ("truncated" clashed with truncated BPTT)
RENAMED_GRADIENTS = {"truncated": "one_step"}


def online_gradient(gradient: Any, key: str = "gradient") -> Any:
    """``gradient`` with a deprecated spelling (``truncated``) mapped to its name (``one_step``)
    and one FutureWarning naming ``key``; anything else unchanged (checked by the caller)."""
    return renamed_value(gradient, RENAMED_GRADIENTS, key)

# --- online states ------------------------------------------------------------------------------
@dataclass
class OnlineState:
    """Model D: memory S (N,) and its forward derivatives P = ∂S/∂w (N, d), Q = ∂S/∂b (N,)."""

    S: Tensor
    P: Tensor
    Q: Tensor

    @classmethod
    def zeros(cls, model: Any) -> "OnlineState | FeedbackState":
        """The zero state of ``model``'s recurrence (a `FeedbackState` for Model F)."""
        rec = recurrence_of(model.recurrence)
        if rec.state_class is not cls:
            return rec.zeros(model)
        c = model.c.detach()
        return cls(c.new_zeros(model.width), c.new_zeros(model.width, model.input_dim),
                   c.new_zeros(model.width))

    def state_dict(self) -> dict[str, Tensor]:
        return {"S": self.S, "P": self.P, "Q": self.Q}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        for k, v in self.state_dict().items():
            v.copy_(d[k])


@dataclass
class FeedbackState:
    """Model F: memory m (0-dim) and the last gradient G = (dc (N,), dw (N, d), db (N,)).

    Under ``gradient="rtrl"`` G is ∂Ŷ_{k−1}/∂θ = ∂m_k/∂θ, the RTRL sensitivity of the memory;
    under ``"one_step"`` it is the truncated gradient of the last step (not carried over).
    """

    m: Tensor
    dc: Tensor
    dw: Tensor
    db: Tensor

    @classmethod
    def zeros(cls, model: Any) -> "FeedbackState":
        c = model.c.detach()
        N, d = model.width, model.input_dim
        return cls(c.new_zeros(()), c.new_zeros(N), c.new_zeros(N, d), c.new_zeros(N))

    def state_dict(self) -> dict[str, Tensor]:
        return {"m": self.m, "dc": self.dc, "dw": self.dw, "db": self.db}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        for k, v in self.state_dict().items():
            v.copy_(d[k])


# --- Model D's recursion ------------------------------------------------------------------------
def spq_step(act: Activation, w: Tensor, b: Tensor, x: Tensor, S: Tensor, P: Tensor, Q: Tensor,
             truncated: bool = False) -> Tensor:
    """Model D's forward step and its RTRL recursion, in place (theory §3) — the torch form of
    ``spq_step`` in ``ntk_rnn/csrc/ntk_rnn.h``:

        z = w·x + b S,  S ← σ(z),  P ← σ'(z)(x + b P),  Q ← σ'(z)(S + b Q)   (old S on the right)

    ``truncated`` drops the b P and b Q terms. Units w (M, d), b (M,); batched over leading
    dims: x (..., d), S and Q (..., M), P (..., M, d). Returns σ'(z) (..., M).

    The reference: the reference step (``online.rtrl.rtrl_step``), `spq_features` (the unit
    features, the K_∞ sampler, the linearised callback) and the compiled kernels' self-checks
    use it. The fast path is ``online.fast._EagerEngine._diag_step`` (fused with the SGD
    update, in place over an ensemble axis; its C twin ``dfwd`` in ``csrc/fast.c``), checked
    against this by ``tests/test_fast.py``."""
    S_new, ds = act.value_and_deriv(torch.addcmul(x @ w.T, b, S))
    if truncated:
        torch.mul(ds.unsqueeze(-1), x.unsqueeze(-2), out=P)
        torch.mul(ds, S, out=Q)
    else:
        P.mul_(b.unsqueeze(-1)).add_(x.unsqueeze(-2)).mul_(ds.unsqueeze(-1))
        Q.mul_(b).add_(S).mul_(ds)
    S.copy_(S_new)
    return ds


def spq_features(act: Activation, w: Tensor, b: Tensor, x: Tensor, truncated: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(S, P, Q) at the last step of each window x (B, L, d) from S_0 = P_0 = Q_0 = 0, for units
    w (M, d), b (M,): `spq_step` over the window, θ frozen (theory §3, §4). Shapes (B, M),
    (B, M, d), (B, M); no (B, L, M) array is formed. ``MeanFieldRNN.unit_features``, the K_∞
    sampler (``limit.kernel``) and the linearised callback use it."""
    B, L, d = x.shape
    S = x.new_zeros(B, w.shape[0])
    P = x.new_zeros(B, w.shape[0], d)
    Q = torch.zeros_like(S)
    for k in range(L):
        spq_step(act, w, b, x[:, k], S, P, Q, truncated)
    return S, P, Q


# --- the recurrences ----------------------------------------------------------------------------
class Recurrence:
    """What distinguishes one recurrence (see the module docstring)."""

    name: str
    contraction: bool
    default_b: dict
    state_class: type
    unit_features: bool

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.state_class))

    def zeros(self, model: Any) -> Any:
        """The zero online state of ``model``."""
        return self.state_class.zeros(model)

    def check_state(self, state: Any, what: str = "state") -> None:
        if not isinstance(state, self.state_class):
            raise ConfigError(f"{what} is a {type(state).__name__}; model.recurrence="
                              f"{self.name!r} needs a {self.state_class.__name__}")

    def __repr__(self) -> str:
        return f"<recurrence {self.name!r}>"


class Diagonal(Recurrence):
    """Model D: S_{i,k+1} = σ(w_i·X_k + b_i S_{i,k}) per unit (theory §2)."""

    name = "diagonal"
    contraction = True  # μ0 must keep |b| sup|σ'| < 1
    default_b = {}  # μ0's b law: InitLaw's default, b ~ U[-ρ, ρ]
    state_class = OnlineState
    unit_features = True


class Feedback(Recurrence):
    """Model F: the output fed back as the memory, m_{k+1} = Ŷ_k (theory §6)."""

    name = "feedback"
    contraction = False  # no bound on b (theory §6)
    default_b = {"b": "normal", "rho": 1.0}  # μ0's b law: b ~ N(0, 1)
    state_class = FeedbackState
    unit_features = False


#: the ``model.recurrence`` names, and their objects
RecurrenceName = Literal["diagonal", "feedback"]
DIAGONAL, FEEDBACK = Diagonal(), Feedback()
RECURRENCES: dict[str, Recurrence] = {r.name: r for r in (DIAGONAL, FEEDBACK)}
assert tuple(RECURRENCES) == get_args(RecurrenceName)


def recurrence_of(name: str) -> Recurrence:
    """The recurrence object of a ``model.recurrence`` name (of a model:
    ``family_of(model).recurrence``, the model-family seam)."""
    try:
        return RECURRENCES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.recurrence={name!r} is not known; choose one of "
                          f"{list(RECURRENCES)}") from None
