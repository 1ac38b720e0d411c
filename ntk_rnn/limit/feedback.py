"""The infinite-width limit of Model F (theory §6): the cell kernel and the coupled limit.

**Cell kernel.** For augmented inputs a = (x, s), a' = (x', s') and θ ~ μ0 (c independent of w, b)

    K_cell(a, a') = E[σ(z)σ(z')] + E[c²] E[σ'(z)σ'(z')] (x·x' + s s'),   z = w·x + b s

With w ~ N(0, w_scale² I/d), b ~ N(0, ρ²), (z, z') is centred Gaussian with covariance
Σ11 = w_scale²|x|²/d + ρ²s², Σ12 = w_scale² x·x'/d + ρ² s s', Σ22 likewise (z' = w·x' + b s'),
and (:func:`limit_cell_ntk`)

- erf, closed form: E[erf z erf z'] = (2/π) arcsin(2Σ12 / √((1+2Σ11)(1+2Σ22))),
  E[erf' z erf' z'] = (4/π) / √((1+2Σ11)(1+2Σ22) − 4Σ12²);
- any activation: a 2-D rule in (z, z') = (L11 u, L21 u + L22 v) (Cholesky of Σ; u, v standard
  normal), n nodes per axis, n doubling until two resolutions agree to ``tol``; the error reported
  is |K_n − K_{n/2}| (conservative for K_n). ``rule="trapezoid"`` (default): 2n+1 nodes on
  [−9, 9] with weights ∝ e^{−u²/2}, exponentially convergent for integrands analytic in a strip
  (tanh, sigmoid); ``rule="hermite"``: n-node Gauss–Hermite, markedly slower for tanh when Σ is
  O(1) or larger (at 65 nodes per axis and Σ11 = 9: 2e−6 vs 7e−5 error) as theory §5 reports;
- other laws (uniform, rademacher, constant; custom sampler): R scrambled-Sobol' (RQMC) or Monte
  Carlo replicates of J (w, b) points each; error t_{0.975,R−1} · std / √R (a 95% half-width).

**Coupled limit.** h_0 = 0; for a sample of stationary windows X̄_r (length L) with last-step
targets Y_r, r = 1..M, the memory runs with h_t from zero: A_{r,k} = (X_{r,k}, m_{r,k}), k = 1..L,
m_{r,1} = 0, m_{r,k+1} = h_t(A_{r,k}); A_r = A_{r,L} is a sample of π_t (burn-in L−1). Then

    ∂_t h_t(a) = α (1/M) Σ_r (Y_r − h_t(A_r)) Ψ_r(a),
    truncated:  Ψ_r(a) = K(a, A_{r,L})                                (theory §6's equation)
    rtrl:       Ψ_r(a) = Σ_{i≥0} (Π_{l<i} ∂_s h_t(A_{r,L−l})) K(a, A_{r,L−i}).

The rtrl form is the limit of the exact gradient of §3: ∂Ŷ_k/∂θ = D_k + ∂_s f(A_k) ∂Ŷ_{k−1}/∂θ, so
N^{2β−1} ∇f(a)·∂Ŷ_k/∂θ → Ψ(a); the §6 equation (K alone) is the limit of ``gradient=one_step``.
The two differ once ∂_s h_t is O(1) (by ~0.5% of h's rms at t = 1, where sup|∂_s h_t| ≈ 0.16, on
a VAR(1) lag target with α = 4).

The kernel is represented by a quadrature of μ0 over J points (w_j, b_j) (scrambled Sobol'
mapped by the inverse CDF; ω_j = 1/J): K_J(a, a') = (1/J) Σ_j φ_j(a)·φ_j(a'),
φ_j(a) = (σ(z_j), γ σ'(z_j) a), γ = √E[c²] (the drawn c_j for a custom law). h_t, a kernel
expansion over all chain samples of all time steps n, is then stored in primal form

    h_t(a) = (1/J) Σ_j [u_j σ(z_j(a)) + γ σ'(z_j(a)) v_j·a],  (u_j, v_j) = Σ_{n,r} e_{n,r} ψ_{j,n,r}

ψ = φ(A_{r,L}) (truncated) or the RTRL sum ψ = Σ_k (Π_{l>k} ∂_s h(A_{r,l})) φ(A_{r,k}) (rtrl),
so an evaluation costs O(J d) however long the run. Time is discretised by explicit Euler with
step dt: the chains are run with h_{t_n}, then e_{n,r} = α dt (Y_r − h_{t_n}(A_r)) / M is added.
The scheme is consistent: errors O(dt) + O(M^{-1/2}) (the π sample) + the quadrature error of K_J
(check it against :func:`limit_cell_ntk`) + the burn-in error O(ρ_t^{L−1}). The contraction
ρ_t ≈ sup_r |∂_s h_t(A_r)| (estimated on the sample) is recorded every step; a
:class:`ContractionWarning` is raised where it reaches 1 (the memory fixed point is then not
guaranteed and the limit is unreliable).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import stats
from scipy.special import roots_hermitenorm
from scipy.stats import qmc
from torch import Tensor

from ..errors import ConfigError
from ..models.activations import Activation
from ..models.family import family_of
from ..models.init import InitLaw, generator_from_seed
from ..models.recurrence import ONLINE_GRADIENTS, online_gradient
from ..ntk.cell import cell_gram, check_cell_inputs
from .kernel import LimitAccuracyWarning, LimitKernel, inverse_cdf, law_axes, limit_method

_F64 = torch.float64
METHODS = ("auto", "closed", "quadrature", "rqmc", "iid")
_HALF_WIDTH = 9.0  # trapezoid nodes on [-9, 9] standard deviations (tail mass 2e-19)


class ContractionWarning(RuntimeWarning):
    """sup|∂_s h_t| ≥ 1 on the sample: the memory chain of the Model F limit need not contract."""


# --- the limit cell kernel ----------------------------------------------------------------------
def _check_feedback(model) -> None:
    if family_of(model).limit != "cell":
        raise ConfigError("the cell kernel and its limit need model.recurrence='feedback' "
                          "(Model F)")


def _gaussian(law: InitLaw) -> bool:
    return not law.is_custom and law.w == "normal" and law.b == "normal"


def _covariances(law: InitLaw, d: int, a: Tensor, a2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Σ11 (n, 1), Σ12 (n, m), Σ22 (1, m) of (z, z') for w ~ N(0, w_scale² I/d), b ~ N(0, ρ²)."""
    scale = torch.tensor([law.w_scale**2 / d] * d + [law.rho**2], dtype=a.dtype, device=a.device)
    return ((a * a) @ scale)[:, None], (a * scale) @ a2.T, ((a2 * a2) @ scale)[None, :]


