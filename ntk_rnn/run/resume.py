"""Resume: find a run's newest good checkpoint, and check it comes from the same config."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..checkpoint import CheckpointError, load_checkpoint
from ..errors import ConfigError

# keys a resumed run may change
RESUME_MAY_CHANGE = ("train.resume", "train.backend", "logger", "device", "callbacks.progress")
# keys newer than some checkpoints: absent from a checkpoint's config = this default
ADDED_KEYS = {"train.ensemble_size": 1, "train.shared_stream": False, "data_seed": None,
              "train.bptt_window": 32, "model._target_": "ntk_rnn.models.MeanFieldRNN"}


def find_checkpoint(run_dir: Path, n_steps: int) -> Optional[tuple[Path, dict]]:
    """(path, payload) of the newest readable ``checkpoints/step_*.pt``, preferring steps before
    the last one (so the final step, and each callback's final state, is redone on resume);
    corrupt files are skipped with a warning."""
    folder = run_dir / "checkpoints"
    steps = {p: int(m.group(1)) for p in folder.glob("step_*.pt")
             if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))}
    for path in sorted(steps, key=lambda p: (steps[p] < n_steps, steps[p]), reverse=True):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            print(f"ntk_rnn: warning: {exc}; trying an older checkpoint", file=sys.stderr)
    return None


def completed_metrics(run_dir: Path) -> Optional[dict]:
    """metrics.json of a run that completed (and has its final checkpoint), else None."""
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("status") != "completed":
        return None
    if not (run_dir / "checkpoints" / "final.pt").exists():
        return None
    return m


def check_same_config(cfg: Any, payload: dict, run_dir: Path) -> None:
    """A checkpoint continues only the run it came from: same config except
    ``RESUME_MAY_CHANGE``."""
    if not isinstance(cfg, DictConfig) or "config" not in payload:
        return
    old = _plain(OmegaConf.create(payload["config"]))
    new = _plain(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))
    diff = [k for k in _diff_keys(old, new) if not k.startswith(RESUME_MAY_CHANGE)
            and not (k in ADDED_KEYS and _get(old, k) == "<absent>"
                     and _get(new, k) == ADDED_KEYS[k])]
    if diff:
        shown = ", ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in diff[:5])
        raise ConfigError(f"train.resume: the checkpoints in {run_dir} come from a run "
                          f"with a different config ({shown}); resume with the same "
                          "settings or use a new run directory")


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}{k}.")
        return out
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [prefix.rstrip(".")]


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


_MISSING = object()
