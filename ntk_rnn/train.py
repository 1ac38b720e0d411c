"""Online SGD along one long ergodic sequence (theory §3), configured by Hydra.

    python -m ntk_rnn.train model.width=1024 model.beta=0.6 train.horizon=2 seed=3
    python -m ntk_rnn.train -m model.width=256,1024 model.beta=0.6,0.9 seed=0,1

Each step k reads (X_k, Y_k), predicts Ŷ_k, and moves c, w, b at once by
α N^{2β-2} (Y_k − Ŷ_k) N^{-β} (S, c P, c Q)  (``rtrl_step``). Time is t = k / N.

``train.resume=true|auto`` continues from the newest good checkpoint in the run directory and ends
in exactly the state an uninterrupted run reaches; SIGTERM/SIGINT during ``fit`` write a
checkpoint at the end of the current step, then stop (README, "Reliability").
"""

from __future__ import annotations

import inspect
import json
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from .callbacks.base import Callback, TrainState
from .callbacks.checkpoint import CheckpointCallback
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import check_callback_args, num_steps, opt, register_configs, validate
from .data.base import check_chunk, check_source, source_name
from .errors import ConfigError, TrainingDiverged
from .fast import FastStepper
from .init import InitLaw
from .logging import make_writer, tensorboard_enabled, write_hparams
from .model import MeanFieldRNN
from .rtrl import OnlineState, ReferenceStepper

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SEED_STREAMS = ("model", "data", "probe")


def derive_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for model init, data stream and probes from one run seed."""
    children = np.random.SeedSequence(int(seed)).spawn(len(SEED_STREAMS))
    return {k: int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for k, c in
            zip(SEED_STREAMS, children)}


def run_seeds(cfg: Any) -> dict[str, int]:
    """The run's seeds: all from ``seed``, except the data stream's from ``data_seed`` when set
    (the stream of run seed ``data_seed``: an ensemble's shared stream)."""
    seeds = derive_seeds(cfg.seed)
    data_seed = opt(cfg, "data_seed")
    if data_seed is not None:
        seeds["data"] = derive_seeds(data_seed)["data"]
    return seeds


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def build_source(data_cfg: Any) -> Any:
    """Instantiate ``data`` from its ``_target_``; a key the class does not take: a clear error."""
    if isinstance(data_cfg, DictConfig) and "_target_" in data_cfg:
        target = data_cfg._target_
        try:
            cls = get_class(target) if not callable(target) else target
        except Exception as exc:
            raise ConfigError(f"data._target_={target!r} cannot be imported ({exc})") from None
        params = inspect.signature(cls).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = [k for k in data_cfg if k != "_target_" and k not in params]
        if extra and not takes_kwargs:
            raise ConfigError(
                f"data._target_={target} does not accept {extra}; for a custom source start from "
                "the empty preset: data=custom data._target_=..."
            )
    try:
        source = instantiate(data_cfg, _convert_="all") if not _is_source(data_cfg) else data_cfg
    except ConfigError:
        raise
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        root = exc.__cause__ or exc  # hydra wraps the class's own exception
        text = str(root).strip().splitlines()
        raise ConfigError(f"data: could not build the source ({type(root).__name__}"
                          f"{': ' + text[0][:300] if text else ''})") from None
    return check_source(source)


def _is_source(obj: Any) -> bool:
    return hasattr(obj, "stream") and hasattr(obj, "windows")


def build_model(cfg: Any, input_dim: int, seed: int) -> MeanFieldRNN:
    m = cfg.model
    law = OmegaConf.to_container(m.init, resolve=True) if isinstance(m.init, DictConfig) \
        else dict(m.init)
    if law.get("sampler") is not None:
        law["sampler"] = instantiate(m.init.sampler)
    init = InitLaw(**law)
    return MeanFieldRNN(input_dim, int(m.width), beta=float(m.beta), activation=m.activation,
                        recurrence=m.recurrence, init=init, generator=generator(seed),
                        dtype=DTYPES[cfg.dtype], device=cfg.device)


def build_callbacks(cfg: Any) -> list[Callback]:
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        target = node.get("_target_") if hasattr(node, "get") else None
        if target is None:
            raise ConfigError(f"callbacks.{name} has no _target_ (a Callback class to build)")
        try:
            cls = get_class(target)
        except Exception as exc:
            raise ConfigError(f"callbacks.{name}._target_={target!r} cannot be imported "
                              f"({exc})") from None
        check_callback_args(name, node, cls)
        try:
            cb = instantiate(node)
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
            if cause is not None:
                raise cause from None
            raise ConfigError(f"callbacks.{name}: could not build {target} "
                              f"({str(exc).splitlines()[-1][:300]})") from None
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks.{name}: {type(cb).__name__} is not an "
                              "ntk_rnn.callbacks.Callback")
        cb.name = name
        out.append(cb)
    return out


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

    @property
    def T(self) -> int:
        return self.X.shape[0]

    @property
    def done(self) -> bool:
        return self.j >= self.T


