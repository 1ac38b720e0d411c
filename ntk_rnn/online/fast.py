"""Fast online training: many exact SGD steps (theory §3, §6) per call, as ``rtrl_step`` does them.

``rtrl_step`` spends ~15 small tensor operations per sequence element; at moderate N nearly all
of its time is dispatch overhead, not arithmetic. A `FastStepper` runs a whole chunk of the
sequence per call and keeps the parameters and the RTRL state where they live (the model's own
tensors and its ``OnlineState`` / ``FeedbackState``), so callbacks always see the current values.
Every backend is *exact*: step k uses the parameters after step k-1, as the reference does;
nothing is batched across steps (w changes every step, so e.g. w·X_k cannot be precomputed).

Backends (``backend=``):

``"kernel"``  (CPU, float32/float64; the default where a C compiler is present)
    ``ntk_rnn/csrc/fast.c``, compiled on first use by `ntk_rnn.csrc.loader` (``cc -O3
    -march=native``, cached per user and per input dimension and activation), runs the whole
    chunk: per step ONE pass over the units, the update of step k fused with the forward/RTRL
    recursion of step k+1 (they only share the scalar Ŷ_k), σ vectorised through glibc's libmvec
    where available. A self-check against the eager backend runs once per process and kernel;
    any failure falls back to ``"eager"`` with one warning saying why (``KERNEL.status``;
    ``NTK_RNN_NO_KERNEL=1`` disables it, ``NTK_RNN_KERNEL_CACHE`` moves the cache,
    ``NTK_RNN_FAST_BACKEND`` overrides ``backend="auto"``).
``"eager"``  (any device)
    Preallocated buffers and ``out=`` / in-place torch ops, ~16 ops per step whatever E and N.
``"graphs"``  (CUDA; the default on CUDA)
    The eager steps captured as CUDA graphs of 64, 32, …, 1 steps that read X, Y from static
    buffers: a chunk of T steps costs ~popcount-many graph replays instead of ~16 T launches. On
    CPU the same block machinery runs uncaptured (so the tests exercise it without a GPU).

All backends work on an ensemble axis E (parameters (E, N), (E, N, d), (E, N)); a single model is
E = 1 through views of its own tensors (see `ntk_rnn.online.ensemble` for E > 1).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..csrc import loader
from ..errors import ConfigError
from ..models.family import family_of
from ..models.mean_field import MeanFieldRNN
from ..models.recurrence import (
    DIAGONAL,
    FEEDBACK,
    ONLINE_GRADIENTS,
    RECURRENCES,
    FeedbackState,
    OnlineState,
    Recurrence,
    online_gradient,
)

BACKENDS = ("auto", "kernel", "eager", "graphs")


# --- the compiled kernel (ntk_rnn/csrc/fast.c, built by ntk_rnn.csrc.loader) ----------------------
@dataclass(frozen=True)
class KernelLayout:
    """The arguments of one recurrence's functions in ``csrc/fast.c``:
    ``<prefix>_{rtrl,trunc}_{f32,f64}(E, N, T, c, w, b, *state, *scratch, X, xs, Y, ys, out, os,
    lr, scale)`` — ``state`` the online state's tensors in that order, ``scratch`` the per-unit
    rows the kernel needs besides."""

    prefix: str
    state: tuple[str, ...]
    scratch: tuple[str, ...]


#: the recurrence's key (``family_of(model).recurrence.name``) → its layout in csrc/fast.c
LAYOUTS: dict[str, KernelLayout] = {
    # scratch: σ'(z) of the last step (fast.c carries P = σ'·U, Q = σ'·V)
    DIAGONAL.name: KernelLayout("diag", ("S", "P", "Q"), ("Dl",)),
    FEEDBACK.name: KernelLayout("fb", ("dc", "dw", "db", "m"), ("H", "dH")),  # σ(z), σ'(z)
}


def _signatures() -> dict[str, tuple[list[Any], Any]]:
    L, P = ctypes.c_long, ctypes.c_void_p
    tail = [P, L, P, L, P, L, P, P]  # X, xs, Y, ys, out, os, lr, scale
    return {f"{lay.prefix}_{g}": ([L, L, L] + [P] * (3 + len(lay.state) + len(lay.scratch))
                                  + tail, None)  # E N T, c w b, the state, the scratch rows
            for lay in LAYOUTS.values() for g in ("rtrl", "trunc")}


def _self_check(lib: ctypes.CDLL, d: int, act: str) -> None:
    """Run the fresh kernel on a small problem and compare with the eager backend (float64 and
    float32, both models and gradients); raises on a mismatch (the kernel is then not used)."""
    gen = torch.Generator().manual_seed(1234)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for rec in RECURRENCES:
            for grad in ONLINE_GRADIENTS:
                init = {"b": "uniform", "rho": 0.5}
                m1 = MeanFieldRNN(d, 37, beta=0.7, activation=act, recurrence=rec, init=init,
                                  seed=5, dtype=dtype)
                m2 = MeanFieldRNN(d, 37, beta=0.7, activation=act, recurrence=rec, init=init,
                                  seed=5, dtype=dtype)
                X = torch.randn(2, 9, d, generator=gen, dtype=torch.float64).to(dtype)
                Y = torch.randn(2, 9, generator=gen, dtype=torch.float64).to(dtype)
                lr = m1.learning_rate(2.0)
                o1 = FastStepper(m1, lr, grad, backend="kernel", _unchecked=True).run_chunk(
                    X[0], Y[0])
                FastStepper(m1, lr, grad, backend="kernel", _unchecked=True).run_chunk(
                    X[1, :4], Y[1, :4])
                o2 = FastStepper(m2, lr, grad, backend="eager").run_chunk(X[0], Y[0])
                FastStepper(m2, lr, grad, backend="eager").run_chunk(X[1, :4], Y[1, :4])
                for a, b in ((o1, o2), (m1.w, m2.w), (m1.c, m2.c), (m1.b, m2.b)):
                    a, b = a.detach().double(), b.detach().double()
                    if not torch.isfinite(a).all() or float((a - b).abs().max()) > tol * (
                            1 + float(b.abs().max())):
                        raise loader.KernelUnavailable(
                            f"self-check failed ({rec}, {grad}, {dtype}): the kernel disagrees "
                            "with the eager steps")


#: the compiled training kernel: ``KERNEL.library(d, act)``, ``KERNEL.status(d, act)``
KERNEL = loader.Kernel("fast", "the compiled training kernel", _signatures(), _self_check)


# --- the stacked tensors an engine acts on ------------------------------------------------------
class Buffers:
    """Parameters and online state with a leading ensemble axis E, plus per-member lr and scale.

    c (E,N), w (E,N,d), b (E,N) and the recurrence's state (``rec.state_names``):
    diagonal: S (E,N), P (E,N,d), Q (E,N); feedback: m (E,), dc (E,N), dw (E,N,d), db (E,N)
    """

    def __init__(self, rec: Recurrence, act: Any, tensors: dict[str, Tensor],
                 lr: Sequence[float], scale: Sequence[float]) -> None:
        self.rec = rec
        self.act = act
        self.t = tensors
        c = tensors["c"]
        self.E, self.N = c.shape
        self.d = tensors["w"].shape[-1]
        self.dtype, self.device = c.dtype, c.device
        self.lr_host = torch.tensor([float(v) for v in lr], dtype=torch.float64)
        self.scale_host = torch.tensor([float(v) for v in scale], dtype=torch.float64)
        self.lr = self.lr_host.to(self.device, self.dtype)
        self.scale = self.scale_host.to(self.device, self.dtype)
        self.eta = (self.lr_host * self.scale_host).to(self.device, self.dtype)  # α_N N^{-β}

    @property
    def names(self) -> tuple[str, ...]:
        return ("c", "w", "b") + self.rec.state_names

    def mutable(self) -> list[Tensor]:
        return [self.t[k] for k in self.names]

    def ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.mutable())

    def bump_versions(self) -> None:
        """In-place writes through raw pointers bypass autograd's version counters: bump them."""
        bump = getattr(torch.autograd.graph, "increment_version", None)
        if bump is not None:
            for t in self.mutable():
                bump(t)


