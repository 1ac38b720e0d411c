"""One table for a Hydra sweep: ``python -m ntk_rnn.sweep multirun/2024-05-01/12-00-00``.

Every job directory under the sweep (one with ``.hydra/overrides.yaml`` or ``metrics.json``)
becomes a row: its overrides, its status and final metrics (``metrics.json``), and, for a job
that did not complete, why: the ``error`` of a ``failed`` / ``diverged`` / ``interrupted`` job,
or "no metrics.json" for one that crashed, was killed or is still running (with its newest
checkpoint, from which ``train.resume=auto`` continues). The table is printed and written next to
the jobs as ``summary.csv`` and ``summary.json``.

With ``--plot`` (or `plot_sweep`, which `PlotSweepCallback` calls at the end of a
multirun) it also draws drift from init, distance to the limit and the output error against the
limit time t = step / N, one line per width (the seeds' mean) with the seeds' min–max band, into
``sweep_vs_t.png`` and as the TensorBoard image ``sweep/vs_t`` of the sweep root: widths whose
runs have different numbers of steps become comparable.

Exit status: 0 when every job completed, 1 when some did not, 2 when there is no job to report.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback as HydraCallback

from .tags import NTK_DISTANCE_TO_LIMIT, NTK_DRIFT, OUTPUT_RMSE_TO_LIMIT, SUMMARY_KEYS, TITLES

# metrics shown in the printed table (all of them go to summary.csv / summary.json)
SHOWN = ("steps", "t", *SUMMARY_KEYS, "wall_s")
NOT_RUN = "crashed"  # the status of a job directory without metrics.json
# the curves of ``--plot``: (tag, panel title)
PLOTTED = tuple((tag, TITLES[tag]) for tag in (NTK_DRIFT, NTK_DISTANCE_TO_LIMIT,
                                               OUTPUT_RMSE_TO_LIMIT))
PLOT_PNG = "sweep_vs_t.png"
PLOT_TAG = "sweep/vs_t"
PLOT_SUFFIX = ".sweep_plot"  # the sweep root's event file (replaced by each plot)


@dataclass
class Job:
    """One job of a sweep: where it ran, what it overrode, how it ended."""

    dir: str
    num: int | None
    overrides: dict[str, str]
    status: str
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    last_checkpoint_step: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (recursively; submitit's own folders are skipped).

    An ensemble job (``train.ensemble_size`` > 1) is reported by its members ``member_{e:03d}/``,
    one row each (with or without ``metrics.json``); its own directory too when its own
    ``metrics.json`` reports a failure (e.g. a config error before the members ran)."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p for d in list(found) for p in d.glob("member_*") if _member(p) is not None}
    found = {d for d in found if ".submitit" not in d.relative_to(sweep_dir).parts}
    # an ensemble directory is its members' rows, unless it failed before they could run
    found -= {d.parent for d in found if _member(d) is not None
              and not _failed_early(d.parent)}
    return sorted(found, key=lambda d: (_num(d) is None, _num(d) or 0, _member(d) or 0, str(d)))


def _failed_early(ens_dir: Path) -> bool:
    """An ensemble directory whose own metrics.json reports a failure (e.g. a config error)."""
    try:
        return json.loads((ens_dir / "metrics.json").read_text()).get("status") != "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _member(job_dir: Path) -> int | None:
    m = re.fullmatch(r"member_(\d+)", job_dir.name)
    return int(m.group(1)) if m else None


def _num(job_dir: Path) -> int | None:
    if _member(job_dir) is not None:
        job_dir = job_dir.parent
    m = re.match(r"(\d+)(_|$)", job_dir.name)
    return int(m.group(1)) if m else None


def read_job(job_dir: Path) -> Job:
    overrides: dict[str, str] = {}
    member = _member(job_dir)
    ov = (job_dir.parent if member is not None else job_dir) / ".hydra" / "overrides.yaml"
    if ov.exists():
        try:
            for item in yaml.safe_load(ov.read_text()) or []:
                key, _, value = str(item).partition("=")
                overrides[key] = value
        except (yaml.YAMLError, OSError) as exc:
            overrides["<overrides>"] = f"unreadable ({exc})"
    if member is not None:  # the job's overrides, with the member's own seeds
        overrides["member"] = str(member)
        try:
            cfg = yaml.safe_load((job_dir / "config.yaml").read_text()) or {}
            for key in ("seed", "data_seed"):
                if cfg.get(key) is not None:
                    overrides[key] = str(cfg[key])
        except (yaml.YAMLError, OSError, AttributeError):
            pass
    steps = [int(m.group(1)) for p in (job_dir / "checkpoints").glob("step_*.pt")
             if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    last = max(steps) if steps else None
    job = Job(dir=str(job_dir), num=_num(job_dir), overrides=overrides, status=NOT_RUN,
              last_checkpoint_step=last)
    mpath = job_dir / "metrics.json"
    if not mpath.exists():
        where = f"; newest checkpoint at step {last} (train.resume=auto continues from it)" \
            if last is not None else "; no checkpoint"
        job.error = f"no metrics.json: the job crashed, was killed or is still running{where}"
        return job
    try:
        metrics = json.loads(mpath.read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        job.status, job.error = "unreadable", f"metrics.json is unreadable ({exc})"
        return job
    job.status = str(metrics.pop("status", "unknown"))
    job.error = str(metrics.pop("error", "") or "")
    job.metrics = metrics
    return job


def collect(sweep_dir: str | Path) -> list[Job]:
    """Every job of the sweep, in job-number order."""
    return [read_job(d) for d in find_job_dirs(Path(sweep_dir))]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def table(jobs: list[Job]) -> str:
    """The jobs as a fixed-width text table: job, swept overrides, status, main metrics."""
    keys = sorted({k for j in jobs for k in j.overrides}
                  - {k for k in jobs[0].overrides if all(j.overrides.get(k) ==
                                                        jobs[0].overrides[k] for j in jobs)}) \
        if len(jobs) > 1 else sorted({k for j in jobs for k in j.overrides})
    shown = [k for k in SHOWN if any(k in j.metrics for j in jobs)]
    head = ["job", *keys, "status", *shown]
    rows = [[_fmt(j.num), *[j.overrides.get(k, "") for k in keys], j.status,
             *[_fmt(j.metrics.get(k)) for k in shown]] for j in jobs]
    width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, width, strict=True)).rstrip()
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def counts(jobs: list[Job]) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        out[j.status] = out.get(j.status, 0) + 1
    return out


def write(jobs: list[Job], sweep_dir: str | Path) -> tuple[Path, Path]:
    """``summary.csv`` (one row per job, every metric) and ``summary.json`` in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    okeys = sorted({k for j in jobs for k in j.overrides})
    mkeys = sorted({k for j in jobs for k in j.metrics})
    csv_path, json_path = sweep_dir / "summary.csv", sweep_dir / "summary.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *okeys, "status", "error", *mkeys, "last_checkpoint_step", "dir"])
        for j in jobs:
            w.writerow([j.num, *[j.overrides.get(k, "") for k in okeys], j.status, j.error,
                        *[j.metrics.get(k, "") for k in mkeys], j.last_checkpoint_step, j.dir])
    json_path.write_text(json.dumps({"sweep_dir": str(sweep_dir), "counts": counts(jobs),
                                     "jobs": [asdict(j) for j in jobs]}, indent=2,
                                    default=str))
    return csv_path, json_path


