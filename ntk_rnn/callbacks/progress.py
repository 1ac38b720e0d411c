"""Progress: a tqdm bar showing steps/s, the limit time t and the running MSE, and the one-line
notes the trainer prints around the slow start of a run (K_∞, the limit ODE).

The bar is tqdm's text bar in a terminal and its widget in Jupyter when ipywidgets is installed
(the text bar otherwise). tqdm is imported when a bar is made, not at ``import ntk_rnn``: in a
notebook without ipywidgets ``tqdm.auto`` would warn (TqdmWarning) at import.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .base import Callback, TrainState


def in_notebook() -> bool:
    """True inside a Jupyter kernel (notebook, lab, VS Code), not in a terminal IPython."""
    if "ipykernel" not in sys.modules:
        return False
    ipython = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(ipython).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether a person is likely watching: stderr is a terminal, or we run in a notebook."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or in_notebook()


def progress_bar(**kw: Any) -> Any:
    """A tqdm bar: the notebook widget inside Jupyter when ipywidgets is importable, else the
    text bar on stderr (no TqdmWarning either way)."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as bar_class
        except ImportError:
            from tqdm.std import tqdm as bar_class
    else:
        from tqdm.std import tqdm as bar_class
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 0.5)
    kw.setdefault("unit", "step")
    return bar_class(**kw)


def start_note(cb: Callback, state: TrainState) -> Optional[str]:
    """What ``cb.on_train_start`` is about to compute, when that may take a while (a callback
    of one's own can say it with a ``start_note(state)`` method); None when nothing slow is due."""
    own = getattr(cb, "start_note", None)
    return own(state) if callable(own) else None


class ProgressCallback(Callback):
    """A progress bar (steps, steps/s, t = k/N and the running MSE), updated every
    ``every_n_steps`` steps; ``leave`` keeps it on screen after the run."""

    name = "progress"

    def __init__(self, every_n_steps: int = 50, leave: bool = True) -> None:
        super().__init__(every_n_steps)
        self.leave = leave
        self.bar = None
        self._last = 0

    def on_train_start(self, state: TrainState) -> None:
        self.bar = progress_bar(total=state.n_steps, initial=state.step, leave=self.leave)
        self._last = state.step

    def on_step_end(self, step: int, state: TrainState) -> None:
        self.bar.update(step - self._last)
        self._last = step
        self.bar.set_postfix(t=f"{state.t:.3f}", mse=f"{state.running_mse:.4g}", refresh=False)

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(state.step - self._last)
            self.bar.close()
