"""The infinite-width NTK of gated RNNs, sampled from the coordinate distribution (theory §10).

Tensor Programs (Yang 2019, 2020): as N → ∞ the coordinates i = 1..N of every vector of an RNN
with i.i.d. weights become i.i.d. copies of a random variable ("the coordinate"), jointly over all
windows a and steps k. For a recurrent matrix W (entries of variance σ², entering as N^{-1/2} W h)
the coordinates of N^{-1/2} W h_k are, jointly over (a, k), a centred Gaussian process with

    E[ĝ^a_k ĝ^b_{k'}] = σ² E[h^a_{k-1} h^b_{k'-1}]                                   (forward)

independent of the input weights' coordinates (w_i · x^a_k, exactly as drawn). Backward, with
η_k = ∂(c · h_L)/∂h_k (η_L = c) and the gradient-independence assumption (valid: c is drawn
independently with E[c] = 0 and used only in the readout), N^{-1/2} Wᵀ v_k is a second centred
Gaussian process Ẑ_k, independent of the forward one, with E[Ẑ^a_k Ẑ^b_{k'}] = σ² E[v^a_k v^b_{k'}]
(for a GRU the three gates' matrices add: Σ_g E[v^g v^g']). The normalised kernel
N^{2β−1} ∇Ŷ·∇Ŷ' is then, block by block (δ^g_k = ∂(c·h_L)/∂(pre-activation of gate g at step k),
v^g_k the vector multiplying W_g's N^{-1/2} h_{k-1}),

    K_c = E[h_L h'_L],   K_{W_ih} = Σ_g E[(Σ_k δ^g_k x_k)·(Σ_k' δ'^g_k' x'_k')],
    K_{W_hh} = Σ_{k,k'} Σ_g E[v^g_k v'^g_{k'}] · E[h_{k-1} h'_{k'-1}],
    K_{b_ih} = Σ_g E[Σ_k δ^g_k · Σ_k' δ'^g_k'],   K_{b_hh} = Σ_g E[Σ_k v^g_k · Σ_k' v'^g_k'].

Every expectation is a mean over ``samples`` i.i.d. coordinates (all windows jointly), computed
step by step: the Gaussians of step k are drawn conditionally on those of the earlier steps from
the covariances estimated on the same samples (a block Cholesky factor grown one step at a time).
There is no finite-width bias; the estimate has Monte-Carlo error O(samples^{-1/2}) and a bias
O(1/samples) from the estimated covariances. ``replicates`` independent runs give the stated
error: per entry t_{0.975, R−1} std/√R, relative ‖std/√R‖_F/‖K‖_F.

Under mean-field recurrent scaling (γ = 1) N^{-1} W h → E[W] · E[h]: the GRU's hidden Gaussians
and Ẑ vanish and so does its W_hh block (the gates still remember through z ⊙ h); the Elman
network's memory is m_A E[S_{k-1}] (E[c] = 0 keeps nothing backward), as in theory §9.

Windows of different lengths: the forward steps are aligned at the windows' starts (each starts
from h_0 = 0), the backward ones at their ends; a window takes no part in the steps it lacks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from scipy import stats
from torch import Tensor

from ..errors import ConfigError
from ..models.family import family_of

_F64 = torch.float64
_DT = torch.float64  # the samples too: float32 left a bias of several % (conditioning cancels)
_CUT = 1e-8  # relative conditional variance below which a direction is not sampled
DEFAULT_SAMPLES, DEFAULT_REPLICATES = 4096, 40  # limit_ntk's: ~0.25% at 64 windows × 24 (§10)


@dataclass
class CoordinateLimitKernel:
    """K_∞ (n, m) float64 sampled from the coordinate distribution: ``value`` the mean of
    ``replicates`` independent estimates of ``samples`` coordinates each, ``stderr`` its
    entrywise standard error, ``error_entries`` = t_{0.975, R−1}·stderr (95% half-widths),
    ``error`` their maximum, ``relative_error`` = ‖stderr‖_F/‖value‖_F; ``blocks`` the
    per-parameter-block means; ``seconds`` the wall time."""

    value: Tensor
    stderr: Tensor
    error_entries: Tensor
    error: float
    relative_error: float
    samples: int
    replicates: int
    blocks: dict
    seconds: float = 0.0
    method: str = "coordinate"

    @property
    def converged(self) -> bool:
        return True

    def __repr__(self) -> str:
        n, m = self.value.shape
        return (f"CoordinateLimitKernel(shape=({n}, {m}), samples={self.samples}, "
                f"replicates={self.replicates}, relative_error={self.relative_error:.3g}, "
                f"error={self.error:.3g})")


class _Gaussians:
    """Centred Gaussian coordinates g_0, g_1, ... ((copies, M, W) each), jointly over the slots,
    with E[g_t g_sᵀ] = scale · Ê[v_t v_sᵀ] (v_t the sources given at slot t, (G, M, W), summed
    over G; Ê the mean over the M samples): g_t = Σ_{r≤t} ξ_r L_{t,r}ᵀ with a block lower
    triangular factor L grown one slot at a time (block Cholesky; the diagonal blocks are the
    symmetric square roots of the Schur complements, pseudo-inverted, so singular covariances —
    a window that takes no part — are fine). ``gram`` keeps Ê[v_t v_sᵀ] (unscaled)."""

    def __init__(self, M: int, W: int, T: int, G: int, copies: int, scale: float,
                 gen: torch.Generator):
        self.M, self.W, self.G, self.copies, self.scale, self.gen = M, W, G, copies, scale, gen
        self.src = torch.empty(G * M, T * W, dtype=_DT)
        self.xi = torch.empty(copies, M, T * W, dtype=_DT) if copies else None
        self.L = torch.zeros(T * W, T * W, dtype=_F64)
        self.P: list[Tensor] = []  # pinv(L_ss)ᵀ
        self.gram = torch.zeros(T * W, T * W, dtype=_F64)
        self.t = 0

    def next(self, v: Tensor, sample: bool = True) -> Optional[Tensor]:
        t, W, M = self.t, self.W, self.M
        lo, hi = t * W, (t + 1) * W
        self.src[:, lo:hi] = v.reshape(self.G * M, W)
        row = (self.src[:, lo:hi].T @ self.src[:, :hi]).to(_F64) / M  # (W, (t+1)W)
        self.gram[lo:hi, :hi] = row
        self.gram[:hi, lo:hi] = row.T
        self.t += 1
        if self.copies == 0:
            return None
        C = row * self.scale
        Lt = self.L[lo:hi]
        for s in range(t):
            a, b = s * W, (s + 1) * W
            Lt[:, a:b] = (C[:, a:b] - Lt[:, :a] @ self.L[a:b, :a].T) @ self.P[s]
        S = C[:, lo:hi] - Lt[:, :lo] @ Lt[:, :lo].T
        e, U = torch.linalg.eigh(0.5 * (S + S.T))
        # directions of conditional variance below 1e-8 of the slot's own are taken as known
        # from the past (the float32 samples resolve no more; smaller cut-offs amplify noise)
        keep = e > _CUT * max(float(C[:, lo:hi].diagonal().max()), 1e-300)
        root = torch.where(keep, e, torch.zeros_like(e)).clamp_min(0).sqrt()
        Lt[:, lo:hi] = (U * root) @ U.T
        self.P.append((U * torch.where(keep, 1.0 / root.clamp_min(1e-300),
                                       torch.zeros_like(e))) @ U.T)
        if not sample:  # (a slot of zero sources, or the last one)
            self.xi[:, :, lo:hi] = 0.0
            return None
        self.xi[:, :, lo:hi] = torch.randn(self.copies, M, W, generator=self.gen, dtype=_DT)
        return self.xi[:, :, :hi] @ Lt[:, :hi].T.to(_DT)


# --- the cells: one step forward, one step backward ---------------------------------------------
def _readout(law, M: int, gen: torch.Generator) -> Tensor:
    """c = σ_c ε with ε = ±1: the limit depends on c's law only through σ_c² = E[c²] (the
    backward pass is linear in c, and c is independent of everything else), and |c| = σ_c
    removes the fluctuation of c² from the estimate."""
    eps = torch.randint(0, 2, (M,), generator=gen).to(_DT) * 2.0 - 1.0
    return eps * math.sqrt(law.c_second_moment())


class _ElmanCell:
    """S_k = σ(w·x_k + ĝ_k); δ_k = η_k σ'(u_k) = v_k; η_{k-1} = Ẑ_k (no direct path)."""

    G, bias = 1, False

    def __init__(self, model, M: int, gen: torch.Generator):
        law = model.init_cw
        _, w, _ = law.sample(M, model.input_dim, gen, dtype=_DT)
        self.c, self.w, self.act = _readout(law, M, gen), w.unsqueeze(1), model.act  # w: (M,1,d)
        self.ntk = model.recurrent_scaling == "ntk"
        self.sigma2, self.mA = model.A_std ** 2, model.A_mean

    def inputs(self, xk: Tensor) -> Tensor:  # xk (W, d) → (M, W, 1)
        return torch.einsum("mgd,wd->mwg", self.w, xk)

    def forward(self, i: Tensor, g: Tensor, h: Tensor) -> Tensor:
        return self.act(i[..., 0] + g[..., 0])

    def mean_field(self, h: Tensor) -> Tensor:  # N^{-1} A h → m_A E[h]
        return (self.mA * h.mean(0)).expand_as(h).unsqueeze(-1)

    def backward(self, i, g, h, eta):
        _, ds = self.act.value_and_deriv(i[..., 0] + g[..., 0])
        d = (eta * ds).unsqueeze(-1)
        return d, d, None