def report(jobs: list[Job]) -> str:
    """The table, then one line per job that did not complete, saying why."""
    c = counts(jobs)
    lines = [table(jobs), "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))]
    bad = [j for j in jobs if not j.ok]
    if bad:
        lines.append("not completed:")
        for j in bad:
            lines.append(f"  job {_fmt(j.num)} ({Path(j.dir).name}): {j.status}: {j.error}")
    return "\n".join(lines)


# --- curves against t ------------------------------------------------------------------------
def _job_config(job: Job) -> dict:
    try:
        cfg = yaml.safe_load((Path(job.dir) / "config.yaml").read_text())
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _width(job: Job) -> int | None:
    w = (_job_config(job).get("model") or {}).get("width", job.overrides.get("model.width"))
    try:
        return int(w)
    except (TypeError, ValueError):
        return None


def job_curves(job_dir: str | Path, tags: tuple[str, ...] | None = None) -> dict:
    """``{tag: (steps, values)}`` of a job's scalar tags, read with TensorBoard's own reader
    (which drops what a resumed run's purge_step discarded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # (its reader logs "No path found after <file>" at INFO, which Hydra's logging would print)
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    ea = EventAccumulator(str(job_dir), size_guidance={"scalars": 0, "images": 1,
                                                       "histograms": 1, "tensors": 1})
    ea.Reload()
    out = {}
    for tag in ea.Tags().get("scalars", []):
        if tags is None or tag in tags:
            ev = ea.Scalars(tag)
            out[tag] = ([e.step for e in ev], [e.value for e in ev])
    return out


SEED_KEYS = ("seed", "data_seed", "model.width")  # not part of a line's label


def sweep_curves(sweep_dir: str | Path, tags: tuple[str, ...] = tuple(t for t, _ in PLOTTED)
                 ) -> dict[str, dict[tuple[str, int], list[tuple[list[float], list[float]]]]]:
    """``{tag: {(setting, width): [(t, values) per job]}}`` for the sweep's completed jobs (all
    jobs when none completed), t = step / N. ``setting`` names the job's other swept values
    (e.g. ``model=gru``; "" when only width and seeds vary), so different models or β are never
    averaged together as if they were seeds."""
    import numpy as np

    jobs = collect(sweep_dir)
    done = [j for j in jobs if j.ok] or jobs
    out: dict[str, dict[tuple[str, int], list]] = {}
    keys = {k for j in done for k in j.overrides}  # the overrides that differ between jobs
    varying = {k for k in keys if len({j.overrides.get(k) for j in done}) > 1}
    for job in done:
        N = _width(job)
        if not N:
            continue
        setting = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(job.overrides.items())
                           if k in varying and k.lstrip("+~") not in SEED_KEYS)
        for tag, (steps, vals) in job_curves(job.dir, tags).items():
            t = np.asarray(steps, dtype=float) / N
            out.setdefault(tag, {}).setdefault((setting, N), []).append(
                (t, np.asarray(vals, dtype=float)))
    return out


def _band(runs: list) -> tuple:
    """(t, mean, min, max) of several runs' curves on their common t range (interpolated onto
    the union of their t's there: exact when they were logged at the same steps)."""
    import numpy as np

    if len(runs) == 1:
        t, v = runs[0]
        return t, v, v, v
    lo = max(float(t[0]) for t, _ in runs)
    hi = min(float(t[-1]) for t, _ in runs)
    grid = np.unique(np.concatenate([t[(t >= lo) & (t <= hi)] for t, _ in runs]))
    if grid.size == 0:
        grid = np.asarray([lo])
    V = np.stack([np.interp(grid, t, v) for t, v in runs])
    return grid, V.mean(0), V.min(0), V.max(0)


