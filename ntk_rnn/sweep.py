"""One table for a Hydra sweep: ``python -m ntk_rnn.sweep multirun/2024-05-01/12-00-00``.

Every job directory under the sweep (one with ``.hydra/overrides.yaml`` or ``metrics.json``)
becomes a row: its overrides, its status and final metrics (``metrics.json``), and, for a job
that did not complete, why: the ``error`` of a ``failed`` / ``diverged`` / ``interrupted`` job,
or "no metrics.json" for one that crashed, was killed or is still running (with its newest
checkpoint, from which ``train.resume=auto`` continues). The table is printed and written next to
the jobs as ``summary.csv`` and ``summary.json``.

Exit status: 0 when every job completed, 1 when some did not, 2 when there is no job to report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# metrics shown in the printed table (all of them go to summary.csv / summary.json)
SHOWN = ("steps", "t", "running_mse", "final_loss", "ntk_drift_from_init",
         "ntk_distance_to_limit", "wall_s")
NOT_RUN = "crashed"  # the status of a job directory without metrics.json


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ntk_rnn.sweep", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="the sweep's directory (hydra.sweep.dir, e.g. "
                    "multirun/<date>/<time>)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write "
                    "summary.csv / summary.json")
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
    return 0 if all(j.ok for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
