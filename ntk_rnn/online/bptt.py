"""Online SGD by truncated backpropagation through time, for models without an exact online step.

One SGD step per stream element, θ ← θ − lr ∇_θ ½(Y_k − Ŷ_k)², the gradient taken through the
last ``window`` = W elements of the stream. Exactly, with θ_k the parameters before step k:

* the stepper keeps the inputs X_{k−n+1..k−1} of the current window (n − 1 ≤ W − 1 of them, a
  buffer) and, for models with a memory (``memory_dim``: :class:`~ntk_rnn.models.ElmanRNN`,
  :class:`~ntk_rnn.models.GRURNN`), the memory h entering the window (zero at the stream start);
* step k appends X_k (window length n = min(k + 1, W)), runs the model with θ_k over the window
  from h, so Ŷ_k is the last output, and backpropagates ½(Y_k − Ŷ_k)² through the n steps of the
  window to θ_k (h is a constant: the truncation); then θ_{k+1} = θ_k − lr ∇;
* when the window is full (n = W) its oldest input leaves the buffer and h becomes the memory
  after that input *as this step's forward computed it* (with θ_k), so the next window starts
  where this one's second element did. Nothing else is carried: no stale activations are reused.

A model without a memory (any ``nn.Module`` whose ``forward`` maps windows (B, L, d) to (B, L))
starts every window from its own zero memory: Ŷ_k = f_{θ_k}(X_{k−n+1..k})_{last}.

The forward of the window with the new θ is unavoidable for exact truncated BPTT (θ changes every
step), so each step costs one forward and one backward over n ≤ W steps. What is saved is
everything else (``engine``):

``"kernel"`` (ElmanRNN and GRURNN on CPU, float32/float64, where a C compiler is present; the
    default there) — a C loop (``cc -O3 -march=native``, built once per activation and cached in
    the kernel cache of :mod:`ntk_rnn.csrc.loader`, checked once per process against a torch
    engine) runs a whole chunk: per step n mat-vecs forward, n − 1 transposed mat-vecs backward
    and the rank-n update of the recurrent matrix, each blocked four rows (or four rank-one
    terms) per pass; no allocation and no dispatch. Single-threaded: per member and step the
    arithmetic is ~3 n N² (Elman) or ~9 n N² (GRU) multiply-adds.
``"eager"`` (ElmanRNN, any device) — the same hand-written forward/backward as batched torch ops
    (bmm / baddbmm on an ensemble axis E), preallocated buffers.
``"autograd"`` (any module; the fallback) — one model: ``torch.autograd.grad`` of the window loss
    on the model's own parameters; an ensemble: ``vmap(torch.func.grad(...))`` through
    ``functional_call`` over the stacked parameters. From the kept memory where the model has
    one. This saves nothing over a hand-written autograd loop: it is what any module gets.

:class:`BPTTStepper` trains one model, :class:`BPTTEnsembleStepper` E models of the same
architecture (parameters stacked with ``torch.func.stack_module_state``, each model bound to its
slice so it always holds the current values), member e evolving exactly as a :class:`BPTTStepper`
of model e would (to round-off). ``state_dict()`` holds the buffer, the memory and the counters:
with the model's own ``state_dict`` it resumes a run bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ..csrc import loader
from ..errors import ConfigError
from ..models.elman import ElmanRNN
from ..models.gru import GRURNN

ENGINES = ("auto", "kernel", "eager", "autograd")
_ACT_CODES = {"tanh": 0, "sigmoid": 1, "erf": 2}


def check_window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"train.bptt_window={window!r} must be an integer >= 1")
    return int(window)


def has_memory(model: nn.Module) -> bool:
    """True for models exposing the memory interface: ``memory_dim`` (int) and
    ``forward(x, h0=..., return_states=True) -> (Ŷ (B, L), states (B, L, memory_dim))``."""
    m = getattr(model, "memory_dim", None)
    return isinstance(m, int) and not isinstance(m, bool) and m >= 1


def _first_param(model: nn.Module) -> Tensor:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    raise ConfigError(f"{type(model).__name__} has no floating-point parameters; nothing to train")


def _check_lr(lr: Any, E: int) -> list[float]:
    vals = [lr] * E if isinstance(lr, (int, float)) else list(lr)
    if len(vals) != E:
        raise ConfigError(f"lr has {len(vals)} values for an ensemble of {E}")
    out = []
    for v in vals:
        v = float(v)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"lr={v} must be a finite number >= 0")
        out.append(v)
    return out


# --- the compiled Elman kernel ------------------------------------------------------------------
_C_HEAD = r"""
#include <math.h>
#include <string.h>
#ifdef USE_MVEC
#pragma omp declare simd notinbranch
extern double tanh(double);
#pragma omp declare simd notinbranch
extern float tanhf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double erf(double);
#pragma omp declare simd notinbranch
extern float erff(float);
#endif
#define INL static inline __attribute__((always_inline))
"""

_C_BODY = r"""
INL void act_$S($R z, $R *s, $R *ds) {
#if ACT == 0
    $R v = $tanh(z); *s = v; *ds = ($R)1 - v * v;
#elif ACT == 1
    $R v = ($R)1 / (($R)1 + $exp(-z)); *s = v; *ds = v * (($R)1 - v);
#else
    *s = $erf(z); *ds = ($R)1.1283791670955126 * $exp(-z * z);
#endif
}