def plot_sweep(sweep_dir: str | Path, tags: tuple[tuple[str, str], ...] = PLOTTED,
               tensorboard: bool = True) -> Path:
    """Drift from init, distance to the limit and the output error (when logged) against the
    limit time t = step / N: one line per width (the mean over seeds) with the seeds' min–max
    band. Writes ``<sweep_dir>/sweep_vs_t.png`` (returned) and, with ``tensorboard``, the same
    picture as the image ``sweep/vs_t`` of the sweep root's TensorBoard run (an event file in
    ``sweep_dir`` itself, replaced on each call). ValueError when no job logged these tags."""
    import numpy as np
    from matplotlib import colormaps, rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep_dir = Path(sweep_dir)
    curves = sweep_curves(sweep_dir, tuple(t for t, _ in tags))
    panels = [(tag, title) for tag, title in tags if curves.get(tag)]
    if not panels:
        raise ValueError(f"no job under {sweep_dir} logged any of "
                         f"{', '.join(t for t, _ in tags)} (NTK / output callbacks off?)")
    widths = sorted({key for tag, _ in panels for key in curves[tag]})  # (setting, N)
    cmap = colormaps["viridis"]
    colour = {key: cmap(0.85 * i / max(len(widths) - 1, 1)) for i, key in enumerate(widths)}
    with rc_context({"axes.unicode_minus": True, "font.size": 11}):
        fig = Figure(figsize=(5.2 * len(panels), 4.4), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (tag, title) in zip(axes, panels):
            bands = {N: (len(curves[tag][N]), _band(curves[tag][N]))
                     for N in widths if curves[tag].get(N)}
            pos = np.concatenate([b[1][b[1] > 0] for _, b in bands.values()])
            log = bool(pos.size) and pos.max() > 20 * pos.min()  # decades apart: a log axis
            for N, (n, (t, mean, lo, hi)) in bands.items():
                keep = (lo > 0) if log else np.ones_like(t, bool)  # (drift is 0 at t = 0)
                label = (f"{N[0]}, " if N[0] else "") + f"N = {N[1]}" + (
                    f" ({n} seeds)" if n > 1 else "")
                ax.plot(t[keep], mean[keep], color=colour[N], lw=1.8, label=label)
                if n > 1:
                    ax.fill_between(t[keep], lo[keep], hi[keep], color=colour[N], alpha=0.25,
                                    lw=0)
            if log:
                ax.set_yscale("log")
            ax.set_title(title, fontsize=11)
            ax.set_xlabel("t = step / N")
            ax.set_ylabel(tag)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=9)
        fig.suptitle(f"{sweep_dir.name}: mean over seeds, band = min–max", fontsize=11)
        fig.tight_layout()
        png = sweep_dir / PLOT_PNG
        fig.savefig(png)
        if tensorboard:
            fig.canvas.draw()
            arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            from torch.utils.tensorboard import SummaryWriter

            for old in sweep_dir.glob(f"events.out.tfevents.*{PLOT_SUFFIX}"):
                old.unlink()
            with SummaryWriter(str(sweep_dir), filename_suffix=PLOT_SUFFIX) as w:
                w.add_image(PLOT_TAG, arr, 0, dataformats="HWC")
    return png


