"""Compiled per-unit features of the structured NTK (theory §4): the Python side of
``ntk_rnn/csrc/features.c``, for ``structured._block_features``.

For one block of units i and every window x̄ = (X_0..X_{L−1}) the kernel computes, fused per
(window, unit), the features φ_i = (S_L, c_i Q_L, c_i P_L) of theory §4 with the recursion
``spq_step`` of ``csrc/ntk_rnn.h`` (the C twin of :func:`ntk_rnn.models.recurrence.spq_step`):

    z_k = w_i·X_k + b_i S_k,   S_{k+1} = σ(z_k),   D_k = σ'(z_k),   S_0 = P_0 = Q_0 = 0
    Q_{k+1} = D_k (S_k + g Q_k),   P_{k+1} = D_k (X_k + g P_k),   g = b_i  (truncated: g = 0)

i.e. Q_L = Σ_k a_k S_k, P_L = Σ_k a_k X_k with a_{L−1} = D_{L−1}, a_{k−1} = g D_{k−1} a_k (the
torch path's unrolled form; the kernel uses the forward form, so S, Q, P stay in registers).
Output rows [S, cQ, cP (d rows)] of phi (n, d+2, Nb), as ``structured._block_features``. With
``coef`` (the factorised P·P' term) the cP rows are skipped (left untouched, as on the torch
path) and c_i a_{i,k} go to coef (n, L, Nb).

Built by :mod:`ntk_rnn.csrc.loader` (one shared object per (d, activation), cached per user),
checked once per process against the torch recursion (:func:`_reference`); any failure means
``None`` here, i.e. the torch path, with one warning. ``NTK_RNN_NO_KERNEL=1`` disables it (as
for the training kernel); ``structured.USE_C = False`` does too, at run time.
The windows are split over ``torch.get_num_threads()`` Python threads (ctypes drops the GIL);
:func:`run_parallel` also serves ``structured_ntk``, which splits the units over threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

from ..csrc import loader
from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import spq_step

_WHAT = "the compiled NTK features kernel"

_LIBS: dict[tuple[int, str], Any] = {}  # (d, activation) -> CDLL, or the reason it is not used
_LOCK = threading.RLock()
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child inherits the pool but not its threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _build(d: int, act: str) -> ctypes.CDLL:
    """Compile (or load from the per-user cache) csrc/features.c for (d, act)."""
    lib = loader.build("features", d, act, _WHAT)
    Lg, P = ctypes.c_long, ctypes.c_void_p
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"features_{sfx}")
        fn.argtypes = [Lg, Lg, Lg, Lg, ctypes.c_int, P, P, Lg, P, P, P, P]
        fn.restype = ctypes.c_int
    return lib


def library(d: int, act: str) -> ctypes.CDLL | None:
    """The compiled, self-checked kernel for input dimension ``d`` and activation ``act``, or None
    (the reason is in :func:`status`)."""
    return loader.load_checked(_LIBS, _LOCK, (int(d), act), _build, _self_check, _WHAT)


def status(d: int = 4, act: str = "tanh") -> str:
    """'ok (...)' or why the compiled features are not used for (d, act)."""
    lib = library(d, act)
    return loader.status(_LIBS, (int(d), act), lib)


def usable(model: Any, x: Tensor) -> bool:
    """True when :func:`block_features` can run: CPU float32/float64 and a working kernel."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 3 and x.shape[1] >= 1 and model.w.device.type == "cpu"
            and model.w.dtype == x.dtype and model.act.name in loader.ACT_CODES
            and library(x.shape[-1], model.act.name) is not None)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                       thread_name_prefix="ntk-features")
        return _POOL


def run_parallel(tasks: list[Callable[[], Any]]) -> list[Any]:
    """The results of ``tasks``: the first in this thread, the others on the module's pool
    (C calls and torch's BLAS drop the GIL). The tasks must not use the pool themselves."""
    if len(tasks) <= 1:
        return [t() for t in tasks]
    futures = [_pool().submit(t) for t in tasks[1:]]
    first = tasks[0]()
    return [first] + [f.result() for f in futures]


