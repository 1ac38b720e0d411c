"""TensorBoard: the run's writer and its HParams entry (written into the run directory itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


def tensorboard_enabled(cfg: Any) -> bool:
    lg = cfg.get("logger") if hasattr(cfg, "get") else getattr(cfg, "logger", None)
    return lg is None or bool(lg.get("tensorboard", True))


def make_writer(cfg: Any, run_dir: str | Path,
                purge_step: Optional[int] = None) -> Optional[SummaryWriter]:
    """A SummaryWriter on the run directory itself, so one run = one TensorBoard run.
    ``purge_step`` (resume): readers drop what earlier event files hold from that step on."""
    if not tensorboard_enabled(cfg):
        return None
    lg = cfg.get("logger") if hasattr(cfg, "get") else getattr(cfg, "logger", None)
    flush = int(lg.get("flush_secs", 10)) if lg is not None else 10
    return SummaryWriter(log_dir=str(run_dir), flush_secs=flush, purge_step=purge_step)


def run_hparams(cfg: Any) -> dict[str, Any]:
    """The hyper-parameters a sweep compares: width, β, α, gradient, seed, data, activation."""
    data = cfg.data
    target = data.get("_target_", type(data).__name__) if hasattr(data, "get") else str(data)
    out = {
        "width": int(cfg.model.width),
        "beta": float(cfg.model.beta),
        "alpha": float(cfg.train.alpha),
        "gradient": str(cfg.train.gradient),
        "activation": str(cfg.model.activation),
        "recurrence": str(cfg.model.recurrence),
        "seed": int(cfg.seed),
        "data": str(target).rsplit(".", 1)[-1],
        "dtype": str(cfg.dtype),
    }
    return out


def write_hparams(writer: SummaryWriter, cfg: Any, metrics: dict[str, Any]) -> None:
    """HParams entry plus its metric scalars, in the writer's own directory.

    ``SummaryWriter.add_hparams`` would open a timestamped sub-run, which splits the run in the
    HParams dashboard; writing the three hparams summaries to the run's own file avoids that.
    """
    final = {f"final/{k}": float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    exp, ssi, sei = hparams_summary(run_hparams(cfg), final)
    fw = writer._get_file_writer()
    for summ in (exp, ssi, sei):
        fw.add_summary(summ)
    step = int(metrics.get("steps", 0))
    for k, v in final.items():
        writer.add_scalar(k, v, step)
    writer.flush()


def resolved_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
