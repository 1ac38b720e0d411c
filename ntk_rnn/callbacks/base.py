"""The callback protocol and the read-only view of the training state it receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass
class TrainState:
    """What callbacks see. Treat it as read-only: the trainer owns every field.

    ``step`` counts completed SGD steps; ``t = step / N`` is the limit time (theory §3).
    """

    model: Any
    online: Any  # OnlineState (S, P, Q)
    source: Any
    cfg: Any
    run_dir: Path
    n_steps: int
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
    gradient: str = ""  # the online gradient that trains: rtrl, truncated or bptt

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
    """Hooks called by the trainer. ``every_n_steps`` (>= 1) spaces ``on_step_end`` calls;
    ``every_t`` instead gives the spacing in limit time t = k / N (the same t for every width).

    ``setup`` runs before the first step and is where bad settings must fail; ``state_dict`` and
    ``load_state_dict`` carry whatever a resumed run needs.
    """

    name: str = "callback"

    def __init__(self, every_n_steps: int = 1, every_t: Optional[float] = None) -> None:
        self.every_n_steps = int(every_n_steps)
        self.every_t = None if every_t is None else float(every_t)

    def check(self) -> None:
        if self.every_t is not None and not self.every_t > 0:
            raise ConfigError(f"callbacks.{self.name}.every_t={self.every_t} must be > 0 "
                              "(limit time between calls; null = use every_n_steps)")
        if self.every_n_steps < 1:
            raise ConfigError(
                f"callbacks.{self.name}.every_n_steps={self.every_n_steps} must be >= 1 "
                "(1 = every step)"
            )

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def setup(self, state: TrainState) -> None:
        """Validate; ``every_t`` (limit time) becomes every_n_steps = round(every_t · N)."""
        self.check()
        if self.every_t is not None:
            self.every_n_steps = max(1, round(self.every_t * state.model.width))

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


def write_scalar(state: TrainState, tag: str, value: float | Tensor, step: int) -> None:
    if state.writer is not None:
        state.writer.add_scalar(tag, float(value), step)


def as_float(x: float | Tensor) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def generator_from_seed(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