def block_features(model: Any, x: Tensor, units: slice, truncated: bool, phi: Tensor,
                   coef: Tensor | None, lib: ctypes.CDLL | None = None,
                   threads: int | None = None) -> None:
    """φ of ``units`` for windows x (n, L, d) into phi (n, d+2, Nb) (rows [S, cQ, cP], c applied),
    or with ``coef`` (n, L, Nb) the c-scaled coefficients there instead of the cP rows. phi and
    coef must be contiguous; call only when :func:`usable`. The windows are split over
    ``threads`` threads (default ``torch.get_num_threads()``)."""
    n, L, d = x.shape
    lib = lib or library(d, model.act.name)
    x = x.contiguous()
    wT = model.w.detach()[units].T.contiguous()
    b, c = model.b.detach()[units].contiguous(), model.c.detach()[units].contiguous()
    Nb = phi.shape[-1]
    fn = lib.features_f32 if x.dtype == torch.float32 else lib.features_f64
    args = (L, Nb, int(truncated), x.data_ptr(), wT.data_ptr(), Nb, b.data_ptr(), c.data_ptr(),
            phi.data_ptr(), 0 if coef is None else coef.data_ptr())
    threads = torch.get_num_threads() if threads is None else threads
    parts = max(1, min(threads, os.cpu_count() or 1, n, (n * L * Nb) // 2**16))
    cuts = [n * t // parts for t in range(parts + 1)]  # windows split over threads
    codes = run_parallel([functools.partial(fn, cuts[t], cuts[t + 1], *args)
                          for t in range(parts)])
    if any(codes):
        raise MemoryError("features kernel: could not allocate its work buffer")


def _reference(model: MeanFieldRNN, x: Tensor, units: slice, truncated: bool
               ) -> tuple[Tensor, Tensor]:
    """What the kernel computes, from the shared torch recursion (``models.recurrence.spq_step``):
    phi (n, d+2, Nb) rows [S_L, c Q_L, c P_L] and the coefficients c a_k (n, L, Nb) from the
    stored D_k (a_{L-1} = D_{L-1}, a_{k-1} = g D_{k-1} a_k, g = b or 0 when truncated)."""
    n, L, d = x.shape
    w, b, c = (t.detach()[units] for t in (model.w, model.b, model.c))
    S, Q, P = x.new_zeros(n, len(b)), x.new_zeros(n, len(b)), x.new_zeros(n, len(b), d)
    Ds = [spq_step(model.act, w, b, x[:, k], S, P, Q, truncated) for k in range(L)]
    g = torch.zeros_like(b) if truncated else b
    a = [Ds[-1]]
    for k in range(L - 1, 0, -1):
        a.append(g * Ds[k - 1] * a[-1])
    phi = torch.cat([S.unsqueeze(1), (c * Q).unsqueeze(1), (c.unsqueeze(-1) * P).transpose(1, 2)],
                    1)
    return phi, c * torch.stack(a[::-1], 1)


def _self_check(key: tuple[int, str]) -> None:
    """Compare the fresh kernel with :func:`_reference` on a small problem (float64 and float32,
    truncated or not, with and without coefficients, a partial SIMD chunk); raises on a
    mismatch (the kernel is then not used)."""
    d, act = key
    lib = _LIBS[key]
    gen = torch.Generator().manual_seed(4321)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = MeanFieldRNN(d, 37, beta=0.7, activation=act, init={"b": "uniform", "rho": 0.8},
                             seed=3, dtype=dtype)
        x = torch.randn(5, 6, d, generator=gen, dtype=torch.float64).to(dtype)
        units = slice(2, 37)
        for truncated in (False, True):
            ref_phi, ref_coef = _reference(model, x, units, truncated)
            phi = torch.full_like(ref_phi, float("nan"))
            phi2, coef = torch.zeros_like(ref_phi), torch.zeros_like(ref_coef)
            block_features(model, x, units, truncated, phi, None, lib)
            block_features(model, x, units, truncated, phi2, coef, lib)
            for a, r in ((phi, ref_phi), (phi2[:, :2], ref_phi[:, :2]), (coef, ref_coef)):
                a, r = a.double(), r.double()
                if not torch.isfinite(a).all() or float((a - r).abs().max()) > tol * (
                        1 + float(r.abs().max())):
                    raise loader.KernelUnavailable(
                        f"self-check failed ({dtype}, truncated={truncated}): the features "
                        "kernel disagrees with the torch recursion")
