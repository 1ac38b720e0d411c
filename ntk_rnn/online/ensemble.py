"""Ensembles: E independent networks trained online as one batched computation (theory §3).

Members share the width N, input dimension, activation, recurrence, dtype and device; they may
differ in seed (initial parameters), learning rate (several α at one width) and β. Parameters live
in stacked buffers c (E, N), w (E, N, d), b (E, N) (and the online state likewise); each member's
model is *bound* to its slice, so ``stepper.models[e]`` and ``stepper.states[e]`` are ordinary
``MeanFieldRNN`` / ``OnlineState`` objects that always hold the current values and can be handed
to the callbacks, checkpoints and logging of a single run. Data: one stream per member
(X (E, T, d), Y (E, T)) or one shared stream (X (T, d), Y (T,)).

    ens = EnsembleStepper(models, alpha=2.0)          # lr_e = models[e].learning_rate(2.0)
    y_hat = ens.run_chunk(X, Y)                       # (E, T)
    ens.run_chunk(X[:, j0:j1], Y[:, j0:j1], out=y_hat[:, j0:j1])

Member e evolves exactly as the same model trained alone with ``rtrl_step`` (to round-off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.family import family_of
from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import ONLINE_GRADIENTS, FeedbackState, OnlineState, online_gradient
from .fast import Buffers, EngineBackend, check_engine_chunk, make_engine


def _per_member(value: Any, E: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * E
    vals = [float(v) for v in value]
    if len(vals) != E:
        raise ConfigError(f"{name} has {len(vals)} values for an ensemble of {E}")
    return vals


class EnsembleStepper(EngineBackend):
    """Exact online SGD for E models at once (see the module docstring).

    ``lr`` (α_N, one value or one per member) or ``alpha`` (then lr_e = α_e N^{2β_e−2}).
    ``states``: initial online states (default zeros). ``bind=True`` rebinds each model's
    parameters, and the fields of each given state, to views of the stacked buffers (no copies
    ever needed; ``to_models()`` is then a no-op); ``bind=False`` leaves the models and states
    alone (``self.states`` are new objects) until ``to_models()`` copies the parameters back.
    ``shared_stream``: True = X (T, d) only, False = X (E, T, d) only, None = either.
    ``threads`` (kernel backend): members split over that many threads.
    """

    def __init__(self, models: Sequence[MeanFieldRNN], lr: Any = None, gradient: str = "rtrl",
                 states: Sequence[OnlineState | FeedbackState] | None = None, *,
                 alpha: Any = None, backend: str = "auto", bind: bool = True,
                 shared_stream: bool | None = None, threads: int = 1,
                 max_block: int = 64) -> None:
        models = list(models)
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        gradient = online_gradient(gradient)
        if gradient not in ONLINE_GRADIENTS:
            raise ConfigError(f"gradient={gradient!r} is not known; choose one of "
                              f"{list(ONLINE_GRADIENTS)}")
        m0 = models[0]
        for e, m in enumerate(models):
            if family_of(m).recurrence is None:
                raise ConfigError(f"member {e} is a {type(m).__name__}, not a MeanFieldRNN "
                                  "(Model D or F)")
            same = (m.width, m.input_dim, m.recurrence, m.act.name, m.c.dtype, m.c.device)
            ref = (m0.width, m0.input_dim, m0.recurrence, m0.act.name, m0.c.dtype, m0.c.device)
            if same != ref:
                raise ConfigError(f"member {e} differs from member 0 in (width, input_dim, "
                                  f"recurrence, activation, dtype, device): {same} vs {ref}")
        E = len(models)
        if (lr is None) == (alpha is None):
            raise ConfigError("give exactly one of lr (α_N) and alpha")
        if lr is None:
            alphas = _per_member(alpha, E, "alpha")
            self.lr = [m.learning_rate(a) for m, a in zip(models, alphas, strict=True)]
        else:
            self.lr = _per_member(lr, E, "lr")
        self.models, self.gradient, self.bind = models, gradient, bool(bind)
        self.shared_stream = shared_stream
        self.rec = family_of(m0).recurrence
        self.recurrence = self.rec.name
        given_states = states is not None
        if states is None:
            states = [self.rec.zeros(m) for m in models]
        states = list(states)
        if len(states) != E:
            raise ConfigError(f"{len(states)} states for {E} models")
        for e, st in enumerate(states):
            self.rec.check_state(st, f"state {e}")
        t = {k: torch.stack([getattr(m, k).detach() for m in models]).contiguous()
             for k in ("c", "w", "b")}
        names = list(states[0].state_dict())
        for k in names:
            t[k] = torch.stack([st.state_dict()[k].detach() for st in states]).contiguous()
        self.buf = Buffers(self.rec, m0.act, t, self.lr,
                            [m.output_scale for m in models])
        self.E, self.width, self.input_dim = self.buf.E, self.buf.N, self.buf.d
        # each member's state holds views of the stacked state: with bind=True the passed-in
        # state objects themselves are rebound (so whoever holds them sees the live values)
        if self.bind and given_states:
            for e, st in enumerate(states):
                for k in names:
                    setattr(st, k, t[k][e])
            self.states = states
        else:
            self.states = [self.rec.state_class(**{k: t[k][e] for k in names})
                           for e in range(E)]
        if self.bind:
            for e in range(E):
                self._bind(e)
        self.engine = make_engine(self.buf, gradient, backend, threads=threads,
                                  max_block=max_block)

    # --- members ------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Tensor]:
        """The stacked parameters c (E, N), w (E, N, d), b (E, N) (live, not copies)."""
        return {k: self.buf.t[k] for k in ("c", "w", "b")}

    def member(self, e: int) -> tuple[MeanFieldRNN, OnlineState | FeedbackState]:
        """(model, online state) of member e; with ``bind=True`` both are always current."""
        if not self.bind:
            self.to_models()
        return self.models[e], self.states[e]

    def _bind(self, e: int) -> None:
        m = self.models[e]
        with torch.no_grad():
            for k in ("c", "w", "b"):
                getattr(m, k).data = self.buf.t[k][e]

    def _sync_bindings(self) -> None:
        """A member whose parameter was replaced (``.data =``, ``load_state_dict(assign=True)``,
        ``.to()``) is copied back into the buffers and bound again; states are checked likewise."""
        t = self.buf.t
        it = t["c"].element_size()
        for e, m in enumerate(self.models):
            for k in ("c", "w", "b"):
                p = getattr(m, k)
                if p.data_ptr() != t[k].data_ptr() + e * t[k].stride(0) * it:
                    if tuple(p.shape) != tuple(t[k].shape[1:]):
                        raise ConfigError(f"member {e}: {k} now has shape {tuple(p.shape)}")
                    t[k][e].copy_(p.detach())
                    self._bind(e)
        for e, st in enumerate(self.states):
            for k, v in st.state_dict().items():
                if v.data_ptr() != t[k].data_ptr() + e * t[k].stride(0) * it:
                    t[k][e].copy_(v)
                    setattr(st, k, t[k][e])

    def to_models(self) -> list[MeanFieldRNN]:
        """The members as models holding the current parameters (copied in when not bound)."""
        with torch.no_grad():
            for e, m in enumerate(self.models):
                for k in ("c", "w", "b"):
                    p, v = getattr(m, k), self.buf.t[k][e]
                    if p.data_ptr() != v.data_ptr():
                        p.copy_(v)
        return self.models

    # --- training -----------------------------------------------------------------------
    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor | None = None) -> Tensor:
        """Steps k = 0..T-1 for every member; X (T, d) shared or (E, T, d) one stream each, Y (T,)
        or (E, T). Returns Ŷ (E, T) (written into ``out`` if given)."""
        if self.shared_stream is not None and isinstance(X, Tensor):
            shared = X.dim() == 2
            if shared != self.shared_stream:
                raise ConfigError(f"X has shape {tuple(X.shape)} but shared_stream="
                                  f"{self.shared_stream}: expected "
                                  + (f"(T, {self.input_dim})" if self.shared_stream
                                     else f"({self.E}, T, {self.input_dim})"))
        if self.bind:
            self._sync_bindings()
        X3, Y2, out2, res = check_engine_chunk(self.buf, X, Y, out, single=False)
        with torch.no_grad():
            self.engine.run(X3, Y2, out2)
        return res
