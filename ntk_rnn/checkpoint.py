"""Checkpoint files: atomic, checksummed writes and safe loads.

A checkpoint is a dict of tensors, numbers and strings only, so ``torch.load(weights_only=True)``
reads it and loading never unpickles arbitrary objects. On disk it is a short text header and the
``torch.save`` bytes of the payload::

    NTK_RNN-CHECKPOINT v2\\n
    sha256=<64 hex digits> bytes=<length of the payload>\\n
    <payload>

so a truncated file (length), a corrupt one (sha256) and a foreign one (magic line) are told apart
and reported as ``CheckpointError`` before anything is unpickled. Writes go to a temporary file in
the same directory, are fsynced, then renamed over the target (atomic on POSIX) and the directory
is fsynced: a crash leaves either the old file or the new one, never half of one. Files of the
earlier format (v1: a bare ``torch.save`` zip with ``format`` = ``ntk_rnn-checkpoint-v1``) are
still read, without a checksum.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "ntk_rnn-checkpoint-v1"  # the ``format`` tag inside the payload (unchanged since v1)
MAGIC = b"NTK_RNN-CHECKPOINT v2\n"
_HEADER = re.compile(rb"sha256=([0-9a-f]{64}) bytes=([0-9]{1,15})\n")
_HEADER_MAX = 128


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ours."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus a format tag) to ``path``, with its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    blob = buf.getvalue()
    header = MAGIC + b"sha256=%s bytes=%d\n" % (hashlib.sha256(blob).hexdigest().encode(),
                                                 len(blob))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a bad file raises CheckpointError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc})") from None
    if raw.startswith(MAGIC):
        blob = _verified_blob(path, raw)
        kind = "corrupt"
    elif raw.startswith(b"PK\x03\x04"):  # v1: a bare torch.save zip, no checksum
        blob, kind = raw, "unreadable"
    else:
        raise CheckpointError(f"checkpoint {path} is not an ntk_rnn checkpoint (unknown header "
                              f"{raw[:16]!r}; {len(raw)} bytes)")
    try:
        data = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"checkpoint {path} is {kind} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an ntk_rnn checkpoint ({FORMAT})")
    return data


def _verified_blob(path: Path, raw: bytes) -> bytes:
    rest = raw[len(MAGIC):]
    m = _HEADER.match(rest[:_HEADER_MAX])
    if m is None:
        raise CheckpointError(f"checkpoint {path} has a damaged header (truncated or overwritten)")
    digest, size = m.group(1).decode(), int(m.group(2))
    blob = rest[m.end():]
    if len(blob) != size:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(blob)} of {size} payload "
                              "bytes" if len(blob) < size else
                              f"checkpoint {path} has {len(blob) - size} bytes more than its "
                              f"header says ({size}); it is corrupt")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual[:12]}… does not match "
                              f"the recorded {digest[:12]}…")
    return blob