class PlotSweepCallback(HydraCallback):
    """Hydra callback: at the end of a multirun, the sweep summary (summary.csv / .json) and
    `plot_sweep`. In ``conf/config.yaml``::

        hydra:
          callbacks:
            sweep_plot:
              _target_: ntk_rnn.sweep.PlotSweepCallback
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            jobs = collect(sweep_dir)
            if jobs:
                write(jobs, sweep_dir)
            print(f"ntk_rnn.sweep: wrote {plot_sweep(sweep_dir)}")
        except Exception as exc:  # a plot must not fail the sweep
            print(f"ntk_rnn.sweep: no plot for {sweep_dir}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ntk_rnn.sweep", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="the sweep's directory (hydra.sweep.dir, e.g. "
                    "multirun/<date>/<time>)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write "
                    "summary.csv / summary.json")
    ap.add_argument("--plot", action="store_true", help=f"also draw drift, distance to the "
                    f"limit and output error against t = step/N per width ({PLOT_PNG} and the "
                    f"TensorBoard image {PLOT_TAG} at the sweep root)")
    args = ap.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"ntk_rnn.sweep: {sweep_dir} is not a directory", file=sys.stderr)
        return 2
    jobs = collect(sweep_dir)
    if not jobs:
        print(f"ntk_rnn.sweep: no job directories (with .hydra/overrides.yaml or metrics.json) "
              f"under {sweep_dir}", file=sys.stderr)
        return 2
    print(report(jobs))
    if not args.no_write:
        csv_path, json_path = write(jobs, sweep_dir)
        print(f"wrote {csv_path} and {json_path}")
    if args.plot:
        try:
            print(f"wrote {plot_sweep(sweep_dir)}")
        except ValueError as exc:
            print(f"ntk_rnn.sweep: no plot: {exc}", file=sys.stderr)
    return 0 if all(j.ok for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