/* y[i] = sum_l M[i, l] v[l] for i < m (rows of length N); four rows share each load of v */
INL void mv_$S(long m, long N, const $R *restrict M, const $R *restrict v, $R *restrict y) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        const $R *restrict r0 = M + i * N, *restrict r1 = r0 + N, *restrict r2 = r1 + N,
                 *restrict r3 = r2 + N;
        $R a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        #pragma omp simd reduction(+:a0, a1, a2, a3)
        for (long l = 0; l < N; l++) {
            const $R x = v[l];
            a0 += r0[l] * x; a1 += r1[l] * x; a2 += r2[l] * x; a3 += r3[l] * x;
        }
        y[i] = a0; y[i + 1] = a1; y[i + 2] = a2; y[i + 3] = a3;
    }
    for (; i < m; i++) {
        const $R *restrict r0 = M + i * N;
        $R a0 = 0;
        #pragma omp simd reduction(+:a0)
        for (long l = 0; l < N; l++) a0 += r0[l] * v[l];
        y[i] = a0;
    }
}

/* y[l] += sum_i a[i] M[i, l] over i < m: four rows per pass over y */
INL void mtv_$S(long m, long N, const $R *restrict M, const $R *restrict a, $R *restrict y) {
    long i = 0;
    for (; i + 4 <= m; i += 4) {
        const $R *restrict r0 = M + i * N, *restrict r1 = r0 + N, *restrict r2 = r1 + N,
                 *restrict r3 = r2 + N;
        const $R c0 = a[i], c1 = a[i + 1], c2 = a[i + 2], c3 = a[i + 3];
        #pragma omp simd
        for (long l = 0; l < N; l++) y[l] += c0 * r0[l] + c1 * r1[l] + c2 * r2[l] + c3 * r3[l];
    }
    for (; i < m; i++) {
        const $R *restrict r0 = M + i * N;
        const $R c0 = a[i];
        #pragma omp simd
        for (long l = 0; l < N; l++) y[l] += c0 * r0[l];
    }
}

/* row[l] -= sum_j coef[j] V[j, l] over j < n: four rank-one terms per pass over the row */
INL void rowupd_$S(long n, long N, $R *restrict row, const $R *restrict coef,
                   const $R *restrict V) {
    long j = 0;
    for (; j + 4 <= n; j += 4) {
        const $R *restrict v0 = V + j * N, *restrict v1 = v0 + N, *restrict v2 = v1 + N,
                 *restrict v3 = v2 + N;
        const $R c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
        #pragma omp simd
        for (long l = 0; l < N; l++) row[l] -= c0 * v0[l] + c1 * v1[l] + c2 * v2[l] + c3 * v3[l];
    }
    for (; j < n; j++) {
        const $R *restrict v0 = V + j * N;
        const $R c0 = coef[j];
        #pragma omp simd
        for (long l = 0; l < N; l++) row[l] -= c0 * v0[l];
    }
}

/* ElmanRNN, T steps of one member (see the Python module docstring).
   work: S (W+1)N | DS W N | DL W N | Z N | CF W */
static void member_$S(long N, long d, long W, long T, long cnt,
                      $R *restrict c, $R *restrict w, $R *restrict A, $R *restrict mem,
                      $R *restrict buf, const $R *restrict X, const $R *restrict Y,
                      $R *restrict out, $R lr, $R so, $R g, $R *restrict work) {
    $R *restrict S = work;
    $R *restrict DS = S + (W + 1) * N;
    $R *restrict DL = DS + W * N;
    $R *restrict Z = DL + W * N;
    $R *restrict CF = Z + N;
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        for (long p = 0; p < d; p++) buf[(n - 1) * d + p] = X[t * d + p];
        memcpy(S, mem, (size_t)N * sizeof($R));
        /* forward: z_j = w x_j + g A S_j, S_{j+1} = s(z_j), DS_j = s'(z_j) */
        for (long j = 0; j < n; j++) {
            const $R *restrict xj = buf + j * d;
            $R *restrict Sn = S + (j + 1) * N;
            $R *restrict dsj = DS + j * N;
            mv_$S(N, N, A, S + j * N, Z);
            for (long i = 0; i < N; i++) {
                $R u = 0;
                for (long p = 0; p < d; p++) u += w[i * d + p] * xj[p];
                Z[i] = u + g * Z[i];
            }
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                $R s, ds;
                act_$S(Z[i], &s, &ds);
                Sn[i] = s;
                dsj[i] = ds;
            }
        }
        const $R *restrict SL = S + n * N;
        $R acc = 0;
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * SL[i];
        const $R yh = acc * so;
        out[t] = yh;
        const $R es = (yh - Y[t]) * so; /* dL/dyhat * N^-beta */
        /* backward: DL_{n-1} = es c s'(z_{n-1}); DL_{j-1} = g (A^T DL_j) s'(z_{j-1}) */
        {
            $R *restrict dl = DL + (n - 1) * N;
            const $R *restrict ds = DS + (n - 1) * N;
            #pragma omp simd
            for (long i = 0; i < N; i++) dl[i] = es * c[i] * ds[i];
        }
        for (long j = n - 1; j > 0; j--) {
            $R *restrict dp = DL + (j - 1) * N;
            const $R *restrict dsp = DS + (j - 1) * N;
            for (long l = 0; l < N; l++) dp[l] = 0;
            mtv_$S(N, N, A, DL + j * N, dp);
            #pragma omp simd
            for (long l = 0; l < N; l++) dp[l] *= g * dsp[l];
        }
        /* update with the gradients at theta_k: c -= lr es S_n, w -= lr sum_j DL_j x_j^T,
           A -= lr g sum_j DL_j S_j^T */
        #pragma omp simd
        for (long i = 0; i < N; i++) c[i] -= lr * (es * SL[i]);
        for (long i = 0; i < N; i++) {
            for (long j = 0; j < n; j++) CF[j] = lr * (g * DL[j * N + i]);
            rowupd_$S(n, N, A + i * N, CF, S);
            for (long p = 0; p < d; p++) {
                $R gw = 0;
                for (long j = 0; j < n; j++) gw += DL[j * N + i] * buf[j * d + p];
                w[i * d + p] -= lr * gw;
            }
        }
        if (n == W) { /* the oldest input leaves; the memory moves past it */
            memcpy(mem, S + N, (size_t)N * sizeof($R));
            memmove(buf, buf + d, (size_t)((W - 1) * d) * sizeof($R));
            cnt = W - 1;
        } else {
            cnt = n;
        }
    }
}

