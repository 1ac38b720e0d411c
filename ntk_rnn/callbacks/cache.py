"""A small on-disk cache for limit objects that do not depend on the run (N, β, seed).

Entries are checkpoint-format files (tensors only, atomic writes, weights_only loads), named by a
hash of everything the cached value depends on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# Bump when a limit computation's numerics change, so stale entries are not reused
# (2: limit_cell_ntk's trapezoid rule reaches its full 513-node budget).
CACHE_VERSION = 2


def cache_key(spec: dict[str, Any]) -> str:
    def plain(v):
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v

    spec = {k: plain(v) for k, v in spec.items()}
    spec["__cache_version__"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def cached(cache_dir: Optional[str], prefix: str, spec: dict[str, Any],
           compute: Callable[[], dict]) -> dict:
    """``compute()`` (a dict of tensors/numbers), or its stored copy under ``cache_dir``."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir).expanduser() / f"{prefix}_{cache_key(spec)}.pt"
    if path.exists():
        try:
            return load_checkpoint(path)
        except CheckpointError:
            pass  # unreadable: recompute and overwrite
    value = compute()
    save_checkpoint(path, value)
    return value
