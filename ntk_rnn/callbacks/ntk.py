"""NTKCallback: the empirical NTK on a fixed probe set during training (theory §4–§5).

At the start it draws ``n_probes`` stationary windows, computes K_0 = K^N_{θ_0} and (if
``limit``) the limit kernel K_∞ with its error estimate. Every ``every_n_steps`` it computes
K_t = K^N_{θ_t} and logs how far it has moved from K_0, how far it is from K_∞, and its shape.

Tags (``ntk/`` sorts first in TensorBoard's Time Series, and within it ``distance_to_limit`` and
``drift_from_init`` come first): quantities spanning decades or of order 1e−4 (eigenvalues,
cosine kernel distances) are logged as log10 so their axes can be read. ``metrics.json`` keeps
the plain values (``ntk_kernel_distance``, ``ntk_eig_1``, ...).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from torch import Tensor

from .. import tags as T
from ..errors import ConfigError
from ..limit.dispatch import default_mc_width, is_exact, limit_kind, limit_ntk, sampler_settings
from ..limit.kernel import limit_method as limit_method_name
from ..logging import write_layout
from ..models.family import family_of
from ..models.init import generator_from_seed
from ..ntk import features_choice, ntk_blocks, pin_features, training_kernel
from ..ntk import metrics as M
from .base import Callback, TrainState, check_probes
from .cache import cached

BLOCKS = ("c", "w", "b")


def scalar_tags(s: dict[str, float], step: int) -> dict[str, float]:
    """The TensorBoard tags and values of one NTK log point ``s`` (plain names → values): the
    cosine kernel distances (~1e−4) and the eigenvalues as log10 (not logged when ≤ 0, nor the
    distance to K_0 at step 0, which is 0 by definition), the per-block drifts under
    ``ntk/per_block/``, the eigenvalues under ``ntk/spectrum/``."""
    out = {}
    for k, v in s.items():
        if k in ("kernel_distance", "kernel_distance_to_limit"):
            if v > 0 and math.isfinite(v) and not (k == "kernel_distance" and step == 0):
                out[T.ntk_log10_tag(k)] = math.log10(v)
        elif k.startswith("eig_"):
            if v > 0 and math.isfinite(v):
                out[T.ntk_spectrum_tag(k)] = math.log10(v)
        elif k.startswith("drift_") and k[len("drift_"):] in BLOCKS:
            out[T.ntk_block_tag(k)] = v
        else:
            out[T.ntk_tag(k)] = v
    return out


def summary_line(m: dict) -> Optional[str]:
    """The run summary's NTK line from the final metrics ``m``: the drift from K_0, and the
    distance to K_∞ beside the limit's own relative error — "below the limit's resolution" when
    the distance is within twice that error (then it is not a finding)."""
    parts = []
    if T.NTK_DRIFT_KEY in m:
        parts.append(f"drift from init {m[T.NTK_DRIFT_KEY]:.4g}")
    if T.NTK_DISTANCE_TO_LIMIT_KEY in m:
        dist = m[T.NTK_DISTANCE_TO_LIMIT_KEY]
        err = m.get(T.NTK_LIMIT_RELATIVE_ERROR_KEY, float("nan"))
        text = f"distance to limit {dist:.4g}"
        if math.isfinite(err):
            text += f" (limit's relative error {err:.2g}"
            text += (": below the limit's resolution)" if dist <= 2 * err else ")")
        parts.append(text)
    return "  NTK: " + ", ".join(parts) if parts else None


class NTKCallback(Callback):
    """The empirical NTK on a fixed set of probe windows during training (theory §4–§5).

    At the start it draws `n_probes` stationary windows of `probe_length` elements, computes
    K_0 and (with `limit`) the limit kernel K_∞ with its error estimate; then at every log point
    it computes K_t and logs how far it has moved from K_0 (`ntk/drift_from_init`), how far it
    is from K_∞ (`ntk/distance_to_limit`) and its shape (eigenvalues, effective rank, target
    alignment, per-block drifts), plus kernel images and parameter histograms. The tags are in
    the README's table and `ntk_rnn.callbacks.ntk.scalar_tags`; `metrics.json`
    gets the last values as `ntk_*`.

    Example:
        ```python
        NTKCallback()                              # every 1/8 of limit time, K_∞ included
        NTKCallback(every_n_steps=64, limit=False) # every 64 steps, no limit kernel
        ```

    Args:
        every_n_steps: Log every this many steps (1 = every step). When set it wins over
            `every_t`; None (default): use `every_t`.
        n_probes: Stationary probe windows the kernel is computed on (an n × n kernel).
        probe_length: Elements L of each probe window.
        method: How K_t is computed: `auto`, `structured` (Model D's fast per-unit features),
            `jacobian` (torch.func Jacobians) or `ntk_vp` (NTK-vector products, bounded
            memory); see `ntk_rnn.ntk.empirical_ntk`.
        limit: Compute the limit kernel K_∞ once, at the start (the slow part of the start-up;
            its time is announced and kept in `metrics.json` as `limit_s`).
        limit_tol: Absolute error target of K_∞.
        limit_method: How K_∞ is computed: `auto`, `rqmc` (scrambled Sobol' points),
            `quadrature` or `iid` (plain Monte Carlo over i.i.d. draws of μ0; needed for a custom
            initial law `model.init.sampler`; formerly `mc`, still accepted with a warning).
        top_k: Eigenvalues of K_t logged (`ntk/spectrum/log10_eig_1` ...).
        image_every_n_steps: Steps between kernel heatmaps and spectra (0 = off; otherwise
            the first and the last step get them too).
        histogram_every_n_steps: Steps between parameter-displacement histograms (0 = off).
        every_t: Log every this much limit time t = k / N: round(every_t · N) steps, the same
            points in t at every width. Default 1/8: 32 points over t ∈ [0, 4], at N = 32
            as at N = 4096.
        probe_seed: Fix the probes across runs (None: drawn from the run's seed); with it K_∞
            can be cached, computed once for a whole sweep.
        cache_dir: Where K_∞ is cached when `probe_seed` is set (None: no cache).
        limit_width: Models whose limit is a Monte Carlo over networks (your own; `GRURNN`
            has a sampled infinite-width limit, theory §10): K_∞ is a
            Monte-Carlo estimate over networks of this width N' (None: 2N within [256, 2048]),
            its 1/N' bias estimated from width N'/2 and included in its stated error.
        limit_draws: ... over this many independent networks (>= 2).
    """

    name = T.NTK_CALLBACK[0]

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        n_probes: int = 64,
        probe_length: int = 24,
        method: str = "auto",
        limit: bool = True,
        limit_tol: float = 5e-4,
        limit_method: str = "auto",
        top_k: int = 5,
        image_every_n_steps: int = 1024,
        histogram_every_n_steps: int = 1024,
        every_t: Optional[float] = 0.125,
        probe_seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
        limit_width: Optional[int] = None,
        limit_draws: int = 8,
    ) -> None:
        super().__init__(every_n_steps, every_t)
        self.probe_seed, self.cache_dir = probe_seed, cache_dir
        self.n_probes, self.probe_length = int(n_probes), int(probe_length)
        self.method, self.limit = method, bool(limit)
        self.limit_tol = float(limit_tol)
        self.limit_method = limit_method_name(limit_method, "callbacks.ntk.limit_method")
        self.top_k = int(top_k)
        # models without an analytic limit: Monte Carlo over limit_draws networks of width N'
        self.limit_width = None if limit_width is None else int(limit_width)
        self.limit_draws = int(limit_draws)
        self.image_every = int(image_every_n_steps)
        self.hist_every = int(histogram_every_n_steps)
        self.probes: Optional[Tensor] = None
        self.probe_y: Optional[Tensor] = None
        self.K0: Optional[Tensor] = None
        self.K0_blocks: dict[str, Tensor] = {}
        self.K_inf: Optional[Tensor] = None
        self.K_inf_error = float("nan")
        self.K_inf_rel_error = float("nan")  # ‖error‖_F/‖K_∞‖_F: the units of the distance
        self.K_inf_method = ""
        self.K_prev: Optional[Tensor] = None
        self.t_prev = 0.0
        self.theta0: dict[str, Tensor] = {}
        self.last: dict[str, float] = {}
        self._images = None  # KernelImages, made at the first image event
        self._spec_inf = None
        self._logged_inf = False
        self.features: Optional[dict] = None  # Model D's unit-features choice (C or torch)
        self.width = 0

    # --- validation, before any step --------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        super().setup(state)
        f = f"callbacks.{self.name}"
        check_probes(state, self.name, self.n_probes, self.probe_length, minimum=2)
        for key, attr in (("image_every_n_steps", "image_every"),
                          ("histogram_every_n_steps", "hist_every")):
            if getattr(self, attr) < 0:
                raise ConfigError(f"{f}.{key}={getattr(self, attr)} must be >= 0 (0 = off)")
        if not 1 <= self.top_k <= self.n_probes:
            raise ConfigError(f"{f}.top_k={self.top_k} must be in [1, n_probes={self.n_probes}]")
        law = getattr(state.model, "init_law", None)
        if self.limit and law is not None and law.is_custom and self.limit_method != "iid":
            raise ConfigError(
                f"{f}.limit_method={self.limit_method!r}: the initial law is custom "
                f"(model.init.sampler), so the limit needs i.i.d. draws: set "
                f"{f}.limit_method=iid (or {f}.limit=false)"
            )
        if self.limit and not is_exact(state.model):  # Monte Carlo over wider networks
            if self.limit_draws < 2:
                raise ConfigError(f"{f}.limit_draws={self.limit_draws} must be >= 2")
            family_of(state.model).check_at_width(state.model, state.model_factory)
        gen = (state.generators["probe"] if self.probe_seed is None
               else generator_from_seed(self.probe_seed))
        X, Y = state.source.windows(self.n_probes, self.probe_length, gen)
        p0 = next(state.model.parameters())
        dev, dt = p0.device, p0.dtype
        self.probes, self.probe_y = X.to(dev, dt), Y.to(dev, dt)

    # --- hooks ----------------------------------------------------------------------------
    def on_train_start(self, state: TrainState) -> None:
        model = state.model
        if family_of(model).structure == "units":  # compiled or torch unit features: the choice
            if self.features is None:  # measured on this machine; a resumed run reuses its own
                self.features = features_choice(model)
            else:
                pin_features(self.features["backend"], model.input_dim, model.act.name,
                             next(model.parameters()).dtype)
        if self.K0 is None:  # not resumed
            self.K0_blocks = ntk_blocks(model, self.probes, method=self.method)
            self.K0 = sum(self.K0_blocks.values())
            self.K_prev, self.t_prev = self.K0, 0.0
            self.theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
            if self.limit:
                lim = self.limit_kernel(state)
                self.K_inf = lim["value"].to(self.K0)
                self.K_inf_error = float(lim["error"])
                self.K_inf_rel_error = float(lim.get("relative_error", float("nan")))
                self.K_inf_method = str(lim.get("method", ""))
        w = state.writer
        if w is not None and state.step == 0:  # (a resumed run wrote them before)
            write_layout(state, self.top_k)
            if self.K_inf is not None:  # two constants of the run: text, not one-point curves
                w.add_text(T.NTK_LIMIT_TEXT, (
                    f"K_∞ on the probes ({self.K_inf_method}): relative error "
                    f"‖δK_∞‖/‖K_∞‖ = {self.K_inf_rel_error:.3g} (the units of "
                    f"ntk/distance_to_limit), largest absolute error {self.K_inf_error:.3g}; "
                    f"initial distance ‖K_0 − K_∞‖/‖K_∞‖ = "
                    f"{float(M.relative_frobenius(self.K0, self.K_inf)):.4g} (the step-0 "
                    f"value of ntk/distance_to_limit)"), 0)
        if state.step == 0:
            self.log(state, 0, self.K0, self.K0_blocks)

    def start_note(self, state: TrainState) -> Optional[str]:
        """What ``on_train_start`` is about to compute when it may take a while (the progress
        callback prints it): K_∞, by the model's family."""
        if not self.limit or self.K0 is not None:
            return None
        model = state.model
        sampled = sampler_settings(model)
        how = (f"coordinate sampler, {sampled['replicates']} replicates of {sampled['samples']} "
               "coordinates" if sampled else
               f"{limit_kind(model)}, to tol {self.limit_tol:g}" if is_exact(model) else
               f"Monte Carlo over {self.limit_draws} networks of width {self._mc_width(model)}")
        return (f"computing the limit kernel K_∞ on {self.n_probes} probe windows of length "
                f"{self.probe_length} ({how}; callbacks.ntk.limit=false skips it)")

    def limit_kernel(self, state: TrainState) -> dict:
        """K_∞ on the probes with its error (absolute, largest entry) and relative error
        (‖error‖_F/‖K_∞‖_F, the units of ``distance_to_limit``), by the model's family
        (``ntk_rnn.limit.limit_ntk``); cached under ``cache_dir`` when the probes are fixed by
        ``probe_seed`` (it depends on the model's law and the probes, not on N, β or the seed;
        a Monte-Carlo limit also on N′ and the draws)."""
        model = state.model
        exact = is_exact(model)

        def compute() -> dict:
            kw = (dict(tol=self.limit_tol, method=self.limit_method) if exact else
                  dict(factory=state.model_factory, width=self._mc_width(model),
                       draws=self.limit_draws, ntk_method=self.method))
            lim = limit_ntk(model, self.probes, **kw)
            return {"value": lim.value, "error": float(lim.error),
                    "relative_error": float(lim.relative_error), "method": str(lim.method)}

        if self.probe_seed is None or getattr(getattr(model, "init_law", None), "is_custom", False):
            return compute()
        probes = self.probes.detach().cpu().contiguous()
        spec = {"model": family_of(model).limit_spec(model),
                "probes_sha256": hashlib.sha256(probes.numpy().tobytes()).hexdigest(),
                "n": self.n_probes, "L": self.probe_length,
                "tol": self.limit_tol, "method": self.limit_method, "probe_seed": self.probe_seed,
                "dtype": str(probes.dtype), "limit": limit_kind(model),
                "sampler": sampler_settings(model) or None, "mc": None if exact else
                [self._mc_width(model), self.limit_draws, getattr(model, "beta", None)]}
        return cached(self.cache_dir, "limit_kernel", spec, compute)

    def _mc_width(self, model: torch.nn.Module) -> int:
        """N′ of the Monte-Carlo limit: ``limit_width``, else ``default_mc_width(N)``."""
        return self.limit_width or default_mc_width(int(getattr(model, "width", 1)))

    def on_step_end(self, step: int, state: TrainState) -> None:
        blocks = ntk_blocks(state.model, self.probes, method=self.method)
        K = sum(blocks.values())
        self.log(state, step, K, blocks)

    def on_train_end(self, state: TrainState) -> None:
        state.metrics.update({T.ntk_key(k): v for k, v in self.last.items()})
        if self.features is not None:  # which unit features ran, and why
            state.metrics["ntk_features_backend"] = self.features["backend"]
            state.metrics["ntk_features_reason"] = self.features.get("reason", "")
        if self.K_inf is not None:
            state.metrics[T.NTK_LIMIT_ERROR_KEY] = self.K_inf_error
            state.metrics[T.NTK_LIMIT_RELATIVE_ERROR_KEY] = self.K_inf_rel_error
            state.metrics[T.NTK_LIMIT_METHOD_KEY] = self.K_inf_method
            state.metrics[T.NTK_INITIAL_DISTANCE_TO_LIMIT_KEY] = float(
                M.relative_frobenius(self.K0, self.K_inf))

    # --- logging --------------------------------------------------------------------------
    def log(self, state: TrainState, step: int, K: Tensor, blocks: dict[str, Tensor]) -> None:
        t = step / state.model.width
        s = {
            "drift_from_init": M.relative_frobenius(K, self.K0),
            "kernel_distance": M.kernel_distance(K, self.K0),
            "target_alignment": M.target_alignment(K, self.probe_y),
            "effective_rank": M.effective_rank(K),
        }
        if t > self.t_prev:
            s["velocity"] = M.kernel_velocity(self.K_prev, K, t - self.t_prev)
        if self.K_inf is not None:
            s["distance_to_limit"] = M.relative_frobenius(K, self.K_inf)
            s["kernel_distance_to_limit"] = M.kernel_distance(K, self.K_inf)
        for name in BLOCKS:
            if name in blocks and name in self.K0_blocks:
                s[f"drift_{name}"] = M.relative_frobenius(blocks[name], self.K0_blocks[name])
        for i, ev in enumerate(M.top_eigenvalues(K, self.top_k)):
            s[f"eig_{i + 1}"] = ev
        if (state.gradient == "one_step"
                and family_of(state.model).structure == "units"):
            Kt = training_kernel(state.model, self.probes, gradient="one_step")
            s["train_kernel_drift_from_init"] = M.relative_frobenius(Kt, self.K0)
            s["train_kernel_asymmetry"] = (Kt - Kt.T).norm() / Kt.norm()
            s["train_kernel_distance_to_ntk"] = M.relative_frobenius(Kt, K)
        s = {k: float(v) for k, v in s.items()}
        w = state.writer
        if w is not None:
            for k, v in scalar_tags(s, step).items():
                w.add_scalar(k, v, step)
            for name, p in state.model.named_parameters():
                if name in self.theta0:
                    d = (p.detach() - self.theta0[name])
                    w.add_scalar(T.displacement_tag(name),
                                 float(d.norm() / self.theta0[name].norm().clamp_min(1e-30)), step)
                    if self.hist_every and step % self.hist_every == 0:
                        w.add_histogram(T.displacement_tag(name, absolute=True), d.abs().cpu(),
                                        step)
            if self.image_every and (step % self.image_every == 0 or step == state.n_steps):
                self.width = state.model.width
                self.log_images(w, step, K)
        self.last = s
        self.K_prev, self.t_prev = K, t

    def log_images(self, writer, step: int, K: Tensor) -> None:
        """Heatmaps of K_t, K_t − K_0 (not at step 0, where it is 0) and K_∞ (once: it does not
        change), K_t and K_∞ on one colour scale (that of K_0 and K_∞), K_t − K_0 on its own
        symmetric one; and the spectrum of K_t against K_∞'s, as TensorBoard images."""
        from .figures import KernelImages, spectrum

        if self._images is None:
            self._images = KernelImages()
            self._images.set_scale(*[k for k in (self.K0, self.K_inf) if k is not None])
            self._spec_inf = None if self.K_inf is None else spectrum(self.K_inf)
        img = self._images
        t = step / self.width if self.width else float("nan")

        def add(tag, arr):
            writer.add_image(T.NTK_IMAGES + tag, arr, step, dataformats="HWC")

        add("K_t", img.heatmap("K_t", K, f"K_t (step {step}, t = {t:.3g})"))
        if step > 0:
            add("K_t_minus_K_0", img.heatmap("dK", K - self.K0, f"K_t − K_0 (step {step})",
                                              diverging=True))
        if self.K_inf is not None and not self._logged_inf:
            add("K_inf", img.heatmap("K_inf", self.K_inf, "K_∞ (limit, same colour scale)"))
            self._logged_inf = True
        spectra = {"K_t": spectrum(K)}
        if self._spec_inf is not None:
            spectra["K_∞"] = self._spec_inf
        add("spectrum", img.spectrum_image("spectrum", spectra, f"spectrum (step {step})"))

    # --- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.K0 is None:
            return {}
        d = {"probes": self.probes, "probe_y": self.probe_y, "K0": self.K0,
             "K_prev": self.K_prev, "t_prev": self.t_prev, "K_inf_error": self.K_inf_error,
             "K_inf_rel_error": self.K_inf_rel_error, "K_inf_method": self.K_inf_method,
             "K0_blocks": self.K0_blocks, "theta0": self.theta0, "logged_inf": self._logged_inf,
             # (the backend alone: the record's timings and reason differ between equal runs)
             "features": None if self.features is None else
             {"backend": self.features["backend"], "reason": "recorded with the run"}}
        if self.K_inf is not None:
            d["K_inf"] = self.K_inf
        return {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in d.items()}

    def load_state_dict(self, d: dict) -> None:
        if not d:
            return
        dev = self.probes.device if self.probes is not None else "cpu"
        mv = lambda v: v.to(dev) if isinstance(v, Tensor) else v  # noqa: E731
        self.probes, self.probe_y, self.K0 = mv(d["probes"]), mv(d["probe_y"]), mv(d["K0"])
        self.K_prev, self.t_prev = mv(d["K_prev"]), float(d["t_prev"])
        self.K_inf, self.K_inf_error = mv(d.get("K_inf")), float(d["K_inf_error"])
        self.K_inf_rel_error = float(d.get("K_inf_rel_error", float("nan")))
        self.K_inf_method = str(d.get("K_inf_method", ""))
        self.K0_blocks = {k: mv(v) for k, v in d["K0_blocks"].items()}
        self.theta0 = {k: mv(v) for k, v in d["theta0"].items()}
        self._logged_inf = bool(d.get("logged_inf", False))  # K_∞'s image: once per run
        self.features = d.get("features")