/* GRURNN (gates r, z, n as nn.GRUCell; W_hh enters as g W_hh), T steps of one member.
   work: H (W+1)N | R, Z, NN, QN: W N each | DA W 3N | DH N | A3, Q3, DQ: 3N each | CF W */
static void gru_member_$S(long N, long d, long W, long T, long cnt, long bias,
                          $R *restrict c, $R *restrict Wi, $R *restrict Wh, $R *restrict bi,
                          $R *restrict bh, $R *restrict mem, $R *restrict buf,
                          const $R *restrict X, const $R *restrict Y, $R *restrict out,
                          $R lr, $R so, $R g, $R *restrict work) {
    const long N3 = 3 * N;
    $R *restrict H = work;
    $R *restrict Rg = H + (W + 1) * N;
    $R *restrict Zg = Rg + W * N;
    $R *restrict Ng = Zg + W * N;
    $R *restrict Qn = Ng + W * N;
    $R *restrict DA = Qn + W * N;
    $R *restrict DH = DA + W * N3;
    $R *restrict A3 = DH + N;
    $R *restrict Q3 = A3 + N3;
    $R *restrict DQ = Q3 + N3;
    $R *restrict CF = DQ + N3;
    for (long t = 0; t < T; t++) {
        const long n = cnt + 1;
        for (long p = 0; p < d; p++) buf[(n - 1) * d + p] = X[t * d + p];
        memcpy(H, mem, (size_t)N * sizeof($R));
        /* forward */
        for (long j = 0; j < n; j++) {
            const $R *restrict xj = buf + j * d;
            const $R *restrict hj = H + j * N;
            $R *restrict hn = H + (j + 1) * N;
            mv_$S(N3, N, Wh, hj, Q3);
            for (long i = 0; i < N3; i++) {
                $R u = bias ? bi[i] : ($R)0;
                for (long p = 0; p < d; p++) u += Wi[i * d + p] * xj[p];
                A3[i] = u;
                Q3[i] = g * Q3[i] + (bias ? bh[i] : ($R)0);
            }
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                const $R r = ($R)1 / (($R)1 + $exp(-(A3[i] + Q3[i])));
                const $R z = ($R)1 / (($R)1 + $exp(-(A3[N + i] + Q3[N + i])));
                const $R v = $tanh(A3[2 * N + i] + r * Q3[2 * N + i]);
                Rg[j * N + i] = r;
                Zg[j * N + i] = z;
                Ng[j * N + i] = v;
                Qn[j * N + i] = Q3[2 * N + i];
                hn[i] = v + z * (hj[i] - v);
            }
        }
        const $R *restrict HL = H + n * N;
        $R acc = 0;
        #pragma omp simd reduction(+:acc)
        for (long i = 0; i < N; i++) acc += c[i] * HL[i];
        const $R yh = acc * so;
        out[t] = yh;
        const $R es = (yh - Y[t]) * so;
        /* backward: DH = dL/dh_{j+1}; DA_j = dL/d(gate pre-activations) [r, z, n] */
        #pragma omp simd
        for (long i = 0; i < N; i++) DH[i] = es * c[i];
        for (long j = n - 1; j >= 0; j--) {
            const $R *restrict hj = H + j * N;
            $R *restrict da = DA + j * N3;
            #pragma omp simd
            for (long i = 0; i < N; i++) {
                const $R r = Rg[j * N + i], z = Zg[j * N + i], v = Ng[j * N + i];
                const $R dh = DH[i];
                const $R dan = dh * (($R)1 - z) * (($R)1 - v * v);
                const $R dr = dan * Qn[j * N + i];
                da[i] = dr * r * (($R)1 - r);
                da[N + i] = dh * (hj[i] - v) * z * (($R)1 - z);
                da[2 * N + i] = dan;
                DH[i] = dh * z;
                DQ[2 * N + i] = g * (dan * r);
            }
            if (j > 0) { /* DH += g W_hh^T dq, dq = [da_r, da_z, da_n r] */
                #pragma omp simd
                for (long i = 0; i < 2 * N; i++) DQ[i] = g * da[i];
                mtv_$S(N3, N, Wh, DQ, DH);
            }
        }
        /* update with the gradients at theta_k */
        #pragma omp simd
        for (long i = 0; i < N; i++) c[i] -= lr * (es * HL[i]);
        for (long i = 0; i < N3; i++) {
            $R sa = 0, sq = 0;
            for (long j = 0; j < n; j++) {
                const $R a = DA[j * N3 + i];
                const $R q = i < 2 * N ? a : a * Rg[j * N + i - 2 * N];
                sa += a;
                sq += q;
                CF[j] = lr * (g * q);
            }
            rowupd_$S(n, N, Wh + i * N, CF, H);
            for (long p = 0; p < d; p++) {
                $R gw = 0;
                for (long j = 0; j < n; j++) gw += DA[j * N3 + i] * buf[j * d + p];
                Wi[i * d + p] -= lr * gw;
            }
            if (bias) {
                bi[i] -= lr * sa;
                bh[i] -= lr * sq;
            }
        }
        if (n == W) {
            memcpy(mem, H + N, (size_t)N * sizeof($R));
            memmove(buf, buf + d, (size_t)((W - 1) * d) * sizeof($R));
            cnt = W - 1;
        } else {
            cnt = n;
        }
    }
}