def _rule(rule: str, n: int, device) -> tuple[Tensor, Tensor]:
    """1-D nodes and weights (summing to 1) for E over a standard normal, resolution n."""
    if rule == "hermite":
        u, wt = roots_hermitenorm(n)
    else:
        u = np.linspace(-_HALF_WIDTH, _HALF_WIDTH, 2 * n + 1)
        wt = np.exp(-0.5 * u * u)
    return (torch.tensor(u, dtype=_F64, device=device),
            torch.tensor(wt / wt.sum(), dtype=_F64, device=device))


def _quad2d(act: Activation, s11: Tensor, s12: Tensor, s22: Tensor, u: Tensor, wt: Tensor,
            chunk: int = 2**22) -> tuple[Tensor, Tensor]:
    """E[σ(z)σ(z')] and E[σ'(z)σ'(z')] per pair (flattened Σ entries) on the tensor grid u × u."""
    L11 = s11.clamp_min(0).sqrt()
    L21 = torch.where(L11 > 0, s12 / L11.clamp_min(1e-300), torch.zeros_like(s12))
    L22 = (s22 - L21**2).clamp_min(0).sqrt()
    out_v, out_d = torch.empty_like(s12), torch.empty_like(s12)
    n = u.shape[0]
    step = max(1, chunk // (n * n))
    for i in range(0, s12.numel(), step):
        sl = slice(i, i + step)
        g1, d1 = act.value_and_deriv(L11[sl, None] * u)  # (P, n)
        z2 = L21[sl, None, None] * u[:, None] + L22[sl, None, None] * u  # (P, n, n)
        g2, d2 = act.value_and_deriv(z2)
        out_v[sl] = (g1 * (g2 @ wt)) @ wt
        out_d[sl] = (d1 * (d2 @ wt)) @ wt
    return out_v, out_d


def cell_points(law: InitLaw, d: int, n: int, generator: torch.Generator,
                rqmc: bool = True, device="cpu") -> tuple[Tensor, Tensor | float]:
    """n points (w_j, b_j) of μ0 as wb (n, d+1), with cfac = √E[c²] (or the drawn c_j, custom law).

    Built-in laws: one scrambled Sobol' sequence mapped by the inverse CDF (``rqmc``) or i.i.d.
    draws; a custom ``law.sampler``: its own draws."""
    if law.is_custom or not rqmc:
        c, w, b = law.sample(n, d, generator, dtype=_F64, device=device)
        cfac = c if law.is_custom else math.sqrt(law.c_second_moment())
        return torch.cat([w, b[:, None]], 1), cfac
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    u = qmc.Sobol(d + 1, scramble=True, seed=np.random.default_rng(seed)).random(n)
    u = torch.from_numpy(np.clip(u, 2.0**-60, 1.0 - 2.0**-53)).to(device)
    wb = torch.stack([inverse_cdf(k, s, u[:, i]) for i, (k, s) in enumerate(law_axes(law, d))], -1)
    return wb, math.sqrt(law.c_second_moment())


def limit_cell_ntk(
    model, xs: Tensor, xs2: Optional[Tensor] = None, tol: float = 1e-6, method: str = "auto",
    rule: str = "trapezoid", max_nodes: int = 513, replicates: int = 8, n_points: int = 2**14,
    generator: Optional[torch.Generator] = None, seed: int = 0,
) -> LimitKernel:
    """The limit cell kernel K_cell(a_i, a'_j) of ``model``'s activation and μ0 (module docstring)
    on augmented inputs xs (n, d+1), xs2 (m, d+1) (default xs), in float64.

    ``method``: 'closed' (erf, Gaussian w and b), 'quadrature' (Gaussian w and b; ``rule``
    'trapezoid' or 'hermite', nodes per axis doubling up to ``max_nodes`` until the change is
    ≤ ``tol``), 'rqmc' / 'iid' (``replicates`` × ``n_points`` points of μ0), 'auto' (the first of
    closed, quadrature, rqmc, iid that applies). Returns a LimitKernel (``value``, ``error`` = max
    per-entry estimate, ``error_entries``, ``method``, ``n_points``, ``converged``); a
    LimitAccuracyWarning says when ``tol`` was not reached.
    """
    _check_feedback(model)
    method = limit_method(method)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not known; choose one of {list(METHODS)}")
    if rule not in ("trapezoid", "hermite"):
        raise ConfigError(f"rule={rule!r}: choose 'trapezoid' or 'hermite'")
    law, act, d = model.init_law, model.act, model.input_dim
    a = check_cell_inputs(model, xs).to(_F64)
    sym = xs2 is None
    a2 = a if sym else check_cell_inputs(model, xs2, "xs2").to(_F64)
    if method == "auto":
        method = ("closed" if act.name == "erf" else "quadrature") if _gaussian(law) else (
            "iid" if law.is_custom else "rqmc")
    if method in ("closed", "quadrature") and not _gaussian(law):
        raise ConfigError(f"method={method!r} needs Gaussian w and b (model.init.w=normal, "
                          "model.init.b=normal); use 'rqmc' or 'iid'")
    if method == "closed" and act.name != "erf":
        raise ConfigError(f"method='closed' is for activation='erf' (got {act.name!r})")
    if method == "rqmc" and law.is_custom:
        raise ConfigError("a custom initial law (init_law.sampler) needs method='iid'")
    c2, dot = law.c_second_moment(), a @ a2.T
    s11, s12, s22 = _covariances(law, d, a, a2)
    if method == "closed":
        q11, q22 = 1 + 2 * s11, 1 + 2 * s22
        Ess = (2 / math.pi) * torch.asin((2 * s12 / (q11 * q22).sqrt()).clamp(-1, 1))
        Edd = (4 / math.pi) / (q11 * q22 - 4 * s12**2).clamp_min(1e-300).sqrt()
        value = Ess + c2 * Edd * dot
        value = _sym(value) if sym else value
        return LimitKernel(value, 0.0, torch.zeros_like(value), "closed", 0, True)
    if method == "quadrature":
        shape, prev, n = s12.shape, None, 16
        p11, p22 = s11.expand(shape).reshape(-1), s22.expand(shape).reshape(-1)
        while True:
            u, wt = _rule(rule, n, a.device)
            Ess, Edd = _quad2d(act, p11, s12.reshape(-1), p22, u, wt)
            value = (Ess + c2 * Edd * dot.reshape(-1)).reshape(shape)
            value = _sym(value) if sym else value
            if prev is not None:
                diff = (value - prev).abs()
                err = float(diff.max())
                # the next level has 2(2n)+1 trapezoid nodes (nested) or 2n Hermite nodes
                nxt = 2 * u.shape[0] - 1 if rule == "trapezoid" else 2 * u.shape[0]
                if err <= tol or nxt > max_nodes:
                    if err > tol:
                        _warn(method, err, tol, f"{u.shape[0]} nodes per axis")
                    return LimitKernel(value, err, diff, method, u.shape[0] ** 2, err <= tol)
            prev, n = value, 2 * n
    # rqmc / mc: R independent replicates of n_points (w, b) points
    if generator is None:
        generator = generator_from_seed(seed)
    reps = torch.stack([
        cell_gram(*cell_points(law, d, n_points, generator, method == "rqmc", a.device), act,
                  a, None if sym else a2) / n_points
        for _ in range(int(replicates))])
    R = reps.shape[0]
    value, half = reps.mean(0), stats.t.ppf(0.975, R - 1) * reps.std(0) / math.sqrt(R)
    err = float(half.max())
    if err > tol:
        _warn(method, err, tol, f"replicates × n_points = {R} × {n_points}")
    return LimitKernel(value, err, half, method, R * n_points, err <= tol)


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def _warn(method: str, err: float, tol: float, budget: str) -> None:
    warnings.warn(f"limit_cell_ntk(method={method!r}): estimated max error {err:.3g} > "
                  f"tol={tol:.3g} at {budget}; raise the budget or tol", LimitAccuracyWarning,
                  stacklevel=3)


# --- the coupled limit ---------------------------------------------------------------------------
# σ'' from (z, σ, σ') for the built-in activations; others use a central difference
_D2 = {"tanh": lambda z, S, dS: -2.0 * S * dS, "sigmoid": lambda z, S, dS: dS * (1.0 - 2.0 * S),
       "erf": lambda z, S, dS: -2.0 * z * dS}


class FeedbackLimit:
    """h(a) = (1/J) Σ_j [u_j σ(z_j(a)) + γ_j σ'(z_j(a)) v_j·a], z_j(a) = (w_j, b_j)·a (module doc).

    ``wb`` (J, d+1) are the quadrature points of μ0, ``cfac`` γ (float or (J,)); u, v start at 0
    (h_0 = 0). ``kernel(a, a2)`` is the quadrature kernel K_J the flow uses.
    """

    def __init__(self, wb: Tensor, cfac: Tensor | float, act: Activation) -> None:
        self.wb, self.cfac, self.act = wb.to(_F64), cfac, act
        J, d1 = wb.shape
        self.u, self.v = wb.new_zeros(J, dtype=_F64), wb.new_zeros(J, d1, dtype=_F64)

    @classmethod
    def from_model(cls, model, n_features: int = 2**11, seed: int = 0) -> "FeedbackLimit":
        """J = ``n_features`` RQMC points of ``model.init_law`` (Monte Carlo for a custom law)."""
        _check_feedback(model)
        g = generator_from_seed(seed)
        wb, cfac = cell_points(model.init_law, model.input_dim, int(n_features), g,
                               device=model.w.device)
        return cls(wb, cfac, model.act)

    def _eval(self, a: Tensor, ds: bool = False):
        """h(a), ∂_s h(a) (if ``ds``, else None) and the features σ(z) (n, J), γσ'(z) (n, J)."""
        J = self.wb.shape[0]
        z = a @ self.wb.T
        S, dS = self.act.value_and_deriv(z)
        G, av = dS * self.cfac, a @ self.v.T
        h = (S @ self.u + (G * av).sum(1)) / J
        if not ds:
            return h, None, S, G
        if self.act.name not in _D2:
            e = torch.zeros_like(a)
            e[:, -1] = 1e-5
            return h, (self.h(a + e) - self.h(a - e)) / 2e-5, S, G
        b = self.wb[:, -1]  # ∂_s z_j = b_j
        d2 = _D2[self.act.name](z, S, dS) * self.cfac
        hs = (dS @ (b * self.u) + (d2 * av) @ b + G @ self.v[:, -1]) / J
        return h, hs, S, G

    def h(self, a: Tensor) -> Tensor:
        """h(a) on augmented inputs a (n, d+1) → (n,)."""
        return self._eval(a)[0]

    def dh_ds(self, a: Tensor) -> Tensor:
        """∂_s h(x, s) at the rows of a (n, d+1) → (n,)."""
        return self._eval(a, ds=True)[1]

    def kernel(self, a: Tensor, a2: Optional[Tensor] = None) -> Tensor:
        """K_J(a, a') = (1/J) Σ_j φ_j(a)·φ_j(a'), the quadrature of K_cell the flow uses."""
        return cell_gram(self.wb, self.cfac, self.act, a, a2) / self.wb.shape[0]

    def run(self, X: Tensor, gradient: Optional[str] = None):
        """Run the memory m_{k+1} = h(A_k), A_k = (X_k, m_k), m_1 = 0 along windows X (n, L, d).

        Returns (A (L, n, d+1), h(A_L) (n,), ∂_s h(A_L) (n,), c (L, n)): ``c`` weighs the steps
        of the kernel expansion, ψ_L = Σ_k c_k φ(A_k): c_k = Π_{l>k} ∂_s h(A_l) (rtrl), the
        last step only (truncated), None (``gradient=None``, then ∂_s h is None too).
        """
        X = X.to(_F64)
        L = X.shape[1]
        m, A, hs = X.new_zeros(X.shape[0]), [], []
        for k in range(L):
            A.append(torch.cat([X[:, k], m[:, None]], 1))
            ds = gradient == "rtrl" or (k == L - 1 and gradient is not None)
            m, g, _, _ = self._eval(A[-1], ds)
            hs.append(g)
        c = None
        if gradient == "rtrl":  # c_{L-1} = 1, c_k = c_{k+1} ∂_s h(A_{k+1})
            c = torch.stack(hs[1:] + [torch.ones_like(m)]).flip(0).cumprod(0).flip(0)
        elif gradient is not None:
            c = torch.zeros(L, X.shape[0], dtype=_F64, device=X.device)
            c[-1] = 1.0
        return torch.stack(A), m, hs[-1], c

    def predict(self, X: Tensor) -> Tensor:
        """The limit's output at the last step of windows X (n, L, d): h(A_L)."""
        return self.run(X)[1]

    def update(self, e: Tensor, A: Tensor, c: Tensor) -> None:
        """h ← h + Σ_r e_r Σ_k c_{k,r} K_J(·, A_{k,r}) for A, c from ``run``: in primal form
        u_j += Σ e c σ(z_j(A)), v_j += Σ e c γ σ'(z_j(A)) A (features recomputed step by step)."""
        for k in range(A.shape[0]):
            if not bool(c[k].any()):
                continue
            _, _, S, G = self._eval(A[k])
            ek = e * c[k]
            self.u += S.T @ ek
            self.v += (G * ek[:, None]).T @ A[k]


@dataclass
class FeedbackSolution:
    """The coupled limit on the grid ``t`` (T+1,): ``h_probes`` (T+1, n_probes) the limit output on
    the probe windows (None without probes), ``contraction`` (T+1,) sup_r |∂_s h_t(A_r)| on the
    π_t sample, ``mse`` (T+1,) the sample mean of (Y − h_t(A))², ``limit`` the final h."""

    t: Tensor
    h_probes: Optional[Tensor]
    contraction: Tensor
    mse: Tensor
    limit: FeedbackLimit


@torch.no_grad()
def solve_feedback_limit(
    model, X: Tensor, Y: Tensor, alpha: float, horizon: float, dt: float,
    probes: Optional[Tensor] = None, gradient: str = "rtrl", n_features: int = 2**11,
    seed: int = 0, limit: Optional[FeedbackLimit] = None,
) -> FeedbackSolution:
    """Solve the coupled limit of Model F (module docstring) on t ∈ [0, horizon] by Euler steps dt.

    X (M, L, d), Y (M,): stationary windows and their last-step targets (e.g. ``source.windows``);
    the first L−1 steps are the memory's burn-in. ``probes`` (n, L', d): windows on which h_t's
    output is recorded. ``gradient``: the training rule whose limit is solved, 'rtrl' (exact
    gradients, the trainer's default) or 'one_step' (theory §6's equation; formerly 'truncated').
    ``limit``: the kernel quadrature (default ``FeedbackLimit.from_model(model, n_features,
    seed)``), advanced in place.
    """
    _check_feedback(model)
    if X.dim() != 3 or X.shape[-1] != model.input_dim or Y.shape != (X.shape[0],) or X.shape[0] < 1:
        raise ConfigError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)}: expected windows (M, L, "
                          f"{model.input_dim}) and their last-step targets (M,)")
    if not (float(alpha) > 0 and float(horizon) >= 0 and float(dt) > 0):
        raise ConfigError(f"alpha={alpha}, dt={dt} must be > 0 and horizon={horizon} >= 0")
    gradient = online_gradient(gradient)
    if gradient not in ONLINE_GRADIENTS:
        raise ConfigError(f"gradient={gradient!r}: choose one of {list(ONLINE_GRADIENTS)}")
    lim = FeedbackLimit.from_model(model, n_features, seed) if limit is None else limit
    Y = Y.to(_F64)
    steps = max(0, round(float(horizon) / float(dt)))
    hp, rho, mse, warned = [], [], [], False
    for n in range(steps + 1):
        A, hA, hs, c = lim.run(X, gradient)
        rho.append(float(hs.abs().max()))
        if rho[-1] >= 1 and not warned:
            warnings.warn(
                f"Model F limit: sup|∂_s h_t| ≈ {rho[-1]:.3g} >= 1 on the π_t sample at "
                f"t = {n * dt:.4g}: the memory chain m_(k+1) = h_t(X_k, m_k) need not contract, "
                "so π_t and the limit are unreliable (lower alpha or the horizon)",
                ContractionWarning, stacklevel=2)
            warned = True
        if probes is not None:
            hp.append(lim.predict(probes))
        resid = Y - hA
        mse.append(float((resid**2).mean()))
        if n < steps:
            lim.update(resid * (float(alpha) * float(dt) / X.shape[0]), A, c)
    t = torch.arange(steps + 1, dtype=_F64) * float(dt)
    return FeedbackSolution(t, torch.stack(hp) if hp else None, torch.tensor(rho, dtype=_F64),
                            torch.tensor(mse, dtype=_F64), lim)