class _GRUCell:
    """r = σ(i_r + ĝ_r), z = σ(i_z + ĝ_z), n = tanh(i_n + r (ĝ_n + b_hn)), h' = n + z (h − n)
    (the biases b_ir + b_hr, b_iz + b_hz, b_in inside i); backward δ^n = η (1 − z)(1 − n²),
    δ^z = η (h − n) z (1 − z), δ^r = δ^n (ĝ_n + b_hn) r (1 − r), v = (δ^r, δ^z, δ^n r),
    η_{k-1} = z η + Ẑ."""

    G = 3

    def __init__(self, model, M: int, gen: torch.Generator):
        d = model.input_dim
        self.c = _readout(model.init_c, M, gen)
        self.w = torch.randn(M, 3, d, generator=gen, dtype=_DT) * (model.w_scale / d ** 0.5)
        self.bias = model.bias
        sb = model.bias_std if model.bias else 0.0
        self.b = torch.randn(M, 3, generator=gen, dtype=_DT) * sb
        self.b[:, :2] *= math.sqrt(2.0)  # b_ir + b_hr, b_iz + b_hz
        self.bhn = torch.randn(M, 1, generator=gen, dtype=_DT) * sb
        self.ntk = model.recurrent_scaling == "ntk"
        self.sigma2 = model.hh_std ** 2

    def inputs(self, xk: Tensor) -> Tensor:
        return torch.einsum("mgd,wd->mwg", self.w, xk) + self.b.unsqueeze(1)

    def _gates(self, i, g):
        r = torch.sigmoid(i[..., 0] + g[..., 0])
        z = torch.sigmoid(i[..., 1] + g[..., 1])
        hn = g[..., 2] + self.bhn
        n = torch.tanh(i[..., 2] + r * hn)
        return r, z, hn, n

    def forward(self, i, g, h):
        _, z, _, n = self._gates(i, g)
        return n + z * (h - n)

    def mean_field(self, h: Tensor) -> Tensor:  # N^{-1} W_hh h → E[W_hh] E[h] = 0
        return h.new_zeros(*h.shape, 3)

    def backward(self, i, g, h, eta):
        r, z, hn, n = self._gates(i, g)
        dn = eta * (1.0 - z) * (1.0 - n * n)
        dz = eta * (h - n) * z * (1.0 - z)
        dr = dn * hn * r * (1.0 - r)
        return torch.stack([dr, dz, dn], -1), torch.stack([dr, dz, dn * r], -1), z