void gru_bptt_$S(long E, long N, long d, long W, long T, long cnt, long bias, $R *c, $R *Wi,
                 $R *Wh, $R *bi, $R *bh, $R *mem, $R *buf, const $R *X, long xs, const $R *Y,
                 long ys, $R *out, long os, const double *lr, double so, double g, $R *work) {
    for (long e = 0; e < E; e++)
        gru_member_$S(N, d, W, T, cnt, bias, c + e * N, Wi + e * 3 * N * d, Wh + e * 3 * N * N,
                      bias ? bi + e * 3 * N : bi, bias ? bh + e * 3 * N : bh, mem + e * N,
                      buf + e * W * d, X + e * xs, Y + e * ys, out + e * os, ($R)lr[e],
                      ($R)so, ($R)g, work);
}

void elman_bptt_$S(long E, long N, long d, long W, long T, long cnt, $R *c, $R *w, $R *A,
                   $R *mem, $R *buf, const $R *X, long xs, const $R *Y, long ys, $R *out,
                   long os, const double *lr, double so, double g, $R *work) {
    for (long e = 0; e < E; e++)
        member_$S(N, d, W, T, cnt, c + e * N, w + e * N * d, A + e * N * N, mem + e * N,
                  buf + e * W * d, X + e * xs, Y + e * ys, out + e * os, ($R)lr[e], ($R)so,
                  ($R)g, work);
}
"""


def _c_source() -> str:
    body = Template(_C_BODY)
    return (_C_HEAD + body.substitute(R="double", S="f64", tanh="tanh", exp="exp", erf="erf")
            + body.substitute(R="float", S="f32", tanh="tanhf", exp="expf", erf="erff"))


_KERNELS: dict = {}
_LOCK = threading.RLock()
_WHAT = "the compiled BPTT kernel (ElmanRNN, GRURNN)"
_CFLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp-simd", "-std=gnu11")
_FLAG_SETS = (  # (compile flags, link flags), tried in order, as ntk_rnn.csrc.loader does
    (("-march=native", "-DUSE_MVEC"), ("-lmvec", "-lm")),
    (("-march=native",), ("-lm",)),
    ((), ("-lm",)),
)


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    ident += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return ident


def _cache_folder() -> Path:
    """The kernel cache folder of :mod:`ntk_rnn.csrc.loader` (private, mode 0700), else a
    private folder in the temp dir."""
    try:
        return loader.private_dir(loader.cache_dir())
    except OSError:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        return loader.private_dir(Path(tempfile.gettempdir()) / f"ntk_rnn_kernels_{uid}")


def _build(_d: int, act: str) -> ctypes.CDLL:
    """Compile the inline C source above for ``act`` (cached on disk by a hash of source,
    compiler, flags and CPU, in the same private cache folder as the other kernels)."""
    cc = loader.compiler()
    if cc is None:
        raise loader.KernelUnavailable("no C compiler (set CC, or install cc/gcc/clang)")
    src, folder, errors = _c_source(), _cache_folder(), []
    cpu = _cpu_id()
    for comp, link in _FLAG_SETS:
        args = [*_CFLAGS, f"-DACT={_ACT_CODES[act]}", *comp]
        key = hashlib.sha256("\0".join([src, os.path.realpath(cc), *args, *link, cpu,
                                        sys.platform]).encode()).hexdigest()[:20]
        path = folder / f"bptt_{act}_{key}.so"
        try:
            if not path.exists():
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    c_file, so = Path(tmp) / "bptt.c", Path(tmp) / "k.so"
                    c_file.write_text(src)
                    res = subprocess.run([cc, *args, str(c_file), "-o", str(so), *link],
                                         capture_output=True, text=True, timeout=300)
                    if res.returncode != 0:
                        errors.append(f"[{' '.join(comp + link)}] {res.stderr.strip()[-300:]}")
                        continue
                    os.chmod(so, 0o700)
                    os.replace(so, path)  # atomic: concurrent builders are safe
            loader.check_private(path, "cached kernel")
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"[{' '.join(comp + link)}] {exc}")
    else:
        raise loader.KernelUnavailable(f"could not build {_WHAT}: " + " | ".join(errors))
    L, P, Dbl = ctypes.c_long, ctypes.c_void_p, ctypes.c_double
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"elman_bptt_{sfx}")
        fn.argtypes = [L] * 6 + [P] * 5 + [P, L, P, L, P, L, P, Dbl, Dbl, P]
        fn.restype = None
        fn = getattr(lib, f"gru_bptt_{sfx}")
        fn.argtypes = [L] * 7 + [P] * 7 + [P, L, P, L, P, L, P, Dbl, Dbl, P]
        fn.restype = None
    return lib


def _self_check(key: tuple[int, str]) -> None:
    """The kernel vs a torch engine on small ensembles, float64 and float32: ElmanRNN of this
    activation against "eager", and (in the tanh library, which serves GRURNN) GRURNN against
    "autograd"; raises on a mismatch, so the kernel is not used."""
    _, act = key
    X = torch.randn(2, 11, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Y = torch.randn(2, 11, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cases = [(f"elman {scaling}", "eager",
              lambda dt, s, sc=scaling: ElmanRNN(2, 13, beta=0.7, recurrent_scaling=sc,
                                                 activation=act, A_mean=0.3, seed=s, dtype=dt))
             for scaling in ("mean_field", "ntk")]
    if act == "tanh":
        cases += [(f"gru bias={bias}", "autograd",
                   lambda dt, s, b=bias: GRURNN(2, 7, beta=0.7, bias=b, bias_std=0.5, seed=s,
                                                dtype=dt)) for bias in (True, False)]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for name, other, make in cases:
            runs = []
            for engine in ("kernel", other):
                st = BPTTEnsembleStepper([make(dtype, 1), make(dtype, 2)], [0.3, 0.2], window=4,
                                         engine=engine, _unchecked=True)
                Xd, Yd = X.to(dtype), Y.to(dtype)
                o = torch.cat([st.run_chunk(Xd[:, :6], Yd[:, :6]),
                               st.run_chunk(Xd[:, 6:], Yd[:, 6:])], 1)
                runs.append([o] + [p.detach() for p in st.params.values()] + [st.memory])
            for a, b in zip(*runs, strict=True):
                a, b = a.double(), b.double()
                if not torch.isfinite(a).all() or float((a - b).abs().max()) > tol * (
                        1 + float(b.abs().max())):
                    raise RuntimeError(f"self-check failed ({name}, {dtype}): the kernel "
                                       f"disagrees with the {other} engine")


def kernel_library(act: str) -> Optional[ctypes.CDLL]:
    """The compiled, self-checked BPTT kernel for ElmanRNN with activation ``act``, or None."""
    return loader.load_checked(_KERNELS, _LOCK, (0, act), _build, _self_check, _WHAT)


def kernel_status(act: str = "tanh") -> str:
    """'ok (<path>)' or 'unavailable: <why>' for the BPTT kernel of ``act``."""
    return loader.status(_KERNELS, (0, act), kernel_library(act))


# --- the steppers -------------------------------------------------------------------------------
class _BPTTBase:
    """Common machinery on an ensemble axis E (a single model is E = 1)."""

    backend = "bptt"

    def _setup(self, model0: nn.Module, window: int, engine: str, unchecked: bool,
               input_dim: Optional[int]) -> None:
        self.window = check_window(window)
        if engine not in ENGINES:
            raise ConfigError(f"engine={engine!r} is not known; choose one of {list(ENGINES)}")
        self.model0 = model0
        p0 = _first_param(model0)
        self.dtype, self.device = p0.dtype, p0.device
        d = getattr(model0, "input_dim", None) if input_dim is None else input_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ConfigError(f"input_dim={d!r}: pass input_dim (an integer >= 1) for a "
                              f"{type(model0).__name__} without an input_dim attribute")
        self.d = d
        self.memory_dim = int(model0.memory_dim) if has_memory(model0) else None
        E, W = self.E, self.window
        self.inputs = torch.zeros(E, W, d, dtype=self.dtype, device=self.device)
        self.memory = (None if self.memory_dim is None else
                       torch.zeros(E, self.memory_dim, dtype=self.dtype, device=self.device))
        self.count = 0  # inputs held between steps, 0..W-1
        self.steps = 0
        self.engine = self._choose_engine(engine, unchecked)
        if self.engine == "eager":
            N = model0.width
            self._S = torch.zeros(E, W + 1, N, dtype=self.dtype, device=self.device)
            self._DS = torch.zeros(E, W, N, dtype=self.dtype, device=self.device)
            self._D = torch.zeros(E, W, N, dtype=self.dtype, device=self.device)
        elif self.engine == "kernel":
            N = model0.width  # elman: (3W + 2) N + W; gru: (8W + 11) N + W (see the C source)
            self._work = torch.zeros((8 * W + 11) * N + W, dtype=self.dtype)
        else:
            self._gradfn = self._make_gradfn()

    def _model_kind(self) -> Optional[str]:
        """'elman' / 'gru' for the models with hand-written engines, else None."""
        m = self.model0
        if not (all(p.requires_grad for p in m.parameters())
                and self.dtype in (torch.float32, torch.float64)):
            return None
        if type(m) is ElmanRNN and m.act.name in _ACT_CODES:
            return "elman"
        if type(m) is GRURNN:
            return "gru"
        return None

    def _choose_engine(self, engine: str, unchecked: bool) -> str:
        kind = self._kind = self._model_kind()
        if engine == "autograd":
            return engine
        if kind is None or (engine == "eager" and kind != "elman"):
            if engine != "auto":
                raise ConfigError(
                    f"engine={engine!r} needs an ElmanRNN (activation tanh, sigmoid or erf)"
                    + (" or a GRURNN" if engine == "kernel" else "") + " with all parameters "
                    f"trainable in float32/float64; {type(self.model0).__name__} trains with "
                    "engine='autograd'")
            return "autograd"
        if engine == "eager":
            return engine
        act = self.model0.act.name if kind == "elman" else "tanh"
        cpu = self.device.type == "cpu"
        lib = (_build(0, act) if unchecked else kernel_library(act)) if cpu else None
        if lib is None:
            if engine == "kernel":
                why = "the model is not on the CPU" if not cpu else kernel_status(act)
                raise ConfigError(f"engine='kernel' is unavailable: {why}")
            return "eager" if kind == "elman" else "autograd"
        self._lib = lib
        return "kernel"

    # --- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Tensor]:
        d = {"inputs": self.inputs.clone(), "count": torch.tensor(self.count),
             "steps": torch.tensor(self.steps)}
        if self.memory is not None:
            d["memory"] = self.memory.clone()
        return d

    def _load_state(self, d: dict[str, Tensor], squeeze: bool) -> None:
        inputs = d["inputs"].unsqueeze(0) if squeeze else d["inputs"]
        if tuple(inputs.shape) != tuple(self.inputs.shape):
            raise ConfigError(f"BPTT state: inputs of shape {tuple(d['inputs'].shape)} do not "
                              f"fit window={self.window}, input_dim={self.d} (E={self.E})")
        count = int(d["count"])
        if not 0 <= count < self.window:
            raise ConfigError(f"BPTT state: count={count} is outside [0, {self.window - 1}]")
        if (self.memory is None) != ("memory" not in d):
            raise ConfigError("BPTT state: the memory does not match the model's "
                              "(saved from a model with a different memory interface?)")
        self.inputs.copy_(inputs)
        if self.memory is not None:
            mem = d["memory"].unsqueeze(0) if squeeze else d["memory"]
            self.memory.copy_(mem)
        self.count, self.steps = count, int(d.get("steps", 0))

    # --- stepping ---------------------------------------------------------------------------
    def _run(self, X: Tensor, Y: Tensor, out: Tensor, shared: bool) -> None:
        """X (E, T, d) (an expanded view when ``shared``), Y (E, T), out (E, T)."""
        T = X.shape[1]
        if T == 0:
            return
        with torch.no_grad():
            if self.engine == "kernel":
                self._run_kernel(X, Y, out, shared)
            else:
                step = self._eager_step if self.engine == "eager" else self._autograd_step
                for t in range(T):
                    out[:, t] = step(X[:, t], Y[:, t])
        self.steps += T

    def _advance(self, n: int, first: Optional[Tensor]) -> None:
        """After a step over a window of n inputs: if full, drop the oldest input and move the
        memory to ``first`` (the memory after it, from this step's forward)."""
        if n == self.window:
            if self.memory is not None:
                self.memory.copy_(first)
            if self.window > 1:
                self.inputs[:, : n - 1] = self.inputs[:, 1:n].clone()
            self.count = n - 1
        else:
            self.count = n

    def _eager_step(self, x: Tensor, y: Tensor) -> Tensor:
        """ElmanRNN, hand-written forward and backward on the ensemble axis (batched torch)."""
        m, P = self.model0, self.params
        c, w, A = P["c"], P["w"], P["A"]
        g, so = m.recurrent_scale, m.output_scale
        n = self.count + 1
        self.inputs[:, n - 1] = x
        Xw = self.inputs[:, :n]  # (E, n, d)
        U = torch.bmm(Xw, w.transpose(1, 2))  # (E, n, N)
        S, DS, D = self._S, self._DS, self._D
        S[:, 0] = self.memory
        At = A.transpose(1, 2)
        for j in range(n):
            z = torch.baddbmm(U[:, j:j + 1], S[:, j:j + 1], At, alpha=g)  # (E, 1, N)
            s, ds = m.act.value_and_deriv(z[:, 0])
            S[:, j + 1] = s
            DS[:, j] = ds
        SL = S[:, n]
        yh = (SL * c).sum(-1) * so
        es = (yh - y) * so  # (E,)
        D[:, n - 1] = es.unsqueeze(1) * c * DS[:, n - 1]
        for j in range(n - 1, 0, -1):
            v = torch.bmm(D[:, j:j + 1], A)[:, 0]  # (A^T δ_j), (E, N)
            D[:, j - 1] = v * g * DS[:, j - 1]
        Dt = D[:, :n].transpose(1, 2)  # (E, N, n)
        gA = torch.bmm(Dt, S[:, :n]).mul_(g)
        gw = torch.bmm(Dt, Xw)
        gc = es.unsqueeze(1) * SL
        lr = self._lr_t
        A.sub_(gA * lr.view(-1, 1, 1))
        w.sub_(gw * lr.view(-1, 1, 1))
        c.sub_(gc * lr.view(-1, 1))
        self._advance(n, S[:, 1])
        return yh

    def _run_kernel(self, X: Tensor, Y: Tensor, out: Tensor, shared: bool) -> None:
        m, P = self.model0, self.params
        E, T = X.shape[0], X.shape[1]
        Xc = (X[0] if shared else X).contiguous()
        xs = 0 if shared else T * self.d
        Yc = Y.contiguous() if Y.stride(0) != 0 else Y[0].contiguous()
        ys = 0 if Y.stride(0) == 0 else T
        oc = out if out.is_contiguous() else torch.empty_like(out)
        if self._kind == "elman":
            ts = [P["c"], P["w"], P["A"], self.memory, self.inputs]
            head = [E, m.width, self.d, self.window, T, self.count]
            name = "elman_bptt"
        else:
            bias = m.bias
            ts = [P["c"], P["cell.weight_ih"], P["cell.weight_hh"],
                  P["cell.bias_ih"] if bias else None, P["cell.bias_hh"] if bias else None,
                  self.memory, self.inputs]
            head = [E, m.width, self.d, self.window, T, self.count, int(bias)]
            name = "gru_bptt"
        if not all(t is None or t.is_contiguous() for t in ts):
            raise ConfigError("the BPTT kernel needs contiguous parameters (use engine='eager' "
                              "or 'autograd')")
        lr = (ctypes.c_double * E)(*self.lr)
        fn = getattr(self._lib, name + ("_f64" if self.dtype == torch.float64 else "_f32"))
        fn(*head, *(None if t is None else t.data_ptr() for t in ts), Xc.data_ptr(), xs,
           Yc.data_ptr(), ys, oc.data_ptr(), T, lr, m.output_scale, m.recurrent_scale,
           self._work.data_ptr())
        bump = getattr(torch.autograd.graph, "increment_version", None)
        if bump is not None:  # written through raw pointers: tell autograd
            for t in ts:
                if t is not None:
                    bump(t)
        if oc is not out:
            out.copy_(oc)
        self.count = min(self.count + T, self.window - 1)

    # --- generic engine (torch.func) ---------------------------------------------------------
    def _make_gradfn(self):
        model, mem = self.model0, self.memory is not None

        def loss(params, rest, h0, xw, y):
            if mem:
                out, H = functional_call(model, rest | params, (xw.unsqueeze(0),),
                                         {"h0": h0.unsqueeze(0), "return_states": True})
                first = H.reshape(xw.shape[0], -1)[0]
            else:
                out = functional_call(model, rest | params, (xw.unsqueeze(0),))
                first = xw.new_zeros(())  # (vmap wants a tensor) unused: no memory
            if out.numel() != xw.shape[0]:
                raise ConfigError(
                    f"{type(model).__name__}.forward gave an output of shape {tuple(out.shape)} "
                    f"for one window (1, {xw.shape[0]}, {self.d}); expected (1, {xw.shape[0]})")
            yh = out.reshape(-1)[-1]
            return 0.5 * (yh - y) ** 2, (yh, first)

        g = grad(loss, has_aux=True)
        if self.E == 1:  # plain autograd on the model's own parameters: no functorch layers
            named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]

            def one(params, rest, h0, xw, y):
                with torch.enable_grad():
                    if mem:
                        out, H = model(xw[0].unsqueeze(0), h0=h0, return_states=True)
                        first = H.reshape(xw.shape[1], -1)[:1]
                    else:
                        out, first = model(xw[0].unsqueeze(0)), None
                    if out.numel() != xw.shape[1]:
                        raise ConfigError(
                            f"{type(model).__name__}.forward gave an output of shape "
                            f"{tuple(out.shape)} for one window (1, {xw.shape[1]}, {self.d}); "
                            f"expected (1, {xw.shape[1]})")
                    yh = out.reshape(-1)[-1]
                    gr = torch.autograd.grad(0.5 * (yh - y[0]) ** 2, [p for _, p in named],
                                             allow_unused=True)
                grads = {k: (torch.zeros_like(p) if v is None else v).unsqueeze(0)
                         for (k, p), v in zip(named, gr)}
                return grads, yh.detach().reshape(1), None if first is None else first.detach()
            return one

        vg = vmap(g, in_dims=(0, 0, 0 if mem else None, 0, 0))

        def many(params, rest, h0, xw, y):
            gr, (yh, first) = vg(params, rest, h0, xw, y)
            return gr, yh, first if mem else None
        return many

    def _autograd_step(self, x: Tensor, y: Tensor) -> Tensor:
        n = self.count + 1
        self.inputs[:, n - 1] = x
        grads, yh, first = self._gradfn(self.params, self.rest, self.memory,
                                        self.inputs[:, :n], y)
        shape = lambda v: (-1,) + (1,) * (v.dim() - 1)  # noqa: E731
        for k, p in self.params.items():
            p.sub_(grads[k] * self._lr_t.view(shape(p)))
        self._advance(n, first)
        return yh

    # --- input checks ------------------------------------------------------------------------
    def _prepare(self, X: Any, Y: Any, out: Optional[Tensor], single: bool):
        E, d = self.E, self.d
        X = torch.as_tensor(X) if not isinstance(X, Tensor) else X
        Y = torch.as_tensor(Y) if not isinstance(Y, Tensor) else Y
        if X.dim() == 2 and X.shape[1] == d:
            T, shared = X.shape[0], True
            X3 = X.to(self.device, self.dtype).unsqueeze(0).expand(E, T, d)
        elif X.dim() == 3 and not single and X.shape[0] == E and X.shape[2] == d:
            T, shared = X.shape[1], False
            X3 = X.to(self.device, self.dtype)
        else:
            want = f"(T, {d})" if single else f"(T, {d}) (one shared stream) or ({E}, T, {d})"
            raise ConfigError(f"X has shape {tuple(X.shape)}; expected {want}")
        if Y.dim() == 1 and Y.shape[0] == T:
            Y2 = Y.to(self.device, self.dtype).unsqueeze(0).expand(E, T)
        elif Y.dim() == 2 and not single and tuple(Y.shape) == (E, T):
            Y2 = Y.to(self.device, self.dtype)
        else:
            want = f"({T},)" if single else f"({T},) (shared) or ({E}, {T})"
            raise ConfigError(f"Y has shape {tuple(Y.shape)}; expected {want}")
        shape = (T,) if single else (E, T)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != self.dtype or out.device != self.device:
            raise ConfigError(f"out has shape {tuple(out.shape)}, {out.dtype} on {out.device}; "
                              f"expected {shape}, {self.dtype} on {self.device}")
        return X3, Y2, (out.unsqueeze(0) if single else out), out, shared


