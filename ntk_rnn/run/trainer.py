"""The training loop: online SGD along one long ergodic sequence (theory §3), for E >= 1 networks.

    from ntk_rnn import MeanFieldRNN, Trainer, NTKCallback
    from ntk_rnn.data import VAR1
    trainer = Trainer(model=MeanFieldRNN(input_dim=1, width=256), data=VAR1(), alpha=4.0,
                      horizon=2.0, callbacks=[NTKCallback(every_n_steps=64)], seed=0)
    metrics = trainer.fit()                    # the metrics.json dict
    trainer.history["ntk/drift_from_init"]     # [(step, value), ...]

Each step k reads (X_k, Y_k), predicts Ŷ_k with the current θ, then moves every parameter at once:

    θ ← θ + α_N (Y_k − Ŷ_k) ∂Ŷ_k/∂θ,     α_N = α N^{2β−2},     t = k / N,

with ∂Ŷ_k/∂θ exact by RTRL (Models D and F: `N^{-β} (S, c P, c Q)`, see
`ntk_rnn.online.rtrl`) or truncated. One stepper (`ntk_rnn.online.stepper.make_stepper`, picked
from the model family) runs many steps of every network per call; the loop in `Trainer._fit`
stops it at every event — a log point, a callback, the end of a chunk of the stream — where each
`Member` records its errors and its callbacks see the state.

A run is determined by its config and seed: θ_0 is drawn from the seed's model stream whichever
way the model was built, so the same settings from the CLI and from Python give the same numbers.
With ``ensemble_size`` E > 1 member e is exactly the single run with seed + e, each in
``<run_dir>/member_{e:03d}/``, all moved by one batched stepper; ``ensemble.json`` sums them up.
``run_dir=None`` writes nothing (no event file, config, checkpoint or metrics.json).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import tags as T
from ..callbacks.base import Callback
from ..callbacks.progress import ProgressCallback, interactive, progress_bar
from ..checkpoint import atomic_write_text
from ..data.base import source_name
from ..errors import ConfigError, TrainingDiverged
from ..online.stepper import make_stepper, online_state, resolve_gradient, stack_segments
from .build import (
    build_callbacks,
    build_model,
    build_source,
    describe,
    member_config,
    member_dir,
    model_node,
    run_seeds,
    seed_model,
)
from .config import Config, num_steps, opt, validate
from .lock import RunLock
from .member import Member
from .resources import check_resources
from .signals import StopSignals, TrainingInterrupted

# metrics.json's time measurements: the only numbers that differ between equal runs (a resumed
# run's limit_s is 0: K_∞ comes from the checkpoint)
TIMING_KEYS = ("wall_s", "build_s", "setup_s", "limit_s", "train_s", "steps_per_s", "callback_s",
               "ntk_features_reason")  # (the last: why the unit features ran, with timings)


class EnsembleIncomplete(TrainingDiverged):
    """Some members diverged or failed; the others completed (their results are written)."""


class Trainer:
    """Online SGD along one data stream for E >= 1 networks, with callbacks (theory §3).

    Each step k reads (X_k, Y_k), predicts Ŷ_k and moves every parameter at once,
    θ ← θ + α_N (Y_k − Ŷ_k) ∂Ŷ_k/∂θ with α_N = α N^{2β−2}; the limit time is t = k / N.
    A run is determined by its settings and seed: θ_0 is drawn from the seed (the model's
    `reset_parameters(generator)`), so the same settings from the command line and from Python
    give the same numbers. Nothing is written before every member is built and checked.

    Example:
        ```python
        from ntk_rnn import MeanFieldRNN, NTKCallback, Trainer
        from ntk_rnn.data import VAR1
        trainer = Trainer(model=MeanFieldRNN(input_dim=1, width=256), data=VAR1(),
                          alpha=4.0, horizon=2.0, callbacks=[NTKCallback()], seed=0)
        metrics = trainer.fit()                  # the metrics.json dict
        trainer.history["ntk/drift_from_init"]   # [(step, value), ...]
        ```

    Args:
        model: The network, an `nn.Module` mapping windows (B, L, d) to outputs (B, L):
            `MeanFieldRNN` (Models D and F), `ElmanRNN`, `GRURNN` or your own. Its θ_0 is
            redrawn from the seed when it has `reset_parameters(generator)`; otherwise it keeps
            the θ_0 it was built with, and the trainer warns that the seed does not fix it.
        data: The data stream, a `SequenceSource` (`ntk_rnn.data`: `VAR1`, `MarkovChain`,
            `FileSeries`, ... or your own class with `stream`, `windows` and `input_dim`).
        callbacks: What runs during training (`NTKCallback`, `OutputTrackingCallback`,
            `CheckpointCallback`, `ProgressCallback`, or your own `Callback`).
        seed: The run's seed: θ_0, the probe draws and (unless `data_seed` is set) the data
            stream. With `ensemble_size=E`, member e uses `seed + e`.
        data_seed: The data stream's own seed (None: from `seed`).
        run_dir: Where the run's files go (`config.yaml`, TensorBoard event files,
            `checkpoints/`, `metrics.json`), exactly as a command-line run writes them.
            None writes nothing.
        tensorboard: Write TensorBoard event files into `run_dir`.
        progress: Show a progress bar and announce slow start-up phases (the limit kernel
            K_∞, the limit ODE) with their times on stderr. None (default): on when stderr
            is a terminal or in a Jupyter notebook (tqdm's widget when ipywidgets is
            installed, its text bar otherwise). A `ProgressCallback` among `callbacks` draws
            its own bar.
        **train: Any `train.*` setting of [`TrainConfig`][ntk_rnn.run.config.TrainConfig],
            with the same default as on the command line. The main ones: `alpha` (α > 0, the
            step size is α N^{2β−2}; default 4.0), `horizon` (the limit time t to train to;
            steps = round(horizon · N); default 4.0), `steps` (a number of steps instead),
            `gradient` (`auto`, `rtrl`, `truncated` or `bptt`), `ensemble_size` (E networks
            trained together). An unknown keyword is a `ConfigError` listing them.

    Raises:
        ConfigError: A setting out of range, an unusable model or data source, a callback
            with bad settings; raised before anything is written.

    Attributes:
        members: Each network's run; `members[e].history`, `.metrics` and `.model` of
            ensemble member e (a single run is `members[0]`, which the properties below read).
        run_dir: Where the run's files go (None: nowhere).
        cfg: The config the run is described by (`config.yaml`), defaults filled in.
        status: `pending`, `running`, `completed`, `incomplete` (an ensemble with failed
            members), `interrupted` or `failed`.

    The command line builds a trainer from its composed config with
    [`from_config`][ntk_rnn.Trainer.from_config].
    """

    def __init__(self, model: torch.nn.Module | None = None, data: Any = None, *,
                 callbacks: Sequence[Callback] = (), seed: int = 0,
                 data_seed: Optional[int] = None, run_dir: str | Path | None = None,
                 tensorboard: bool = True, progress: Optional[bool] = None,
                 **train: Any) -> None:
        self._t_built = time.perf_counter()
        _cfg = train.pop("_cfg", None)  # from_config's (not a train.* setting)
        python = _cfg is None
        if _cfg is None:  # the Python API: a config describing the objects given
            if model is None or data is None:
                raise ConfigError("Trainer needs model= and data= (or Trainer.from_config(cfg))")
            models, source, cbs = model, data, list(callbacks)
            _cfg = python_config(model, data, cbs, seed, data_seed, tensorboard, train)
        else:
            models = source = cbs = None
        self.cfg = cfg = _cfg
        validate(cfg)  # nothing is written before the whole run is built and checked
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.E = int(opt(cfg.train, "ensemble_size", 1))
        # Python: progress=None is on where someone watches (a terminal, a notebook); the CLI's
        # bar is callbacks.progress, and it announces slow start-up phases always
        show = interactive() if progress is None else bool(progress)
        self._notes = show or not python
        self.backend_asked = str(opt(cfg.train, "backend", "auto"))
        self.stepper: Any = None  # (built by fit: _stepper_of)
        self._stepper_ids: list[int] = []
        self.members: list[Member] = []
        for e in range(self.E):
            cfg_e = member_config(cfg, e) if self.E > 1 else cfg
            dir_e = (None if self.run_dir is None else
                     self.run_dir / member_dir(e) if self.E > 1 else self.run_dir)
            self.members.append(self._member(e, cfg_e, dir_e, source, models, cbs))
        self.gradient = str(cfg.train.gradient)  # (resolved from auto by _member)
        self._check_resume_mode()
        self.network_steps, self.stepper_s, self.wall_s = 0, 0.0, 0.0
        self.setup_s = 0.0  # fit's start-up: writers, callbacks' on_train_start (K_∞), files
        self.status = "pending"
        self._locks: list[RunLock] = []
        # one progress bar for the ensemble instead of one per member
        self.progress = [cb for cb in self.members[0].callbacks if isinstance(cb, ProgressCallback)]
        if self.E > 1:
            for m in self.members:
                m.drop_callbacks(ProgressCallback)
        self.own_bar = python and show and not self.progress
        self.build_s = time.perf_counter() - self._t_built

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path | None) -> Trainer:
        """The run a composed config describes (what `python -m ntk_rnn.train` does).

        Args:
            cfg: The composed config (`conf/config.yaml` with overrides), a `DictConfig` or a
                `Config` dataclass.
            run_dir: Where the run's files go; None writes nothing.
        """
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.structured(cfg)
        return cls(_cfg=cfg, run_dir=run_dir)

    # --- building -----------------------------------------------------------------------
    def _member(self, e: int, cfg: Any, run_dir: Optional[Path], source: Any, model: Any,
                callbacks: Optional[list]) -> Member:
        seeds = run_seeds(cfg)
        factory = None
        if model is None:  # from the config
            source = build_source(cfg.data)
            check_resources(cfg, source.input_dim)  # before the model allocates anything
            model = build_model(cfg, source.input_dim, seeds["model"])
            callbacks = build_callbacks(cfg)
            factory = width_factory(cfg, source.input_dim)
        else:  # Python objects: member 0 uses them, the others deep copies (θ_0 from the seed)
            source = build_source(source) if e == 0 else source
            model = model if e == 0 else copy.deepcopy(model)
            if e == 0:
                warn_unseeded(model, int(cfg.seed))
            seed_model(model, seeds["model"], cfg.dtype, cfg.device)
            callbacks = callbacks if e == 0 else copy.deepcopy(callbacks)  # (named, checked)
        complete_model_config(cfg, model)
        gradient = resolve_gradient(cfg.train.gradient, model)
        for c in {id(cfg): cfg, id(self.cfg): self.cfg}.values():  # config.yaml says which ran
            with open_dict(c):
                c.train.gradient = gradient
        n_steps = num_steps(cfg, width=int(getattr(model, "width", 0)) or None)
        available = getattr(source, "num_steps", None)
        if available is not None and n_steps > available:
            hint = ("set data.cycle=true" if not getattr(source, "cycle", False)
                    else "the source cannot supply more")
            raise ConfigError(
                f"train: the run needs {n_steps} steps but data ({source_name(source)}) holds "
                f"{available}; lower train.horizon/train.steps or {hint}")
        alpha = float(cfg.train.alpha)
        lr = model.learning_rate(alpha) if callable(getattr(model, "learning_rate", None)) \
            else alpha
        online = online_state(model, lr, gradient, int(opt(cfg.train, "bptt_window", 32)))
        return Member(e, cfg, run_dir, source, model, online, lr, callbacks, seeds, n_steps,
                      model_factory=factory, run_info=self._run_info, ensemble=self.E > 1,
                      notes=self._notes)

    def _check_resume_mode(self) -> None:
        mode = opt(self.cfg.train, "resume", False)
        if self.E > 1 and mode not in (False, None) and self.run_dir is not None and \
                (self.run_dir / "checkpoints").is_dir():
            raise ConfigError(f"train.resume: {self.run_dir} holds a single run (checkpoints/), "
                              f"not an ensemble; resume it without train.ensemble_size={self.E}")
        for m in self.members:
            m.resume(mode)

    # --- one writer per run directory -------------------------------------------------------
    def lock(self) -> None:
        """Take the run directory's lock (and each ensemble member's): one writer per directory;
        :class:`~ntk_rnn.run.lock.RunDirLocked` names the holder. ``fit`` takes it when not
        already held; ``unlock`` gives it back."""
        if self.run_dir is None or self._locks:
            return
        dirs = [self.run_dir] + ([m.run_dir for m in self.members] if self.E > 1 else [])
        try:
            for d in dirs:
                self._locks.append(RunLock(d).acquire())
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        for lk in reversed(self._locks):
            lk.release()
        self._locks = []

    # --- what a notebook reads ------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The network of a single run (member 0 of an ensemble)."""
        return self.members[0].model

    @property
    def step(self) -> int:
        """Steps done (member 0 of an ensemble)."""
        return self.members[0].step

    @property
    def n_steps(self) -> int:
        """Steps of the whole run: round(horizon · N), or `steps` (member 0)."""
        return self.members[0].n_steps

    @property
    def online(self) -> Any:
        """The online gradient state (RTRL's S, P, Q; member 0)."""
        return self.members[0].online

    @property
    def sq_err(self) -> torch.Tensor:
        """(Y_k − Ŷ_k)² of the last ``train.mse_window`` steps done, oldest first (member 0):
        what the running MSE averages. Bounded by the window, so memory and checkpoints do not
        grow with the number of steps; the whole curve is ``history["train/loss"]``."""
        return self.members[0].sq_err

    @property
    def callbacks(self) -> list[Callback]:
        """The callbacks of the run (member 0 of an ensemble)."""
        return self.members[0].callbacks

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every scalar logged: tag -> [(step, value), ...] (member 0 of an ensemble; each
        member's is ``trainer.members[e].history``)."""
        return self.members[0].history

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.status == "running"]

    # --- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the horizon.

        Returns:
            `metrics.json`'s dict (E = 1): `status`, `steps`, `t`, `running_mse`, `final_loss`,
            the times `wall_s` (the whole run: building it, the start-up, the steps),
            `build_s`, `setup_s` (callbacks' start-up, files), `limit_s` (its part computing
            K_∞ and the limit ODE), `train_s` (the steps), `steps_per_s`, `backend`,
            `gradient`, and what the callbacks add (`ntk_*`, ...). An ensemble (E > 1) returns
            its summary, `ensemble.json`'s dict.

        Raises:
            TrainingDiverged: The loss became NaN/Inf or exceeded `divergence_threshold`
                (`checkpoints/last_good.pt` keeps the last good state).
            TrainingInterrupted: SIGTERM or SIGINT; the state is checkpointed first.
        """
        own = not self._locks
        self.lock()
        try:
            return self._fit()
        finally:
            if own:
                self.unlock()

    def _fit(self) -> dict:
        for m in self.members:
            m.prepare()
        if all(m.status == "completed" for m in self.members):
            return self._finished()
        self.status = "running"
        self._write_summary()
        t0, bar = time.perf_counter(), None
        self._t_fit = t0
        with StopSignals() as stop:  # SIGTERM/SIGINT: checkpoint at the next boundary, then stop
            try:
                for m in self.members:
                    if m.status == "pending":
                        m.begin()
                self._open_streams()
                self.setup_s = time.perf_counter() - t0
                bar = self._progress_bar()
                while self._next_chunks():  # each member's next chunk; a finished run ends here
                    for lk in self._locks:
                        lk.heartbeat()
                    if stop.signum is not None:
                        self._interrupt(stop.signum)
                    active = self.active
                    L = min(m.steps_to_event() for m in active)
                    # L online SGD steps of every active network, in one stepper call:
                    #   Ŷ_k = f_θ(X_k);  θ ← θ + α_N (Y_k − Ŷ_k) ∂Ŷ_k/∂θ
                    ts = time.perf_counter()
                    X, Y, Y_hat = stack_segments([m.segment(L) for m in active])
                    self._stepper_of(active).run_chunk(X, Y, Y_hat)
                    self.stepper_s += time.perf_counter() - ts
                    self.network_steps += L * len(active)
                    for m, y_hat in zip(active, Y_hat.unbind(0)):  # errors, logs, callbacks
                        try:
                            m.advance(y_hat)
                        except TrainingDiverged as exc:
                            self._drop(m, "diverged", exc)
                    if bar is not None:
                        self._update_bar(bar)
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, TrainingInterrupted) else "failed"
                for m in self.active:
                    m.abort(exc, "interrupted" if status == "interrupted" else "aborted")
                self.status = status
                self.wall_s = time.perf_counter() - t0 + self.build_s
                self._write_summary()
                raise
            finally:
                if bar is not None:
                    done = [m.step for m in self.members if m.status == "completed"]
                    if done and max(done) > bar.n:
                        bar.update(max(done) - bar.n)
                    bar.close()
        self.wall_s = time.perf_counter() - t0 + self.build_s
        return self._finished()

    def _finished(self) -> dict:
        done = [m for m in self.members if m.status == "completed"]
        self.status = "completed" if len(done) == self.E else "incomplete"
        if self.E == 1:
            return self.members[0].metrics
        summary = self._write_summary()
        if self.status != "completed":
            bad = [m for m in self.members if m.status != "completed"]
            shown = "; ".join(f"{member_dir(m.e)} {m.status}: {m.error}" for m in bad[:3])
            where = f" (see {self.run_dir / 'ensemble.json'})" if self.run_dir else ""
            raise EnsembleIncomplete(f"{len(bad)} of {self.E} members did not complete, the "
                                     f"others did{where}: {shown}")
        return summary

    def _open_streams(self) -> None:
        """Each member's stream from its step; members that read the same stream from the same
        step (a shared stream) share one generator (``itertools.tee``)."""
        groups: dict[tuple, list[Member]] = {}
        for m in self.active:
            groups.setdefault((m.seeds["data"], m.step), []).append(m)
        for ms in groups.values():
            for m, it in zip(ms, itertools.tee(ms[0].open_stream(), len(ms)), strict=True):
                m.attach_stream(it)

    def _next_chunks(self) -> bool:
        """A member whose chunk is done gets its next one, or ends (its last step); a data error
        fails that member alone. False when no member is left running."""
        for m in self.active:
            try:
                m.next_chunk()
            except ConfigError as exc:
                self._drop(m, "failed", exc)
        return bool(self.active)

    def _run_info(self, m: Optional[Member] = None) -> dict:
        """What metrics.json (and, without ``m``, a checkpoint) records from the trainer: the
        stepper that ran and, for member ``m``, where the time went (``wall_s`` the whole run:
        building it, the start-up, the steps)."""
        info = {"backend": self.backend, "gradient": self.gradient}
        restored = self.members[0].restored_info
        if self.stepper is None and restored and self.gradient != "bptt" and \
                self.backend_asked == "auto":  # resumed at the end: what ran before
            info["backend"] = restored.get("backend", info["backend"])
        if m is not None:
            now = time.perf_counter()
            info.update(wall_s=now - self._t_fit + self.build_s, build_s=self.build_s,
                        setup_s=self.setup_s, limit_s=m.limit_s, train_s=now - m.t_start)
        return info

    @property
    def backend(self) -> str:
        """The stepper that ran: `kernel` (compiled C), `eager`, `graphs`, `reference`, or
        `bptt-<engine>` for truncated BPTT."""
        if self.stepper is not None:
            return self.stepper.backend
        if self.gradient == "bptt":
            return f"bptt-{getattr(self.members[0].online, 'engine', 'autograd')}"
        return self.backend_asked

    def _drop(self, m: Member, status: str, exc: BaseException) -> None:
        """Member m stops (its metrics.json says why; a diverged one keeps last_good.pt)."""
        m.abort(exc, status)
        if self.E == 1:
            raise exc
        print(f"ntk_rnn: {member_dir(m.e)} (seed {m.seed}) {status}: {exc}", file=sys.stderr)

    def _stepper_of(self, active: list[Member]) -> Any:
        """The active networks' stepper (`make_stepper`, from the model family), rebuilt when one
        leaves."""
        ids = [m.e for m in active]
        if self.stepper is None or ids != self._stepper_ids:
            self.stepper = make_stepper([m.model for m in active], [m.lr for m in active],
                                        [m.online for m in active], self.gradient,
                                        self.backend_asked)
            self._stepper_ids = ids
        return self.stepper

    def _interrupt(self, signum: int) -> None:
        """A signal: every active member checkpoints its current step and records why."""
        errs = []
        for m in self.active:
            try:
                errs.append(m.interrupt(signum))
            except TrainingDiverged as exc:
                self._drop(m, "diverged", exc)
        if self.E == 1 and errs:
            raise errs[0]
        steps = [e.step for e in errs]
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name}; {len(steps)} members saved their state at "
            f"step "
            f"{min(steps) if steps else '-'} in {self.run_dir}/member_*/checkpoints. To continue, "
            f"run the same command again with train.resume=true and hydra.run.dir={self.run_dir}",
            signum=signum, step=min(steps) if steps else -1, checkpoint=None)

    # --- progress and the ensemble's summary ----------------------------------------------
    def _progress_bar(self) -> Any:
        """The trainer's own bar: an ensemble's (one for all members), or a Python run's with
        ``progress`` on and no ProgressCallback (a single run's callback draws its own)."""
        if not self.own_bar and (self.E == 1 or not self.progress):
            return None
        steps = [m.step for m in self.active]
        n = self.members[0].n_steps
        return progress_bar(total=n, initial=min(steps) if steps else n)

    def _update_bar(self, bar: Any) -> None:
        active = self.active
        if not active:
            return
        bar.update(min(m.step for m in active) - bar.n)
        mse = [m.state.running_mse for m in active]
        if self.E > 1:
            bar.set_postfix(members=f"{len(active)}/{self.E}",
                            mse=f"{sum(mse) / len(mse):.4g}", refresh=False)
        else:
            bar.set_postfix(t=f"{active[0].state.t:.3f}", mse=f"{mse[0]:.4g}", refresh=False)

    def summary(self) -> dict:
        """The ensemble's summary (``ensemble.json``): status and metrics of every member."""
        members = []
        for m in self.members:
            row = {"member": m.e, "dir": member_dir(m.e), "seed": m.seed,
                   "data_seed": opt(m.cfg, "data_seed"), "status": m.status,
                   "steps": m.metrics.get("steps", m.step)}
            for k in T.SUMMARY_KEYS:
                if k in m.metrics:
                    row[k] = m.metrics[k]
            if m.error:
                row["error"] = m.error
            members.append(row)
        done = [r[T.RUNNING_MSE] for r in members
                if r["status"] == "completed" and isinstance(r.get(T.RUNNING_MSE), float)]
        counts: dict[str, int] = {}
        for r in members:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        wall = self.wall_s
        return {
            "status": self.status,
            "ensemble_size": self.E,
            "seeds": [r["seed"] for r in members],
            "shared_stream": bool(opt(self.cfg.train, "shared_stream", False)),
            "data_seeds": [r["data_seed"] for r in members],
            "steps": self.members[0].n_steps,
            "wall_s": wall,
            "network_steps": self.network_steps,
            "network_steps_per_s": self.network_steps / wall if wall > 0 else None,
            "stepper_s": self.stepper_s,
            "stepper_network_steps_per_s": (self.network_steps / self.stepper_s
                                            if self.stepper_s > 0 else None),
            "backend": self.backend,
            "gradient": self.gradient,
            "threads": 1,
            "counts": counts,
            T.RUNNING_MSE: sum(done) / len(done) if done else None,  # mean over completed
            "members": members,
        }

    def _write_summary(self) -> dict:
        s = self.summary()
        if self.E == 1 or self.run_dir is None:
            return s
        if self.status == "completed" and all(m.completed is not None for m in self.members):
            try:  # resumed after everything completed: the summary on disk stands
                done = json.loads((self.run_dir / "ensemble.json").read_text())
                if done.get("status") == "completed" and done.get("ensemble_size") == self.E:
                    return done
            except (OSError, ValueError):
                pass
        clean = json.loads(json.dumps(s, default=float), parse_constant=lambda _: None)
        atomic_write_text(self.run_dir / "ensemble.json", json.dumps(clean, indent=2))
        return s


def warn_unseeded(model: torch.nn.Module, seed: int) -> None:
    """A Python-built module without ``reset_parameters(generator)`` keeps the θ_0 its
    constructor drew from torch's global RNG: the run's seed does not determine it."""
    reset = getattr(model, "reset_parameters", None)
    if callable(reset) and "generator" in inspect.signature(reset).parameters:
        return
    warnings.warn(
        f"Trainer: {type(model).__qualname__} has no reset_parameters(generator), so θ_0 is what "
        f"its constructor drew from torch's global RNG, not determined by seed={seed} (ensemble "
        "members start from copies of it); call torch.manual_seed(...) before building the "
        "model, or give it reset_parameters(generator)", UserWarning, stacklevel=4)


def width_factory(cfg: DictConfig, input_dim: int) -> Any:
    """``factory(width, seed)``: the run's model config built at another width with θ_0 from
    ``seed`` (the Monte-Carlo limit's networks for a config-built model without ``at_width``)."""
    node = copy.deepcopy(cfg)

    def factory(width: int, seed: int) -> torch.nn.Module:
        c = copy.deepcopy(node)
        with open_dict(c):
            c.model.width = int(width)
        return build_model(c, input_dim, int(seed))
    return factory


def complete_model_config(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Fill ``cfg.model`` with every setting of the built model (the class defaults a preset did
    not set), so config.yaml, HParams and callbacks see the whole model."""
    full = OmegaConf.merge(OmegaConf.create(model_node(model)), cfg.model)
    with open_dict(cfg):
        cfg.model = full


def python_config(model: Any, data: Any, callbacks: list[Callback], seed: int,
                  data_seed: Optional[int], tensorboard: bool, train: dict) -> DictConfig:
    """The config a Python-built run is described by (config.yaml, HParams, resume checks):
    the schema's defaults, ``train`` overrides, and the objects' own settings."""
    cfg = OmegaConf.structured(Config)
    known = set(cfg.train.keys())
    unknown = sorted(set(train) - known)
    if unknown:
        raise ConfigError(f"Trainer got unknown settings {unknown}; train settings are "
                          f"{sorted(known)}")
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(
        p.dtype if p is not None else torch.float32, "float32")
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks[{i}] is a {type(cb).__name__}, not an "
                              "ntk_rnn.callbacks.Callback")
        if cb.name == Callback.name:  # (its checkpoint state and config entry go by name)
            cb.name = type(cb).__name__.lower()
    with open_dict(cfg):
        cfg.model = model_node(model)
        cfg.data = describe(data)
        cfg.callbacks = {cb.name: describe(cb) for cb in callbacks}
        cfg.seed, cfg.data_seed = int(seed), data_seed
        cfg.dtype, cfg.device = dtype, str(p.device) if p is not None else "cpu"
        cfg.logger.tensorboard = bool(tensorboard)
        for k, v in train.items():
            cfg.train[k] = v
    return cfg
