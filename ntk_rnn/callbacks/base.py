"""The callback protocol and the read-only view of the training state it receives."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor

from ..errors import ConfigError
from ..models.init import generator_from_seed  # noqa: F401 (callbacks/output.py imports it here)


@dataclass
class TrainState:
    """What callbacks see. Treat it as read-only: the trainer owns every field, each value
    derived once from the validated config (callbacks do not read the config).

    ``step`` counts completed SGD steps; ``t = step / N`` is the limit time (theory §3).
    """

    model: Any
    online: Any  # OnlineState (S, P, Q)
    source: Any
    run_dir: Optional[Path]
    n_steps: int  # steps of the whole run: train.steps, or round(train.horizon · N)
    lr: float  # α_N = α N^{2β−2}, the SGD step size
    writer: Optional[Any] = None  # torch.utils.tensorboard.SummaryWriter
    generators: dict = field(default_factory=dict)  # 'probe' for probe draws
    step: int = 0
    x: Optional[Tensor] = None  # last input X_k
    y: Optional[Tensor] = None  # last target Y_k
    y_hat: Optional[Tensor] = None  # last prediction Ŷ_k (before the update)
    running_mse: float = float("nan")
    metrics: dict = field(default_factory=dict)  # callbacks add their final numbers here
    save_checkpoint: Optional[Callable[[Path], Path]] = None  # writes the full trainer state
    # the run's model rebuilt at another width with θ_0 from a seed, for a model built from a
    # config (None from Python): a Monte-Carlo limit's wider networks (models.family.at_width)
    model_factory: Optional[Callable[[int, int], Any]] = None
    alpha: float = float("nan")  # α, the learning-rate scale of the limit ODE (train.alpha)
    gradient: str = ""  # the gradient that trains: rtrl, one_step or bptt
    bptt_window: int = 32  # elements the truncated-BPTT gradient reaches back (train.bptt_window)
    seed: int = 0  # the run's seed (θ_0, probes, and the data unless data_seed is set)
    data: dict = field(default_factory=dict)  # the data source as config.yaml describes it
    callbacks: tuple = ()  # the run's callbacks

    @property
    def horizon(self) -> float:
        """The limit time at the end of the run, n_steps / N."""
        return self.n_steps / self.model.width

    @property
    def t(self) -> float:
        return self.step / self.model.width

    @property
    def loss(self) -> float:
        """ℓ_k = ½ (Y_k − Ŷ_k)² of the last step."""
        if self.y is None or self.y_hat is None:
            return float("nan")
        return 0.5 * float(self.y - self.y_hat) ** 2


class Callback:
    """Hooks called by the trainer.

    Cadence: ``on_step_end`` runs every ``every_n_steps`` steps (>= 1) when that is set;
    otherwise every ``every_t`` in limit time t = k / N, i.e. every ``round(every_t · N)`` steps,
    so runs of every width get the same points in t; with neither, every step. A set
    ``every_n_steps`` wins over ``every_t``, so a subclass gives a default cadence in t as
    ``every_n_steps=None, every_t=...`` (the NTK, output and linearized callbacks: 32 or more
    points over t ∈ [0, 4], at N = 32 as at N = 4096).

    ``setup`` runs before the first step and is where bad settings must fail; ``state_dict`` and
    ``load_state_dict`` carry whatever a resumed run needs.
    """

    name: str = "callback"

    def __init__(self, every_n_steps: Optional[int] = None,
                 every_t: Optional[float] = None) -> None:
        f = f"callbacks.{self.name}"
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or
                                          not isinstance(every_n_steps, numbers.Integral)):
            raise ConfigError(f"{f}.every_n_steps={every_n_steps!r} must be an integer >= 1 "
                              "(or null: every every_t of limit time)")
        if every_t is not None and (isinstance(every_t, bool) or
                                    not isinstance(every_t, numbers.Real)):
            raise ConfigError(f"{f}.every_t={every_t!r} must be a number > 0 (limit time)")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.every_t = None if every_t is None else float(every_t)
        self._steps_set = self.every_n_steps is not None  # (setup fills every_n_steps in)

    def check(self) -> None:
        if self.every_t is not None and not self.every_t > 0:
            raise ConfigError(f"callbacks.{self.name}.every_t={self.every_t} must be > 0 "
                              "(limit time between calls; null = use every_n_steps)")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(
                f"callbacks.{self.name}.every_n_steps={self.every_n_steps} must be >= 1 "
                "(1 = every step)"
            )

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def setup(self, state: TrainState) -> None:
        """Validate; without a set ``every_n_steps``, ``every_t`` (limit time) becomes
        every_n_steps = max(1, round(every_t · N)) (neither: 1)."""
        self.check()
        if getattr(self, "_steps_set", True) and self.every_n_steps is not None:
            return
        if self.every_t is None:
            self.every_n_steps = 1
            return
        width = getattr(state.model, "width", None)
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ConfigError(f"callbacks.{self.name}.every_t={self.every_t}: the model has no "
                              "width N, so limit time t = k/N is undefined; set "
                              f"callbacks.{self.name}.every_n_steps instead")
        self.every_n_steps = max(1, round(self.every_t * width))

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, step: int, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def on_segment(self, X: Tensor, Y: Tensor, y_hat: Tensor, state: TrainState) -> None:
        """Called after every stepper call with the elements just trained on: X (L, d), Y (L,)
        and the predictions Ŷ (L,) (made before each step), ``state.step`` already advanced by L.
        Together the segments are the whole stream, in order, each element once (a resumed run
        continues where the checkpoint left off). Override it only when a callback must see every
        element (e.g. a shadow model trained on the same stream); the default does nothing and
        the trainer does not call it then."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


def check_probes(state: TrainState, name: str, n_probes: int, probe_length: int,
                 minimum: int = 1) -> None:
    """``callbacks.<name>``: at least ``minimum`` probe windows of ``probe_length`` >= 1 elements,
    no more than the distinct windows the data holds; a ConfigError otherwise."""
    f = f"callbacks.{name}"
    if n_probes < minimum:
        raise ConfigError(f"{f}.n_probes={n_probes} must be >= {minimum}")
    if probe_length < 1:
        raise ConfigError(f"{f}.probe_length={probe_length} must be >= 1")
    avail = getattr(state.source, "length", None) or getattr(state.source, "num_steps", None)
    if avail is not None and n_probes > avail - probe_length + 1:
        raise ConfigError(
            f"{f}.n_probes={n_probes} exceeds the {max(avail - probe_length + 1, 0)} distinct "
            f"windows of length {probe_length} that data holds; lower {f}.n_probes or "
            f"{f}.probe_length")