class BPTTStepper(_BPTTBase):
    """Online truncated-BPTT SGD on one model (see the module docstring).

        stepper = BPTTStepper(model, lr=model.learning_rate(alpha), window=32)
        y_hat = stepper.run_chunk(X, Y)              # X (T, d), Y (T,) -> Ŷ (T,)
        stepper.run_chunk(X[j0:j1], Y[j0:j1], out=y_hat[j0:j1])

    ``input_dim`` (d) defaults to ``model.input_dim``. The model's parameters are updated in
    place. ``state_dict()`` / ``load_state_dict()`` hold the window buffer, the memory at the
    window start and the step counters (not the parameters: save the model's own state_dict
    with them). ``engine`` says which engine runs; ``backend`` is "bptt".
    """

    def __init__(self, model: nn.Module, lr: float, window: int = 32, *, engine: str = "auto",
                 input_dim: Optional[int] = None, _unchecked: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"BPTTStepper needs an nn.Module, not {type(model).__name__}")
        self.model, self.E = model, 1
        self.lr = _check_lr(lr, 1)
        self._bind_views()
        self._setup(model, window, engine, _unchecked, input_dim)

    def _bind_views(self) -> None:
        """(1, ...) views of the model's own parameters (re-made if one was replaced)."""
        named = dict(self.model.named_parameters())
        key = tuple((k, p.data_ptr()) for k, p in named.items())
        if getattr(self, "_key", None) == key:
            return
        self._key = key
        self.params = {k: p.detach().unsqueeze(0) for k, p in named.items() if p.requires_grad}
        self.rest = {k: p.detach().unsqueeze(0) for k, p in named.items() if not p.requires_grad}
        self.rest.update({k: b.unsqueeze(0) for k, b in self.model.named_buffers()})
        if not self.params:
            raise ConfigError(f"{type(self.model).__name__} has no trainable parameters")
        p0 = next(iter(self.params.values()))
        self._lr_t = torch.tensor(self.lr, dtype=p0.dtype, device=p0.device)

    def run_chunk(self, X: Tensor, Y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Steps on (X[k], Y[k]), k = 0..T-1; returns Ŷ (T,) (written into ``out`` if given),
        each made with the parameters before its step."""
        self._bind_views()
        X3, Y2, out2, res, shared = self._prepare(X, Y, out, single=True)
        self._run(X3, Y2, out2, shared)
        return res

    def state_dict(self) -> dict[str, Tensor]:
        return {k: (v[0] if v.dim() > 0 and k in ("inputs", "memory") else v)
                for k, v in self._state().items()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self._load_state(d, squeeze=True)


class BPTTEnsembleStepper(_BPTTBase):
    """Truncated-BPTT online SGD for E models of one architecture at once.

    ``models`` share type, hyper-parameters (``extra_repr``), parameter shapes, dtype and device;
    they differ in their parameter values (seeds) and learning rate (``lrs``: one value or one
    per member). Their parameters are stacked (``torch.func.stack_module_state``) and each model
    is bound to its slice, so ``models[e]`` always holds member e's current parameters. Data: one
    stream per member (X (E, T, d), Y (E, T)) or one shared stream (X (T, d), Y (T,));
    ``run_chunk`` returns Ŷ (E, T). The generic engine is ``vmap`` of the single-model gradient.
    """

    def __init__(self, models: Sequence[nn.Module], lrs: Any, window: int = 32, *,
                 engine: str = "auto", input_dim: Optional[int] = None,
                 _unchecked: bool = False) -> None:
        models = list(models)
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        m0 = models[0]
        for e, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"member {e} is a {type(m).__name__}, not an nn.Module")
            same = (type(m), m.extra_repr(), [(k, tuple(p.shape), p.dtype, p.device,
                                               p.requires_grad) for k, p in m.named_parameters()])
            ref = (type(m0), m0.extra_repr(), [(k, tuple(p.shape), p.dtype, p.device,
                                                p.requires_grad) for k, p in m0.named_parameters()])
            if same != ref:
                raise ConfigError(f"member {e} differs from member 0 in its type, hyper-parameters "
                                  "or parameters; an ensemble shares the architecture")
        self.models, self.E = models, len(models)
        self.lr = _check_lr(lrs, self.E)
        params, buffers = stack_module_state(models)
        trainable = {k for k, p in m0.named_parameters() if p.requires_grad}
        if not trainable:
            raise ConfigError(f"{type(m0).__name__} has no trainable parameters")
        self.params = {k: v.detach().contiguous() for k, v in params.items() if k in trainable}
        self.rest = {k: v.detach().contiguous() for k, v in params.items() if k not in trainable}
        self.rest.update({k: v.contiguous() for k, v in buffers.items()})
        for e in range(self.E):
            self._bind(e)
        p0 = next(iter(self.params.values()))
        self._lr_t = torch.tensor(self.lr, dtype=p0.dtype, device=p0.device)
        self._setup(m0, window, engine, _unchecked, input_dim)

    def _bind(self, e: int) -> None:
        m = self.models[e]
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.data = (self.params if k in self.params else self.rest)[k][e]

    def _sync_bindings(self) -> None:
        """A member whose parameter was replaced (``.data =``, ``load_state_dict(assign=True)``)
        is copied back into the stacked tensors and bound again."""
        for e, m in enumerate(self.models):
            for k, p in m.named_parameters():
                v = (self.params if k in self.params else self.rest)[k][e]
                if p.data_ptr() != v.data_ptr():
                    if tuple(p.shape) != tuple(v.shape):
                        raise ConfigError(f"member {e}: {k} now has shape {tuple(p.shape)}")
                    v.copy_(p.detach())
                    self._bind(e)

    def run_chunk(self, X: Tensor, Y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Steps k = 0..T-1 for every member; returns Ŷ (E, T) (into ``out`` if given)."""
        self._sync_bindings()
        X3, Y2, out2, res, shared = self._prepare(X, Y, out, single=False)
        self._run(X3, Y2, out2, shared)
        return res

    def state_dict(self) -> dict[str, Tensor]:
        return self._state()

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self._load_state(d, squeeze=False)
