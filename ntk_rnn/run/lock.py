"""One writer per run directory: ``<run_dir>/.ntk_rnn.lock``.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFS v3+ /
Lustre, where ``flock`` is not reliable); it holds the owner's host, PID, the PID's start time and
the time the lock was taken, as JSON. It is held for the whole run (a single run, each ensemble
member, each sweep job) and removed when the run ends, however it ends short of SIGKILL.

A lock is *stale*, and is taken over, when

- it was written on this host and its PID is gone, or the PID now belongs to another process
  (its start time differs: the PID was reused);
- it was written on another host and has not been refreshed for :data:`STALE_AFTER_S` seconds
  (the holder refreshes it, ``os.utime``, at most every :data:`HEARTBEAT_S` seconds while it
  trains), or by an earlier run of this very Slurm job (``SLURM_JOB_ID``: a requeued job that
  was killed on its previous node);
- it cannot be parsed (a writer killed between creating and filling it) and is older than
  :data:`HEARTBEAT_S` seconds.

A second writer is refused with :class:`RunDirLocked`, one line naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

LOCK_NAME = ".ntk_rnn.lock"
STALE_AFTER_S = 900.0
HEARTBEAT_S = 30.0


class RunDirLocked(ConfigError):
    """Another process writes into this run directory."""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux ``/proc``); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()[19].decode()  # field 22 (starttime)


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


class RunLock:
    """``RunLock(run_dir).acquire()`` / ``release()`` (also a context manager)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.held = False
        self._beat = 0.0
        self._ident: dict[str, Any] = {}

    def describe_holder(self, info: dict) -> str:
        when = info.get("since")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(
            when, (int, float)) else "?"
        return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')} (since {since}, "
                f"lock file {self.path})")

    def _read(self) -> Optional[dict]:
        try:
            info = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _stale(self, info: Optional[dict]) -> bool:
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        if not info:  # empty or unreadable: a writer killed while creating it
            return age > HEARTBEAT_S
        job = os.environ.get("SLURM_JOB_ID")
        if job and info.get("job") == job and info.get("host") != socket.gethostname():
            return True  # this Slurm job's earlier run, on the node it was requeued from
        if info.get("host") == socket.gethostname():
            try:
                pid = int(info.get("pid"))
            except (TypeError, ValueError):
                return True
            if pid == os.getpid() and info.get("start") == _start_time(pid) and not self.held:
                return False  # this very process (another Trainer in it): not stale
            return not _alive(pid, info.get("start"))
        return age > STALE_AFTER_S

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        self._ident = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                       "since": time.time(), "job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read()
                if not self._stale(info):
                    raise RunDirLocked(
                        f"{self.dir} is in use by another run: {self.describe_holder(info or {})}"
                        "; wait for it to finish, or remove the lock file if that process is "
                        "gone") from None
                # stale: move it aside (one taker wins the rename), then try again
                aside = self.path.with_name(f"{LOCK_NAME}.stale.{pid}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._ident))
                fh.flush()
                os.fsync(fh.fileno())
            self.held, self._beat = True, time.monotonic()
            return self
        raise RunDirLocked(f"{self.dir}: could not take the lock {self.path} (contended)")

    def heartbeat(self) -> None:
        """Refresh the lock's mtime (at most every HEARTBEAT_S seconds)."""
        if self.held and time.monotonic() - self._beat > HEARTBEAT_S:
            self._beat = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:  # only our own lock (a stale-lock taker may have replaced it)
            if self._read() == self._ident:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


_FRESH: dict[str, str] = {}


def fresh_dir(path: str) -> str:
    """``path``, or ``path_1``, ``path_2``, ... : the first that this call creates (``mkdir``
    is atomic), so two runs started in the same second get distinct default directories. The
    same answer for the same ``path`` within a process (Hydra resolves ``hydra.run.dir`` more
    than once). The OmegaConf resolver ``${ntk_fresh:...}`` of conf/config.yaml."""
    path = str(path)
    if path not in _FRESH:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        for i in range(10000):
            cand = path if i == 0 else f"{path}_{i}"
            try:
                os.mkdir(cand)
            except FileExistsError:
                continue
            _FRESH[path] = cand
            break
        else:
            raise RunDirLocked(f"no free run directory next to {path}")
    return _FRESH[path]
