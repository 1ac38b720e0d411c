"""The closed-form infinite-width kernel of the full-matrix Elman network (theory §9).

Network (:class:`ntk_rnn.models.ElmanRNN`): u_k = w X_k + N^{-γ} A S_{k-1}, S_k = σ(u_k),
S_0 = 0, Ŷ = N^{-β} c·S_L; the normalised kernel is K = N^{2β-1} ∇Ŷ_L·∇Ŷ'_L, block by block
(c, w, A). Write E[c²] = σ_c², w ~ N(0, s_w² I/d), A_ij of mean m_A and variance σ_A²,
V = E[σ(u)σ(u')], V̇ = E[σ'(u)σ'(u')] over a bivariate Gaussian (u, u').

**NTK recurrent scaling (γ = 1/2, m_A = 0).** The pre-activations of one step are Gaussian over
units with covariance

    q_{k,k'}(x̄, x̄') = s_w² X_k·X'_{k'}/d + σ_A² V_{k-1,k'-1},   V_{0,·} = V_{·,0} = 0

(by the central limit theorem over j in N^{-1/2} Σ_j A_ij S_j: only the variance of A's law
enters, so ``A_law`` normal and uniform have the same limit). Backward vectors δ_k = ∂(c·S_L)/∂u_k
have Π_{L,L'} = σ_c² V̇_{L,L'} and Π_{k,k'} = σ_A² V̇_{k,k'} Π_{k+1,k'+1} (gradient
independence); a pair (k, k') with L − k ≠ L' − k' has no common factor of c and vanishes. So only
steps at the same distance j from the windows' ends pair, forward and backward: with
ℓ = min(L, L'), k = L − j, k' = L' − j, j = 0..ℓ−1,

    K_c = V_{L,L'},   K_w = Σ_j Π_{k,k'} X_k·X'_{k'},   K_A = Σ_j Π_{k,k'} V_{k-1,k'-1},

and the forward recursion runs along the same end-aligned diagonal, started from V = 0 at the
shorter window's step 0 (its S_0 = 0 whatever the longer window's state is there). The
variances q_{k,k}(x̄, x̄) of each window follow its own recursion from its own start. The w and A
gradients carry no s_w²/d or σ_A² (w and A hold their own scale).

**Mean-field recurrent scaling (γ = 1).** N^{-1} Σ_j A_ij S_j → m_A S̄_{k-1} (law of large
numbers: only the mean of A's law enters), S̄_k = E[σ(w·X_k + m_A S̄_{k-1})], S̄_0 = 0. With
E[c] = 0 the backward vector reaching step k < L is N^{-1} Σ_j A_ji δ_{k+1,j} → m_A E[δ_{k+1}] = 0,
and the A block is O(1/N), so with ũ = w·X_L + m_A S̄_{L-1}(x̄)

    K_c = E[σ(ũ)σ(ũ')],   K_w = σ_c² E[σ'(ũ)σ'(ũ')] X_L·X'_{L'},   K_A = 0.

For odd σ (tanh, erf) S̄ ≡ 0 whatever m_A is; only sigmoid and relu keep memory through m_A.

**Not covered (ConfigError):** m_A ≠ 0 under NTK scaling (the recurrence grows like √N);
``w_law`` other than normal (the pre-activations are then not Gaussian); E[c] ≠ 0 (``c_law``
constant) under NTK scaling (the backward vectors are no longer independent of the forward
ones) and under mean-field scaling with m_A ≠ 0 (a backward term through m_A E[c] survives).

**Expectations.** Closed forms where they exist at zero mean: erf (arcsine formula) and relu
(arc-cosine formulas); relu with means (mean-field, m_A ≠ 0): one Gauss–Legendre integral of the
conditional closed form on the half line where σ ≠ 0; otherwise the trapezoidal rule in the
whitened coordinates (z₁, z₂) on [-9, 9]², weights ∝ exp(-z²/2) (exponentially convergent for
integrands analytic in a strip, as ``limit_ntk``'s normal axes). The resolution doubles until two
resolutions differ by ≤ tol in every entry; the finer one is returned with that difference as
its per-entry error (conservative), like Model D's quadrature limit. tanh and sigmoid at zero
means (``method="auto"``) interpolate instead a table computed once (:mod:`.gauss_table`), its
nodes at spacings 2h and h being the two resolutions; pairs that miss tol continue with the
trapezoidal rule at 32, 64, …. Mean-field with means and d = 1 (one scalar w for both windows):
one trapezoidal rule over w shared by all windows, two matrix products (:func:`_rank_one`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from scipy import special
from torch import Tensor

from ..errors import ConfigError
from ..models.activations import ACTIVATIONS, Activation
from ..models.family import family_of
from . import gauss_table
from .kernel import LimitAccuracyWarning, LimitKernel

_F64 = torch.float64
_HALF_WIDTH = 9.0  # whitened Gaussian coordinates on [-9, 9] (tail mass 2e-19)
_CENTRE = 2.5  # largest shift of a rule's centre (sd) from the Gaussian's
_START_RES, _MAX_RES = 8, 64  # trapezoid half-intervals per axis: 2 res + 1 nodes
_CHUNK = 2**22  # pair × node elements per temporary
BLOCKS = ("c", "w", "A")
TABLE_ACTS = ("tanh", "sigmoid")  # centred pair moments from gauss_table


@dataclass(frozen=True)
class Table:
    """The interpolation-table rule (:mod:`ntk_rnn.limit.gauss_table`) at ``stride`` (2: every
    other node, the coarse resolution); pairs outside the table by the 2-D quadrature at
    ``fallback``."""

    stride: int

    @property
    def fallback(self) -> int:
        return 32 // self.stride


def _table_moments(act: Activation, A, B, ia, ib, q12: Tensor, rule: Table, qa: Tensor,
                   qb: Tensor) -> tuple[Tensor, Tensor]:
    """(V, V̇) at zero means for tanh or sigmoid (σ = ½ + ½ tanh(u/2): V = ¼ + ¼ V_tanh(q/4),
    V̇ = V̇_tanh(q/4)/16) from the table axes A, B (of q or q/4) for the pairs (ia, ib) (None:
    elementwise); pairs outside the table by :func:`_mapped2`."""
    sig = act.name == "sigmoid"
    c12 = q12 * 0.25 if sig else q12
    ev, edv, ok = gauss_table.tanh_pairs(A, B, ia, ib, c12, rule.stride)
    if not bool(ok.all()):
        out = (~ok).nonzero().squeeze(-1)
        q11 = qa if ia is None else qa[ia]
        q22 = qb if ib is None else qb[ib]
        q11, q22, c = (v[out] * (0.25 if sig else 1.0) for v in (q11, q22, c12))
        e1, e2 = _mapped2(ACTIVATIONS["tanh"], *_whiten(q11, q22, c), rule.fallback, None, None)
        ev, edv = ev.clone(), edv.clone()
        ev[out], edv[out] = e1, e2
    if sig:
        return 0.25 + 0.25 * ev, edv / 16.0
    return ev, edv


def _axes(act: Activation, qa: Tensor, qb: Tensor, rule: Table):
    """The table axes of the variances qa (first) and qb (second) (q/4 for sigmoid)."""
    f = 0.25 if act.name == "sigmoid" else 1.0
    return (gauss_table.axis(qa * f, rule.stride, True),
            gauss_table.axis(qb * f, rule.stride, False))


# --- Gaussian expectations ----------------------------------------------------------------------
def _legendre(res: int) -> tuple[Tensor, Tensor]:
    t, wt = special.roots_legendre(2 * res + 1)
    return torch.tensor(t, dtype=_F64), torch.tensor(wt, dtype=_F64)


def _norm_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _norm_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _whiten(q11: Tensor, q22: Tensor, q12: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, ρ) with u = μ + a z₁, u' = μ' + b(ρ z₁ + √(1−ρ²) z₂); ρ = 0 where a b = 0."""
    a, b = q11.clamp_min(0).sqrt(), q22.clamp_min(0).sqrt()
    ab = a * b
    rho = torch.where(ab > 0, q12 / ab.clamp_min(1e-300), torch.zeros_like(ab)).clamp(-1.0, 1.0)
    return a, b, rho


