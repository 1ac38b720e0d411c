"""V = E[σ(u)σ(u')] and V̇ = E[σ'(u)σ'(u')] for σ = tanh over a centred bivariate Gaussian
(u, u'), by interpolation in a table computed once (theory §9, "Expectations"); sigmoid is
tanh in disguise, σ(u) = ½ + ½ tanh(u/2): V_sig(q) = ¼ + ¼ V(q/4), V̇_sig(q) = V̇(q/4)/16.

**Polar form (the table's values).** With u = a z₁, u' = b(cos θ z₁ + sin θ z₂) (ρ = cos θ) and
(z₁, z₂) = r(cos φ, sin φ), s = r²/2,

    V(a, b, θ) = ½ ∫₀^∞ e^{−s} [c₀(ar) c₀(br)/2 + Σ_{k≥1} c_k(ar) c_k(br) cos kθ] ds,

c_k(x) the cosine coefficients of φ ↦ σ(x cos φ) (one FFT over 2048 φ-nodes), and the same with
σ' for V̇: the φ integral is a circular correlation, diagonal in k. The s integral is the
exp-sinh rule s = exp(π/2 sinh t) (its nodes reach the singularities of the integrand at
s ≈ −π²/(8a²) near 0). Against a 2-D quadrature at 2401 nodes: agreement to 1e-13.

**Interpolation.** Cubic Lagrange, tensor product, uniform in α = asinh(a/λ), β = asinh(b/λ) and
t = asinh(θ sinh κ · 2/π)/κ with θ = arccos|ρ| ∈ [0, π/2] (nodes cluster at ρ = 1, where V̇ has
a layer of width ~1/a); V is odd in ρ, V̇ even; the table holds V and √(1+a²)√(1+b²) V̇ (both
O(1) as a, b → ∞). Ghost nodes (a < 0, θ < 0, θ > π/2: the same formula) carry the stencils
over the edges. ``stride`` 1 uses every node (spacing h), 2 every other one (2h): the two
resolutions of the error estimate (cubic: the 2h error is ~16× the h error).
Pairs with a or b > ``A_MAX`` are outside (``in_range`` False): the caller integrates them.
"""

from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache

import torch
from torch import Tensor

_F64 = torch.float64
LAM, KAPPA = 0.5, 2.5  # α = asinh(a/λ); θ = (π/2) sinh(κ t)/sinh κ
A_MAX = 16.0  # largest standard deviation a = √q in the table
N_ALPHA, N_THETA = 96, 96  # intervals (even: stride 2 keeps α = 0, t = 0 on a node)
N_PHI, S_STEP = 2048, 0.1  # FFT nodes over φ; exp-sinh step in t
_GHOST = 2  # ghost nodes below 0 and above the top of each axis
_VERSION = 1
_CHUNK = 1 << 13  # pairs per gather


def _harmonics(fn, x: Tensor) -> Tensor:
    """c_k(x), k = 0..N_PHI/2, of σ(x cos φ) = c₀/2 + Σ c_k cos kφ: (..., K)."""
    phi = torch.arange(N_PHI, dtype=_F64) * (2.0 * math.pi / N_PHI)
    return torch.fft.rfft(fn(x.unsqueeze(-1) * torch.cos(phi))).real * (2.0 / N_PHI)


def _s_rule() -> tuple[Tensor, Tensor]:
    """exp-sinh nodes s and weights for ∫₀^∞ e^{−s} g(s) ds (s from 3e-13 to 52)."""
    t = torch.arange(-3.6, 1.7 + 1e-9, S_STEP, dtype=_F64)
    s = torch.exp(0.5 * math.pi * torch.sinh(t))
    return s, s * 0.5 * math.pi * torch.cosh(t) * S_STEP * torch.exp(-s)