#: the model's family (``ntk_rnn.models.family_of(model).name``) → its cell
CELLS = {"elman": _ElmanCell, "gru": _GRUCell}


def _cell(model, M, gen):
    return CELLS[family_of(model).name](model, M, gen)


def applies(model) -> bool:
    """Whether the coordinate limit covers ``model`` (else `check_model` says why)."""
    try:
        check_model(model)
    except ConfigError:
        return False
    return True


def check_model(model) -> None:
    """ConfigError where the coordinate limit does not apply (named by the model key)."""
    fam = family_of(model).name
    if fam not in CELLS:
        raise ConfigError(f"the coordinate limit is for ElmanRNN and GRURNN, not "
                          f"{type(model).__qualname__}")
    law = model.init_cw if fam == "elman" else model.init_c
    c_mean = law.c == "constant" and float(law.c_scale) != 0.0
    if model.recurrent_scaling == "ntk" and c_mean:
        raise ConfigError("model.c_law='constant' (E[c] != 0): under recurrent_scaling='ntk' the "
                          "coordinate limit needs E[c] = 0 (gradient independence); use uniform, "
                          "normal or rademacher")
    if fam == "elman":
        if model.recurrent_scaling == "ntk" and model.A_mean != 0.0:
            raise ConfigError(f"model.A_mean={model.A_mean}: under recurrent_scaling='ntk' a "
                              "nonzero mean of A has no infinite-width limit")
        if model.recurrent_scaling == "mean_field" and c_mean and model.A_mean != 0.0:
            raise ConfigError("model.c_law='constant' with model.A_mean != 0: the mean-field limit"
                              " keeps a backward term through mean(A) that is not implemented")


