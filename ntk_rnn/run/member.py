"""One network's run inside the training loop: its model and online state, its share of the
stream, its errors, logs, callbacks and files. The `Trainer` owns E >= 1 of
these and one stepper that moves all of them; a single run is E = 1.

Files of a member (``run_dir`` given; ``None`` writes nothing): ``config.yaml``, the event file,
``checkpoints/{init,step_*,final,last_good}.pt`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .. import tags as T
from ..callbacks.base import Callback, TrainState
from ..callbacks.checkpoint import CheckpointCallback
from ..callbacks.progress import ProgressCallback, start_note
from ..checkpoint import atomic_write_text, save_checkpoint
from ..data.base import check_chunk, source_name
from ..errors import ConfigError, TrainingDiverged
from ..logging import make_writer, tensorboard_enabled, write_hparams
from ..models.init import generator_from_seed
from .build import member_dir
from .resume import check_same_config, completed_run, find_checkpoint, metrics_intact
from .signals import TrainingInterrupted
from .writer import RunWriter


@dataclass
class Chunk:
    """A chunk of the stream being trained on: X (T, d), Y (T,), the predictions Ŷ made so far,
    its first step ``k0``, the state before it (``snapshot``) and the steps done in it (``j``)."""

    X: torch.Tensor
    Y: torch.Tensor
    y_hat: torch.Tensor
    k0: int
    snapshot: dict
    j: int = 0
    recorded: int = 0  # steps of the chunk whose errors are stored

    @property
    def T(self) -> int:
        return self.X.shape[0]

    @property
    def done(self) -> bool:
        return self.j >= self.T


class Member:
    """One network's run (see the module docstring). ``online`` is whatever carries the online
    gradient between steps (RTRL's S, P, Q; a BPTT window), with ``state_dict``/``load_state_dict``.
    """

    def __init__(self, e: int, cfg: Any, run_dir: Optional[Path], source: Any,
                 model: torch.nn.Module, online: Any, lr: float, callbacks: list[Callback],
                 seeds: dict[str, int], n_steps: int,
                 model_factory: Optional[Callable[[int, int], torch.nn.Module]] = None, *,
                 run_info: Optional[Callable[..., dict]] = None, ensemble: bool = False,
                 notes: bool = True) -> None:
        self.e, self.cfg, self.run_dir = e, cfg, run_dir
        self.source, self.model, self.online, self.lr = source, model, online, float(lr)
        self.callbacks, self.seeds, self.n_steps = callbacks, seeds, n_steps
        t = cfg.train
        self.width = int(getattr(model, "width", 1))
        self.log_every = int(t.log_every) or max(1, n_steps // 200)
        self.mse_window = max(1, min(int(t.mse_window) or self.width, n_steps))
        thr = float(t.divergence_threshold)  # (read once: config access is slow per event)
        self.err2_bound = thr * thr  # (inf for a huge threshold; ** would raise OverflowError)
        self.chunk_size = int(t.chunk_size)
        # (Y_k - Ŷ_k)² of the last mse_window steps, a ring indexed by k % mse_window (memory
        # and checkpoints independent of the number of steps); loss_sum: their sum since the last
        # log point (train/loss)
        self._ring = torch.full((self.mse_window,), float("nan"), dtype=torch.float64)
        self.loss_sum = 0.0
        self.step = 0
        self.status = "pending"  # pending|running|completed|diverged|failed|interrupted
        self.error = ""
        self.metrics: dict = {}
        self.chunk: Optional[Chunk] = None
        self.stream: Optional[Iterator] = None
        self.writer = RunWriter(None)
        self.state = TrainState(
            model=model, online=online, source=source, run_dir=run_dir,
            n_steps=n_steps, lr=self.lr, generators={"probe": generator_from_seed(seeds["probe"])},
            save_checkpoint=self.save, writer=self.writer, model_factory=model_factory,
            alpha=float(t.alpha), gradient=str(t.gradient),
            bptt_window=int(t.get("bptt_window", 32)), seed=int(cfg.seed),
            data=OmegaConf.to_container(cfg.data, resolve=True), callbacks=tuple(callbacks),
        )
        for cb in callbacks:  # bad callback settings fail here, before any step
            cb.setup(self.state)
        self.resumed_from: Optional[Path] = None
        # announce slow starts on stderr (``notes``), labelled member_<e> in an ensemble
        self.notes, self.label = notes, f"{member_dir(e)}: " if ensemble else ""
        self.completed: Optional[dict] = None  # metrics of a finished run asked to resume
        # the trainer's (backend, gradient), recorded in checkpoints; with the member, what its
        # metrics.json adds (times)
        self.run_info = run_info if run_info is not None else (lambda member=None: {})
        self.restored_info: Optional[dict] = None  # ... as read back from one
        self._fresh_logs = False  # starting over in a directory that holds older event files
        where = run_dir.parent if ensemble and run_dir is not None else run_dir
        self.resume_hint = (f"run the ensemble's command again with train.resume=true and "
                            f"hydra.run.dir={where}" if ensemble else
                            f"run the same command again with train.resume=true and "
                            f"hydra.run.dir={where} (a sweep: hydra.sweep.dir=<its dir> "
                            "train.resume=auto)")

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        return self.writer.history

    # --- state and files ----------------------------------------------------------------
    def state_payload(self) -> dict:
        return {  # (checkpoint.save_checkpoint adds top-level c, w, b from "model")
            "step": self.step,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "online": {k: v.detach().cpu().clone() for k, v in self.online.state_dict().items()},
            "sq_err": self.sq_err.clone(),  # the last mse_window steps (to ``step``)
            "loss_sum": self.loss_sum,
            "probe_rng": self.state.generators["probe"].get_state(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "config": self.config_yaml(),
            "seed": self.seed,
            # what the callbacks reported so far and how the run ran: the end of a run resumed
            # from its last step reports the same metrics
            "callback_metrics": {k: v for k, v in self.state.metrics.items()
                                 if not k.startswith("_") and _plain_value(v)},
            "run_info": dict(self.run_info()),
        }

    def config_yaml(self) -> str:
        return (OmegaConf.to_yaml(self.cfg, resolve=True) if isinstance(self.cfg, DictConfig)
                else str(self.cfg))

    @property
    def sq_err(self) -> torch.Tensor:
        """(Y_k − Ŷ_k)² of the last ``train.mse_window`` steps done (fewer at the start), oldest
        first: what the running MSE averages."""
        lo = max(0, self.step - self.mse_window)
        return self._ring[torch.arange(lo, self.step) % self.mse_window]

    def _set_sq_err(self, values: torch.Tensor, step: int) -> None:
        """The ring as it was at ``step``, from that step's last values (a checkpoint's)."""
        values = values.to(torch.float64)[-self.mse_window:] if step else values[:0]
        self._ring.fill_(float("nan"))
        if values.numel():
            self._ring[torch.arange(step - values.numel(), step) % self.mse_window] = values

    def snapshot(self) -> dict:
        """Step, parameters, online state and squared errors (cheap: O(N d)); see ``record``."""
        return {
            "step": self.step,
            "sq_err": self.sq_err.clone(),
            "loss_sum": self.loss_sum,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "online": {k: v.detach().clone() for k, v in self.online.state_dict().items()},
        }

    def save(self, path: str | Path, payload: Optional[dict] = None) -> Optional[Path]:
        """Write a checkpoint (none without a run directory); the event files are flushed first,
        so every logged step up to the checkpoint's is on disk whenever the checkpoint is."""
        if self.run_dir is None:
            return None
        self.writer.flush()
        return save_checkpoint(path, payload if payload is not None else self.state_payload())

    def restore(self, payload: dict) -> None:
        dev = next(self.model.parameters()).device
        self.model.load_state_dict({k: v.to(dev) for k, v in payload["model"].items()})
        self.online.load_state_dict({k: v.to(dev) for k, v in payload["online"].items()})
        self.step = int(payload["step"])
        sq = payload["sq_err"]
        self._set_sq_err(sq, self.step)
        if "loss_sum" in payload:
            self.loss_sum = float(payload["loss_sum"])
        else:  # a checkpoint from before the ring: every step's error, sum since the last log
            s0 = self.step - self.step % self.log_every
            self.loss_sum = float(sq[s0:self.step].sum()) if sq.numel() >= self.step else 0.0
        self.state.step, self.state.running_mse = self.step, self.running_mse()
        self.state.generators["probe"].set_state(payload["probe_rng"])
        for cb in self.callbacks:
            cb.load_state_dict(payload["callbacks"].get(cb.name, {}))
        self.state.metrics.update(payload.get("callback_metrics") or {})
        self.restored_info = payload.get("run_info") or None

    def write_metrics(self, metrics: dict) -> None:
        if self.run_dir is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(clean, indent=2, default=float))

    def prepare(self) -> None:
        """Before the run writes (its directory locked): remove temporary files of a write cut
        short; a run that already completed is marked so, and its record given back (from
        ``final.pt``) when metrics.json is missing or damaged (an intact one is never
        rewritten)."""
        if self.completed is not None:  # resumed after it completed: nothing to redo
            self.status, self.metrics = "completed", dict(self.completed)
        if self.run_dir is None:
            return
        for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):  # a write cut short
            if stale.is_file():
                stale.unlink(missing_ok=True)
        if self.completed is not None and not metrics_intact(self.run_dir):
            self.write_metrics(self.completed)

    def drop_callbacks(self, kind: type) -> None:
        """Remove the callbacks of class ``kind`` (an ensemble draws one progress bar for all
        members)."""
        self.callbacks = [cb for cb in self.callbacks if not isinstance(cb, kind)]
        self.state.callbacks = tuple(self.callbacks)

    # --- resume ---------------------------------------------------------------------------
    def resume(self, mode: Any = True) -> bool:
        """Continue from the newest good checkpoint (``mode``: True = one must exist, "auto" =
        if one exists, False = start at step 0). A run that already completed is not redone."""
        rd = self.run_dir
        if rd is None:
            if mode not in (False, None):
                raise ConfigError("train.resume needs a run directory (run_dir=None keeps no "
                                  "checkpoints)")
            return False
        if mode is False or mode is None:
            if completed_run(rd, self.n_steps) is not None:  # never overwrite a finished run
                raise ConfigError(f"{rd} holds a completed run; a new run needs a new directory "
                                  "(leave out hydra.run.dir), and train.resume=auto or true "
                                  "there confirms the finished run without redoing it")
            self._fresh_logs = any(rd.glob("events.out.tfevents.*"))
            return False
        if (rd / "ensemble.json").exists():
            raise ConfigError(f"train.resume: {rd} holds an ensemble (ensemble.json); "
                              "resume it with the same train.ensemble_size, or one member as a "
                              "single run in its member_<e> directory (README, Ensembles)")
        done = completed_run(rd, self.n_steps)
        if done is not None:
            metrics, payload = done
            if payload is None:  # final.pt unreadable: the newest step checkpoint's config,
                found = find_checkpoint(rd, self.n_steps)  # else config.yaml's
                payload = found[1] if found is not None else {}
                if "config" not in payload and (rd / "config.yaml").is_file():
                    payload = {"config": (rd / "config.yaml").read_text()}
            check_same_config(self.cfg, payload, rd)
            self.completed = done = metrics
            print(f"ntk_rnn: {rd} already completed {done.get('steps')} steps; "
                  "nothing to resume", file=sys.stderr)
            return True
        found = find_checkpoint(rd, self.n_steps)
        if found is None:
            if mode is True:
                raise ConfigError(f"train.resume=true but {rd / 'checkpoints'} holds no "
                                  "readable step_*.pt checkpoint; use train.resume=auto to start "
                                  "fresh when there is none")
            self._fresh_logs = any(rd.glob("events.out.tfevents.*"))
            return False
        path, payload = found
        check_same_config(self.cfg, payload, rd)
        if int(payload["step"]) > self.n_steps:
            raise ConfigError(f"train.resume: {path} is at step {payload['step']}, past the "
                              f"{self.n_steps} steps of this run")
        self.restore(payload)
        self.resumed_from = path
        print(f"ntk_rnn: resuming from {path} (step {self.step} of {self.n_steps})",
              file=sys.stderr)
        return True

    # --- the pieces of the loop -------------------------------------------------------------
    def begin(self) -> None:
        """Start-up: the writer, callbacks' on_train_start, config.yaml, ``init.pt``."""
        self.status = "running"
        self.writer = self.state.writer = self._make_writer()
        self.start_step = self.step
        self.segment_callbacks = [cb for cb in self.callbacks
                                  if type(cb).on_segment is not Callback.on_segment]
        # at a step boundary checkpoints come after the other callbacks, so a checkpoint at step
        # k holds everything done for step k (and a resumed run redoes none of it)
        self.step_callbacks = sorted(self.callbacks,
                                     key=lambda cb: isinstance(cb, CheckpointCallback))
        self._start_callbacks()
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer.open()  # the run has started: from here on it has logs
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml())
            if self.step == 0:
                self.save(self.run_dir / "checkpoints" / "init.pt")
        self.t_start = time.perf_counter()
        self.t_cb = 0.0
        self.last_log = (self.step - self.step % self.log_every, self.t_start)
        self.next_event = self._next_event()

    def _start_callbacks(self) -> None:
        """Each callback's ``on_train_start``, timed (``start_s``), the progress bar last; a slow
        one (K_∞, the limit ODE) is announced on stderr first and its time after (``notes``)."""
        self.start_s: dict[str, float] = {}
        self.limit_s = 0.0  # the announced part: limit kernel, limit ODE
        for cb in sorted(self.callbacks, key=lambda cb: isinstance(cb, ProgressCallback)):
            note = start_note(cb, self.state)
            if note and self.notes:
                print(f"ntk_rnn: {self.label}{note} ...", file=sys.stderr, flush=True)
            tc = time.perf_counter()
            cb.on_train_start(self.state)
            self.start_s[cb.name] = time.perf_counter() - tc
            self.limit_s += self.start_s[cb.name] if note else 0.0
            if note and self.notes:
                print(f"ntk_rnn: {self.label}... done in {self.start_s[cb.name]:.1f} s",
                      file=sys.stderr, flush=True)

    def _make_writer(self) -> RunWriter:
        """Resumed from step k: readers drop what older event files hold after k (purge_step)
        and nothing is logged again for <= k."""
        if self.resumed_from is not None:
            purge, floor = self.step + 1, self.step
        else:  # starting over where older event files lie: hide them all
            purge, floor = (0 if self._fresh_logs else None), -1
        if self.run_dir is None or not tensorboard_enabled(self.cfg):
            return RunWriter(None, floor)
        cfg, rd = self.cfg, self.run_dir
        return RunWriter(lambda: make_writer(cfg, rd, purge_step=purge), floor)

    def open_stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The data sequence from the current step on (replayed from its seed: exact resume)."""
        start = self.step
        if start >= self.n_steps:
            return
        gen = generator_from_seed(self.seeds["data"])
        seen = 0
        for X, Y in self.source.stream(gen, self.chunk_size):
            check_chunk(self.source, X, Y, self.chunk_size)
            if seen + X.shape[0] > start:
                lo = max(0, start - seen)
                yield X[lo:], Y[lo:]
            seen += X.shape[0]
            if seen >= self.n_steps:
                return
        raise ConfigError(f"data: {source_name(self.source)}.stream ended after {seen} "
                          f"elements; the run needs {self.n_steps}")

    def attach_stream(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Read the run's chunks from ``stream`` (``open_stream``'s, or a copy of one shared by
        members that read the same stream from the same step)."""
        self.stream = stream

    def next_chunk(self) -> None:
        """When the chunk is done: the next one from the stream, or at the last step the run
        ends (``end``). A stream that fails or ends early is a ConfigError."""
        if self.chunk is not None and not self.chunk.done:
            return
        if self.step >= self.n_steps:
            self.end()
            return
        try:
            X, Y = next(self.stream)
        except StopIteration:
            raise ConfigError(f"data: the stream ended at step {self.step}; the run needs "
                              f"{self.n_steps}") from None
        self.start_chunk(X, Y)

    def start_chunk(self, X: torch.Tensor, Y: torch.Tensor) -> Chunk:
        """A chunk of the stream (cut at the last step), on the model's device and dtype."""
        p = next(self.model.parameters())
        X = X[: self.n_steps - self.step].to(p.device, p.dtype)
        Y = Y[: self.n_steps - self.step].to(p.device, p.dtype)
        # the state before the chunk: the last good one, in case it diverges
        self.chunk = Chunk(X, Y, torch.empty_like(Y), self.step, self.snapshot())
        return self.chunk

    def segment(self, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next L steps of the chunk: X (L, d), Y (L,) and where their Ŷ go (L,) (views)."""
        c, j = self.chunk, self.chunk.j
        return c.X[j:j + L], c.Y[j:j + L], c.y_hat[j:j + L]

    def steps_to_event(self) -> int:
        """Steps until the next event (log, callback, end of run) or the end of the chunk."""
        return min(self.chunk.T - self.chunk.j, self.next_event - self.step)

    def running_mse(self) -> float:
        return float(self.sq_err.mean()) if self.step > 0 else float("nan")

    def _next_event(self) -> int:
        s = self.step
        nxt = [self.n_steps, (s // self.log_every + 1) * self.log_every]
        nxt += [(s // cb.every_n_steps + 1) * cb.every_n_steps for cb in self.callbacks]
        return min(nxt)

    def advance(self, y_hat: torch.Tensor) -> None:
        """The stepper has run the ``segment`` of L steps, predicting ``y_hat`` (L,): segment
        callbacks see them; at an event or the chunk's end the errors are recorded (divergence
        stops the run); at an event the trainer logs and the callbacks run."""
        chunk = self.chunk
        L = y_hat.shape[0]
        j0, j1 = chunk.j, chunk.j + L
        if y_hat.data_ptr() != chunk.y_hat.data_ptr() + j0 * y_hat.element_size():  # (E = 1
            # predicts in place: y_hat is then the view segment() gave)
            chunk.y_hat[j0:j1] = y_hat
        self.step += L
        chunk.j = j1
        st = self.state
        st.step = self.step
        for cb in self.segment_callbacks:
            cb.on_segment(chunk.X[j0:j1], chunk.Y[j0:j1], chunk.y_hat[j0:j1], st)
        if self.step == self.next_event or chunk.done:
            self.record()
        if self.step != self.next_event:
            return
        st.x, st.y, st.y_hat = chunk.X[j1 - 1], chunk.Y[j1 - 1], chunk.y_hat[j1 - 1]
        st.running_mse = self.running_mse()
        if self.step % self.log_every == 0 or self.step == self.n_steps:
            now = time.perf_counter()
            self._log_train(now)
            self.last_log = (self.step, now)
        tc = time.perf_counter()
        for cb in self.step_callbacks:
            if cb.due(self.step) or self.step == self.n_steps:
                cb.on_step_end(self.step, st)
        self.t_cb += time.perf_counter() - tc
        self.next_event = self._next_event()

    def record(self) -> None:
        """Store (Y − Ŷ)² of the chunk so far; stop with the last good state on NaN/Inf/blow-up."""
        chunk = self.chunk
        k0, snapshot = chunk.k0, chunk.snapshot
        r, j = chunk.recorded, chunk.j  # the steps of the chunk not recorded yet
        err2 = (chunk.Y[r:j] - chunk.y_hat[r:j]).double().cpu() ** 2
        chunk.recorded = j
        self._ring[torch.arange(k0 + r, k0 + j) % self.mse_window] = err2
        self.loss_sum += float(err2.sum())
        bad = ~torch.isfinite(err2) | (err2 > self.err2_bound)
        if bad.any():
            k_bad = k0 + r + int(bad.nonzero()[0, 0])
            where = ""
            if self.run_dir is not None:
                payload = self.state_payload()
                payload.update(snapshot)
                self.save(self.run_dir / "checkpoints" / "last_good.pt", payload)
                where = (f". Logs and the last good state (step {snapshot['step']}) are in "
                         f"{self.run_dir}")
            what = ("NaN/Inf" if not torch.isfinite(err2).all()
                    else f"above {self.cfg.train.divergence_threshold}")
            msg = (f"training diverged at step {k_bad} (t={k_bad / self.width:.4g}): "
                   f"|Y - Ŷ| is {what}{where}; lower train.alpha (now {self.cfg.train.alpha})")
            self.write_metrics({"status": "diverged", "steps": k_bad, "error": msg})
            raise TrainingDiverged(msg)

    def _log_train(self, now: float) -> None:
        s0, t0 = self.last_log
        w = self.writer
        w.add_scalar(T.TRAIN_LOSS, 0.5 * self.loss_sum / max(1, self.step - s0), self.step)
        self.loss_sum = 0.0
        w.add_scalar(T.TRAIN_RUNNING_MSE, self.state.running_mse, self.step)
        w.add_scalar(T.TRAIN_T, self.step / self.width, self.step)
        if now > t0:
            w.add_scalar(T.TRAIN_STEPS_PER_S, (self.step - s0) / (now - t0), self.step)

    def interrupt(self, signum: int) -> TrainingInterrupted:
        """A signal: checkpoint the current state (a step boundary) and record why."""
        if self.chunk is not None:
            self.record()
        name = signal.Signals(signum).name
        path = (self.save(self.run_dir / "checkpoints" / f"step_{self.step:09d}.pt")
                if self.run_dir is not None else None)
        msg = (f"stopped by {name} at step {self.step} of {self.n_steps}"
               + (f"; the state is saved in {path}. To continue, {self.resume_hint}"
                  if path is not None else ""))
        self.write_metrics({"status": "interrupted", "steps": self.step, "signal": name,
                            "checkpoint": str(path), "error": msg})
        self.error = msg
        return TrainingInterrupted(msg, signum=signum, step=self.step, checkpoint=path)

    def abort(self, exc: BaseException, status: str) -> None:
        """This member stops on ``exc``: callbacks end (divergence, signal), the event file
        closes, and a failure is recorded in metrics.json."""
        if isinstance(exc, (TrainingDiverged, TrainingInterrupted)):
            for cb in self.callbacks:
                try:
                    cb.on_train_end(self.state)
                except Exception as err:  # never mask the divergence message
                    print(f"warning: callback {cb.name} failed at shutdown: {err}",
                          file=sys.stderr)
        self.writer.close()
        if status == "failed":
            self.write_metrics({"status": "failed", "steps": self.step, "error": str(exc)})
        self.status, self.error = status, self.error or str(exc)
        self.chunk = self.stream = None

    def end(self) -> dict:
        """The run completed: callbacks end, ``final.pt``, HParams, ``metrics.json`` (with what
        the trainer adds: backend, gradient mode, times)."""
        info = self.run_info(self)
        wall = time.perf_counter() - self.t_start
        st = self.state
        st.step, st.running_mse = self.step, self.running_mse()
        for cb in self.callbacks:
            cb.on_train_end(st)
        metrics = {
            "status": "completed",
            "steps": self.step,
            "t": self.step / self.width,
            T.RUNNING_MSE: st.running_mse,
            T.FINAL_LOSS: 0.5 * float(self._ring[(self.step - 1) % self.mse_window]),
            "wall_s": wall,
            "steps_per_s": (self.step - self.start_step) / wall if wall > 0 else float("nan"),
            "callback_s": self.t_cb,
            **info,
            **({"resumed_from_step": self.start_step} if self.resumed_from is not None else {}),
            **{k: v for k, v in st.metrics.items() if not k.startswith("_")},
            **_data_columns(self.source),
        }
        if self.run_dir is not None:  # the run's own record of its completion travels with it
            payload = self.state_payload()
            payload["final_metrics"] = {k: v for k, v in metrics.items() if _plain_value(v)}
            self.save(self.run_dir / "checkpoints" / "final.pt", payload)
        if self.writer.writes_files:  # (the same HParams with or without a resume)
            write_hparams(self.writer.open(), self.cfg,
                          {k: v for k, v in metrics.items()
                           if k != "resumed_from_step" and isinstance(v, (int, float))})
        self.writer.close()
        self.write_metrics(metrics)
        self.status, self.metrics, self.chunk, self.stream = "completed", metrics, None, None
        return metrics


def _plain_value(v: Any) -> bool:
    """A value a checkpoint (``weights_only``) and metrics.json both hold."""
    if isinstance(v, (list, tuple)):
        return all(isinstance(x, (bool, int, float, str)) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _data_columns(source: Any) -> dict:
    """The input columns and the target of a file source (metrics.json says what was learned)."""
    cols, target = getattr(source, "columns", None), getattr(source, "target_column", None)
    if isinstance(cols, (list, tuple)) and target is not None:
        return {"input_columns": [str(c) for c in cols], "target_column": str(target)}
    return {}
