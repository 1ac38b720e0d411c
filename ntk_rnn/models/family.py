"""The model-family seam: every "which" question about a model has one answer, here.

A model's *family* says, as plain keys that the packages above ``models/`` dispatch on through
their own tables (so ``models/`` imports none of them and no import cycle appears):

=================  =========================================================================
``online``         how it trains along the stream: ``"rtrl"`` (an exact online step, Models D
                   and F: ``ntk_rnn.online``) or ``"bptt"`` (truncated backpropagation through
                   a window, any other model)
``recurrence``     Model D/F's `Recurrence` (its online state; its compiled-kernel layout is
                   ``ntk_rnn.online.fast.LAYOUTS[recurrence.name]``), None for the others
``bptt_engine``    the hand-written BPTT engine (``"elman"``, ``"gru"``) or None (autograd)
``structure``      the structured empirical NTK (``ntk_rnn.ntk``): ``"units"`` (Model D's
                   per-unit features), ``"elman"``, ``"gru"`` (per-step backward vectors and
                   states of the weight matrices), or None (torch.func only)
``linearized``     the exact linearised (θ_0) stream features: ``"diagonal"``, ``"feedback"``
                   or None
``limit``          the infinite-width kernel K_∞ (``ntk_rnn.limit.limit_ntk``):
                   ``"quadrature"`` (Model D, theory §5), ``"cell"`` (Model F at
                   initialisation, §6), ``"elman"`` (closed form, §9), ``"coordinate"`` (GRU:
                   sampled infinite-width coordinates, §10) or ``"monte_carlo"`` (wide
                   networks drawn with `Family.at_width`)
=================  =========================================================================

and `Family.at_width` builds the same network at another width with θ_0 from a seed (the
Monte-Carlo limit's wider networks), `Family.limit_spec` describes the law that K_∞
depends on (its cache key).

``family_of(model)`` is the one lookup: the class's registered family (walking the MRO; Model D
and Model F are told apart by ``model.recurrence`` here and nowhere else), a ``family`` attribute
of the model's class, or the generic family of custom modules.

The contract a custom module meets (the generic family): ``forward(x)`` maps windows
``(B, L, d)`` to outputs ``(B, L)`` (``last_only=True`` may give ``(B,)``), it keeps ``width``
(N) and ``input_dim``, has ``ntk_scale`` and ``learning_rate(alpha)`` (or inherits
`MeanFieldScaling`), and for a Monte-Carlo limit either defines
``at_width(width, seed) -> nn.Module`` or takes ``width`` (and ``input_dim``) in its constructor
and was built from a config (the trainer then rebuilds it from that config at width N′).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .elman import ElmanRNN
from .gru import GRURNN
from .mean_field import MeanFieldRNN
from .recurrence import DIAGONAL, FEEDBACK, Recurrence

Online = Literal["rtrl", "bptt"]
Structure = Literal["units", "elman", "gru"]
LimitKind = Literal["quadrature", "cell", "elman", "coordinate", "monte_carlo"]
LIMIT_KINDS = ("quadrature", "cell", "elman", "coordinate", "monte_carlo")


def constructor_args(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments ``model`` was built with, as it recorded them (``init_args``)."""
    args = getattr(model, "init_args", None)
    return dict(args) if isinstance(args, dict) else {}


