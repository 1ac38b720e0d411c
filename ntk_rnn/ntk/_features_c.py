"""Compiled per-unit features of the structured NTK (theory §4), for ``structured._block_features``.

For one block of units i and every window x̄ = (X_0..X_{L−1}) this computes, fused per
(window, unit), the features φ_i = (S_L, c_i Q_L, c_i P_L) of theory §4:

    z_k = w_i·X_k + b_i S_k,   S_{k+1} = σ(z_k),   D_k = σ'(z_k),   S_0 = P_0 = Q_0 = 0
    Q_{k+1} = D_k (S_k + g Q_k),   P_{k+1} = D_k (X_k + g P_k),   g = b_i  (truncated: g = 0)

i.e. Q_L = Σ_k a_k S_k, P_L = Σ_k a_k X_k with a_{L−1} = D_{L−1}, a_{k−1} = g D_{k−1} a_k (the
torch path's unrolled form; here the forward form, so S, Q, P stay in registers and nothing of
length L is stored). Output rows [S, cQ, cP (d rows)] of phi (n, d+2, Nb), as
``structured._block_features``. With ``coef`` (the factorised P·P' term) the cP rows are skipped
(left untouched, as on the torch path) and c_i a_{i,k} go to coef (n, L, Nb): D_k is stored there
going forward, then turned into c a_k by the backward recursion in place.

Units are processed in chunks of VL (32 float / 16 double: two AVX-512 vectors, for latency
hiding), each C loop over the VL lanes of a chunk, so ``cc -O3`` turns it into vector code and σ
into libmvec calls. The same build recipe as :mod:`ntk_rnn.fast` (its compiler lookup, cache
folder, CPU key, flag sets and libmvec declarations): one shared object per (d, activation),
compiled on first use, cached on disk keyed by source, flags and CPU; it is checked once per
process against the torch path (:func:`structured._block_features` with ``use_c=False``) and any
failure means ``None`` here, i.e. the torch path. ``NTK_RNN_NO_KERNEL=1`` disables it (as for
fast.py's kernels); ``structured.USE_C = False`` does too, at run time.
The windows are split over ``torch.get_num_threads()`` Python threads (ctypes drops the GIL).
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from string import Template
from typing import Any

import torch
from torch import Tensor

from ..fast import _ACT_CODES, _C_HEAD, build_shared, load_checked

_C_BODY = Template(r"""
INL void act_$S($R z, $R *s, $R *ds) {
#if ACT == 0
    $R v = $tanh(z); *s = v; *ds = ($R)1 - v * v;
#elif ACT == 1
    $R v = ($R)1 / (($R)1 + $exp(-z)); *s = v; *ds = v * (($R)1 - v);
#else
    *s = $erf(z); *ds = ($R)1.1283791670955126 * $exp(-z * z);
#endif
}

/* One chunk of VL units (one or more vectors: lanes v), one window xr (L, D): the forward pass
   with the RTRL recursions in registers (g = b, or 0 when truncated: then Q = D_{L-1} S_{L-1},
   P = D_{L-1} X_{L-1}); out rows (stride ld) [S_L, c Q_L, c P_L]. With co != 0 (row stride ld)
   the P rows are skipped and co[k] = c a_k, from D_k (stored going forward) and a backward pass. */
