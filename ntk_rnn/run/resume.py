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
from .config import resolve_renamed

# keys a resumed run may change
RESUME_MAY_CHANGE = ("train.resume", "train.backend", "logger", "device", "callbacks.progress")
# keys newer than some checkpoints: absent from a checkpoint's config = this default
ADDED_KEYS = {"train.ensemble_size": 1, "train.shared_stream": False, "data_seed": None,
              "train.bptt_window": 32, "model._target_": "ntk_rnn.models.MeanFieldRNN"}


def find_checkpoint(run_dir: Path, n_steps: int) -> Optional[tuple[Path, dict]]:
    """(path, payload) of the newest readable ``checkpoints/step_*.pt``, preferring steps before
    the last one (so the final step, and each callback's final state, is redone on resume), and
    ``init.pt`` (step 0) when there is no other: the end of a run can always be redone. Corrupt
    files are skipped with a warning."""
    folder = run_dir / "checkpoints"
    steps = {p: int(m.group(1)) for p in folder.glob("step_*.pt")
             if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)) and p.is_file()}
    if (folder / "init.pt").is_file():  # step 0: a run killed before (or at) its first periodic
        steps[folder / "init.pt"] = -1  # checkpoint is redone from the start (last resort)
    for path in sorted(steps, key=lambda p: (steps[p] < n_steps, steps[p]), reverse=True):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            print(f"ntk_rnn: warning: {exc}; trying an older checkpoint", file=sys.stderr)
    return None


def read_metrics(run_dir: Path) -> Optional[dict]:
    """metrics.json as a dict, or None when missing or damaged."""
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def metrics_intact(run_dir: Path) -> bool:
    """Does metrics.json record the completed run (readable, status completed)?"""
    m = read_metrics(run_dir)
    return m is not None and m.get("status") == "completed"


def completed_run(run_dir: Path, n_steps: int) -> Optional[tuple[dict, Optional[dict]]]:
    """(metrics, final.pt payload or None) of a run that completed, by its own record: the
    metrics ``final.pt`` carries (runs written since it does), else a metrics.json saying
    ``completed`` next to a ``final.pt`` (older runs, or a final.pt that no longer reads: then
    the payload is None). None for a run that did not complete."""
    final = run_dir / "checkpoints" / "final.pt"
    if not final.exists():
        return None
    payload = None
    try:
        payload = load_checkpoint(final)
    except CheckpointError as exc:
        print(f"ntk_rnn: warning: {exc}", file=sys.stderr)
    record = payload.get("final_metrics") if payload is not None else None
    if isinstance(record, dict) and record.get("status") == "completed":
        return dict(record), payload
    m = read_metrics(run_dir)
    if m is not None and m.get("status") == "completed":
        return m, payload
    return None


def check_same_config(cfg: Any, payload: dict, run_dir: Path) -> None:
    """A checkpoint continues only the run it came from: same config except
    ``RESUME_MAY_CHANGE``."""
    if not isinstance(cfg, DictConfig) or "config" not in payload:
        return
    old = _plain(OmegaConf.create(payload["config"]))
    resolve_renamed(old, warn=False)  # a run saved with an old spelling (train.gradient=truncated)
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