class Family:
    """What one family of models answers (see the module docstring); the generic family."""

    name: str = "generic"
    online: Online = "bptt"
    recurrence: Optional[Recurrence] = None
    bptt_engine: Optional[str] = None
    structure: Optional[Structure] = None
    linearized: Optional[str] = None
    limit: LimitKind = "monte_carlo"

    # --- the same network at another width (the Monte-Carlo limit) ------------------------
    def at_width(self, model: nn.Module, width: int, seed: int,
                 factory: Optional[Callable[[int, int], nn.Module]] = None) -> nn.Module:
        """A fresh network like ``model`` of width ``width``, θ_0 drawn from ``seed``, in
        ``model``'s dtype and device: ``model.at_width(width, seed)`` when it has one, else
        ``factory(width, seed)`` (the trainer's rebuild from the run's config)."""
        own, new = getattr(model, "at_width", None), None
        if callable(own):
            try:
                new = own(int(width), int(seed))
            except NotImplementedError:  # (MeanFieldScaling's, without recorded arguments)
                new = None
        if new is not None:
            pass
        elif factory is not None:
            new = factory(int(width), int(seed))
        else:
            raise ConfigError(
                f"{type(model).__qualname__} has no closed-form limit, and the Monte-Carlo limit "
                "needs the same network at a larger width: give it a method "
                "`at_width(width, seed) -> nn.Module`, or build it from a config (model._target_"
                " with a `width` argument), or set callbacks.ntk.limit=false")
        if not isinstance(new, nn.Module):
            raise ConfigError(f"at_width of {type(model).__qualname__} returned a "
                              f"{type(new).__name__}, not an nn.Module")
        p = next(iter(model.parameters()), None)
        return new if p is None else new.to(p)

    def check_at_width(self, model: nn.Module,
                       factory: Optional[Callable[[int, int], nn.Module]] = None) -> None:
        """Refuse early (before any step) a model whose Monte-Carlo limit cannot be built: builds
        the network once at width 2."""
        self.at_width(model, 2, 0, factory)

    # --- what K_∞ depends on -----------------------------------------------------------------
    def limit_spec(self, model: nn.Module) -> dict[str, Any]:
        """The law K_∞ depends on (not the width N or the seed): the class and its recorded
        constructor arguments — the cache key of a limit kernel."""
        args = {k: v for k, v in constructor_args(model).items()
                if k not in ("width", "seed", "generator", "device", "dtype")}
        act = getattr(model, "act", None)
        if act is not None and hasattr(act, "name"):
            args["activation"] = act.name
        return {"family": self.name,
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "args": {k: _plain(v) for k, v in sorted(args.items())}}

    def __repr__(self) -> str:
        return f"<family {self.name!r}>"


class DiagonalFamily(Family):
    """Model D (MeanFieldRNN, recurrence='diagonal'): exact RTRL, per-unit features, K_∞ by
    quadrature (theory §3–§5)."""

    name, online, recurrence = "diagonal", "rtrl", DIAGONAL
    structure, linearized, limit = "units", "diagonal", "quadrature"


class FeedbackFamily(Family):
    """Model F (MeanFieldRNN, recurrence='feedback'): exact online step, the cell kernel at
    initialisation as K_∞ of the window NTK (theory §6)."""

    name, online, recurrence = "feedback", "rtrl", FEEDBACK
    linearized, limit = "feedback", "cell"


class ElmanFamily(Family):
    """ElmanRNN: truncated BPTT (compiled for tanh/sigmoid/erf), structured NTK over its weight
    matrices, closed-form K_∞ (theory §9)."""

    name, bptt_engine, structure, limit = "elman", "elman", "elman", "elman"


class GRUFamily(Family):
    """GRURNN: truncated BPTT (compiled), structured NTK, K_∞ sampled from the infinite-width
    coordinate distribution (theory §10)."""

    name, bptt_engine, structure, limit = "gru", "gru", "gru", "coordinate"


GENERIC, DIAGONAL_F, FEEDBACK_F = Family(), DiagonalFamily(), FeedbackFamily()
ELMAN_F, GRU_F = ElmanFamily(), GRUFamily()

#: class → family (or a function of the model for classes with several families)
FAMILIES: dict[type, Family | Callable[[Any], Family]] = {
    MeanFieldRNN: lambda m: FEEDBACK_F if m.recurrence == FEEDBACK.name else DIAGONAL_F,
    ElmanRNN: ELMAN_F,
    GRURNN: GRU_F,
}


def register_family(cls: type, family: Family | Callable[[Any], Family]) -> None:
    """Give the models of ``cls`` (and its subclasses) ``family``."""
    FAMILIES[cls] = family


def family_of(model: Any) -> Family:
    """The family of ``model`` (see the module docstring): registered class (MRO), a ``family``
    class attribute, else the generic family."""
    own = getattr(type(model), "family", None)
    if isinstance(own, Family):
        return own
    for cls in type(model).__mro__:
        fam = FAMILIES.get(cls)
        if fam is not None:
            fam = fam if isinstance(fam, Family) else fam(model)
            if cls is not type(model) and fam.bptt_engine is not None:
                # a subclass may change forward: the hand-written engines and structured
                # kernels are for the class itself; limits and stepping laws are inherited
                return _subclass_family(fam)
            return fam
    return GENERIC


_SUBCLASS_FAMILIES: dict[type, Family] = {}


def _subclass_family(fam: Family) -> Family:
    """``fam`` without the hand-written engine and structured kernel (one object per family)."""
    sub = _SUBCLASS_FAMILIES.get(type(fam))
    if sub is None:
        sub = type(f"{type(fam).__name__}Subclass", (type(fam),),
                   {"bptt_engine": None, "structure": None})()
        _SUBCLASS_FAMILIES[type(fam)] = sub
    return sub


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "name"):
        return str(v.name)
    return repr(v)