INL void chunk_$S(long L, int trunc, const $R *restrict xr, const $R *restrict wt, long ldw,
                  const $R *restrict bt, const $R *restrict ct, $R *restrict out,
                  $R *restrict co, long ld) {
    $R W[D][$VL], B[$VL], G[$VL], S[$VL], Q[$VL], P[D][$VL], z[$VL], sn[$VL], ds[$VL];
    for (int v = 0; v < $VL; v++) {
        for (int j = 0; j < D; j++) { W[j][v] = wt[j * ldw + v]; P[j][v] = 0; }
        B[v] = bt[v]; G[v] = trunc ? 0 : bt[v]; S[v] = 0; Q[v] = 0;
    }
    for (long k = 0; k < L; k++) {
        const $R *restrict xk = xr + k * D;
        #pragma omp simd
        for (int v = 0; v < $VL; v++) {  /* z_k = b S_k + w.X_k */
            $R zz = B[v] * S[v];
            for (int j = 0; j < D; j++) zz += W[j][v] * xk[j];
            z[v] = zz;
        }
        #pragma omp simd
        for (int v = 0; v < $VL; v++) act_$S(z[v], sn + v, ds + v);
        if (co) {  /* Q_{k+1} = D_k (S_k + g Q_k); keep D_k for the coefficients */
            #pragma omp simd
            for (int v = 0; v < $VL; v++) {
                Q[v] = ds[v] * (S[v] + G[v] * Q[v]);
                co[k * ld + v] = ds[v];
                S[v] = sn[v];
            }
        } else {  /* and P_{k+1} = D_k (X_k + g P_k) */
            #pragma omp simd
            for (int v = 0; v < $VL; v++) {
                Q[v] = ds[v] * (S[v] + G[v] * Q[v]);
                for (int j = 0; j < D; j++) P[j][v] = ds[v] * (xk[j] + G[v] * P[j][v]);
                S[v] = sn[v];
            }
        }
    }
    for (int v = 0; v < $VL; v++) {
        out[v] = S[v];
        out[ld + v] = ct[v] * Q[v];
        if (!co) for (int j = 0; j < D; j++) out[(2 + j) * ld + v] = ct[v] * P[j][v];
    }
    if (co) {  /* a_{L-1} = D_{L-1}, a_{k-1} = g D_{k-1} a_k; then c a_k */
        for (int v = 0; v < $VL; v++) co[(L - 1) * ld + v] *= ct[v];
        for (long k = L - 2; k >= 0; k--) {
            #pragma omp simd
            for (int v = 0; v < $VL; v++) co[k * ld + v] *= G[v] * co[(k + 1) * ld + v];
        }
    }
}

/* Windows r0..r1-1 of x (n, L, D), units 0..Nb-1 (wT (D, ldw), b, c (Nb)) into phi (n, D+2, Nb)
   and coef (n, L, Nb) or 0 (see chunk_). Units go in chunks of VL; a last partial chunk works on
   zero-padded copies. Returns 0, or -1 when its scratch buffer cannot be allocated. */
int features_$S(long r0, long r1, long L, long Nb, int trunc, const $R *restrict x,
                const $R *restrict wT, long ldw, const $R *restrict b, const $R *restrict c,
                $R *restrict phi, $R *restrict coef) {
    const long full = Nb - Nb % $VL, rem = Nb - full;
    $R *tmp = 0, pw[D * $VL], pb[$VL], pc[$VL];
    if (rem) {
        tmp = ($R *)malloc(sizeof($R) * (D + 2 + L) * $VL);
        if (!tmp) return -1;
        for (int v = 0; v < $VL; v++) {
            for (int j = 0; j < D; j++) pw[j * $VL + v] = v < rem ? wT[j * ldw + full + v] : 0;
            pb[v] = v < rem ? b[full + v] : 0;
            pc[v] = v < rem ? c[full + v] : 0;
        }
    }
    for (long r = r0; r < r1; r++) {
        const $R *restrict xr = x + r * L * D;
        $R *restrict ph = phi + r * (D + 2) * Nb;
        $R *restrict co = coef ? coef + r * L * Nb : 0;
        for (long u = 0; u < full; u += $VL)
            chunk_$S(L, trunc, xr, wT + u, ldw, b + u, c + u, ph + u, co ? co + u : 0, Nb);
        if (rem) {
            chunk_$S(L, trunc, xr, pw, $VL, pb, pc, tmp, co ? tmp + (D + 2) * $VL : 0, $VL);
            for (long row = 0; row < (co ? 2 : D + 2); row++)
                for (long v = 0; v < rem; v++) ph[row * Nb + full + v] = tmp[row * $VL + v];
            if (co)
                for (long k = 0; k < L; k++)
                    for (long v = 0; v < rem; v++)
                        co[k * Nb + full + v] = tmp[(D + 2 + k) * $VL + v];
        }
    }
    free(tmp);
    return 0;
}
""")


def _c_source() -> str:
    f64 = _C_BODY.substitute(R="double", S="f64", VL=16, tanh="tanh", exp="exp", erf="erf")
    f32 = _C_BODY.substitute(R="float", S="f32", VL=32, tanh="tanhf", exp="expf", erf="erff")
    return "#include <stdlib.h>\n" + _C_HEAD + f64 + f32


_LIBS: dict[tuple[int, str], Any] = {}  # (d, activation) -> CDLL, or the reason it is not used
_LOCK = threading.RLock()
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child inherits the pool but not its threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _build(d: int, act: str) -> ctypes.CDLL:
    """Compile (or load from the cache) the shared object for (d, act); fast.py's recipe."""
    lib = build_shared(_c_source(), f"features_d{d}_{act}",
                       [f"-DD={d}", f"-DACT={_ACT_CODES[act]}"], "the features kernel")
    Lg, P = ctypes.c_long, ctypes.c_void_p
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"features_{sfx}")
        fn.argtypes = [Lg, Lg, Lg, Lg, ctypes.c_int, P, P, Lg, P, P, P, P]
        fn.restype = ctypes.c_int
    return lib


