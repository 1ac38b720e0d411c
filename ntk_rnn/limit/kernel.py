"""The infinite-width limit kernel of Model D (theory §5), with an error estimate.

    K(x̄, x̄') = E_{θ~μ0}[φ_θ(x̄)·φ_θ(x̄')],   φ_θ = (S, c P, c Q)
             = E_{(w,b)}[S S'] + E[c²] E_{(w,b)}[P·P' + Q Q']      (c independent of (w, b))

S, P, Q are the per-unit features of theory §3/§4 at the last step of each window, read from
zero memory with θ frozen. For points (w_j, b_j), j = 1..M, they are exactly what the network
recursion computes with width M (``models.recurrence.spq_features``), so with positive weights ω_j

    K ≈ Σ_j ω_j φ_j(x̄)·φ_j(x̄'),   φ_j = (S_j, √E[c²] P_j, √E[c²] Q_j),

a Gram matrix accumulated over batches of points. The integral over (w, b) ∈ R^{d+1} is done by

- ``"rqmc"`` — randomised quasi-Monte Carlo: R independently scrambled Sobol' sequences in
  [0, 1)^{d+1}, mapped to μ0 by the inverse CDF, ω_j = 1/M. The estimate is the mean of the R
  replicate estimates; its per-entry error is t_{0.975, R-1}·std/√R (a 95% interval). Points
  per replicate double (the Sobol' sequences are extended, nothing is recomputed) until the
  largest per-entry error is ≤ tol or ``max_points`` is reached.
- ``"quadrature"`` (d ≤ 2) — tensor-product rules: for normal coordinates the trapezoidal rule
  in t = w/scale on [-9, 9] sd with weights ∝ exp(-t²/2) (exponentially convergent for
  integrands analytic in a strip, so it avoids the slow convergence of Gauss–Hermite that theory
  §5 reports for saturating tanh), Gauss–Legendre for uniform coordinates, the atoms for
  rademacher/constant ones. The w axes and the b axis are refined (doubled) separately until the
  two one-axis refinements change no entry by more than tol in total; the error reported is
  that sum of changes (conservative for the returned, finer grid).
- ``"iid"`` (formerly ``"mc"``, a deprecated spelling: not the Monte-Carlo limit over wider
  networks of ``limit/monte_carlo.py``) — plain Monte Carlo over i.i.d. draws of
  ``init_law.sample`` (the only method for a custom sampler;
  c is then used as drawn, φ = (S, cP, cQ), so c need not be independent of (w, b)); R
  independent batches, error as for rqmc (batch-means standard error × t quantile).
- ``"auto"`` — iid for a custom ``init_law.sampler``; for the built-in laws quadrature when
  d = 1 (measured: on d = 1, L = 24 it reaches 1e-9 with ~2000 points where rqmc needs ~5·10^5
  points for 1e-6) and rqmc when d ≥ 2 (a tensor grid grows like n^d; rqmc wins already at d = 2).

Everything is computed and returned in float64.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special, stats
from scipy.stats import qmc
from torch import Tensor

from ..errors import ConfigError, renamed_value
from ..models.activations import Activation
from ..models.family import family_of
from ..models.init import InitLaw, generator_from_seed
from ..models.recurrence import spq_features

METHODS = ("auto", "rqmc", "quadrature", "iid")
#: deprecated spellings of ``method`` → their names ("mc" clashed with the Monte-Carlo limit)
RENAMED_METHODS = {"mc": "iid"}


def limit_method(method: object, key: str = "method") -> object:
    """``method`` with a deprecated spelling (``mc``) mapped to its name (``iid``) and one
    FutureWarning naming ``key``; anything else unchanged (checked by the caller)."""
    return renamed_value(method, RENAMED_METHODS, key)
_F64 = torch.float64
_TRAP_HALF_WIDTH = 9.0  # normal coordinates are integrated on [-9, 9] sd (tail mass 2e-19)
_MEM_BUDGET = 2**28  # bytes for the per-batch feature temporaries (auto chunk_size)


class LimitAccuracyWarning(RuntimeWarning):
    """The point budget ran out before the limit kernel reached the requested tolerance."""


@dataclass
class LimitKernel:
    """The limit kernel K (n, m) with its error estimate.

    ``error`` is a float: the largest per-entry error estimate, max_{ij} error_entries[i, j];
    ``error_entries`` (n, m) holds the per-entry estimates of |value − K| (a 95% interval
    half-width for rqmc/mc, the two-resolution difference for quadrature). ``n_points`` is the
    number of (w, b) points (all replicates) behind ``value``; ``converged`` says whether
    ``error <= tol`` was reached within the budget.
    """

    value: Tensor
    error: float
    error_entries: Tensor
    method: str
    n_points: int
    converged: bool = True

    @property
    def relative_error(self) -> float:
        """‖error_entries‖_F / ‖value‖_F: the error in the units of the relative distance
        ‖K − K_∞‖_F/‖K_∞‖_F that the NTK callback logs."""
        norm = float(self.value.norm())
        return float(self.error_entries.norm()) / norm if norm > 0 else float("inf")

    def __repr__(self) -> str:
        n, m = self.value.shape
        return (f"LimitKernel(shape=({n}, {m}), error={self.error:.3g}, method={self.method!r}, "
                f"n_points={self.n_points}, converged={self.converged})")


# --- features ---------------------------------------------------------------------------------
def _phi(w: Tensor, b: Tensor, cfac, act: Activation, x: Tensor, truncated: bool) -> Tensor:
    """φ = (S, c P, c Q) as (B, M, d+2); cfac is √E[c²] (float) or the drawn c (M,)."""
    S, P, Q = spq_features(act, w, b, x, truncated)
    if isinstance(cfac, Tensor):
        cfac = cfac.unsqueeze(-1)
    return torch.cat([S.unsqueeze(-1), cfac * torch.cat([P, Q.unsqueeze(-1)], -1)], -1)


def _gram_sums(w, b, cfac, weight, act, xa, xb, truncated, chunk, out=None) -> Tensor:
    """Σ_j ω_j φ_j(xa)·φ_j(xb) for R groups of points: w (R, M, d), b, cfac, weight (R, M) or
    None (ω = 1) → (R, n, m), added to ``out`` if given. Batches of ``chunk`` points (all
    groups together); xb None means xb = xa."""
    R, M, d = w.shape
    n, m = xa.shape[0], (xa if xb is None else xb).shape[0]
    G = xa.new_zeros(R, n, m) if out is None else out
    step = max(1, chunk // R)
    for s in range(0, M, step):
        sl = slice(s, min(M, s + step))
        Mb = sl.stop - sl.start
        wb, bb = w[:, sl].reshape(-1, d), b[:, sl].reshape(-1)
        cb = cfac[:, sl].reshape(-1) if isinstance(cfac, Tensor) else cfac
        fa = _phi(wb, bb, cb, act, xa, False)  # (n, R·Mb, d+2)
        fb = fa if xb is None and not truncated else _phi(
            wb, bb, cb, act, xa if xb is None else xb, truncated)
        if weight is not None:
            fa = fa * weight[:, sl].reshape(1, -1, 1)
        fa = fa.reshape(n, R, Mb * (d + 2)).transpose(0, 1)
        fb = fb.reshape(m, R, Mb * (d + 2)).transpose(0, 1)
        G.baddbmm_(fa, fb.transpose(1, 2))
    return G


# --- laws and rules ----------------------------------------------------------------------------
def law_axes(law: InitLaw, d: int) -> list[tuple[str, float]]:
    """(kind, scale) of each coordinate of (w_1..w_d, b); w normal has sd w_scale/√d."""
    ws = law.w_scale / math.sqrt(d) if law.w == "normal" else law.w_scale
    return [(law.w, float(ws))] * d + [(law.b, float(law.rho))]


def inverse_cdf(kind: str, scale: float, u: Tensor) -> Tensor:
    """Map u ~ U(0, 1) to the coordinate's law by its inverse CDF."""
    if kind == "normal":
        return torch.special.ndtri(u) * scale
    if kind == "uniform":
        return (2.0 * u - 1.0) * scale
    if kind == "rademacher":
        return (2.0 * (u >= 0.5).to(u.dtype) - 1.0) * scale
    return torch.full_like(u, scale)


