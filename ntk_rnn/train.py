"""The command line: ``python -m ntk_rnn.train`` (or ``ntk-rnn-train``), a thin layer over
:class:`ntk_rnn.run.Trainer` configured by Hydra.

    python -m ntk_rnn.train model.width=1024 model.beta=0.6 train.horizon=2 seed=3
    python -m ntk_rnn.train -m model.width=256,1024 model.beta=0.6,0.9 seed=0,1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .callbacks.ntk import summary_line as ntk_summary_line
from .errors import ConfigError, TrainingDiverged
from .run.config import register_configs
from .run.signals import TrainingInterrupted
from .run.trainer import Trainer


def conf_dir() -> Path:
    """The built-in config tree: ``ntk_rnn/conf`` in an installed wheel, the repository's
    top-level ``conf/`` in a checkout (users add their own with ``--config-dir`` or
    ``hydra.searchpath``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise RuntimeError(f"ntk_rnn: the config tree is missing (looked in {here / 'conf'} and "
                       f"{here.parent / 'conf'}); reinstall the package")


register_configs()
CONF_DIR = str(conf_dir())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode.name == "MULTIRUN"
    try:
        trainer = Trainer.from_config(cfg, run_dir)
        result = trainer.fit()
    except TrainingInterrupted as exc:  # the Trainer wrote the checkpoint and metrics.json
        print(f"ntk_rnn: interrupted: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)  # SystemExit: a signalled sweep stops too
    except (ConfigError, TrainingDiverged) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "diverged"
        if isinstance(exc, ConfigError):
            _write_failure(run_dir, str(exc))
        print(f"ntk_rnn: {kind}: {exc}", file=sys.stderr)
        if multirun:  # the launcher records the failure; the other jobs go on
            raise
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except Exception as exc:  # a bug or the user's own code: keep the traceback
        _write_failure(run_dir, f"{type(exc).__name__}: {exc}")
        raise
    if not multirun:
        print(run_summary(trainer, result), file=sys.stderr)
    return result.get("running_mse")


def run_summary(trainer: Trainer, result: dict) -> str:
    """The few lines a run ends with: where it went, what it found, how to look at it."""
    m = result if trainer.E == 1 else trainer.members[0].metrics
    lines = [f"ntk_rnn: run complete -> {trainer.run_dir}"]
    if trainer.E > 1:
        lines.append(f"  ensemble: {trainer.E} members (member_000..), "
                     f"{result.get('counts')}; mean running MSE {_fmt(result.get('running_mse'))}")
    lines.append(f"  steps {m.get('steps')}  t = {_fmt(m.get('t'))}  running MSE "
                 f"{_fmt(m.get('running_mse'))}  ({m.get('gradient', trainer.gradient)} gradient,"
                 f" {trainer.backend} backend, {_fmt(m.get('wall_s'))} s)")
    ntk = ntk_summary_line(m)
    if ntk:
        lines.append(ntk)
    lines.append(f"  look at it: tensorboard --logdir {trainer.run_dir}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class SweepSummary(Callback):
    """Hydra callback: a multirun ends with the command that summarises it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        print(f"ntk_rnn: sweep complete -> {sweep_dir}\n  summary: python -m ntk_rnn.sweep "
              f"{sweep_dir}\n  look at it: tensorboard --logdir {sweep_dir}", file=sys.stderr)


def _write_failure(run_dir: str | Path, error: str) -> None:
    """metrics.json of a job that failed (``python -m ntk_rnn.sweep`` reports it)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "metrics.json").write_text(json.dumps(
            {"status": "failed", "error": error}, indent=2))
    except OSError as exc:
        print(f"ntk_rnn: warning: could not write {run_dir}/metrics.json ({exc})", file=sys.stderr)


if __name__ == "__main__":
    main()