def _mean(act: Activation, mu: Tensor, q: Tensor, res: int) -> Tensor:
    """E[σ(μ + √q Z)], Z ~ N(0, 1)."""
    s = q.clamp_min(0).sqrt()
    if act.name == "erf":
        return torch.erf(mu / torch.sqrt(1.0 + 2.0 * s * s))
    if act.name == "relu":
        return _relu_mean(mu, s)
    c = torch.where(s > 0, -mu / s.clamp_min(1e-300), torch.zeros_like(s))
    c = c.clamp(-_HALF_WIDTH, _HALF_WIDTH)
    full = torch.full_like(s, _HALF_WIDTH)
    z, wt = _sinh_rule(-full, full, c, torch.maximum(s, torch.ones_like(s)), res)
    return (act(mu.unsqueeze(-1) + s.unsqueeze(-1) * z) * wt).sum(-1)


def _relu_mean(m: Tensor, s: Tensor) -> Tensor:
    """E[relu(m + s Z)] = m Φ(m/s) + s φ(m/s) (relu(m) at s = 0)."""
    r = m / s.clamp_min(1e-300)
    return m * _norm_cdf(r) + s * _norm_pdf(r)


def pair_moments(act: Activation, q11: Tensor, q22: Tensor, q12: Tensor, res: int,
                 mu1: Tensor | None = None, mu2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(E[σ(u)σ(u')], E[σ'(u)σ'(u')]) for (u, u') Gaussian with variances q11, q22, covariance
    q12 and means mu1, mu2 (None: zero), elementwise over broadcast tensors; ``res`` is the
    quadrature resolution (unused by the closed forms)."""
    q11, q22, q12 = torch.broadcast_tensors(q11, q22, q12)
    if mu1 is not None:
        mu1, mu2 = mu1.expand_as(q11), mu2.expand_as(q11)
        if not (bool(mu1.any()) or bool(mu2.any())):
            mu1 = mu2 = None
    if isinstance(res, Table):
        if mu1 is not None or act.name not in TABLE_ACTS:
            raise ValueError(f"the table is for centred {TABLE_ACTS}, not {act.name} with means")
        shape = q11.shape
        q11, q22, q12 = q11.reshape(-1), q22.reshape(-1), q12.reshape(-1)
        A, B = _axes(act, q11, q22, res)
        ev, edv = _table_moments(act, A, B, None, None, q12, res, q11, q22)
        return ev.reshape(shape), edv.reshape(shape)
    if mu1 is None and act.name == "erf":
        det = (1.0 + 2.0 * q11) * (1.0 + 2.0 * q22)
        ev = (2.0 / math.pi) * torch.asin((2.0 * q12 / det.sqrt()).clamp(-1.0, 1.0))
        edv = (4.0 / math.pi) / (det - 4.0 * q12 * q12).clamp_min(1e-300).sqrt()
        return ev, edv
    a, b, rho = _whiten(q11, q22, q12)
    if act.name == "relu":
        if mu1 is None:  # arc-cosine kernels of degree 1 and 0
            theta = torch.acos(rho)
            ev = a * b / (2.0 * math.pi) * (torch.sin(theta) + (math.pi - theta) * rho)
            edv = torch.where(a * b > 0, (math.pi - theta) / (2.0 * math.pi),
                              torch.zeros_like(theta))  # u ≡ 0: σ'(0) = 0
            return ev, edv
        return _relu_shifted(mu1, mu2, a, b, rho, res)
    return _mapped2(act, a, b, rho, res, mu1, mu2)


def _sinh_rule(lo: Tensor, hi: Tensor, center: Tensor, lam: Tensor, res: int
               ) -> tuple[Tensor, Tensor]:
    """Nodes z and weights (∝ φ(z), summing to 1) on [lo, hi], clustered around ``center`` at
    spacing ~1/lam: z = center + sinh(τ)/lam with τ on a uniform grid of 2 res + 1 points (the
    trapezoidal rule in τ). An integrand σ(lam' (z − center)) with lam' ≤ lam is analytic in a
    strip of width independent of lam' in τ, so the node count does not grow with the variance
    (a plain grid in z needs spacing ~1/lam'). Leading shape of the arguments + (2 res + 1,)."""
    s = torch.linspace(-1.0, 1.0, 2 * res + 1, dtype=_F64)
    t0 = torch.asinh((lo - center) * lam).unsqueeze(-1)
    t1 = torch.asinh((hi - center) * lam).unsqueeze(-1)
    tau = t0 + (t1 - t0) * 0.5 * (s + 1.0)
    z = center.unsqueeze(-1) + torch.sinh(tau) / lam.unsqueeze(-1)
    w = torch.cosh(tau) * torch.exp(-0.5 * z * z)
    w[..., 0] *= 0.5
    w[..., -1] *= 0.5
    return z, w / w.sum(-1, keepdim=True)


def _mapped2(act, a, b, rho, res, mu1, mu2) -> tuple[Tensor, Tensor]:
    """E[σ(u)σ(u')], E[σ'(u)σ'(u')] with u = μ + a z₁, u' = μ' + b ρ z₁ + s z₂ (s = b√(1−ρ²)):
    the outer z₁ rule clustered where u = 0 (:func:`_sinh_rule`), the inner z₂ rule, per z₁ node,
    clustered where u' = 0 — one τ grid per pair, z₂ = c(z₁) + sinh(τ)/λ₂ on [c − 18, c + 18]
    (covers [-9, 9]), so a node costs one exp and σ; chunked over the pairs. A centre is moved
    only for a step narrower than the Gaussian (scale > 1) and at most ``_CENTRE`` from 0 (the
    spacing grows like the distance from the centre: the Gaussian bulk must stay resolved)."""
    shape = a.shape
    a, b, rho = a.reshape(-1), b.reshape(-1), rho.reshape(-1)
    m1 = torch.zeros_like(a) if mu1 is None else mu1.reshape(-1)
    m2 = torch.zeros_like(a) if mu2 is None else mu2.reshape(-1)
    n = 2 * res + 1
    ev, edv = torch.empty_like(a), torch.empty_like(a)
    step = max(1, _CHUNK // (n * n))
    Z = _HALF_WIDTH
    grid = torch.linspace(-1.0, 1.0, n, dtype=_F64)
    ends = torch.ones(n, dtype=_F64)
    ends[0] = ends[-1] = 0.5
    for s0 in range(0, a.shape[0], step):
        sl = slice(s0, s0 + step)
        A, B, R, M1, M2 = a[sl], b[sl], rho[sl], m1[sl], m2[sl]
        br, sd = B * R, B * (1.0 - R * R).clamp_min(0).sqrt()
        one = torch.ones_like(A)
        lam1 = torch.maximum(torch.maximum(A, br.abs()), one)
        c1 = torch.where(A > 1.0, -M1 / A.clamp_min(1.0), torch.zeros_like(A))
        z1, w1 = _sinh_rule(-Z * one, Z * one, c1.clamp(-_CENTRE, _CENTRE), lam1, res)
        lam2 = torch.maximum(sd, one)
        tau = torch.asinh(2.0 * Z * lam2).unsqueeze(-1) * grid  # (P, n)
        v, g = torch.sinh(tau) / lam2.unsqueeze(-1), torch.cosh(tau) * ends
        mean2 = M2.unsqueeze(-1) + br.unsqueeze(-1) * z1  # (P, n): u' − s z₂
        # centre the inner rule on the step of σ(u') only where it is narrower than the
        # Gaussian (s > 1), and within the bulk (|c| ≤ 2.5), where the bulk stays resolved
        sharp = (sd > 1.0).unsqueeze(-1)
        c2 = torch.where(sharp, -mean2 / sd.clamp_min(1.0).unsqueeze(-1),
                         torch.zeros_like(mean2)).clamp(-_CENTRE, _CENTRE)
        z2 = c2.unsqueeze(-1) + v.unsqueeze(1)  # (P, n, n)
        w2 = torch.exp(-0.5 * z2 * z2).mul_(g.unsqueeze(1))
        w2 = w2 / w2.sum(-1, keepdim=True)
        s1, d1 = act.value_and_deriv(M1.unsqueeze(-1) + A.unsqueeze(-1) * z1)
        s2, d2 = act.value_and_deriv(mean2.unsqueeze(-1) + sd[:, None, None] * z2)
        ev[sl] = ((s2 * w2).sum(-1) * s1 * w1).sum(-1)
        edv[sl] = ((d2 * w2).sum(-1) * d1 * w1).sum(-1)
    return ev.reshape(shape), edv.reshape(shape)


def _relu_shifted(mu1, mu2, a, b, rho, res) -> tuple[Tensor, Tensor]:
    """relu with means: ∫_{z₁ > −μ/a} φ(z₁)(μ + a z₁)·E[relu(u') | z₁] dz₁ (and the same for
    1{u > 0}1{u' > 0}) by Gauss–Legendre on [−μ/a, 9], split where E[relu(u') | z₁] has its kink
    (or bend): the integrand is analytic on each piece."""
    t, wt = _legendre(res)
    pos = a > 0
    Z = _HALF_WIDTH
    lo = torch.where(pos, -mu1 / a.clamp_min(1e-300), torch.full_like(a, -Z)).clamp(-Z, Z)
    # split at the kink of E[relu(u') | z₁] (where b ρ z₁ + μ' = 0; sharp when s is small)
    br = b * rho
    kink = torch.where(br != 0, -mu2 / torch.where(br != 0, br, torch.ones_like(br)), lo)
    mid = torch.maximum(torch.minimum(kink, torch.full_like(kink, Z)), lo)
    zs, ws = [], []
    for x0, x1 in ((lo, mid), (mid, torch.full_like(lo, Z))):
        half = 0.5 * (x1 - x0)
        zs.append(x0.unsqueeze(-1) + half.unsqueeze(-1) * (t + 1.0))  # (..., n)
        ws.append(half.unsqueeze(-1) * wt)
    z = torch.cat(zs, -1)
    wz = torch.cat(ws, -1) * _norm_pdf(z)
    m2 = mu2.unsqueeze(-1) + (b * rho).unsqueeze(-1) * z
    s2 = (b * (1.0 - rho * rho).clamp_min(0).sqrt()).unsqueeze(-1)
    r2 = m2 / s2.clamp_min(1e-300)
    ev = (wz * (mu1.unsqueeze(-1) + a.unsqueeze(-1) * z) * _relu_mean(m2, s2)).sum(-1)
    edv = (wz * _norm_cdf(r2)).sum(-1)
    # a = 0: u ≡ μ is not random
    ev0 = torch.relu(mu1) * _relu_mean(mu2, b)
    edv0 = (mu1 > 0).to(a.dtype) * _norm_cdf(mu2 / b.clamp_min(1e-300))
    return torch.where(pos, ev, ev0), torch.where(pos, edv, edv0)


# --- the kernels ----------------------------------------------------------------------------------
def _self_variances(act, x: Tensor, ws2: float, sA2: float, res: int) -> Tensor:
    """q_{k,k}(x̄, x̄) for k = 1..L of each window (NTK scaling): (n, L)."""
    n, L, d = x.shape
    sq = (x * x).sum(-1) * (ws2 / d)
    q = torch.empty_like(sq)
    V = x.new_zeros(n)
    for k in range(L):
        q[:, k] = sq[:, k] + sA2 * V
        V = pair_moments(act, q[:, k], q[:, k], q[:, k], res)[0]
    return q


def _ntk_pairs(act, xa, xb, ia, ib, ws2, sA2, c2, res, selfq, window=None
               ) -> dict[str, Tensor]:
    """The three blocks under NTK scaling at one resolution for the pairs (ia, ib) (module
    docstring); ``selfq(res)`` gives the windows' own variances; ``window`` keeps the backward
    terms of the last ``window`` steps only (truncated BPTT). Under a :class:`Table` rule the
    table stencils of the variances are made once per window and step, not per pair."""
    La, Lb, d = xa.shape[1], xb.shape[1], xa.shape[2]
    ell = min(La, Lb)
    oa, ob = La - ell, Lb - ell  # steps aligned from the end
    qa, qb = selfq(res)
    xa, xb = xa[ia, oa:], xb[ib, ob:]
    V = xa.new_zeros(xa.shape[0])
    G, Vprev, dV = [], [], []
    for t in range(ell):
        g = (xa[:, t] * xb[:, t]).sum(-1)
        Vprev.append(V)
        q12 = g * (ws2 / d) + sA2 * V
        if isinstance(res, Table):
            A, B = _axes(act, qa[:, oa + t], qb[:, ob + t], res)
            V, edv = _table_moments(act, A, B, ia, ib, q12, res, qa[:, oa + t], qb[:, ob + t])
        else:
            V, edv = pair_moments(act, qa[ia, oa + t], qb[ib, ob + t], q12, res)
        G.append(g)
        dV.append(edv)
    Kw, KA = torch.zeros_like(V), torch.zeros_like(V)
    Pi = c2 * dV[-1]
    first = 0 if window is None else max(0, ell - int(window))
    for t in range(ell - 1, first - 1, -1):
        if t < ell - 1:
            Pi = sA2 * dV[t] * Pi
        Kw += Pi * G[t]
        KA += Pi * Vprev[t]
    return {"c": V, "w": Kw, "A": KA}


def mean_states(act: Activation, x: Tensor, ws2: float, mA: float, res: int = 16) -> Tensor:
    """S̄_k(x̄) = E[σ(w·X_k + m_A S̄_{k-1})], k = 0..L (S̄_0 = 0), the mean-field limit's memory
    of each window: (n, L + 1)."""
    n, L, d = x.shape
    sq = (x * x).sum(-1) * (ws2 / d)
    S = x.new_zeros(n, L + 1)
    for k in range(L):
        S[:, k + 1] = _mean(act, mA * S[:, k], sq[:, k], res)
    return S


def _mf_pairs(act, xa, xb, ia, ib, ws2, mA, c2, res, means) -> dict[str, Tensor]:
    """The blocks under mean-field scaling at one resolution for the pairs (ia, ib)."""
    d = xa.shape[2]
    ua, ub = xa[ia, -1], xb[ib, -1]
    g = (ua * ub).sum(-1)
    if mA != 0.0:
        ma, mb = means(res)
        if d == 1 and act.name != "relu" and isinstance(res, int):
            ev, edv = _rank_one(act, xa[:, -1, 0], xb[:, -1, 0], mA * ma[:, -2], mA * mb[:, -2],
                                ia, ib, math.sqrt(ws2), res)
            return {"c": ev, "w": c2 * edv * g, "A": torch.zeros_like(ev)}
        mu1, mu2 = mA * ma[ia, -2], mA * mb[ib, -2]
    else:
        mu1 = mu2 = None
    q11, q22 = (ua * ua).sum(-1) * (ws2 / d), (ub * ub).sum(-1) * (ws2 / d)
    ev, edv = pair_moments(act, q11, q22, g * (ws2 / d), res, mu1, mu2)
    return {"c": ev, "w": c2 * edv * g, "A": torch.zeros_like(ev)}


def _rank_one(act, xa, xb, mua, mub, ia, ib, s, res) -> tuple[Tensor, Tensor]:
    """d = 1, mean-field: u = w x + μ with one scalar w ~ N(0, s²) for both windows, so
    E[σ(u)σ(u')] = ∫ φ(z) σ(s z x_i + μ_i) σ(s z x_j + μ_j) dz: one trapezoidal rule in z on
    [−9, 9] (16 res + 1 nodes; σ analytic in a strip of half-width ≥ π/(2 s|x|), so the error
    falls like exp(−π²/(s|x| h))) shared by all windows — a matrix product F_a diag(ω) F_bᵀ."""
    z = torch.linspace(-_HALF_WIDTH, _HALF_WIDTH, 16 * res + 1, dtype=_F64)
    wz = torch.exp(-0.5 * z * z)
    wz[0] *= 0.5
    wz[-1] *= 0.5
    wz = wz / wz.sum()
    Fa, Da = act.value_and_deriv(mua[:, None] + s * xa[:, None] * z)
    Fb, Db = act.value_and_deriv(mub[:, None] + s * xb[:, None] * z)
    if 4 * ia.numel() >= Fa.shape[0] * Fb.shape[0]:  # (nearly) all pairs: two GEMMs
        return ((Fa * wz) @ Fb.T)[ia, ib], ((Da * wz) @ Db.T)[ia, ib]
    return (Fa[ia] * wz * Fb[ib]).sum(-1), (Da[ia] * wz * Db[ib]).sum(-1)


def _unflatten(v: Tensor, ia: Tensor, ib: Tensor, n: int, m: int, symmetric: bool) -> Tensor:
    out = v.new_zeros(n, m)
    out[ia, ib] = v
    if symmetric:
        out[ib, ia] = v
    return out


def _cached(fn):
    cache: dict = {}
    return lambda res: cache[res] if res in cache else cache.setdefault(res, fn(res))


def _check(model, x: Tensor, x2: Tensor | None, tol: float) -> None:
    if family_of(model).limit != "elman":
        raise ConfigError(f"elman_limit_ntk is for ElmanRNN (family limit 'elman'); "
                          f"{type(model).__qualname__} has limit {family_of(model).limit!r}")
    if not float(tol) > 0:
        raise ConfigError(f"tol={tol} must be > 0")
    for name, xx in (("x", x), ("x2", x2)):
        if xx is None:
            continue
        model.check_windows(xx, name)
        if not xx.is_floating_point():
            raise ConfigError(f"{name} has dtype {xx.dtype}; expected a floating-point tensor")
    law = model.init_cw
    if law.w != "normal":
        raise ConfigError(f"model.w_law={law.w!r}: the Elman limit needs w_law='normal' "
                          "(Gaussian pre-activations); use the Monte-Carlo limit for other laws")
    c_mean = law.c == "constant" and float(law.c_scale) != 0.0
    if model.recurrent_scaling == "ntk":
        if model.A_mean != 0.0:
            raise ConfigError(f"model.A_mean={model.A_mean}: under recurrent_scaling='ntk' a "
                              "nonzero mean of A has no infinite-width limit (the recurrence "
                              "grows like sqrt(N)); use A_mean=0 or recurrent_scaling='mean_field'")
        if c_mean:
            raise ConfigError("model.c_law='constant' (E[c] != 0): the NTK-scaling Elman limit "
                              "needs E[c] = 0 (gradient independence); use uniform, normal or "
                              "rademacher")
    elif c_mean and model.A_mean != 0.0:
        raise ConfigError(f"model.c_law='constant' (E[c] != 0) with model.A_mean={model.A_mean}:"
                          " the mean-field Elman limit then keeps a backward term through "
                          "mean(A), which is not implemented; use a c law of mean 0 or A_mean=0")


def _ladder(method: str, act: Activation, model, max_res: int) -> list:
    """The rules tried in turn: the table at 2h and h, then the quadrature at 32, 64, ... (the
    table's pairs that do not reach tol); or the quadrature at 8, 16, ..., max_res."""
    quad = [r for r in (8, 16, 32, 64, 128, 256, 512) if r <= max(16, max_res)]
    usable = act.name in TABLE_ACTS and (model.recurrent_scaling == "ntk" or model.A_mean == 0.0)
    if method == "table" and not usable:
        raise ConfigError(f"method='table' needs activation tanh or sigmoid at zero means (NTK "
                          f"scaling, or mean-field with A_mean=0), not {act.name!r} with "
                          f"recurrent_scaling={model.recurrent_scaling!r}, A_mean={model.A_mean}")
    if method == "quadrature" or not usable:
        return quad
    return [Table(2), Table(1)] + [r for r in quad if r >= 32]


def elman_limit_ntk(model, x: Tensor, x2: Tensor | None = None, tol: float = 1e-4,
                    blocks: bool = False, max_res: int = _MAX_RES, window: int | None = None,
                    method: str = "auto") -> LimitKernel | dict[str, LimitKernel]:
    """K_∞(x̄_i, x̄'_j) of an :class:`~ntk_rnn.models.ElmanRNN` for windows x (n, L, d) and x2
    (m, L', d) (default x2 = x; L ≠ L' pairs the steps from the windows' ends), both recurrent
    scalings, in float64 (module docstring, theory §9).

    ``tol`` is the target for the largest per-entry error: the quadrature resolution doubles
    (up to ``max_res`` half-intervals per axis, then a :class:`LimitAccuracyWarning`) until two
    resolutions agree to ``tol``. ``method``: "auto" (the table of :mod:`.gauss_table` at
    spacings 2h and h for tanh and sigmoid at zero means, the pairs that miss tol then by the
    quadrature from 32; the quadrature otherwise), "table" or "quadrature" (the 2-D rule
    only). ``blocks=True`` returns {"c", "w", "A"}: the kernels of the
    readout c, the input weights w and the recurrent matrix A (they sum to the total), each a
    LimitKernel with its own error. ``window`` = W gives the kernel of truncated BPTT through W
    steps, ⟨∇Ŷ(x̄), ∇_W Ŷ(x̄')⟩: the backward sum keeps the pairs j < W from the end (the forward
    covariances are unchanged; under mean-field scaling only j = 0 contributes anyway).
    ConfigError where no limit is implemented (module docstring).
    """
    _check(model, x, x2, tol)
    if method not in ("auto", "table", "quadrature"):
        raise ConfigError(f"method={method!r} must be 'auto', 'table' or 'quadrature'")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ConfigError(f"window={window!r} must be an integer >= 1 (the BPTT window) or None")
    xa = (x if x.dim() == 3 else x.unsqueeze(0)).detach().to("cpu", _F64)
    xb = xa if x2 is None else (x2 if x2.dim() == 3 else x2.unsqueeze(0)).detach().to("cpu", _F64)
    law, act = model.init_cw, model.act
    ws2, c2 = float(law.w_scale) ** 2, law.c_second_moment()
    if model.recurrent_scaling == "ntk":
        sA2 = model.A_std ** 2
        selfq = _cached(lambda r: (_self_variances(act, xa, ws2, sA2, r),
                                   _self_variances(act, xb, ws2, sA2, r)))

        def fn(r, ia, ib):
            return _ntk_pairs(act, xa, xb, ia, ib, ws2, sA2, c2, r, selfq, window)
    else:
        means = _cached(lambda r: (mean_states(act, xa, ws2, model.A_mean, r),
                                   mean_states(act, xb, ws2, model.A_mean, r)))

        def fn(r, ia, ib):
            return _mf_pairs(act, xa, xb, ia, ib, ws2, model.A_mean, c2, r, means)
    n, m = xa.shape[0], xb.shape[0]
    if x2 is None:  # K is symmetric: the pairs i <= j only
        ia, ib = torch.triu_indices(n, n)
    else:
        ia, ib = torch.arange(n).repeat_interleave(m), torch.arange(m).repeat(n)
    # every pair at the first two rules of the ladder; the pairs whose two values differ by more
    # than tol are recomputed at the next rule, ... (each pair's recursion is its own)
    rules = _ladder(method, act, model, max_res)
    coarse, fine = fn(rules[0], ia, ib), fn(rules[1], ia, ib)
    errs = {k: (fine[k] - coarse[k]).abs() for k in BLOCKS}
    total = sum(errs.values())
    level = torch.ones_like(total, dtype=torch.long)
    for i in range(2, len(rules)):
        bad = (total > tol).nonzero().squeeze(-1)
        if bad.numel() == 0:
            break
        finer = fn(rules[i], ia[bad], ib[bad])
        for k in BLOCKS:
            errs[k][bad] = (finer[k] - fine[k][bad]).abs()
            fine[k][bad] = finer[k]
        total[bad] = sum(errs[k][bad] for k in BLOCKS)
        level[bad] = i
    err = float(total.max()) if total.numel() else 0.0
    converged = err <= tol
    last = rules[int(level.max())] if level.numel() else rules[1]
    if not converged:
        warnings.warn(f"elman_limit_ntk stopped at resolution {last} (max_res={max_res})"
                      f" with estimated max error {err:.3g} > tol={tol:.3g}; raise max_res or tol",
                      LimitAccuracyWarning, stacklevel=2)
    n_points = 64 if isinstance(last, Table) else (2 * last + 1) ** 2
    name, dev = "elman_closed_form", x.device
    out = {k: (_unflatten(fine[k], ia, ib, n, m, x2 is None),
               _unflatten(errs[k], ia, ib, n, m, x2 is None)) for k in BLOCKS}
    if blocks:
        return {k: LimitKernel(v.to(dev), float(e.max()) if e.numel() else 0.0, e.to(dev),
                               name, n_points, converged) for k, (v, e) in out.items()}
    value = sum(out[k][0] for k in BLOCKS)
    error = sum(out[k][1] for k in BLOCKS)
    return LimitKernel(value.to(dev), err, error.to(dev), name, n_points, converged)