def _one(model, xs: list[Tensor], M: int, gen: torch.Generator) -> dict[str, Tensor]:
    """One estimate of the blocks over all windows ``xs`` (a list of (L_a, d)) jointly."""
    cell = _cell(model, M, gen)
    Wn = len(xs)
    lens = torch.tensor([len(x) for x in xs])
    T = int(lens.max())
    d = xs[0].shape[1]
    X = torch.zeros(T, Wn, d, dtype=_DT)  # start-aligned inputs
    for a, x in enumerate(xs):
        X[: len(x), a] = x.to(_DT)
    G = cell.G
    fwd = _Gaussians(M, Wn, T, 1, G if cell.ntk else 0, cell.sigma2, gen)
    gs = torch.zeros(T, M, Wn, G, dtype=_DT)  # hidden Gaussians of each step
    h = torch.zeros(M, Wn, dtype=_DT)
    hL = torch.zeros(M, Wn, dtype=_DT)
    for k in range(T):  # step k + 1; its source is h_k (zero at k = 0)
        active = (lens > k).to(_DT)
        if cell.ntk:
            g = fwd.next((h * active).unsqueeze(0), sample=k > 0)
            if g is not None:
                gs[k] = g.permute(1, 2, 0)
        else:
            fwd.next((h * active).unsqueeze(0))
            gs[k] = cell.mean_field(h)
        h = cell.forward(cell.inputs(X[k]), gs[k], h)
        last = lens == k + 1
        hL[:, last] = h[:, last]
    hs = fwd.src.view(M, T, Wn)  # h_{k} at slot k (masked): the state entering step k + 1
    fwd.xi = None
    out = {"c": (hL.T @ hL).to(_F64) / M}
    # backward, end-aligned: slot j ↔ step L_a − j of window a
    bwd = _Gaussians(M, Wn, T, G, 1 if cell.ntk else 0, cell.sigma2, gen)
    eta = cell.c.unsqueeze(1).expand(M, Wn).clone()
    D = torch.zeros(M, Wn, G, d, dtype=_DT)
    Sd = torch.zeros(M, Wn, G, dtype=_DT)
    Sv = torch.zeros(M, Wn, G, dtype=_DT)
    ar = torch.arange(Wn)
    for j in range(T):
        k = lens - 1 - j  # 0-based step index of each window
        act = (k >= 0)
        kc = k.clamp_min(0)
        af = act.to(_DT)
        xk = X[kc, ar]  # (W, d)
        gk = gs[kc, :, ar].permute(1, 0, 2)  # (M, W, G)
        hk = hs[:, kc, ar]  # (M, W): the state entering the step
        eta = eta * af
        delta, v, direct = cell.backward(cell.inputs(xk), gk, hk, eta)
        D += delta.unsqueeze(-1) * xk.unsqueeze(-2)
        Sd += delta
        Sv += v
        if cell.ntk:
            z = bwd.next(v.permute(2, 0, 1), sample=j < T - 1)
            back = z[0] if z is not None else 0.0
        else:
            bwd.next(v.permute(2, 0, 1))
            back = 0.0
        eta = (direct * eta if direct is not None else 0.0) + back
    Dm = D.permute(0, 2, 3, 1).reshape(-1, Wn)
    out["w_ih"] = (Dm.T @ Dm).to(_F64) / M
    if cell.bias:
        Sdm, Svm = Sd.permute(0, 2, 1).reshape(-1, Wn), Sv.permute(0, 2, 1).reshape(-1, Wn)
        out["b_ih"] = (Sdm.T @ Sdm).to(_F64) / M
        out["b_hh"] = (Svm.T @ Svm).to(_F64) / M
    if cell.ntk:  # Σ_{j,j'} Ê[v v'] ⊙ Ê[h h'] at the matching steps
        idx = ((lens.unsqueeze(0) - 1 - torch.arange(T).unsqueeze(1)) * Wn + ar)  # (T, W)
        ok = (idx >= 0).reshape(-1) & ((lens.unsqueeze(0) - 1 - torch.arange(T).unsqueeze(1))
                                       >= 0).reshape(-1)
        flat = idx.reshape(-1).clamp_min(0)
        Hf = fwd.gram[flat][:, flat] * (ok.unsqueeze(0) & ok.unsqueeze(1))
        out["w_hh"] = (bwd.gram * Hf).view(T, Wn, T, Wn).sum((0, 2))
    return out


