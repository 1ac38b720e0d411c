"""SIGTERM/SIGINT during ``fit``: finish the step, checkpoint, stop (README, "Reliability")."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped ``fit``; the state at ``step`` is in ``checkpoint``. A
    KeyboardInterrupt, so ``except Exception`` (e.g. Hydra's job runner) does not swallow it."""

    def __init__(self, msg: str, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(msg)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT only set ``signum``; the trainer checks it
    after each segment, writes a checkpoint and stops. A second signal stops at once (the previous
    checkpoints are intact: writes are atomic). Installed only from the main thread and not over
    SIG_IGN; the previous handlers come back on exit, and a signal that arrived after the last
    check is delivered to them then."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                prev = signal.getsignal(sig) if sig is not None else None
                if prev is None or prev is signal.SIG_IGN:  # not ours to change
                    continue
                self._previous[sig] = prev
                signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now, without a new checkpoint
            raise TrainingInterrupted(f"stopped by a second {signal.Signals(signum).name} before "
                                      "the checkpoint was written; the last periodic checkpoint "
                                      "is intact", signum=signum, step=-1, checkpoint=None)
        self.signum = signum

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        if exc_type is None and self.signum is not None:  # came after the last step: pass it on
            signal.raise_signal(self.signum)
        return False
