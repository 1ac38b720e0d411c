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
**Chosen by measurement.** Where the kernel builds and passes its self-check it still runs only
if it beats the torch path on this machine: :func:`choice` times both on a small block at first
use per (d, activation, dtype) — one thread each, interleaved, min of a few runs — and caches the
result as JSON next to the compiled object (the loader's cache folder; the object's name already
hashes the sources, compiler, flags and CPU model and flags), so later processes on the same CPU
reuse it without timing. The result (``Choice``: backend, reason, both timings, ISA) is what
``make bench`` prints and what a run records (:func:`record`); ``NTK_RNN_FEATURES=c|torch`` or
:func:`pin` fixes it (a resumed run or an ensemble member pins the recorded backend, so the
round-off of its logged kernels does not change with the machine's load).

The windows are split over ``torch.get_num_threads()`` Python threads (ctypes drops the GIL);
:func:`run_parallel` also serves ``structured_ntk``, which splits the units over threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..csrc import loader
from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import spq_step
from ..subnormals import without_subnormals

_LOCK = threading.RLock()  # the choices and the pool
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child inherits the pool but not its threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def usable(model: Any, x: Tensor) -> bool:
    """True when :func:`block_features` can run: CPU float32/float64 and a working kernel."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 3 and x.shape[1] >= 1 and model.w.device.type == "cpu"
            and model.w.dtype == x.dtype and model.act.name in loader.ACT_CODES
            and KERNEL.library(x.shape[-1], model.act.name) is not None)


# --- the measured choice between this kernel and the torch path ---------------------------------
BACKENDS = ("c", "torch")
#: the timed problem: units × windows × steps of one block (the torch path's time dominates)
PROBE = dict(units=512, n=64, L=32)
PROBE_RUNS = 5


@dataclass(frozen=True)
class Choice:
    """Which per-unit features run for (d, activation, dtype) and why. ``backend``: "c" or
    "torch"; ``reason``: measured / cached measurement / pinned / unavailable (with the reason);
    ``c_ms``, ``torch_ms``: the timings of the probe block (None when not measured); ``isa``:
    the CPU's vector ISA the timing was made on."""

    backend: str
    reason: str
    c_ms: float | None = None
    torch_ms: float | None = None
    isa: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_CHOICES: dict[tuple[int, str, str], Choice] = {}
_PINNED: dict[tuple[int, str, str], str] = {}


def cpu_isa() -> str:
    """'AVX-512', 'AVX2', 'SSE' or the machine name: the widest vector ISA of /proc/cpuinfo;
    with ``$NTK_RNN_MARCH`` set, the ISA the kernels are built for (e.g. 'AVX2 build
    (x86-64-v3) on AVX-512')."""
    m = os.environ.get("NTK_RNN_MARCH", "").strip()
    if m and m != "native":
        return f"{loader.MARCH_NAMES.get(m, m)} build ({m}) on {_cpu_isa()}"
    return _cpu_isa()


def _cpu_isa() -> str:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse2", "SSE")):
        if flag in flags:
            return name
    return os.uname().machine if hasattr(os, "uname") else "unknown"


def _key(d: int, act: str, dtype: torch.dtype) -> tuple[int, str, str]:
    return int(d), act, str(dtype).replace("torch.", "")


def pin(backend: str | None, d: int | None = None, act: str | None = None,
        dtype: torch.dtype | None = None) -> None:
    """Fix the backend ("c" or "torch"; None: measure again) for (d, act, dtype), or for every key
    when they are None — e.g. from a run's recorded choice on resume. "c" where the kernel is
    unavailable falls back to torch (with the reason in :func:`choice`)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"features backend {backend!r}: choose one of {list(BACKENDS)}")
    with _LOCK:
        if d is None:
            _PINNED.clear()
            if backend is not None:
                _PINNED[("*", "*", "*")] = backend  # type: ignore[index]
            _CHOICES.clear()
            return
        k = _key(d, act or "tanh", dtype or torch.float32)
        if backend is None:
            _PINNED.pop(k, None)
        else:
            _PINNED[k] = backend
        _CHOICES.pop(k, None)


def _forced(k: tuple[int, str, str]) -> tuple[str, str] | None:
    env = os.environ.get("NTK_RNN_FEATURES", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"NTK_RNN_FEATURES={env!r}: choose one of {list(BACKENDS)} or auto")
        return env, f"forced by NTK_RNN_FEATURES={env}"
    b = _PINNED.get(k) or _PINNED.get(("*", "*", "*"))  # type: ignore[arg-type]
    return (b, "pinned (a recorded choice)") if b else None


def _cache_file(lib: ctypes.CDLL, k: tuple[int, str, str]) -> Path | None:
    name = getattr(lib, "_name", "")
    if not name:
        return None
    so = Path(name)
    return so.with_name(f"{so.stem}.choice_{k[2]}.json")


def _read_cached(path: Path | None) -> Choice | None:
    if path is None or not path.is_file():
        return None
    try:
        loader.check_private(path, "cached features choice")
        data = json.loads(path.read_text())
        if data.get("torch") != torch.__version__ or data.get("backend") not in BACKENDS:
            return None
        return Choice(data["backend"], f"cached measurement ({path.name}): {data['reason']}",
                      data.get("c_ms"), data.get("torch_ms"), data.get("isa", ""))
    except (OSError, ValueError, KeyError, loader.KernelUnavailable):
        return None


def _write_cached(path: Path | None, c: Choice) -> None:
    if path is None:
        return
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                         suffix=".tmp") as fh:
            json.dump({**c.as_dict(), "torch": torch.__version__}, fh)
        os.chmod(fh.name, 0o600)
        os.replace(fh.name, path)
    except OSError:
        pass  # (no cache: measured again next process)


#: ``TORCH_FEATURES(model, x, units) -> run()``: the torch path of the same unit features, the
#: competitor of the compiled kernel; registered by ``ntk.structured`` (which imports this
#: module, so this one does not import it back).
TORCH_FEATURES: Callable[[Any, Tensor, slice], Callable[[], Any]] | None = None


def measure(d: int, act: str, dtype: torch.dtype, lib: ctypes.CDLL | None = None
            ) -> tuple[float, float]:
    """(C ms, torch ms) of the features of one probe block (``PROBE``) on one thread: each the
    min of ``PROBE_RUNS`` interleaved runs after a warm-up."""
    if TORCH_FEATURES is None:
        raise RuntimeError("the torch path of the unit features is not registered "
                           "(ntk_rnn.ntk.structured registers it when imported)")
    lib = lib or KERNEL.library(d, act)
    p = PROBE
    model = MeanFieldRNN(d, p["units"], activation=act, init={"b": "uniform", "rho": 0.8},
                         seed=0, dtype=dtype)
    x = torch.randn(p["n"], p["L"], d, generator=torch.Generator().manual_seed(0),
                    dtype=dtype)
    units = slice(0, p["units"])
    phi = x.new_empty(p["n"], d + 2, p["units"])
    run_torch_once = TORCH_FEATURES(model, x, units)

    def run_c() -> None:
        block_features(model, x, units, False, phi, None, lib)  # (torch on 1 thread here)

    def run_torch() -> None:
        run_torch_once()

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {run_c: float("inf"), run_torch: float("inf")}
    try:
        with torch.inference_mode(), without_subnormals():  # as they run (run_flushed)
            for fn in best:
                fn()
            for _ in range(PROBE_RUNS):
                for fn in best:
                    t = time.perf_counter()
                    fn()
                    best[fn] = min(best[fn], time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return best[run_c] * 1e3, best[run_torch] * 1e3


def choice(d: int, act: str, dtype: torch.dtype) -> Choice:
    """Which features run for (d, act, dtype) (see the module docstring): forced or pinned, else
    the torch path where the kernel is unavailable, else the cached or a fresh measurement."""
    k = _key(d, act, dtype)
    with _LOCK:
        forced = _forced(k)  # (read at every call: the environment or a pin may change)
        got = _CHOICES.get(k)
        if got is not None and forced is None:
            return got
        isa = cpu_isa()
        lib = KERNEL.library(d, act)
        if lib is None:
            c = Choice("torch", f"compiled features unavailable: {KERNEL.reason(d, act)}",
                       isa=isa)
        elif forced is not None:
            return Choice(forced[0], forced[1], isa=isa)
        else:
            path = _cache_file(lib, k)
            c = _read_cached(path)
            if c is None:
                c_ms, t_ms = measure(d, act, dtype, lib)
                backend = "c" if c_ms <= t_ms else "torch"
                c = Choice(backend, f"measured at first use: C {c_ms:.2f} ms vs torch "
                           f"{t_ms:.2f} ms on a {PROBE['units']}-unit, {PROBE['n']}-window, "
                           f"L={PROBE['L']} block, 1 thread ({isa})", c_ms, t_ms, isa)
                _write_cached(path, c)
        _CHOICES[k] = c
        return c


def preferred(model: Any, x: Tensor) -> bool:
    """True when the compiled features should run for ``model`` on windows x: :func:`usable`
    and chosen by :func:`choice`."""
    return usable(model, x) and choice(x.shape[-1], model.act.name, x.dtype).backend == "c"


def record(model: Any) -> dict[str, Any]:
    """The features choice for ``model`` (its d, activation and dtype) as a plain dict, for a
    run's metrics and checkpoint (restore it with ``pin(rec["backend"], ...)``)."""
    dtype = next(model.parameters()).dtype
    c = choice(model.input_dim, model.act.name, dtype)
    return {"d": int(model.input_dim), "activation": model.act.name,
            "dtype": str(dtype).replace("torch.", ""), **c.as_dict()}


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


@contextlib.contextmanager
def torch_threads(k: int) -> Iterator[None]:
    """torch (and its BLAS) on ``k`` threads inside the block, the old setting restored after
    (around :func:`run_parallel`, whose tasks each run single-threaded)."""
    old = torch.get_num_threads()
    if old == k:
        yield
        return
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_flushed(tasks: list[Callable[[], Any]], parts: int,
                device: torch.device | str = "cpu") -> list[Any]:
    """The results of ``tasks`` with subnormals flushed to zero (:mod:`ntk_rnn.subnormals`),
    in inference mode: on this thread when ``parts`` is 1 (torch's own threading inside), else
    on ``parts`` threads (this one and the pool), each running its share of the tasks with torch
    single-threaded. The flush is per thread and torch's intra-op workers cannot be reached from
    Python, so the work goes to threads that can set it: at 2 threads the mean-field Elman
    kernel took 2.3 s with the flush on the calling thread only and 0.15 s on 1 thread
    (N = 1024, 64 windows of 24). Nothing is flushed off the CPU (``device``)."""
    def worker(group: list[Callable[[], Any]]) -> list[Any]:
        torch.set_num_threads(1)  # this thread's OpenMP setting (a pool thread keeps its own)
        with torch.inference_mode(), without_subnormals(device):
            return [t() for t in group]

    parts = min(parts, len(tasks))
    if parts <= 1:
        with torch.inference_mode(), without_subnormals(device):
            return [t() for t in tasks]
    groups = [tasks[i::parts] for i in range(parts)]
    with torch_threads(1):
        done = run_parallel([functools.partial(worker, g) for g in groups])
    out: list[Any] = [None] * len(tasks)
    for i, res in enumerate(done):
        out[i::parts] = res
    return out


def block_features(model: Any, x: Tensor, units: slice, truncated: bool, phi: Tensor,
                   coef: Tensor | None, lib: ctypes.CDLL | None = None) -> None:
    """φ of ``units`` for windows x (n, L, d) into phi (n, d+2, Nb) (rows [S, cQ, cP], c applied),
    or with ``coef`` (n, L, Nb) the c-scaled coefficients there instead of the cP rows. phi and
    coef must be contiguous; call only when :func:`usable`. The windows are split over
    ``torch.get_num_threads()`` threads."""
    n, L, d = x.shape
    lib = lib or KERNEL.library(d, model.act.name)
    x = x.contiguous()
    wT = model.w.detach()[units].T.contiguous()
    b, c = model.b.detach()[units].contiguous(), model.c.detach()[units].contiguous()
    Nb = phi.shape[-1]
    fn = lib.features_f32 if x.dtype == torch.float32 else lib.features_f64
    args = (L, Nb, int(truncated), x.data_ptr(), wT.data_ptr(), Nb, b.data_ptr(), c.data_ptr(),
            phi.data_ptr(), 0 if coef is None else coef.data_ptr())
    parts = loader.team_size(torch.get_num_threads(), min(n, (n * L * Nb) // 2**16))
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


def _self_check(lib: ctypes.CDLL, d: int, act: str) -> None:
    """Compare the fresh kernel with :func:`_reference` on a small problem (float64 and float32,
    truncated or not, with and without coefficients, a partial SIMD chunk); raises on a
    mismatch (the kernel is then not used)."""
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


_L, _P = ctypes.c_long, ctypes.c_void_p
#: the compiled features: ``KERNEL.library(d, act)``, ``KERNEL.status(d, act)``
KERNEL = loader.Kernel("features", "the compiled NTK features kernel",
                       {"features": ([_L, _L, _L, _L, ctypes.c_int, _P, _P, _L, _P, _P, _P, _P],
                                     ctypes.c_int)}, _self_check)
