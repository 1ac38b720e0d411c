"""Ensembles from the CLI: E independent runs trained in one process as one batched computation.

    python -m ntk_rnn.train train.ensemble_size=16                      # a data stream each
    python -m ntk_rnn.train train.ensemble_size=16 train.shared_stream=true

Member e is *exactly* the single run with ``seed = cfg.seed + e`` (and ``data_seed + e`` when
``data_seed`` is set); with ``train.shared_stream=true`` every member reads one stream, that of
run seed ``cfg.seed`` (``data_seed = cfg.seed``, or ``cfg.data_seed`` when set), while the
initial parameters and probes still come from seed + e. Each member is an ordinary
:class:`~ntk_rnn.train.Trainer` on the member's config (``train.ensemble_size=1``, its seeds) in
``<run_dir>/member_{e:03d}/``, with its own config.yaml, event files, checkpoints and
metrics.json: a member directory is a single run (resumable as one); ``<run_dir>/ensemble.json``
sums up the ensemble.

The members are driven in lockstep through the pieces of ``Trainer.fit``: each segment runs up to
the nearest event (log point, callback, end of run) or chunk end of any member, as one
:class:`~ntk_rnn.ensemble.EnsembleStepper` call for all (their parameters and RTRL states are
views of its stacked buffers); then each member records its errors, logs and calls its callbacks
exactly as it does alone. A member that diverges (or whose data fails) writes its own
metrics.json and last good checkpoint and is dropped; the others go on. SIGTERM/SIGINT stop every
member at the same step boundary, each with its checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, open_dict

from .callbacks.progress import ProgressCallback
from .config import opt, validate
from .ensemble import EnsembleStepper
from .errors import ConfigError, TrainingDiverged
from .train import Chunk, StopSignals, Trainer, TrainingInterrupted


def member_dir(e: int) -> str:
    return f"member_{e:03d}"


def member_config(cfg: Any, e: int) -> Any:
    """The config of member e: the single run with seed + e (see the module docstring)."""
    c = copy.deepcopy(cfg)
    data_seed = opt(cfg, "data_seed")
    if bool(opt(cfg.train, "shared_stream", False)):
        data_seed = int(cfg.seed) if data_seed is None else int(data_seed)
    elif data_seed is not None:
        data_seed = int(data_seed) + e
    values = {"seed": int(cfg.seed) + e, "data_seed": data_seed}
    train = {"ensemble_size": 1, "shared_stream": False}
    if isinstance(c, DictConfig):
        with open_dict(c):
            for k, v in values.items():
                c[k] = v
            for k, v in train.items():
                c.train[k] = v
    else:
        for k, v in values.items():
            setattr(c, k, v)
        for k, v in train.items():
            setattr(c.train, k, v)
    return c


class EnsembleIncomplete(TrainingDiverged):
    """Some members diverged or failed; the others completed (their results are written)."""


@dataclass
class Member:
    e: int
    trainer: Trainer
    status: str = "pending"  # pending | running | completed | diverged | failed | interrupted
    stream: Optional[Iterator] = None
    chunk: Optional[Chunk] = None
    metrics: dict = field(default_factory=dict)
    error: str = ""


class EnsembleTrainer:
    """Builds the E member trainers (each checked like a single run: nothing is written before
    all are built), then ``fit()`` trains them in lockstep and writes ``ensemble.json``."""

    def __init__(self, cfg: Any, run_dir: str | Path) -> None:
        validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.E = int(cfg.train.ensemble_size)
        self.shared_stream = bool(opt(cfg.train, "shared_stream", False))
        if opt(cfg.train, "resume", False) not in (False, None) and \
                (self.run_dir / "checkpoints").is_dir():
            raise ConfigError(f"train.resume: {self.run_dir} holds a single run (checkpoints/), "
                              f"not an ensemble; resume it without train.ensemble_size={self.E}")
        self.members = []
        for e in range(self.E):
            tr = Trainer(member_config(cfg, e), self.run_dir / member_dir(e))
            tr.resume_hint = (f"run the ensemble's command again with train.resume=true and "
                              f"hydra.run.dir={self.run_dir}")
            self.members.append(Member(e, tr))
        # one progress bar for the ensemble instead of one per member
        self.progress = any(isinstance(cb, ProgressCallback)
                            for cb in self.members[0].trainer.callbacks)
        for m in self.members:
            m.trainer.callbacks = [cb for cb in m.trainer.callbacks
                                   if not isinstance(cb, ProgressCallback)]
        self.backend = str(opt(cfg.train, "backend", "auto"))
        # one thread: segments between events are short, and a thread per call costs more than
        # it saves there (EnsembleStepper(threads=...) splits members for long segments)
        self.threads = 1
        self.stepper: Optional[EnsembleStepper] = None
        self._stepper_members: list[int] = []
        self.network_steps, self.stepper_s, self.wall_s = 0, 0.0, 0.0
        self.status = "pending"

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.status == "running"]

    # --- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        for m in self.members:
            if m.trainer.completed is not None:  # resumed after it completed: nothing to redo
                m.status, m.metrics = "completed", dict(m.trainer.completed)
        if all(m.status == "completed" for m in self.members):  # nothing left to run
            try:
                done = json.loads((self.run_dir / "ensemble.json").read_text())
                if done.get("status") == "completed" and done.get("ensemble_size") == self.E:
                    return done
            except (OSError, ValueError):
                pass
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.status = "running"
        self.write_summary()
        t0 = time.perf_counter()
        bar = None
        stop = StopSignals()  # one handler for all members
        with stop:
            try:
                for m in self.members:
                    if m.status == "pending":
                        m.status = "running"  # (from here on, a failure aborts it too)
                        m.trainer.begin()
                now = time.perf_counter()  # (each member's clock starts with the training)
                for m in self.active:
                    m.trainer.t_start, m.trainer.last_log = now, (m.trainer.last_log[0], now)
                self._open_streams()
                bar = self._progress_bar()
                while True:
                    self._refill()  # next chunks; members at their last step end here
                    if stop.signum is not None and self.active:
                        self._interrupt(stop.signum)
                    active = self.active
                    if not active:
                        break
                    L = min(m.trainer.steps_to_event(m.chunk) for m in active)
                    ts = time.perf_counter()
                    self._run_segment(active, L)
                    self.stepper_s += time.perf_counter() - ts
                    self.network_steps += L * len(active)
                    for m in active:
                        try:
                            m.trainer.advance(m.chunk, m.chunk.j + L)
                        except TrainingDiverged as exc:
                            self._drop(m, "diverged", exc)
                    if bar is not None:
                        self._update_bar(bar)
            except BaseException as exc:
                for m in self.active:
                    m.trainer.abort(exc)
                    m.status = "interrupted" if isinstance(exc, TrainingInterrupted) else "failed"
                    m.error = m.error or str(exc)
                self.wall_s = time.perf_counter() - t0
                self.status = "interrupted" if isinstance(exc, TrainingInterrupted) else "failed"
                self.write_summary()
                raise
            finally:
                if bar is not None:
                    bar.close()
            self.wall_s = time.perf_counter() - t0
            done = [m for m in self.members if m.status == "completed"]
            self.status = "completed" if len(done) == self.E else "incomplete"
            summary = self.write_summary()
        if self.status != "completed":
            bad = [m for m in self.members if m.status != "completed"]
            shown = "; ".join(f"{member_dir(m.e)} {m.status}: {m.error}" for m in bad[:3])
            raise EnsembleIncomplete(f"{len(bad)} of {self.E} members did not complete, the "
                                     f"others did (see {self.run_dir / 'ensemble.json'}): "
                                     f"{shown}")
        return summary

    def _open_streams(self) -> None:
        """Each member's data stream from its step; members that read the same stream from the
        same step (a shared stream) share one generator (``itertools.tee``)."""
        groups: dict[tuple, list[Member]] = {}
        for m in self.active:
            groups.setdefault((m.trainer.seeds["data"], m.trainer.step), []).append(m)
        for ms in groups.values():
            its = itertools.tee(ms[0].trainer._stream(ms[0].trainer.step), len(ms))
            for m, it in zip(ms, its, strict=True):
                m.stream = it

    def _refill(self) -> None:
        """A member whose chunk is done gets its next one, or ends (its last step, as
        ``Trainer.fit`` does); a data error fails that member alone."""
        for m in self.active:
            if m.chunk is not None and not m.chunk.done:
                continue
            tr = m.trainer
            if tr.step < tr.n_steps:
                try:
                    X, Y = next(m.stream)
                except StopIteration:
                    exc = ConfigError(f"data: the stream ended at step {tr.step}; the run needs "
                                      f"{tr.n_steps}")
                    self._drop(m, "failed", exc)
                    continue
                except ConfigError as exc:
                    self._drop(m, "failed", exc)
                    continue
                m.chunk = tr.start_chunk(X, Y)
                continue
            m.metrics = tr.end()
            m.status, m.chunk, m.stream = "completed", None, None

    def _drop(self, m: Member, status: str, exc: BaseException) -> None:
        """Member m stops (its metrics.json says why; a diverged one keeps last_good.pt)."""
        m.trainer.abort(exc)
        if status == "failed":
            m.trainer.write_metrics({"status": "failed", "steps": m.trainer.step,
                                     "error": str(exc)})
        m.status, m.error, m.chunk, m.stream = status, str(exc), None, None
        print(f"ntk_rnn: {member_dir(m.e)} (seed {m.trainer.cfg.seed}) {status}: {exc}",
              file=sys.stderr)

    def _run_segment(self, active: list[Member], L: int) -> None:
        """Steps j..j+L of every active member's chunk, as one stepper call."""
        if self.backend == "reference":  # one network at a time (the reference loop)
            for m in active:
                c, j = m.chunk, m.chunk.j
                m.trainer.stepper.run_chunk(c.X[j:j + L], c.Y[j:j + L], out=c.y_hat[j:j + L])
            return
        stepper = self._stepper(active)
        c0, j0 = active[0].chunk, active[0].chunk.j
        same = all(m.chunk.j == j0 and m.chunk.X.data_ptr() == c0.X.data_ptr() and
                   m.chunk.Y.data_ptr() == c0.Y.data_ptr() for m in active)
        if same:  # one shared stream at the same place: X (L, d), Y (L,)
            X, Y = c0.X[j0:j0 + L], c0.Y[j0:j0 + L]
        else:
            X = torch.stack([m.chunk.X[m.chunk.j:m.chunk.j + L] for m in active])
            Y = torch.stack([m.chunk.Y[m.chunk.j:m.chunk.j + L] for m in active])
        out = torch.empty(len(active), L, dtype=c0.y_hat.dtype, device=c0.y_hat.device)
        stepper.run_chunk(X, Y, out=out)
        for i, m in enumerate(active):
            m.chunk.y_hat[m.chunk.j:m.chunk.j + L] = out[i]

    def _stepper(self, active: list[Member]) -> EnsembleStepper:
        """The batched stepper of the active members (rebuilt when one leaves): each member's
        parameters and RTRL state become views of its stacked buffers."""
        ids = [m.e for m in active]
        if self.stepper is None or ids != self._stepper_members:
            trs = [m.trainer for m in active]
            self.stepper = EnsembleStepper(
                [tr.model for tr in trs], lr=[tr.lr for tr in trs], gradient=trs[0].gradient,
                states=[tr.online for tr in trs], backend=self.backend, bind=True,
                threads=self.threads)
            self._stepper_members = ids
            for tr in trs:  # the members' own steppers would hold copies of the old tensors
                tr.stepper = None
        return self.stepper

    def _interrupt(self, signum: int) -> None:
        """A signal: every active member checkpoints its current step and records why."""
        steps = []
        for m in self.active:
            try:
                if m.chunk is not None:
                    m.trainer._record(m.chunk)
                m.trainer._interrupt(signum)
            except TrainingDiverged as exc:
                self._drop(m, "diverged", exc)
            except TrainingInterrupted as exc:
                m.trainer.abort(exc)
                m.status, m.error = "interrupted", str(exc)
                steps.append(m.trainer.step)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"stopped by {name}; {len(steps)} members saved their state at step "
            f"{min(steps) if steps else '-'} in {self.run_dir}/member_*/checkpoints. To continue, "
            f"run the same command again with train.resume=true and hydra.run.dir={self.run_dir}",
            signum=signum, step=min(steps) if steps else -1, checkpoint=None)

    # --- progress and summary -------------------------------------------------------------
    def _progress_bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        steps = [m.trainer.step for m in self.active]
        n = self.members[0].trainer.n_steps
        return tqdm(total=n, initial=min(steps) if steps else n, unit="step",
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def _update_bar(self, bar: Any) -> None:
        active = self.active
        if not active:
            return
        bar.update(min(m.trainer.step for m in active) - bar.n)
        mse = [m.trainer.state.running_mse for m in active]
        bar.set_postfix(members=f"{len(active)}/{self.E}",
                        mse=f"{sum(mse) / len(mse):.4g}", refresh=False)

    def summary(self) -> dict:
        members = []
        for m in self.members:
            tr = m.trainer
            row = {"member": m.e, "dir": member_dir(m.e), "seed": int(tr.cfg.seed),
                   "data_seed": tr.cfg.get("data_seed") if hasattr(tr.cfg, "get") else None,
                   "status": m.status, "steps": m.metrics.get("steps", tr.step)}
            for k in ("running_mse", "final_loss", "ntk_drift_from_init",
                      "ntk_distance_to_limit"):
                if k in m.metrics:
                    row[k] = m.metrics[k]
            if m.error:
                row["error"] = m.error
            members.append(row)
        done = [r["running_mse"] for r in members
                if r["status"] == "completed" and isinstance(r.get("running_mse"), float)]
        counts: dict[str, int] = {}
        for r in members:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        wall = self.wall_s
        return {
            "status": self.status,
            "ensemble_size": self.E,
            "seeds": [r["seed"] for r in members],
            "shared_stream": self.shared_stream,
            "data_seeds": [r["data_seed"] for r in members],
            "steps": self.members[0].trainer.n_steps,
            "wall_s": wall,
            "network_steps": self.network_steps,
            "network_steps_per_s": self.network_steps / wall if wall > 0 else None,
            "stepper_s": self.stepper_s,
            "stepper_network_steps_per_s": (self.network_steps / self.stepper_s
                                            if self.stepper_s > 0 else None),
            "backend": self.stepper.backend if self.stepper is not None else self.backend,
            "threads": self.threads,
            "counts": counts,
            "running_mse": sum(done) / len(done) if done else None,  # mean over completed
            "members": members,
        }

    def write_summary(self) -> dict:
        s = self.summary()
        clean = json.loads(json.dumps(s, default=float), parse_constant=lambda _: None)
        path = self.run_dir / "ensemble.json"
        tmp = path.with_name(".ensemble.json.tmp")
        tmp.write_text(json.dumps(clean, indent=2))
        tmp.replace(path)
        return s
