"""The run's TensorBoard writer as callbacks see it: opened on first use, every scalar also kept
in memory (``Trainer.history``), steps at or before a resumed checkpoint dropped."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional


class RunWriter:
    """Wraps a ``SummaryWriter`` made by ``open_writer`` on first use (a run that fails before
    logging anything leaves no event file); ``open_writer=None`` writes nothing (a run without a
    run directory) but still records scalars. With ``floor`` >= 0 (a resumed run) every ``add_*``
    call for a step <= floor, or without a step, is dropped: those were logged before the
    checkpoint. ``history[tag]`` holds ``(step, value)`` of every scalar logged by this process."""

    def __init__(self, open_writer: Optional[Callable[[], Any]], floor: int = -1) -> None:
        self._open, self._floor, self._writer = open_writer, floor, None
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def writes_files(self) -> bool:
        return self._open is not None

    def open(self) -> Any:
        if self._writer is None and self._open is not None:
            self._writer = self._open()
        return self._writer

    def add_scalar(self, tag: str, scalar_value: Any, global_step: Optional[int] = None,
                   *args: Any, **kwargs: Any) -> None:
        if global_step is None or int(global_step) <= self._floor:
            return
        self.history.setdefault(tag, []).append((int(global_step), float(scalar_value)))
        w = self.open()
        if w is not None:
            w.add_scalar(tag, scalar_value, global_step, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        w = self.open()
        if w is None:  # no files: every other add_* is a no-op
            if name.startswith("add_"):
                return lambda *a, **k: None
            raise AttributeError(name)
        attr = getattr(w, name)
        if self._floor < 0 or not name.startswith("add_") or not callable(attr):
            return attr
        sig = inspect.signature(attr)

        def add(*args: Any, **kwargs: Any) -> Any:
            step = sig.bind(*args, **kwargs).arguments.get("global_step")
            if step is None or int(step) <= self._floor:
                return None
            return attr(*args, **kwargs)

        return add

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
