"""OutputTrackingCallback: does the trained network track the limit ODE? (theory §5)

On a fixed probe set it compares the network output Ŷ_θ(x̄) (window read from zero memory, θ as
trained so far) with the limit solution h_t(x̄) at t = k / N, and logs

    output/rmse_to_limit = rms over probes of Ŷ_θ(x̄) − h_t(x̄)
    output/limit_rms     = rms over probes of h_t(x̄)            (the scale of the signal)
    output/network_rms   = rms over probes of Ŷ_θ(x̄)
    output/limit_error   = rms over probes of the π-sample error estimate of h_t (the floor)

The limit solution (``LimitODE.from_source``: ``samples`` independent sets of M stationary windows)
depends on the data, α, σ and μ0 but not on N, β or the run seed, so it is cached on disk under
``cache_dir`` (keyed by all of those and the probe seed): a width sweep computes it once.

Which limit a model has is asked of its family (``family_of(model).limit``): ``"quadrature"``
(Model D, theory §5), ``"cell"`` (Model F, §6) and ``"elman"`` (the full-matrix Elman network,
§9: the closed-form kernel of truncated BPTT through ``train.bptt_window`` steps, on training
windows of ``train_length`` steps — default the probes' — that stand for the stream's memory).
A model with a Monte-Carlo limit only has no limit ODE here (ConfigError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import tags as T
from ..errors import ConfigError
from ..limit import LimitODE, elman_limit_ntk
from ..logging import write_layout
from ..models.family import family_of
from .base import Callback, TrainState, generator_from_seed
from .cache import cached


class OutputTrackingCallback(Callback):
    name = "output"

    def __init__(self, every_n_steps: Optional[int] = None, n_probes: int = 64,
                 probe_length: int = 24, M: int = 1024, samples: int = 2, limit_tol: float = 5e-4,
                 probe_seed: Optional[int] = 12345, cache_dir: Optional[str] = None,
                 every_t: Optional[float] = 0.0625, dt: float = 0.05,
                 n_features: int = 2048, train_length: Optional[int] = None) -> None:
        super().__init__(every_n_steps, every_t)
        self.train_length = None if train_length is None else int(train_length)
        self.dt, self.n_features = float(dt), int(n_features)
        self.n_probes, self.probe_length = int(n_probes), int(probe_length)
        self.M, self.samples, self.limit_tol = int(M), int(samples), float(limit_tol)
        self.probe_seed = probe_seed
        self.cache_dir = cache_dir
        self.trace_t: list[float] = []
        self.trace_y: list[np.ndarray] = []
        self.ode: Optional[LimitODE] = None

    def setup(self, state: TrainState) -> None:
        super().setup(state)
        f = f"callbacks.{self.name}"
        for key in ("n_probes", "probe_length", "M", "samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{f}.{key}={getattr(self, key)} must be >= 1")
        if not self.dt > 0:
            raise ConfigError(f"{f}.dt={self.dt} must be > 0 (time step of the Model F solver)")
        self.limit = family_of(state.model).limit
        if self.limit not in ("quadrature", "cell", "elman"):
            raise ConfigError(f"{f}: {type(state.model).__qualname__} has no closed-form limit "
                              f"(its family's limit is {self.limit!r}), so there is no limit ODE "
                              "to track; remove the output callback")
        if self.train_length is not None and self.train_length < 1:
            raise ConfigError(f"{f}.train_length={self.train_length} must be >= 1")
        if getattr(getattr(state.model, "init_law", None), "is_custom", False):
            raise ConfigError(f"{f}: the limit ODE needs a built-in initial law, not "
                              "model.init.sampler")
        gen = (generator_from_seed(self.probe_seed) if self.probe_seed is not None
               else state.generators["probe"])
        X, _ = state.source.windows(self.n_probes, self.probe_length, gen)
        self.probes = X.to(state.model.c.device, state.model.c.dtype)
        self._gen = gen

    def _spec(self, state: TrainState) -> dict:
        """What a cached limit on the probes depends on: the data, the model's law
        (`Family.limit_spec`: not N or θ_0, and for Models D and F not β), α, the probes and
        their draw."""
        law = family_of(state.model).limit_spec(state.model)
        if self.limit != "elman":
            law["args"].pop("beta", None)
        return {"data": state.data, "model": law, "input_dim": state.model.input_dim,
                "alpha": state.alpha, "M": self.M, "samples": self.samples,
                "L": self.probe_length, "n": self.n_probes, "probe_seed": self.probe_seed,
                "dtype": str(self.probes.dtype),
                "run_seed": state.seed if self.probe_seed is None else None}

    def _build_ode(self, state: TrainState) -> LimitODE:
        """The limit ODE on the probes; cached: it depends on the data, σ, μ0, α and the probe
        draw, not on N, β or the run seed."""
        alpha = state.alpha
        spec = {**self._spec(state), "tol": self.limit_tol}
        kernel, length = None, None
        if self.limit == "elman":
            window = state.bptt_window
            length = self.train_length or self.probe_length
            spec.update(window=window, train_length=length)

            def kernel(model, x, x2=None, tol=self.limit_tol):
                return elman_limit_ntk(model, x, x2, tol=tol, window=window)

        solved: list[LimitODE] = []  # the ode kernels() solved, so reduced() need not again

        def kernels() -> dict:
            ode = LimitODE.from_source(state.model, state.source, self.probes, alpha, M=self.M,
                                       samples=self.samples, generator=self._gen,
                                       tol=self.limit_tol, kernel=kernel, length=length)
            solved.append(ode)
            return {"K_MM": ode.K_MM, "Y_M": ode.Y_M, "K_xM": ode.K_xM,
                    "kernel_error": ode.kernel_error}

        def reduced() -> dict:  # solved once: the eigendecomposition of K_MM is O(M³)
            d = cached(self.cache_dir, "limit_ode", spec, kernels)
            ode = solved[0] if solved else LimitODE.from_kernels(
                d["K_MM"], d["Y_M"], d["K_xM"], alpha, float(d["kernel_error"]))
            return ode.reduced()

        return LimitODE.from_reduced(cached(self.cache_dir, "limit_ode_solved", spec, reduced),
                                     alpha)

    def _build_feedback(self, state: TrainState) -> "_FeedbackTrack":
        """Model F: the coupled limit (theory §6) on the probes on a grid of step ``dt`` up to the
        horizon, from ``samples`` independent π-samples (their spread is the error); cached."""
        from ..limit.feedback import solve_feedback_limit

        alpha, horizon = state.alpha, state.horizon
        spec = {**self._spec(state), "dt": self.dt, "J": self.n_features, "horizon": horizon,
                "gradient": state.gradient}

        def compute() -> dict:
            hs = []
            for r in range(self.samples):
                X, Y = state.source.windows(self.M, self.probe_length, self._gen)
                sol = solve_feedback_limit(state.model, X.double(), Y.double(), alpha, horizon,
                                           self.dt, probes=self.probes.double(),
                                           gradient=state.gradient,
                                           n_features=self.n_features, seed=r)
                hs.append(sol.h_probes)
            return {"t": sol.t, "h": torch.stack(hs)}

        d = cached(self.cache_dir, "feedback_limit", spec, compute)
        return _FeedbackTrack(d["t"], d["h"])

    def start_note(self, state: TrainState) -> Optional[str]:
        """What ``on_train_start`` is about to compute (the progress callback prints it)."""
        if self.ode is not None:
            return None
        return (f"solving the limit ODE h_t on {self.n_probes} probe windows ({self.samples} × "
                f"{self.M} stationary windows; cached under callbacks.output.cache_dir)")

    def on_train_start(self, state: TrainState) -> None:
        if self.ode is None:
            self.ode = (self._build_feedback(state) if self.limit == "cell"
                        else self._build_ode(state))
        if state.step == 0:
            write_layout(state)  # (the NTK callback's, when it runs too: one layout per run)
            self.on_step_end(0, state)

    @torch.no_grad()
    def on_step_end(self, step: int, state: TrainState) -> None:
        t = step / state.model.width
        y_net = state.model(self.probes)[:, -1].double().cpu()
        h = self.ode.h(t)[0]
        err = self.ode.error(t)[0]
        rmse = float((y_net - h).pow(2).mean().sqrt())
        scalars = {T.OUTPUT_RMSE_TO_LIMIT: rmse,
                   T.OUTPUT_LIMIT_RMS: float(h.pow(2).mean().sqrt()),
                   T.OUTPUT_NETWORK_RMS: float(y_net.pow(2).mean().sqrt()),
                   T.OUTPUT_LIMIT_ERROR: float(err.pow(2).mean().sqrt())}
        if state.writer is not None:
            for k, v in scalars.items():
                state.writer.add_scalar(k, v, step)
        self.trace_t.append(t)
        self.trace_y.append(np.stack([y_net.numpy(), h.numpy(), err.numpy()]))
        self.last = scalars

    def on_train_end(self, state: TrainState) -> None:
        if self.trace_t and self.trace_t[-1] < state.t:
            self.on_step_end(state.step, state)
        ts = np.array(self.trace_t)
        tr = np.stack(self.trace_y)  # (T, 3, n): network, limit, limit error
        if state.run_dir is not None:  # run_dir=None writes nothing
            np.savez(Path(state.run_dir) / "output_tracking.npz", t=ts, y_net=tr[:, 0],
                     h=tr[:, 1], h_err=tr[:, 2])
        rmse = np.sqrt(((tr[:, 0] - tr[:, 1]) ** 2).mean(-1))
        herr = np.sqrt((tr[:, 2] ** 2).mean(-1))
        band = (ts >= 0.5 * ts[-1]) if ts[-1] > 0 else np.ones_like(ts, bool)
        state.metrics.update({
            "output_rmse_t0": float(rmse[0]),
            "output_rmse_final": float(rmse[-1]),
            "output_rmse_band": float(np.sqrt((rmse[band] ** 2).mean())),
            "output_h_error_band": float(np.sqrt((herr[band] ** 2).mean())),
            "output_rms_band": float(np.sqrt((tr[band, 1] ** 2).mean())),
            "limit_ode_kernel_error": float(self.ode.kernel_error),
        })

    def state_dict(self) -> dict:
        return {"trace_t": torch.tensor(self.trace_t, dtype=torch.float64),
                "trace_y": torch.from_numpy(np.stack(self.trace_y)) if self.trace_y else
                torch.zeros(0)}

    def load_state_dict(self, d: dict) -> None:
        if d:
            self.trace_t = d["trace_t"].tolist()
            self.trace_y = list(d["trace_y"].numpy())


class _FeedbackTrack:
    """h_t of Model F on the probes from R solver runs on a time grid (linear interpolation in t),
    with the same ``h``/``error`` interface as LimitODE."""

    def __init__(self, t: torch.Tensor, h: torch.Tensor) -> None:
        self.t, self.hs = t.double(), h.double()  # (T,), (R, T, n)
        self.kernel_error = 0.0

    def h_samples(self, t: float) -> torch.Tensor:
        t = min(max(float(t), 0.0), float(self.t[-1]))
        i = min(int(torch.searchsorted(self.t, torch.tensor(t, dtype=torch.float64))),
                len(self.t) - 1)
        i0 = max(i - 1, 0)
        lo, hi = float(self.t[i0]), float(self.t[i])
        wgt = 0.0 if hi == lo else (t - lo) / (hi - lo)
        return ((1 - wgt) * self.hs[:, i0] + wgt * self.hs[:, i]).unsqueeze(1)

    def h(self, t: float) -> torch.Tensor:
        return self.h_samples(t).mean(0)

    def error(self, t: float) -> torch.Tensor:
        hs = self.h_samples(t)
        if hs.shape[0] < 2:
            return torch.full(hs.shape[1:], float("nan"), dtype=torch.float64)
        return hs.std(0) / hs.shape[0] ** 0.5