def output_buffer(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """Where a stepper writes its predictions Ŷ: ``out`` checked (shape, dtype, device), or a new
    tensor when None (every stepper's ``run_chunk(X, Y, out=None)``)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ConfigError(f"out has shape {tuple(out.shape)}, {out.dtype} on {out.device}; "
                          f"expected {shape}, {dtype} on {device}")
    return out


def check_engine_chunk(buf: Buffers, X: Tensor, Y: Any, out: Tensor | None, single: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate and view a chunk as X (E,T,d), Y (E,T), out (E,T) (shared streams are expanded
    views). Returns (X3, Y2, out2, result) where result is what run_chunk returns."""
    E, d = buf.E, buf.d
    if not isinstance(X, Tensor):
        X = torch.as_tensor(X)
    if X.dim() == 2 and X.shape[1] == d:
        T = X.shape[0]
        X3 = X.unsqueeze(0).expand(E, T, d)
    elif X.dim() == 3 and not single and X.shape[0] == E and X.shape[2] == d:
        T = X.shape[1]
        X3 = X
    else:
        want = f"(T, {d})" if single else f"(T, {d}) (one shared stream) or ({E}, T, {d})"
        raise ConfigError(f"X has shape {tuple(X.shape)}; expected {want}")
    if not isinstance(Y, Tensor):
        Y = torch.as_tensor(Y)
    if Y.dim() == 1 and Y.shape[0] == T:
        Y2 = Y.unsqueeze(0).expand(E, T)
    elif Y.dim() == 2 and not single and tuple(Y.shape) == (E, T):
        Y2 = Y
    else:
        want = f"({T},)" if single else f"({T},) (shared) or ({E}, {T})"
        raise ConfigError(f"Y has shape {tuple(Y.shape)}; expected {want}")
    for name, v in (("X", X3), ("Y", Y2)):
        if v.device != buf.device:
            raise ConfigError(f"{name} is on {v.device} but the model is on {buf.device}")
    X3 = X3.to(buf.dtype)
    Y2 = Y2.to(buf.dtype)
    out = output_buffer(out, (T,) if single else (E, T), buf.dtype, buf.device)
    out2 = out.unsqueeze(0) if single else out
    return X3, Y2, out2, out


# --- backends -------------------------------------------------------------------------------
class _KernelEngine:
    """The compiled loop (CPU). ``threads`` > 1 splits the ensemble members over Python threads
    (the call releases the GIL)."""

    name = "kernel"

    def __init__(self, buf: Buffers, gradient: str, lib: ctypes.CDLL, threads: int = 1) -> None:
        self.buf, self.gradient, self.threads = buf, gradient, max(1, int(threads))
        sfx = "f64" if buf.dtype == torch.float64 else "f32"
        g = "rtrl" if gradient == "rtrl" else "trunc"
        layout = LAYOUTS[buf.rec.name]
        self.fn = getattr(lib, f"{layout.prefix}_{g}_{sfx}")
        self.item = buf.t["c"].element_size()
        # the kernel's arguments after (E, N, T): c, w, b, the state, per-unit scratch rows
        scratch = [torch.empty(buf.E, buf.N, dtype=buf.dtype) for _ in layout.scratch]
        self.args = [buf.t[k] for k in ("c", "w", "b") + layout.state] + scratch

    def run(self, X3: Tensor, Y2: Tensor, out2: Tensor) -> None:
        buf = self.buf
        E, T, d = X3.shape
        if T == 0:
            return
        if X3.stride(2) != 1 or (T > 1 and X3.stride(1) != d):
            X3 = X3.contiguous()
        if Y2.stride(1) != 1 and T > 1:
            Y2 = Y2.contiguous()
        target = out2
        if out2.stride(1) != 1 and T > 1:
            target = torch.empty(out2.shape, dtype=out2.dtype)
        for t in buf.mutable():
            if not t.is_contiguous():
                raise ConfigError("the kernel backend needs contiguous parameters and state "
                                  "(use backend='eager')")
        per = -(-E // self.threads)  # members per thread
        groups = [(e, min(E, e + per)) for e in range(0, E, per)]
        if len(groups) == 1:
            self._call(0, E, X3, Y2, target)
        else:
            threads = [threading.Thread(target=self._call, args=(e0, e1, X3, Y2, target))
                       for e0, e1 in groups]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        if target is not out2:
            out2.copy_(target)
        buf.bump_versions()

    def _call(self, e0: int, e1: int, X3: Tensor, Y2: Tensor, out2: Tensor) -> None:
        buf, it, N = self.buf, self.item, self.buf.N
        T = X3.shape[1]

        def p(x: Tensor, per: int) -> int:  # pointer to member e0 of a (E, ...) tensor
            return x.data_ptr() + e0 * per * it

        xs, ys, os_ = X3.stride(0), Y2.stride(0), out2.stride(0)
        tail = [p(X3, xs), xs, p(Y2, ys), ys, p(out2, os_), os_,
                buf.lr_host.data_ptr() + 8 * e0, buf.scale_host.data_ptr() + 8 * e0]
        self.fn(e1 - e0, N, T, *(p(a, a[0].numel()) for a in self.args), *tail)


class _EagerEngine:
    """Fused torch ops on preallocated buffers, ~15 per step for the whole ensemble (views of the
    buffers are made once; per step only the data views change)."""

    name = "eager"

    def __init__(self, buf: Buffers, gradient: str) -> None:
        self.buf, self.rtrl = buf, gradient == "rtrl"
        E, N = buf.E, buf.N
        new = lambda *s: torch.empty(*s, dtype=buf.dtype, device=buf.device)
        self.z, self.ds, self.gc = new(E, N), new(E, N), new(E, N)
        self.yh, self.err = new(E, 1, 1), new(E)
                # one lr and one scale for all members (the usual case): Python scalars save an op
        uniform = bool((buf.lr_host == buf.lr_host[0]).all() and
                       (buf.scale_host == buf.scale_host[0]).all())
        self.uniform = uniform
        self.scale_f = float(buf.scale_host[0])
        self.eta_f = float(buf.lr_host[0] * buf.scale_host[0])
        self.lr_f = float(buf.lr_host[0])
        builders = {DIAGONAL: self._diag_step, FEEDBACK: self._feedback_step}
        self.step = builders[buf.rec]()

    def run(self, X3: Tensor, Y2: Tensor, out2: Tensor) -> None:
        step = self.step
        for xc, xr, y, o in zip(X3.unsqueeze(-1).unbind(1), X3.unsqueeze(2).unbind(1),
                                Y2.unbind(1), out2.unbind(1), strict=True):
            step(xc, xr, y, o)

    def _diag_step(self) -> Any:
        """x_col (E,d,1), x_row (E,1,d), y (E,), o (E,) -> one step of theory §3: Model D's
        fast path, the recursion of the reference ``models.recurrence.spq_step`` (z = w·x + b S,
        S ← σ(z), P ← σ'(z)(x + b P), Q ← σ'(z)(S + b Q)) fused with the SGD update, in place
        over the ensemble axis."""
        buf, act, rtrl = self.buf, self.buf.act.into(self.z), self.rtrl
        c, w, b, S, P, Q = (buf.t[k] for k in ("c", "w", "b", "S", "P", "Q"))
        z, ds, gc, err, yh = self.z, self.ds, self.gc, self.err, self.yh
        z3, b3, ds3, gc3, err2 = (z.unsqueeze(-1), b.unsqueeze(-1), ds.unsqueeze(-1),
                                  gc.unsqueeze(-1), err.unsqueeze(-1))
        c_row, S_col, yh1 = c.unsqueeze(1), S.unsqueeze(-1), yh.view(-1)
        uniform, scale_f, eta_f, scale_t, eta_t = (self.uniform, self.scale_f, self.eta_f,
                                                    buf.scale, buf.eta)

        def step(x_col: Tensor, x_row: Tensor, y: Tensor, o: Tensor) -> None:
            torch.bmm(w, x_col, out=z3)  # w_i · X_k
            z.addcmul_(b, S)
            if rtrl:  # Q ← S + b Q with the old S (× σ'(z) below)
                torch.addcmul(S, Q, b, out=Q)
            else:
                Q.copy_(S)
            act(z, S, ds)  # S ← σ(z), ds ← σ'(z)
            Q.mul_(ds)
            if rtrl:  # P ← σ'(z)(X_k + b P)
                torch.addcmul(x_row, P, b3, out=P).mul_(ds3)
            else:
                torch.mul(ds3, x_row, out=P)
            torch.bmm(c_row, S_col, out=yh)  # Σ c_i S_i
            if uniform:
                torch.mul(yh1, scale_f, out=o)  # Ŷ_k
                torch.sub(y, o, out=err)  # Y − Ŷ
                torch.mul(c, err2, out=gc)  # c from before the step
                w.addcmul_(P, gc3, value=eta_f)
                b.addcmul_(Q, gc, value=eta_f)
                c.addcmul_(S, err2, value=eta_f)
            else:
                torch.mul(yh1, scale_t, out=o)
                torch.sub(y, o, out=err).mul_(eta_t)  # α_N N^{-β} (Y − Ŷ)
                torch.mul(c, err2, out=gc)
                w.addcmul_(P, gc3)
                b.addcmul_(Q, gc)
                c.addcmul_(S, err2)
        return step

    def _feedback_step(self) -> Any:
        """x_col (E,d,1), x_row (E,1,d), y (E,), o (E,) -> one step of theory §6."""
        buf, act, rtrl = self.buf, self.buf.act.into(self.z), self.rtrl
        c, w, b, m, dc, dw, db = (buf.t[k] for k in ("c", "w", "b", "m", "dc", "dw", "db"))
        new = lambda *s: torch.empty(*s, dtype=buf.dtype, device=buf.device)
        H, cd, g = new(buf.E, buf.N), new(buf.E, buf.N), new(buf.E, 1, 1)
        z, dH, err, yh = self.z, self.ds, self.err, self.yh
        z3, m2, sc2 = z.unsqueeze(-1), m.unsqueeze(-1), buf.scale.unsqueeze(-1)
        c_row, H_col, yh1, cd_row, b_col = (c.unsqueeze(1), H.unsqueeze(-1), yh.view(-1),
                                            cd.unsqueeze(1), b.unsqueeze(-1))
        cd3, g2, err2 = cd.unsqueeze(-1), g.view(-1, 1), err.unsqueeze(-1)
        g3, err3, lr_t = g2.unsqueeze(-1), err2.unsqueeze(-1), buf.lr

        def step(x_col: Tensor, x_row: Tensor, y: Tensor, o: Tensor) -> None:
            torch.bmm(w, x_col, out=z3)
            z.addcmul_(b, m2)  # z = w·X_k + b m_k
            act(z, H, dH)
            torch.bmm(c_row, H_col, out=yh)
            torch.mul(yh1, buf.scale, out=o)  # Ŷ_k
            torch.mul(c, dH, out=cd).mul_(sc2)  # N^{-β} c_i σ'(z_i)
            if rtrl:  # G = D + g ∂m/∂θ, g = Σ cd_i b_i
                torch.bmm(cd_row, b_col, out=g)
                dc.mul_(g2).addcmul_(H, sc2)
                dw.mul_(g3).addcmul_(cd3, x_row)
                db.mul_(g2).addcmul_(cd, m2)
            else:
                torch.mul(H, sc2, out=dc)
                torch.mul(cd3, x_row, out=dw)
                torch.mul(cd, m2, out=db)
            m.copy_(o)
            torch.sub(y, o, out=err).mul_(lr_t)  # α_N (Y − Ŷ)
            c.addcmul_(dc, err2)
            w.addcmul_(dw, err3)
            b.addcmul_(db, err2)
        return step


class _BlockEngine:
    """Eager steps in blocks of 2^j steps reading static input buffers; on CUDA each block size
    is captured once as a CUDA graph (re-captured if a tensor moves). On CPU the blocks run
    uncaptured: the same buffer logic, for tests."""

    name = "graphs"

    def __init__(self, buf: Buffers, gradient: str, max_block: int = 64,
                 capture: bool | None = None) -> None:
        self.buf, self.eager = buf, _EagerEngine(buf, gradient)
        self.capture = buf.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and buf.device.type != "cuda":
            raise ConfigError("CUDA graphs need the model on a CUDA device")
        self.sizes = [1 << j for j in range(max(1, int(max_block)).bit_length() - 1, -1, -1)]
        K = self.sizes[0]
        new = lambda *s: torch.zeros(*s, dtype=buf.dtype, device=buf.device)
        self.Xb, self.Yb, self.Ob = new(buf.E, K, buf.d), new(buf.E, K), new(buf.E, K)
        self.graphs: dict[int, Any] = {}
        self._ptrs: tuple | None = None

    def _steps(self, n: int) -> None:
        self.eager.run(self.Xb[:, :n], self.Yb[:, :n], self.Ob[:, :n])

    def _capture_all(self) -> None:
        buf = self.buf
        snapshot = [t.clone() for t in buf.mutable()]
        side = torch.cuda.Stream(device=buf.device)
        side.wait_stream(torch.cuda.current_stream(buf.device))
        with torch.cuda.stream(side):  # warm-up (cuBLAS handles, kernels) outside capture
            for _ in range(3):
                self._steps(1)
        torch.cuda.current_stream(buf.device).wait_stream(side)
        for t, v in zip(buf.mutable(), snapshot, strict=True):  # undo the warm-up steps
            t.copy_(v)
        self.graphs = {}
        for n in self.sizes:  # capture records kernels without running them: the state is intact
            g = torch.cuda.CUDAGraph()  # (own memory pool: graphs replay in any order)
            with torch.cuda.graph(g):
                self._steps(n)
            self.graphs[n] = g
        self._ptrs = buf.ptrs()

    def run(self, X3: Tensor, Y2: Tensor, out2: Tensor) -> None:
        if self.capture and (not self.graphs or self._ptrs != self.buf.ptrs()):
            self._capture_all()
        T, j = X3.shape[1], 0
        while j < T:
            n = next(s for s in self.sizes if s <= T - j)
            self.Xb[:, :n].copy_(X3[:, j: j + n])
            self.Yb[:, :n].copy_(Y2[:, j: j + n])
            if self.capture:
                self.graphs[n].replay()
            else:
                self._steps(n)
            out2[:, j: j + n].copy_(self.Ob[:, :n])
            j += n


def _resolve_backend(backend: str, buf: Buffers) -> tuple[str, str]:
    """(backend name, why that one)."""
    env = os.environ.get("NTK_RNN_FAST_BACKEND")
    if backend == "auto" and env:
        backend, why = env, f"NTK_RNN_FAST_BACKEND={env}"
    else:
        why = f"backend={backend!r}"
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not known; choose one of {list(BACKENDS)}")
    if backend != "auto":
        return backend, f"requested ({why})"
    if buf.device.type == "cuda":
        return "graphs", "auto: CUDA"
    if buf.device.type != "cpu" or buf.dtype not in (torch.float32, torch.float64):
        return "eager", "auto: the compiled kernel needs float32/float64 on the CPU"
    if not all(t.is_contiguous() for t in buf.mutable()):
        return "eager", "auto: the compiled kernel needs contiguous parameters and state"
    status = KERNEL.status(buf.d, buf.act.name)
    if KERNEL.library(buf.d, buf.act.name) is None:
        return "eager", f"auto: the compiled kernel is {status}"
    return "kernel", f"auto: {status}"


def make_engine(buf: Buffers, gradient: str, backend: str = "auto", threads: int = 1,
                max_block: int = 64, _unchecked: bool = False) -> Any:
    """The engine for ``backend`` ('auto' picks: graphs on CUDA, the compiled kernel on the CPU
    where it builds and passes its self-check, else eager). ``engine.name`` is the backend and
    ``engine.reason`` says why it was chosen (for logs and metrics.json)."""
    gradient = online_gradient(gradient)
    if gradient not in ONLINE_GRADIENTS:
        raise ConfigError(f"gradient={gradient!r} is not known; choose one of "
                          f"{list(ONLINE_GRADIENTS)}")
    name, reason = _resolve_backend(backend, buf)
    if name == "kernel":
        if buf.device.type != "cpu" or buf.dtype not in (torch.float32, torch.float64):
            raise ConfigError("backend='kernel' needs float32/float64 tensors on the CPU")
        lib = (KERNEL.build(buf.d, buf.act.name) if _unchecked
               else KERNEL.library(buf.d, buf.act.name))
        if lib is None:
            raise ConfigError(f"backend='kernel' is not available: "
                              f"{KERNEL.reason(buf.d, buf.act.name)}")
        engine: Any = _KernelEngine(buf, gradient, lib, threads)
    elif name == "graphs":
        engine = _BlockEngine(buf, gradient, max_block)
    else:
        engine = _EagerEngine(buf, gradient)
    engine.reason = reason
    return engine


class EngineBackend:
    """What a stepper tells about the engine it runs (``self.engine``)."""

    engine: Any

    @property
    def backend(self) -> str:
        """The backend in use: 'kernel', 'eager' or 'graphs'."""
        return self.engine.name

    @property
    def backend_reason(self) -> str:
        """Why `backend` runs, e.g. 'auto: ok (<kernel path>)' or 'auto: the compiled
        kernel is unavailable: no C compiler ...' (for logs and metrics.json)."""
        return self.engine.reason


# --- one model ------------------------------------------------------------------------------
def _model_buffers(model: MeanFieldRNN, state: Any, lr: float) -> Buffers:
    """E = 1 views of the model's own parameters and state (writes go straight to them)."""
    t = {k: getattr(model, k).detach().unsqueeze(0) for k in ("c", "w", "b")}
    t.update({k: v.unsqueeze(0) for k, v in state.state_dict().items()})
    return Buffers(family_of(model).recurrence, model.act, t, [lr], [model.output_scale])


class FastStepper(EngineBackend):
    """Exact online SGD on one model, a chunk per call; same semantics as ``rtrl_step``.

        stepper = FastStepper(model, lr=model.learning_rate(alpha), gradient="rtrl")
        y_hat = stepper.run_chunk(X, Y)               # X (T, d), Y (T,) -> Ŷ (T,)
        stepper.run_chunk(X[j0:j1], Y[j0:j1], out=y_hat[j0:j1])   # stop at any step

    ``model`` and ``state`` (an ``OnlineState`` / ``FeedbackState``, default: zeros) are updated
    in place after every call, exactly as ``rtrl_step`` would have left them; so checkpoints,
    callbacks and ``state.load_state_dict`` (resume) work on them as before.
    """

    def __init__(self, model: MeanFieldRNN, lr: float, gradient: str = "rtrl",
                 state: OnlineState | FeedbackState | None = None, *, backend: str = "auto",
                 max_block: int = 64, _unchecked: bool = False) -> None:
        rec = family_of(model).recurrence
        if rec is None:
            raise ConfigError(f"FastStepper needs a MeanFieldRNN, not {type(model).__name__}")
        self.model, self.lr, self.gradient = model, float(lr), online_gradient(gradient)
        self.state = rec.zeros(model) if state is None else state
        rec.check_state(self.state)
        self._opts = dict(backend=backend, max_block=max_block, _unchecked=_unchecked)
        self.engine: Any = None
        self._engine_key: tuple | None = None
        self._engine_for(self._key())

    def _key(self) -> tuple:
        m, st = self.model, self.state
        tensors = (m.c, m.w, m.b) + tuple(st.state_dict().values())
        return tuple(t.data_ptr() for t in tensors) + (m.c.dtype, m.c.device, tuple(m.w.shape))

    def _engine_for(self, key: tuple) -> Any:
        """The engine, rebuilt if a parameter or state tensor was replaced (not just written):
        its buffers are views of the model's and the state's tensors."""
        if key != self._engine_key:
            buf = _model_buffers(self.model, self.state, self.lr)
            self.engine = make_engine(buf, self.gradient, **self._opts)
            self._engine_key = key
        return self.engine

    def run_chunk(self, X: Tensor, Y: Tensor, out: Tensor | None = None) -> Tensor:
        """Steps k = 0..T-1 on (X[k], Y[k]); returns Ŷ (T,) (written into ``out`` if given), each
        made with the parameters before its step."""
        engine = self._engine_for(self._key())
        X3, Y2, out2, res = check_engine_chunk(engine.buf, X, Y, out, single=True)
        with torch.no_grad():
            engine.run(X3, Y2, out2)
        return res

    def step(self, x: Tensor, y: Tensor | float) -> Tensor:
        """One step on (X_k = x (d,), Y_k = y); returns Ŷ_k (0-dim), like ``rtrl_step``."""
        Y = y.reshape(1) if isinstance(y, Tensor) else torch.tensor([float(y)])
        return self.run_chunk(x.unsqueeze(0), Y.to(x.device))[0]