def polar_moments(a: Tensor, b: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(V, V̇) of tanh on the grid a × b × θ (polar form, module docstring): (Na, Nb, Nθ) each."""
    s, w = _s_rule()
    r = torch.sqrt(2.0 * s)
    out = []
    for parity, fn in ((1, torch.tanh), (0, lambda z: 1.0 - torch.tanh(z) ** 2)):
        k = torch.arange(N_PHI // 2 + 1)
        keep = k % 2 == parity  # tanh(x cos φ) is odd about φ = π/2, sech² even
        ca = _harmonics(fn, a[:, None] * r)[..., keep]  # (Na, Ns, K)
        cb = _harmonics(fn, b[:, None] * r)[..., keep]
        if parity == 0:
            ca[..., 0] *= math.sqrt(0.5)
            cb[..., 0] *= math.sqrt(0.5)
        G = torch.bmm((ca * w[:, None]).permute(2, 0, 1), cb.permute(2, 1, 0))  # (K, Na, Nb)
        cos = torch.cos(k[keep].to(_F64)[:, None] * theta[None, :])  # (K, Nθ)
        out.append(0.5 * (G.reshape(G.shape[0], -1).T @ cos).reshape(len(a), len(b), -1))
    return out[0], out[1]


def _alpha_step() -> float:
    return math.asinh(A_MAX / LAM) / N_ALPHA


def _theta_of(t: Tensor) -> Tensor:
    return 0.5 * math.pi * torch.sinh(KAPPA * t) / math.sinh(KAPPA)


def build() -> Tensor:
    """The table (N_ALPHA + 5, N_ALPHA + 5, N_THETA + 5, 2): V and √(1+a²)√(1+b²) V̇."""
    al = (torch.arange(N_ALPHA + 2 * _GHOST + 1, dtype=_F64) - _GHOST) * _alpha_step()
    a = LAM * torch.sinh(al)
    t = (torch.arange(N_THETA + 2 * _GHOST + 1, dtype=_F64) - _GHOST) / N_THETA
    V, Vd = polar_moments(a, a, _theta_of(t))
    sc = torch.sqrt(1.0 + a * a)
    return torch.stack([V, Vd * sc[:, None, None] * sc[None, :, None]], -1).contiguous()


def _cache_path() -> str:
    root = os.environ.get("NTK_RNN_TABLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "ntk_rnn", "tables")
    key = f"v{_VERSION}_{N_ALPHA}x{N_THETA}_a{A_MAX:g}_l{LAM:g}_k{KAPPA:g}_p{N_PHI}_s{S_STEP:g}"
    return os.path.join(os.path.expanduser(root), f"gauss_tanh_{key}.pt")


def _spot_check(T: Tensor) -> bool:
    """Whether a cached table has the right shape and, at a few nodes, the right values."""
    shape = (N_ALPHA + 2 * _GHOST + 1,) * 2 + (N_THETA + 2 * _GHOST + 1, 2)
    if not isinstance(T, Tensor) or tuple(T.shape) != shape or T.dtype != _F64:
        return False
    i = torch.tensor([1, N_ALPHA // 3, N_ALPHA + 3])
    j = torch.tensor([0, N_THETA // 2 + 1, N_THETA + 4])
    al = (i.to(_F64) - _GHOST) * _alpha_step()
    a = LAM * torch.sinh(al)
    V, Vd = polar_moments(a, a.flip(0), _theta_of((j.to(_F64) - _GHOST) / N_THETA))
    sc = torch.sqrt(1.0 + a * a)
    want = torch.stack([V, Vd * sc[:, None, None] * sc.flip(0)[None, :, None]], -1)
    return bool(torch.allclose(T[i][:, i.flip(0)][:, :, j], want, rtol=0, atol=1e-12))


@lru_cache(maxsize=1)
def table() -> Tensor:
    """The table, from the disk cache ($NTK_RNN_TABLE_CACHE, default
    $XDG_CACHE_HOME/ntk_rnn/tables) when a copy there passes :func:`_spot_check`, else built
    (seconds) and cached (atomically; unwritable: memory only)."""
    path = _cache_path()
    try:
        T = torch.load(path, weights_only=True)
        if _spot_check(T):
            return T
    except Exception:  # missing, truncated or foreign file: rebuild
        pass
    T = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(T, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return T


def _lagrange(f: Tensor) -> Tensor:
    """Cubic Lagrange weights at offset f ∈ [0, 1] for nodes −1, 0, 1, 2: (..., 4)."""
    return torch.stack([-f * (f - 1) * (f - 2) / 6, (f + 1) * (f - 1) * (f - 2) / 2,
                        -(f + 1) * f * (f - 2) / 2, (f + 1) * f * (f - 1) / 6], -1)


def _stencil(u: Tensor, n: int, stride: int) -> tuple[Tensor, Tensor]:
    """First table index of the 4-node stencil and its cubic weights (..., 4) at coordinate u
    (in units of the node spacing h) on the grid of ``n`` intervals, every ``stride``-th node."""
    v = u / stride
    j = v.floor().clamp(0, n // stride - 1)
    return _GHOST + stride * (j.long() - 1), _lagrange(v - j)


@lru_cache(maxsize=2)
def _rows(stride: int) -> Tensor:
    """The table as rows of 4 θ-consecutive nodes (at ``stride``) × (V, V̇ column): row
    (p, q, j) = T[p, q, j + stride·(0..3)], (Nα · Nα · (Nθ − 3 stride), 8); one gather per
    (a, b) node of a stencil."""
    T = table()
    n = T.shape[2] - 3 * stride
    return torch.stack([T[:, :, k * stride:k * stride + n] for k in range(4)], 3).view(-1, 8)


def axis(q: Tensor, stride: int, first: bool) -> Tensor:
    """The stencil of a = √q on the α axis (``first``: the table's first axis, else second),
    packed as columns (n, 8): the stencil's first row offset (premultiplied, exact in float64),
    its 4 cubic weights, a, √(1+a²) and 1.0 where a ≤ A_MAX (one gather per pair and step)."""
    a = q.clamp_min(0).sqrt()
    c = a.clamp(max=A_MAX)
    i, w = _stencil(torch.asinh(c / LAM) / _alpha_step(), N_ALPHA, stride)
    n1, n2 = N_ALPHA + 2 * _GHOST + 1, N_THETA + 2 * _GHOST + 1 - 3 * stride
    base = (i * (n1 * n2 if first else n2)).to(_F64)
    return torch.cat([base[:, None], w, a[:, None], torch.sqrt(1.0 + c * c)[:, None],
                      (a <= A_MAX).to(_F64)[:, None]], 1)


def tanh_pairs(A: Tensor, B: Tensor, ia: Tensor | None, ib: Tensor | None, q12: Tensor,
               stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """(V, V̇, in_range) of tanh for the pairs (A[ia], B[ib]) of :func:`axis` rows (None: all,
    elementwise) with covariances q12, by the table at ``stride`` (1 or 2); V, V̇ are 0 where
    not in_range."""
    A = A if ia is None else A.index_select(0, ia)
    B = B if ib is None else B.index_select(0, ib)
    ok = (A[:, 7] * B[:, 7]) > 0
    sab, ab = A[:, 6] * B[:, 6], A[:, 5] * B[:, 5]
    rho = torch.where(ab > 0, q12 / ab.clamp_min(1e-300), torch.zeros_like(ab)).clamp(-1.0, 1.0)
    t = torch.asinh(torch.acos(rho.abs()) * (math.sinh(KAPPA) * 2.0 / math.pi)) / KAPPA
    it, wt = _stencil(t * N_THETA, N_THETA, stride)
    rows = _rows(stride)
    n1, n2 = N_ALPHA + 2 * _GHOST + 1, N_THETA + 2 * _GHOST + 1 - 3 * stride
    off = torch.arange(4) * stride
    offsets = ((off[:, None] * n1 + off[None, :]) * n2).reshape(-1)  # (16,) over (a, b) nodes
    base = (A[:, 0] + B[:, 0]).long() + it
    out = torch.empty(base.shape[0], 2, dtype=_F64)
    for s0 in range(0, base.shape[0], _CHUNK):
        sl = slice(s0, s0 + _CHUNK)
        vals = rows.index_select(0, (base[sl, None] + offsets).reshape(-1)).view(-1, 16, 8)
        w = (A[sl, 1:5, None] * B[sl, None, 1:5]).reshape(-1, 16, 1)  # (P, 16, 1)
        vals = torch.bmm(vals.transpose(1, 2), w).view(-1, 4, 2)
        out[sl] = (vals * wt[sl, :, None]).sum(1)
    zero = torch.zeros_like(ab)
    V = torch.where(ok, out[:, 0] * torch.sign(rho), zero)
    return V, torch.where(ok, out[:, 1] / sab, zero), ok


def tanh_moments(q11: Tensor, q22: Tensor, q12: Tensor, stride: int = 1
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(V, V̇, in_range) of tanh for variances q11, q22 and covariance q12 (1-D tensors of the
    same length) by the table at ``stride`` (1 or 2); V, V̇ are 0 where not in_range."""
    return tanh_pairs(axis(q11, stride, True), axis(q22, stride, False), None, None, q12, stride)
