"""A tqdm progress bar showing steps/s, the limit time t and the running MSE."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from .base import Callback, TrainState


class ProgressCallback(Callback):
    name = "progress"

    def __init__(self, every_n_steps: int = 50, leave: bool = True) -> None:
        super().__init__(every_n_steps)
        self.leave = leave
        self.bar = None
        self._last = 0

    def on_train_start(self, state: TrainState) -> None:
        self.bar = tqdm(total=state.n_steps, initial=state.step, unit="step", leave=self.leave,
                        file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        self._last = state.step

    def on_step_end(self, step: int, state: TrainState) -> None:
        self.bar.update(step - self._last)
        self._last = step
        self.bar.set_postfix(t=f"{state.t:.3f}", mse=f"{state.running_mse:.4g}", refresh=False)

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(state.step - self._last)
            self.bar.close()