def coordinate_limit_ntk(model, x: Tensor, x2: Optional[Tensor] = None, samples: int = 16384,
                         replicates: int = 8, seed: int = 0) -> CoordinateLimitKernel:
    """K_∞(x̄_i, x̄'_j) of an ElmanRNN or GRURNN for windows x (n, L, d) and x2 (m, L′, d)
    (default x2 = x), by sampling the infinite-width coordinate distribution (module docstring):
    ``replicates`` independent estimates of ``samples`` coordinates each, seeded from ``seed``.
    Cost ~ replicates · samples · (n + m)² L² flops (float32 samples) and
    ~ 8 samples (n + m) L floats of memory."""
    check_model(model)
    for name, v, low in (("samples", samples, 16), ("replicates", replicates, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name}={v!r} must be an integer >= {low}")
    for name, xx in (("x", x), ("x2", x2)):
        if xx is not None:
            model.check_windows(xx, name)
    t0 = time.perf_counter()
    xa = (x if x.dim() == 3 else x.unsqueeze(0)).detach().to("cpu", _F64)
    xb = None if x2 is None else (x2 if x2.dim() == 3 else x2.unsqueeze(0)).detach().to(
        "cpu", _F64)
    xs = list(xa) + ([] if xb is None else list(xb))
    n = xa.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    reps = []
    for _ in range(replicates):
        reps.append(_one(model, xs, samples, gen))
    sl = (slice(0, n), slice(0, n)) if xb is None else (slice(0, n), slice(n, None))
    blocks = {k: torch.stack([r[k][sl] for r in reps]) for k in reps[0]}
    tot = sum(blocks.values())  # (R, n, m)
    value = tot.mean(0)
    stderr = tot.std(0) / math.sqrt(replicates)
    half = stderr * float(stats.t.ppf(0.975, replicates - 1))
    norm = float(value.norm())
    rel = float(stderr.norm()) / norm if norm > 0 else float("inf")
    dev = x.device
    return CoordinateLimitKernel(value.to(dev), stderr.to(dev), half.to(dev), float(half.max()),
                                 rel, int(samples), int(replicates),
                                 {k: b.mean(0).to(dev) for k, b in blocks.items()},
                                 time.perf_counter() - t0)