def _rule(kind: str, scale: float, n: int) -> tuple[Tensor, Tensor]:
    """1-D nodes and weights (summing to 1) at resolution n for one coordinate."""
    if kind == "normal":  # trapezoid on [-T, T] in t = w/scale with weights ∝ exp(-t²/2)
        t = np.linspace(-_TRAP_HALF_WIDTH, _TRAP_HALF_WIDTH, 2 * n + 1)
        wt = np.exp(-0.5 * t * t)
        nodes, weights = t * scale, wt / wt.sum()
    elif kind == "uniform":
        t, wt = special.roots_legendre(n)
        nodes, weights = t * scale, wt / 2.0
    elif kind == "rademacher":
        nodes, weights = np.array([-scale, scale]), np.array([0.5, 0.5])
    else:
        nodes, weights = np.array([scale]), np.array([1.0])
    return torch.tensor(nodes, dtype=_F64), torch.tensor(weights, dtype=_F64)


def _tensor_rule(axes, res: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Tensor product of the 1-D rules, resolution res[0] on the w axes and res[1] on b:
    points (M, d+1) and weights (M,); points of negligible weight (< 1e-20) are dropped."""
    rules = [_rule(k, s, res[i == len(axes) - 1]) for i, (k, s) in enumerate(axes)]
    pts = torch.cartesian_prod(*[r[0] for r in rules]).reshape(-1, len(axes))
    wts = torch.cartesian_prod(*[r[1] for r in rules]).reshape(-1, len(axes)).prod(-1)
    keep = wts > 1e-20
    return pts[keep], wts[keep] / wts[keep].sum()


# --- the estimator -----------------------------------------------------------------------------
def _check(model, x: Tensor, x2: Tensor | None, method: str, tol: float) -> str:
    method = limit_method(method)
    if family_of(model).limit != "quadrature":
        raise ConfigError("this K_∞ (quadrature) is Model D's (model.recurrence='diagonal'); "
                          "ntk_rnn.limit.limit_ntk gives any model's")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not known; choose one of {list(METHODS)}")
    if not (float(tol) > 0):
        raise ConfigError(f"tol={tol} must be > 0")
    model.check_windows(x, "x")
    if not x.is_floating_point():
        raise ConfigError(f"x has dtype {x.dtype}; expected a floating-point tensor")
    if x.device != model.w.device:
        raise ConfigError(f"x is on {x.device} but the model is on {model.w.device}")
    if x2 is not None:
        model.check_windows(x2, "x2")
        if x2.dtype != x.dtype or x2.device != x.device:
            raise ConfigError(
                f"x2 has dtype {x2.dtype} on {x2.device} but x has dtype {x.dtype} on "
                f"{x.device}; pass both window sets with the same dtype and device")
    law: InitLaw = model.init_law
    if law.is_custom:
        if method != "auto" and method != "iid":
            raise ConfigError(
                f"method={method!r}: a custom initial law (init_law.sampler) needs method='iid' "
                "(i.i.d. draws); rqmc and quadrature integrate the built-in laws only")
        return "iid"
    if method == "quadrature" and model.input_dim > 2:
        raise ConfigError(
            f"method='quadrature' needs input_dim <= 2 (got {model.input_dim}); use 'rqmc'")
    if method == "auto":  # quadrature is exponentially convergent and cheapest for d = 1
        return "quadrature" if model.input_dim == 1 else "rqmc"
    return method


def _replicate_result(G: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean of the R replicate estimates G_r/count and its 95% half-width t_{R-1}·std/√R."""
    R = G.shape[0]
    half = G.std(0).mul_(stats.t.ppf(0.975, R - 1) / (math.sqrt(R) * count))
    return G.mean(0).div_(count), half


def limit_ntk(
    model,
    x: Tensor,
    x2: Tensor | None = None,
    tol: float = 5e-4,
    method: str = "auto",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    replicates: int = 8,
    max_points: int = 2**22,
    truncated: bool = False,
) -> LimitKernel:
    """Limit kernel K(x̄_i, x̄'_j) = E[S S'] + E[c²] E[P·P' + Q Q'] of ``model``'s activation and
    initial law μ0, for windows x (n, L, d) and x2 (m, L', d) (default x2 = x), theory §5.

    ``tol`` is the target for the largest per-entry absolute error; ``method`` is one of
    'auto', 'rqmc', 'quadrature', 'iid' (see the module docstring). Randomness (Sobol'
    scrambling, Monte Carlo draws) comes from ``generator``, else from ``seed`` (default 0).
    ``chunk_size`` points are processed at a time (default: temporaries within ~256 MB).
    ``replicates`` is R for rqmc/iid, ``max_points`` the budget of (w, b) points (all
    replicates, or one quadrature grid); past it a :class:`LimitAccuracyWarning` reports the
    error reached. ``truncated=True`` gives E[φ(x̄)·φ_trunc(x̄')], the kernel of truncated
    training (theory §4; not symmetric). Returns a :class:`LimitKernel` in float64.
    """
    method = _check(model, x, x2, method, tol)
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise ConfigError(f"replicates={replicates!r} must be an integer >= 2")
    law: InitLaw = model.init_law
    act, d = model.act, model.input_dim
    xa = (x if x.dim() == 3 else x.unsqueeze(0)).to(_F64)
    xb = None if x2 is None else (x2 if x2.dim() == 3 else x2.unsqueeze(0)).to(_F64)
    n, m = xa.shape[0], (xa if xb is None else xb).shape[0]
    if chunk_size is None:
        per_point = 8 * (n + (m if (xb is not None or truncated) else 0)) * (2 * d + 8)
        chunk_size = int(min(2**16, max(256, _MEM_BUDGET // per_point)))
    if generator is None:
        generator = generator_from_seed(0 if seed is None else seed)
    dev = xa.device
    c2 = law.c_second_moment()
    gram = lambda w, b, cfac, weight, out=None: _gram_sums(  # noqa: E731
        w, b, cfac, weight, act, xa, xb, truncated, chunk_size, out)

    if method == "quadrature":
        return _quadrature(law, d, gram, c2, tol, max_points, dev, xb is None and not truncated)
    return _replicated(method, law, d, gram, c2, tol, max_points, replicates, generator,
                       xa.new_zeros(replicates, n, m), xb is None and not truncated)


def _sobol_points(law, d, R, generator, c2, dev):
    """rqmc: ``draw(n)`` → the next n points (w (R, n, d), b (R, n), √E[c²]) of R independently
    scrambled Sobol' sequences (each extended, nothing redrawn), mapped to μ0 by the inverse
    CDF."""
    axes = law_axes(law, d)
    root = int(torch.randint(0, 2**62, (1,), generator=generator))
    engines = [qmc.Sobol(d + 1, scramble=True, seed=np.random.default_rng(s))
               for s in np.random.SeedSequence(root).spawn(R)]

    def draw(new):
        u = np.stack([e.random(new) for e in engines])  # extends each sequence
        u = torch.from_numpy(np.clip(u, 2.0**-60, 1.0 - 2.0**-53)).to(dev)
        wb = torch.stack([inverse_cdf(k, s, u[..., i]) for i, (k, s) in enumerate(axes)], -1)
        return wb[..., :d], wb[..., d], math.sqrt(c2)
    return draw


def _monte_carlo_points(law, d, R, generator, c2, dev):
    """iid: ``draw(n)`` → n fresh draws of μ0 per replicate (a custom law's c as drawn, else
    √E[c²])."""
    def draw(new):
        c, w, b = law.sample(R * new, d, generator, dtype=_F64, device=dev)
        cfac = c.reshape(R, new) if law.is_custom else math.sqrt(c2)
        return w.reshape(R, new, d), b.reshape(R, new), cfac
    return draw


#: the replicated methods' point sources: ``method → f(law, d, R, generator, c2, device)``
POINTS = {"rqmc": _sobol_points, "iid": _monte_carlo_points}


def _replicated(method, law, d, gram, c2, tol, max_points, R, generator, G, symmetric):
    """rqmc / iid: R independent replicate estimates G_r/count, points per replicate doubling
    (Sobol' sequences extended, Monte Carlo draws added) until t·std/√R ≤ tol everywhere."""
    draw = POINTS[method](law, d, R, generator, c2, G.device)
    count = 0
    first = 2 ** int(math.log2(max(64, min(1024, max_points // R))))  # a power of 2 for Sobol'
    while True:
        new = first if count == 0 else count
        gram(*draw(new), None, out=G)
        count += new
        value, half = _replicate_result(G, count)
        if symmetric:
            value, half = _sym(value), _sym(half)
        err = float(half.max())
        if err <= tol or 2 * R * count > max_points:
            if err > tol:
                _warn(method, err, tol, R * count, max_points)
            return LimitKernel(value, err, half, method, R * count, err <= tol)


def _quadrature(law, d, gram, c2, tol, max_points, dev, symmetric) -> LimitKernel:
    """Tensor-product rules, refined separately on the w axes (i = 0) and the b axis (i = 1).

    For the current grid K(r) with r = (r_w, r_b), e_i = |K(r with r_i doubled) − K(r)| estimates
    axis i's error of K(r). At max(e_w + e_b) ≤ tol the grid refined in the worse axis is
    returned with error_entries = e_w + e_b (an upper estimate: its own error is ≈ min(e_w, e_b)
    with exponentially convergent rules); otherwise each axis with max e_i > tol/2 (at least the
    worse one) is doubled. A grid over ``max_points`` is not computed: the axis then keeps its
    last estimate (that of the half resolution, conservative) and the result is not converged.
    """
    axes = law_axes(law, d)
    refinable = (any(k in ("normal", "uniform") for k, _ in axes[:d]),
                 axes[d][0] in ("normal", "uniform"))
    cache: dict = {}

    def K(res):  # weighted Gram of the tensor rule at resolution res, None if over budget
        if res not in cache:
            pts, wts = _tensor_rule(axes, res)
            if pts.shape[0] > max_points:
                return None
            val = gram(pts[None, :, :d].to(dev), pts[None, :, d].to(dev), math.sqrt(c2),
                       wts[None].to(dev))[0]
            cache[res] = (_sym(val) if symmetric else val, pts.shape[0])
        return cache[res]

    res = (16, 8)  # trapezoid half-intervals or Gauss–Legendre nodes (w axes, b axis)
    base = K(res)
    if base is None:
        raise ConfigError(f"max_points={max_points} is below the coarsest quadrature grid "
                          f"({_tensor_rule(axes, res)[0].shape[0]} points)")
    errs = [torch.full_like(base[0], math.inf)] * 2
    while True:
        finer = [None, None]
        for i in (0, 1):
            if not refinable[i]:
                errs[i] = torch.zeros_like(base[0])  # discrete law: exact
                continue
            finer[i] = K((res[0] * 2, res[1]) if i == 0 else (res[0], res[1] * 2))
            if finer[i] is not None:
                errs[i] = (finer[i][0] - base[0]).abs()
        emax = [float(e.max()) for e in errs]
        worse = 0 if emax[0] >= emax[1] else 1
        total = errs[0] + errs[1]
        val, npts = finer[worse] if finer[worse] is not None else base
        if float(total.max()) <= tol:
            return LimitKernel(val, float(total.max()), total, "quadrature", npts, True)
        if any(refinable[i] and finer[i] is None for i in (0, 1)):
            _warn("quadrature", float(total.max()), tol, npts, max_points)
            return LimitKernel(val, float(total.max()), total, "quadrature", npts, False)
        grow = [refinable[i] and (emax[i] > tol / 2 or i == worse) for i in (0, 1)]
        old, res = res, (res[0] * (1 + grow[0]), res[1] * (1 + grow[1]))
        base = K(res)
        if base is None:  # both axes doubled is over budget: refine the worse one only
            res = (old[0] * (2 if worse == 0 else 1), old[1] * (2 if worse == 1 else 1))
            base = K(res)
        for r in [r for r in cache if r != res]:  # keep memory to a few (n, m) grids
            del cache[r]


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def _warn(method: str, err: float, tol: float, npts: int, budget: int) -> None:
    warnings.warn(
        f"limit_ntk(method={method!r}) stopped at the point budget max_points={budget} "
        f"({npts} points used) with estimated max error {err:.3g} > tol={tol:.3g}; "
        "raise max_points or tol", LimitAccuracyWarning, stacklevel=4)
