"""Periodic checkpoints (atomic, keep the last k)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import Callback, TrainState


class CheckpointCallback(Callback):
    """Every ``every_n_steps`` save ``checkpoints/step_{k:09d}.pt``, keeping ``keep_last``."""

    name = "checkpoint"

    def __init__(self, every_n_steps: int = 1000, keep_last: int = 2) -> None:
        super().__init__(every_n_steps)
        self.keep_last = int(keep_last)

    def setup(self, state: TrainState) -> None:
        super().setup(state)
        if self.keep_last < 1:
            raise ConfigError(f"callbacks.{self.name}.keep_last={self.keep_last} must be >= 1")

    def on_step_end(self, step: int, state: TrainState) -> None:
        if state.save_checkpoint is None or state.run_dir is None:  # (run_dir=None: no files)
            return
        state.save_checkpoint(Path(state.run_dir) / "checkpoints" / f"step_{step:09d}.pt")
        self.prune(Path(state.run_dir) / "checkpoints")

    def prune(self, folder: Path) -> None:
        ckpts = sorted(p for p in folder.glob("step_*.pt") if p.is_file() and not p.is_symlink())
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            old.unlink(missing_ok=True)