class Trainer:
    """Builds the run from its config, then ``fit()`` runs the online loop top to bottom."""

    def __init__(self, cfg: Any, run_dir: str | Path) -> None:
        validate(cfg)  # nothing is written before the whole run is built and checked
        size = opt(cfg.train, "ensemble_size", 1)
        if size != 1:
            raise ConfigError(f"train.ensemble_size={size}: a Trainer runs one network; "
                              "ntk_rnn.train.train(cfg, run_dir) runs an ensemble")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seeds = run_seeds(cfg)
        self.source = build_source(cfg.data)
        self.model = build_model(cfg, self.source.input_dim, self.seeds["model"])
        self.n_steps = num_steps(cfg)
        available = getattr(self.source, "num_steps", None)
        if available is not None and self.n_steps > available:
            raise ConfigError(
                f"train: the run needs {self.n_steps} steps but data ({source_name(self.source)}) "
                f"holds {available}; lower train.horizon/train.steps or set data.cycle=true"
            )
        self.lr = self.model.learning_rate(cfg.train.alpha)
        self.gradient = cfg.train.gradient
        self.online = OnlineState.zeros(self.model)
        backend = str(cfg.train.get("backend", "auto"))
        self.stepper = (ReferenceStepper(self.model, self.online, self.lr, self.gradient)
                        if backend == "reference" else
                        FastStepper(self.model, self.lr, self.gradient, state=self.online,
                                    backend=backend))
        self.callbacks = build_callbacks(cfg)
        t = cfg.train
        self.log_every = int(t.log_every) or max(1, self.n_steps // 200)
        self.mse_window = int(t.mse_window) or self.model.width
        thr = float(t.divergence_threshold)  # (read once: config access is slow per event)
        self.err2_bound = thr * thr  # (inf for a huge threshold; ** would raise OverflowError)
        self.sq_err = torch.full((self.n_steps,), float("nan"), dtype=torch.float64)
        self.step = 0
        self.state = TrainState(
            model=self.model, online=self.online, source=self.source, cfg=cfg,
            run_dir=self.run_dir, n_steps=self.n_steps, lr=self.lr,
            generators={"probe": generator(self.seeds["probe"])},
            save_checkpoint=self.save,
        )
        for cb in self.callbacks:  # bad callback settings fail here, before any step
            cb.setup(self.state)
        self.resumed_from: Optional[Path] = None  # the checkpoint this run continues from
        self.completed: Optional[dict] = None  # metrics of a finished run asked to resume
        self._fresh_logs = False  # starting over in a directory that holds older event files
        self.resume_hint = (f"run the same command again with train.resume=true and "
                            f"hydra.run.dir={self.run_dir} (a sweep: hydra.sweep.dir=<its dir> "
                            "train.resume=auto)")
        self.resume(getattr(t, "resume", False))

    # --- state --------------------------------------------------------------------------
    def state_payload(self) -> dict:
        return {
            "step": self.step,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "online": {k: v.detach().cpu().clone() for k, v in self.online.state_dict().items()},
            "sq_err": self.sq_err[: self.step].clone(),
            "probe_rng": self.state.generators["probe"].get_state(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "config": OmegaConf.to_yaml(self.cfg, resolve=True) if isinstance(
                self.cfg, DictConfig) else str(self.cfg),
            "seed": int(self.cfg.seed),
        }

    def _snapshot(self) -> dict:
        """Step, parameters and RTRL state (cheap: O(N d)); see ``_record``."""
        return {
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "online": {k: v.detach().clone() for k, v in self.online.state_dict().items()},
        }

    def save(self, path: str | Path, payload: Optional[dict] = None) -> Path:
        """Write a checkpoint; the event files are flushed first, so every logged step up to the
        checkpoint's is on disk whenever the checkpoint is."""
        if self.state.writer is not None:
            self.state.writer.flush()
        return save_checkpoint(path, payload if payload is not None else self.state_payload())

    def restore(self, payload: dict) -> None:
        self.model.load_state_dict({k: v.to(self.model.c.device) for k, v in
                                    payload["model"].items()})
        self.online.load_state_dict({k: v.to(self.model.c.device) for k, v in
                                     payload["online"].items()})
        self.step = int(payload["step"])
        self.sq_err[: self.step] = payload["sq_err"]
        self.state.step, self.state.running_mse = self.step, self.running_mse()
        self.state.generators["probe"].set_state(payload["probe_rng"])
        for cb in self.callbacks:
            cb.load_state_dict(payload["callbacks"].get(cb.name, {}))

    def latest_checkpoint(self) -> Optional[dict]:
        """The newest readable checkpoint in the run directory (corrupt ones are skipped)."""
        found = self._find_checkpoint()
        return found[1] if found else None

    def _find_checkpoint(self) -> Optional[tuple[Path, dict]]:
        """(path, payload) of the newest readable ``step_*.pt``, preferring steps before the
        last one (so the final step, and each callback's final state, is redone on resume)."""
        folder = self.run_dir / "checkpoints"
        steps = {p: int(m.group(1)) for p in folder.glob("step_*.pt")
                 if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))}
        for path in sorted(steps, key=lambda p: (steps[p] < self.n_steps, steps[p]),
                           reverse=True):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                print(f"ntk_rnn: warning: {exc}; trying an older checkpoint", file=sys.stderr)
        return None

    def resume(self, mode: Any = True) -> bool:
        """Continue from the newest good checkpoint (``mode``: True = one must exist, "auto" =
        if one exists, False = start at step 0). A run that already completed is not redone."""
        if mode is False or mode is None:
            self._fresh_logs = any(self.run_dir.glob("events.out.tfevents.*"))
            return False
        if (self.run_dir / "ensemble.json").exists():
            raise ConfigError(f"train.resume: {self.run_dir} holds an ensemble (ensemble.json); "
                              "resume it with the same train.ensemble_size, or one member as a "
                              "single run in its member_<e> directory (README, Ensembles)")
        for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):  # a write cut short
            stale.unlink(missing_ok=True)
        done = self._completed_metrics()
        if done is not None:
            self._check_same_config(load_checkpoint(self.run_dir / "checkpoints" / "final.pt"))
            self.completed = done
            print(f"ntk_rnn: {self.run_dir} already completed {done.get('steps')} steps; "
                  "nothing to resume", file=sys.stderr)
            return True
        found = self._find_checkpoint()
        if found is None:
            if mode is True:
                raise ConfigError(f"train.resume=true but {self.run_dir / 'checkpoints'} holds no "
                                  "readable step_*.pt checkpoint; use train.resume=auto to start "
                                  "fresh when there is none")
            self._fresh_logs = any(self.run_dir.glob("events.out.tfevents.*"))
            return False
        path, payload = found
        self._check_same_config(payload)
        if int(payload["step"]) > self.n_steps:
            raise ConfigError(f"train.resume: {path} is at step {payload['step']}, past the "
                              f"{self.n_steps} steps of this run")
        self.restore(payload)
        self.resumed_from = path
        print(f"ntk_rnn: resuming from {path} (step {self.step} of {self.n_steps})",
              file=sys.stderr)
        return True

    def _completed_metrics(self) -> Optional[dict]:
        try:
            m = json.loads((self.run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict) or m.get("status") != "completed":
            return None
        if not (self.run_dir / "checkpoints" / "final.pt").exists():
            return None
        return m

    def _check_same_config(self, payload: dict) -> None:
        """A checkpoint continues only the run it came from: same config except the keys in
        ``RESUME_MAY_CHANGE``."""
        if not isinstance(self.cfg, DictConfig) or "config" not in payload:
            return
        old = _plain(OmegaConf.create(payload["config"]))
        new = _plain(OmegaConf.create(OmegaConf.to_yaml(self.cfg, resolve=True)))
        diff = [k for k in _diff_keys(old, new) if not k.startswith(RESUME_MAY_CHANGE)
                and not (k in ADDED_KEYS and _get(old, k) == "<absent>"
                         and _get(new, k) == ADDED_KEYS[k])]
        if diff:
            shown = ", ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in diff[:5])
            raise ConfigError(f"train.resume: the checkpoints in {self.run_dir} come from a run "
                              f"with a different config ({shown}); resume with the same "
                              "settings or use a new run directory")

    # --- the loop -----------------------------------------------------------------------
    def _stream(self, start: int):
        """The data sequence from element ``start`` on (replayed from its seed: exact resume)."""
        if start >= self.n_steps:
            return
        chunk = int(self.cfg.train.chunk_size)
        gen = generator(self.seeds["data"])
        seen = 0
        for X, Y in self.source.stream(gen, chunk):
            check_chunk(self.source, X, Y, chunk)
            if seen + X.shape[0] > start:
                lo = max(0, start - seen)
                yield X[lo:], Y[lo:]
            seen += X.shape[0]
        if seen < self.n_steps:
            raise ConfigError(f"data: {source_name(self.source)}.stream ended after {seen} "
                              f"elements; the run needs {self.n_steps}")

    def running_mse(self) -> float:
        lo = max(0, self.step - self.mse_window)
        return float(self.sq_err[lo: self.step].mean()) if self.step > lo else float("nan")

    def _next_event(self) -> int:
        s = self.step
        nxt = [self.n_steps, (s // self.log_every + 1) * self.log_every]
        nxt += [(s // cb.every_n_steps + 1) * cb.every_n_steps for cb in self.callbacks]
        return min(nxt)

    def fit(self) -> dict:
        if self.completed is not None:  # train.resume on a finished run: nothing to redo
            return self.completed
        stop = StopSignals()  # SIGTERM/SIGINT: checkpoint at the end of the step, then stop
        with stop:
            try:
                self.begin()
                if stop.signum is not None and self.step < self.n_steps:
                    self._interrupt(stop.signum)
                for X, Y in self._stream(self.step):
                    chunk = self.start_chunk(X, Y)
                    while not chunk.done:  # one stepper call to the next event (log, callback, end)
                        j, j1 = chunk.j, chunk.j + self.steps_to_event(chunk)
                        self.stepper.run_chunk(chunk.X[j:j1], chunk.Y[j:j1],
                                               out=chunk.y_hat[j:j1])
                        self.advance(chunk, j1)  # errors recorded; at an event: logs, callbacks
                        if stop.signum is not None and self.step < self.n_steps:
                            self._record(chunk)
                            self._interrupt(stop.signum)
                    if self.step >= self.n_steps:  # not one chunk more: a file may end here
                        break
            except BaseException as exc:
                self.abort(exc)
                raise
            return self.end()

    # --- the pieces of fit (an ensemble drives several trainers through them in lockstep) ----
    def begin(self) -> None:
        """Start-up: callbacks' on_train_start, the event file, config.yaml, ``init.pt``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        writer = self.state.writer = self._open_writer()
        self.start_step = self.step
        # at a step boundary checkpoints come after the other callbacks, so a checkpoint at step
        # k holds everything done for step k (and a resumed run redoes none of it)
        self.step_callbacks = sorted(self.callbacks,
                                     key=lambda cb: isinstance(cb, CheckpointCallback))
        for cb in self.callbacks:
            cb.on_train_start(self.state)
        if writer is not None:  # the run has started: from here on it has logs
            writer.open()
        (self.run_dir / "config.yaml").write_text(self.state_payload()["config"])
        if self.step == 0:
            self.save(self.run_dir / "checkpoints" / "init.pt")
        self.t_start = time.perf_counter()
        self.t_cb = 0.0
        self.last_log = (self.step - self.step % self.log_every, self.t_start)
        self.next_event = self._next_event()

    def start_chunk(self, X: torch.Tensor, Y: torch.Tensor) -> Chunk:
        """A chunk of the stream (cut at the last step), on the model's device and dtype."""
        dev, dtype = self.model.c.device, self.model.c.dtype
        X = X[: self.n_steps - self.step].to(dev, dtype)
        Y = Y[: self.n_steps - self.step].to(dev, dtype)
        # the state before the chunk: the last good one, in case it diverges
        return Chunk(X, Y, torch.empty_like(Y), self.step, self._snapshot())

    def steps_to_event(self, chunk: Chunk) -> int:
        """Steps until the next event (log, callback, end of run) or the end of the chunk."""
        return min(chunk.T - chunk.j, self.next_event - self.step)

    def advance(self, chunk: Chunk, j1: int) -> None:
        """The stepper has run the chunk up to ``j1``: record the errors (at an event or the end
        of the chunk) and, at an event, log and call the callbacks."""
        self.step += j1 - chunk.j
        chunk.j = j1
        if self.step == self.next_event or chunk.done:
            self._record(chunk)
        if self.step != self.next_event:
            return
        st, j = self.state, chunk.j
        st.step, st.x, st.y, st.y_hat = (self.step, chunk.X[j - 1], chunk.Y[j - 1],
                                         chunk.y_hat[j - 1])
        st.running_mse = self.running_mse()
        if self.step % self.log_every == 0 or self.step == self.n_steps:
            now = time.perf_counter()
            self._log_train(st.writer, self.last_log, now)
            self.last_log = (self.step, now)
        tc = time.perf_counter()
        for cb in self.step_callbacks:
            if cb.due(self.step) or self.step == self.n_steps:
                cb.on_step_end(self.step, st)
        self.t_cb += time.perf_counter() - tc
        self.next_event = self._next_event()

    def abort(self, exc: BaseException) -> None:
        """``fit`` stops on ``exc``: callbacks end (divergence, signal), the event file closes."""
        if isinstance(exc, (TrainingDiverged, TrainingInterrupted)):
            for cb in self.callbacks:
                _safe_end(cb, self.state)
        if self.state.writer is not None:
            self.state.writer.close()

    def end(self) -> dict:
        """The run completed: callbacks end, ``final.pt``, HParams, ``metrics.json``."""
        wall = time.perf_counter() - self.t_start
        st, writer = self.state, self.state.writer
        st.step, st.running_mse = self.step, self.running_mse()
        for cb in self.callbacks:
            cb.on_train_end(st)
        self.save(self.run_dir / "checkpoints" / "final.pt")
        metrics = {
            "status": "completed",
            "steps": self.step,
            "t": self.step / self.model.width,
            "running_mse": st.running_mse,
            "final_loss": 0.5 * float(self.sq_err[self.step - 1]),
            "wall_s": wall,
            "steps_per_s": (self.step - self.start_step) / wall if wall > 0 else float("nan"),
            "callback_s": self.t_cb,
            **({"resumed_from_step": self.start_step} if self.resumed_from is not None else {}),
            **{k: v for k, v in st.metrics.items() if not k.startswith("_")},
        }
        if writer is not None:  # (the same HParams with or without a resume)
            write_hparams(writer, self.cfg, {k: v for k, v in metrics.items()
                                             if k != "resumed_from_step"})
            writer.close()
        self.write_metrics(metrics)
        return metrics

    def _open_writer(self) -> Optional[RunWriter]:
        """The run's TensorBoard writer, opened on first use. Resumed from step k: readers drop
        what older event files hold after k (purge_step) and nothing is logged again for <= k."""
        if not tensorboard_enabled(self.cfg):
            return None
        if self.resumed_from is not None:
            purge, floor = self.step + 1, self.step
        else:  # starting over where older event files lie: hide them all
            purge, floor = (0 if self._fresh_logs else None), -1
        return RunWriter(lambda: make_writer(self.cfg, self.run_dir, purge_step=purge), floor)

    def _interrupt(self, signum: int) -> None:
        """Checkpoint the current state (a step boundary), record why, and stop."""
        name = signal.Signals(signum).name
        path = self.save(self.run_dir / "checkpoints" / f"step_{self.step:09d}.pt")
        msg = (f"stopped by {name} at step {self.step} of {self.n_steps}; the state is saved in "
               f"{path}. To continue, {self.resume_hint}")
        self.write_metrics({"status": "interrupted", "steps": self.step, "signal": name,
                            "checkpoint": str(path), "error": msg})
        raise TrainingInterrupted(msg, signum=signum, step=self.step, checkpoint=path)

    def _record(self, chunk: Chunk) -> None:
        """Store (Y − Ŷ)² of this chunk so far; stop with the last good state on NaN/Inf/blow-up."""
        k0, snapshot = chunk.k0, chunk.snapshot
        err2 = (chunk.Y[: chunk.j] - chunk.y_hat[: chunk.j]).double().cpu() ** 2
        self.sq_err[k0: k0 + err2.shape[0]] = err2
        bad = ~torch.isfinite(err2) | (err2 > self.err2_bound)
        if bad.any():
            k_bad = k0 + int(bad.nonzero()[0, 0])
            payload = self.state_payload()
            payload.update(snapshot)
            payload["sq_err"] = self.sq_err[: snapshot["step"]].clone()
            self.save(self.run_dir / "checkpoints" / "last_good.pt", payload)
            what = ("NaN/Inf" if not torch.isfinite(err2).all()
                    else f"above {self.cfg.train.divergence_threshold}")
            msg = (f"training diverged at step {k_bad} (t={k_bad / self.model.width:.4g}): "
                   f"|Y - Ŷ| is {what}"
                   f". Logs and the last good state (step {snapshot['step']}) are in "
                   f"{self.run_dir}; lower train.alpha (now {self.cfg.train.alpha})")
            self.write_metrics({"status": "diverged", "steps": k_bad, "error": msg})
            raise TrainingDiverged(msg)

    def _log_train(self, writer, last_log: tuple[int, float], now: float) -> None:
        if writer is None:
            return
        s0, t0 = last_log
        seg = self.sq_err[s0: self.step]
        writer.add_scalar("train/loss", 0.5 * float(seg.mean()), self.step)
        writer.add_scalar("train/running_mse", self.state.running_mse, self.step)
        writer.add_scalar("train/t", self.step / self.model.width, self.step)
        if now > t0:
            writer.add_scalar("train/steps_per_s", (self.step - s0) / (now - t0), self.step)

    def write_metrics(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        (self.run_dir / "metrics.json").write_text(json.dumps(clean, indent=2, default=float))


def _safe_end(cb: Callback, state: TrainState) -> None:
    try:
        cb.on_train_end(state)
    except Exception as exc:  # never mask the divergence message
        print(f"warning: callback {cb.name} failed at shutdown: {exc}", file=sys.stderr)


# --- resume and signals ------------------------------------------------------------------

RESUME_MAY_CHANGE = ("train.resume", "train.backend", "logger", "device", "callbacks.progress")
# keys newer than some checkpoints: absent from a checkpoint's config = this default
ADDED_KEYS = {"train.ensemble_size": 1, "train.shared_stream": False, "data_seed": None}


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped ``fit``; the state at ``step`` is in ``checkpoint``. A
    KeyboardInterrupt, so ``except Exception`` (e.g. Hydra's job runner) does not swallow it."""

    def __init__(self, msg: str, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(msg)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT only set ``signum``; the trainer checks it
    after each step, writes a checkpoint and stops. A second signal stops at once (the previous
    checkpoints are intact: writes are atomic). Installed only from the main thread and not over
    SIG_IGN; the previous handlers come back on exit, and a signal that arrived after the last
    check is delivered to them then."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                prev = signal.getsignal(sig) if sig is not None else None
                if prev is None or prev is signal.SIG_IGN:  # not ours to change
                    continue
                self._previous[sig] = prev
                signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now, without a new checkpoint
            raise TrainingInterrupted(f"stopped by a second {signal.Signals(signum).name} before "
                                      "the checkpoint was written; the last periodic checkpoint "
                                      "is intact", signum=signum, step=-1, checkpoint=None)
        self.signum = signum

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        if exc_type is None and self.signum is not None:  # came after the last step: pass it on
            signal.raise_signal(self.signum)
        return False


class RunWriter:
    """The run's SummaryWriter, created on first use (a run that fails before logging anything
    leaves no event file). With ``floor`` >= 0 (a resumed run) every ``add_*`` call for a step
    <= floor, or without a step, is dropped: those were logged before the checkpoint."""

    def __init__(self, open_writer: Any, floor: int = -1) -> None:
        self._open, self._floor, self._writer = open_writer, floor, None

    def open(self) -> Any:
        if self._writer is None:
            self._writer = self._open()
        return self._writer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.open(), name)
        if self._floor < 0 or not name.startswith("add_") or not callable(attr):
            return attr
        sig = inspect.signature(attr)

        def add(*args: Any, **kwargs: Any) -> Any:
            step = sig.bind(*args, **kwargs).arguments.get("global_step")
            if step is None or int(step) <= self._floor:
                return None
            return attr(*args, **kwargs)

        return add

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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


def train(cfg: Any, run_dir: str | Path) -> dict:
    """Build and run one training job; returns its final metrics (also in metrics.json). With
    ``train.ensemble_size`` > 1: the ensemble's summary (also in ensemble.json)."""
    if int(opt(cfg.train, "ensemble_size", 1)) != 1:
        from .ensemble_train import EnsembleTrainer

        return EnsembleTrainer(cfg, run_dir).fit()
    return Trainer(cfg, run_dir).fit()


register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    run_dir = HydraConfig.get().runtime.output_dir
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        metrics = train(cfg, run_dir)
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
    except Exception as exc:  # a bug: keep the traceback, but leave the reason for the summary
        _write_failure(run_dir, f"{type(exc).__name__}: {exc}")
        raise
    return metrics.get("running_mse")


def _write_failure(run_dir: str | Path, error: str) -> None:
    """metrics.json of a job that failed (``python -m ntk_rnn.sweep`` reports it)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "metrics.json").write_text(json.dumps(
            {"status": "failed", "error": error}, indent=2))
    except OSError as exc:
        print(f"ntk_rnn: warning: could not write {run_dir}/metrics.json ({exc})", file=sys.stderr)


if __name__ == "__main__":
    # `python -m ntk_rnn.train` runs this file as __main__; run the package's own module instead,
    # so that ntk_rnn.ensemble_train and this entry point share one TrainingInterrupted, Trainer...
    from ntk_rnn.train import main as _main

    _main()
