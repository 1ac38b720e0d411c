"""Checkpoint files: atomic, checksummed writes and safe loads.

A checkpoint is a dict of tensors, numbers and strings only, so ``torch.load(weights_only=True)``
reads it and loading never unpickles arbitrary objects. On disk (v3) it is the plain
``torch.save`` zip archive of the payload, so ``torch.load(path, weights_only=True)`` reads it
as is, with one addition: the archive comment, which the zip format puts at the very end of the
file (after the end-of-central-directory record) and which zip readers, torch's included, skip::

    <torch.save zip of the payload ... end-of-central-directory record, comment length 93>
    NTK_RNN-CHECKPOINT v3 sha256=<64 hex digits>

The digest is the sha256 of every byte of the file before the 64 hex digits (the whole archive,
its end record and the comment's tag), so one file carries both data and checksum and the atomic
rename below covers both. ``load_checkpoint`` checks it before anything is unpickled: a file cut
short loses its end record or part of the digest ("truncated"), a flipped byte anywhere changes
the digest ("corrupt: sha256"), bytes appended after the digest are counted ("bytes more than"),
and a file that is neither an ntk_rnn checkpoint nor a torch zip is refused ("not an ntk_rnn
checkpoint"). The loaded dict carries a ``format`` tag (``ntk_rnn-checkpoint-v1``; the payload
layout has not changed since v1) and, for trainer checkpoints, the parameters ``c``, ``w``, ``b``
at the top level as well (aliases of ``model[...]``: stored once, the tensors share storage).

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target
(atomic on POSIX) and the directory is fsynced: a crash leaves either the old file or the new
one, never half of one. Files of the earlier formats are still read: v2 (a text header
``NTK_RNN-CHECKPOINT v2`` / ``sha256=... bytes=...`` in front of the ``torch.save`` bytes, which
plain ``torch.load`` cannot read) with its checksum, and v1 (a bare ``torch.save`` zip) without.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "ntk_rnn-checkpoint-v1"  # the ``format`` tag inside the payload (unchanged since v1)
MAGIC = b"NTK_RNN-CHECKPOINT v2\n"  # v2 files start with it (read only; v3 is written)
TRAILER = b"NTK_RNN-CHECKPOINT v3 sha256="  # v3: the zip comment, then 64 hex digits, then EOF
ALIASES = ("c", "w", "b")  # model parameters also stored at the top level of the payload
_HEADER = re.compile(rb"sha256=([0-9a-f]{64}) bytes=([0-9]{1,15})\n")
_HEADER_MAX = 128
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_EOCD = b"PK\x05\x06"  # end of central directory record: 22 bytes + the comment
_EOCD_LEN = 22
_COMMENT_LEN = len(TRAILER) + 64
_TAIL_SEARCH = 1 << 16  # how far from the end a v3 trailer is looked for (appended junk)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ours."""


def with_aliases(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus top-level ``c``, ``w``, ``b`` taken from ``payload["model"]`` (those
    present there and not already top-level keys), so a plain ``torch.load`` finds the weights."""
    model = payload.get("model")
    if not isinstance(model, dict):
        return payload
    extra = {k: model[k] for k in ALIASES if k in model and k not in payload}
    return {**payload, **extra} if extra else payload


def encode_checkpoint(payload: dict[str, Any]) -> bytes:
    """The bytes of a v3 checkpoint file: ``torch.save`` zip + comment with the sha256."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **with_aliases(payload)}, buf)
    blob = buf.getvalue()
    eocd = blob[-_EOCD_LEN:]
    if eocd[:4] != _ZIP_EOCD or eocd[-2:] != b"\0\0":  # torch writes no comment of its own
        raise RuntimeError("torch.save did not end its archive with a comment-free zip end record"
                           f" (got {eocd!r}); cannot append the checkpoint digest")
    body = blob[:-2] + struct.pack("<H", _COMMENT_LEN) + TRAILER
    return body + hashlib.sha256(body).hexdigest().encode()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus a format tag and the c/w/b aliases) to ``path``, with
    its sha256; the file is a ``torch.save`` archive that ``torch.load`` reads directly."""
    return atomic_write_bytes(path, encode_checkpoint(payload))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsynced, then
    renamed over the target, then the folder fsynced; a reader, or a crash, sees the old file or
    the new one, never a part. ``mode``: the file's permissions (default: mkstemp's 0600). An
    OSError (disk full, read-only, permission) names ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text, readable by all (0644 less the umask): every
    file a run writes besides checkpoints (metrics.json, config.yaml, ensemble.json, the
    ``.hydra`` records)."""
    return atomic_write_bytes(path, text.encode("utf-8"), 0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    if raw.startswith(MAGIC):  # v2
        blob, kind = _verified_v2(path, raw), "corrupt"
    elif raw.startswith(_ZIP_LOCAL):
        blob, kind = _verified_zip(path, raw)
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


def _verified_zip(path: Path, raw: bytes) -> tuple[bytes, str]:
    """A v3 file (digest checked) or a v1 / foreign ``torch.save`` zip (no digest)."""
    start = max(0, len(raw) - _TAIL_SEARCH)
    at = raw.rfind(TRAILER, start)
    eocd = at - _EOCD_LEN
    if at < 0 or eocd < 0 or raw[eocd:eocd + 4] != _ZIP_EOCD or \
            raw[at - 2:at] != struct.pack("<H", _COMMENT_LEN):
        # No intact v3 trailer. A complete zip ends with its end record (torch writes no
        # comment): a v1 checkpoint or a foreign torch file, told apart by the format tag.
        tail = raw[-_EOCD_LEN:]
        if len(raw) >= _EOCD_LEN and tail[:4] == _ZIP_EOCD and tail[-2:] == b"\0\0":
            return raw, "unreadable"
        v3_end = raw[-_EOCD_LEN - _COMMENT_LEN:-_COMMENT_LEN]
        if at >= 0 or (len(raw) >= _EOCD_LEN + _COMMENT_LEN and v3_end[:4] == _ZIP_EOCD
                       and v3_end[-2:] == struct.pack("<H", _COMMENT_LEN)):
            raise CheckpointError(f"checkpoint {path} is corrupt: its zip end record or digest "
                                  "tag is damaged")
        raise CheckpointError(f"checkpoint {path} is truncated: the zip archive ends without its "
                              f"end record and checkpoint digest ({len(raw)} bytes)")
    end = at + _COMMENT_LEN
    if len(raw) < end:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(raw)} of {end} bytes")
    if len(raw) > end:
        raise CheckpointError(f"checkpoint {path} has {len(raw) - end} bytes more than its end "
                              f"record says ({end}); it is corrupt")
    recorded = raw[end - 64:].decode("ascii", "replace")
    actual = hashlib.sha256(raw[:end - 64]).hexdigest()
    if actual != recorded:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual[:12]}… does not match "
                              f"the recorded {recorded[:12]}…")
    return raw, "corrupt"


def _verified_v2(path: Path, raw: bytes) -> bytes:
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