def library(d: int, act: str) -> ctypes.CDLL | None:
    """The compiled, self-checked kernel for input dimension ``d`` and activation ``act``, or None
    (the reason is in :func:`status`)."""
    return load_checked(_LIBS, _LOCK, (int(d), act), _build, _self_check)


def status(d: int = 4, act: str = "tanh") -> str:
    """'ok (...)' or why the compiled features are not used for (d, act)."""
    lib = library(d, act)
    return f"ok ({lib._name})" if lib is not None else f"unavailable: {_LIBS[(int(d), act)]}"


def usable(model: Any, x: Tensor) -> bool:
    """True when :func:`block_features` can run: CPU float32/float64 and a working kernel."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 3 and x.shape[1] >= 1 and model.w.device.type == "cpu"
            and model.w.dtype == x.dtype and model.act.name in _ACT_CODES
            and library(x.shape[-1], model.act.name) is not None)


def block_features(model: Any, x: Tensor, units: slice, truncated: bool, phi: Tensor,
                   coef: Tensor | None, lib: ctypes.CDLL | None = None) -> None:
    """φ of ``units`` for windows x (n, L, d) into phi (n, d+2, Nb) (rows [S, cQ, cP], c applied),
    or with ``coef`` (n, L, Nb) the c-scaled coefficients there instead of the cP rows. phi and
    coef must be contiguous; call only when :func:`usable`."""
    n, L, d = x.shape
    lib = lib or library(d, model.act.name)
    x = x.contiguous()
    wT = model.w.detach()[units].T.contiguous()
    b, c = model.b.detach()[units].contiguous(), model.c.detach()[units].contiguous()
    Nb = phi.shape[-1]
    fn = lib.features_f32 if x.dtype == torch.float32 else lib.features_f64
    args = (L, Nb, int(truncated), x.data_ptr(), wT.data_ptr(), Nb, b.data_ptr(), c.data_ptr(),
            phi.data_ptr(), 0 if coef is None else coef.data_ptr())
    parts = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n, (n * L * Nb) // 2**16))
    if parts == 1:
        codes = [fn(0, n, *args)]
    else:  # windows split over threads: ctypes releases the GIL during the call
        global _POOL
        with _LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                           thread_name_prefix="ntk-features")
        cuts = [n * t // parts for t in range(parts + 1)]
        futures = [_POOL.submit(fn, cuts[t], cuts[t + 1], *args) for t in range(1, parts)]
        codes = [fn(0, cuts[1], *args)] + [f.result() for f in futures]  # this thread: part 0
    if any(codes):
        raise MemoryError("features kernel: could not allocate its work buffer")


def _self_check(key: tuple[int, str]) -> None:
    """Compare with the torch path on a small problem (float64 and float32, truncated or not,
    with and without coefficients); a mismatch disables the kernel for this key."""
    from ..model import MeanFieldRNN
    from . import structured as st

    d, act = key
    lib = _LIBS[key]
    gen = torch.Generator().manual_seed(4321)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-4)):
        model = MeanFieldRNN(d, 37, beta=0.7, activation=act, init={"b": "uniform", "rho": 0.8},
                             seed=3, dtype=dtype)
        x = torch.randn(5, 6, d, generator=gen, dtype=torch.float64).to(dtype)
        units = slice(2, 37)
        for truncated in (False, True):
            ws = st._Workspace()
            ref_phi, ref_coef = st._block_features(model, x, x.transpose(1, 2).contiguous(),
                                                   units, truncated, True, ws, use_c=False)
            ref_phi2, _ = st._block_features(model, x, x.transpose(1, 2).contiguous(), units,
                                             truncated, False, ws, "2", use_c=False)
            phi, coef = torch.zeros_like(ref_phi), torch.zeros_like(ref_coef)
            phi2 = torch.zeros_like(ref_phi2)
            block_features(model, x, units, truncated, phi, coef, lib)
            block_features(model, x, units, truncated, phi2, None, lib)
            for a, r in ((phi[:, :2], ref_phi[:, :2]), (coef, ref_coef), (phi2, ref_phi2)):
                a, r = a.double(), r.double()
                if not torch.isfinite(a).all() or float((a - r).abs().max()) > tol * (
                        1 + float(r.abs().max())):
                    _LIBS[key] = (f"self-check failed ({dtype}, truncated={truncated}): the "
                                  "kernel disagrees with the torch path")
                    return
