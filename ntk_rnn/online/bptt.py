"""Online SGD by truncated backpropagation through time, for models without an exact online step.

One SGD step per stream element, θ ← θ − lr ∇_θ ½(Y_k − Ŷ_k)², the gradient taken through the
last ``window`` = W elements of the stream. Exactly, with θ_k the parameters before step k:

* the stepper keeps the inputs X_{k−n+1..k−1} of the current window (n − 1 ≤ W − 1 of them, a
  buffer) and, for models with a memory (``memory_dim``: `ElmanRNN`,
  `GRURNN`), the memory h entering the window (zero at the stream start);
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
    the kernel cache of `ntk_rnn.csrc.loader`, checked once per process against a torch
    engine) runs a whole chunk: per step n mat-vecs forward, n − 1 transposed mat-vecs backward
    and the rank-n update of the recurrent matrix, each blocked four rows (or four rank-one
    terms) per pass; no allocation and no dispatch. Per member and step the arithmetic is
    ~3 n N² (Elman) or ~9 n N² (GRU) multiply-adds. Each member's units are split over a team
    of ``kernel_threads()`` threads (``torch.get_num_threads()``, at most the CPUs and one per
    ``MIN_UNITS_PER_THREAD`` units): their rows of A (GRU: their three gate rows of W_hh) for
    the forward mat-vecs and the update, their entries of the backward vector for Aᵀδ, a
    spinning barrier between the phases. The cuts fall on multiples of 64 units, so the result
    is bit-identical for any number of threads (a test). N = 1024, window 32, 2 threads (Intel
    Xeon): Elman 97 → 211 steps/s (the two halves of A fit the two cores' L2), GRU 32 → 57.
``"eager"`` (ElmanRNN, any device) — the same hand-written forward/backward as batched torch ops
    (bmm / baddbmm on an ensemble axis E), preallocated buffers.
``"autograd"`` (any module; the fallback) — one model: ``torch.autograd.grad`` of the window loss
    on the model's own parameters; an ensemble: ``vmap(torch.func.grad(...))`` through
    ``functional_call`` over the stacked parameters. From the kept memory where the model has
    one. This saves nothing over a hand-written autograd loop: it is what any module gets.

`BPTTStepper` trains one model, `BPTTEnsembleStepper` E models of the same
architecture (parameters stacked with ``torch.func.stack_module_state``, each model bound to its
slice so it always holds the current values), member e evolving exactly as a `BPTTStepper`
of model e would (to round-off). ``state_dict()`` holds the buffer, the memory and the counters:
with the model's own ``state_dict`` it resumes a run bit for bit.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ..csrc import loader
from ..errors import ConfigError
from ..models.elman import ElmanRNN
from ..models.family import family_of
from ..models.gru import GRURNN
from ..subnormals import without_subnormals
from .fast import output_buffer

ENGINES = ("auto", "kernel", "eager", "autograd")


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


# --- the compiled kernel (ntk_rnn/csrc/bptt.c) ---------------------------------------------
def _self_check(lib: ctypes.CDLL, d: int, act: str) -> None:
    """The kernel vs a torch engine on small ensembles, float64 and float32: ElmanRNN of this
    activation against "eager", and (in the tanh library, which serves GRURNN) GRURNN against
    "autograd"; raises on a mismatch, so the kernel is not used."""
    X = torch.randn(2, 11, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Y = torch.randn(2, 11, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cases = [(f"elman {scaling}", "eager",
              lambda dt, s, sc=scaling, N=N: ElmanRNN(2, N, beta=0.7, recurrent_scaling=sc,
                                                      activation=act, A_mean=0.3, seed=s,
                                                      dtype=dt), team)
             for scaling, N, team in (("mean_field", 13, 1), ("ntk", 13, 1),
                                      ("mean_field", 130, 2))]
    if act == "tanh":
        cases += [(f"gru bias={bias}", "autograd",
                   lambda dt, s, b=bias, N=N: GRURNN(2, N, beta=0.7, bias=b, bias_std=0.5, seed=s,
                                                     dtype=dt), team)
                  for bias, N, team in ((True, 7, 1), (False, 7, 1), (True, 130, 2))]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        for name, other, make, team in cases:  # team: the kernel's threads (units cut at 64)
            runs = []
            for engine in ("kernel", other):
                st = BPTTEnsembleStepper([make(dtype, 1), make(dtype, 2)], [0.3, 0.2], window=4,
                                         engine=engine, _unchecked=True)
                st.kernel_threads = lambda team=team: team
                Xd, Yd = X.to(dtype), Y.to(dtype)
                o = torch.cat([st.run_chunk(Xd[:, :6], Yd[:, :6]),
                               st.run_chunk(Xd[:, 6:], Yd[:, 6:])], 1)
                runs.append([o] + [p.detach() for p in st.params.values()] + [st.memory])
            for a, b in zip(*runs, strict=True):
                a, b = a.double(), b.double()
                if not torch.isfinite(a).all() or float((a - b).abs().max()) > tol * (
                        1 + float(b.abs().max())):
                    raise RuntimeError(f"self-check failed ({name}, {team} threads, {dtype}): "
                                       f"the kernel disagrees with the {other} engine")


#: the kernel uses another thread only for this many units each (per step it crosses ~3 W
#: barriers, each about a microsecond, and torch's own threads may still be spinning from the
#: work between chunks). Trainer runs with the NTK callback, horizon 1, 2 threads (Intel Xeon):
#: N = 256 no gain (Elman 1.88 vs 1.99 s, GRU 2.38 vs 2.37 s), N = 512 Elman 2.53 s either
#: way, GRU 6.40 -> 4.38 s, N = 1024 Elman 11.6 -> 5.8 s
MIN_UNITS_PER_THREAD = 256


_L, _P, _D = ctypes.c_long, ctypes.c_void_p, ctypes.c_double
#: the compiled BPTT kernel (d is a run-time argument of bptt.c: one library per activation):
#: ``KERNEL.library(act=act)``, ``KERNEL.status(act=act)``
KERNEL = loader.Kernel("bptt", "the compiled BPTT kernel (ElmanRNN, GRURNN)", {
    "elman_bptt": ([_L] * 6 + [_P] * 5 + [_P, _L, _P, _L, _P, _L, _P, _D, _D, _P, _L], _L),
    "gru_bptt": ([_L] * 7 + [_P] * 7 + [_P, _L, _P, _L, _P, _L, _P, _D, _D, _P, _L], _L),
}, _self_check, per_d=False)


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
            N = model0.width  # elman: (3W + 2) N; gru: (8W + 11) N; and a row of W, padded
            # to 64 bytes, per thread, of at most min(64, N / 64) (see the C source)
            es = torch.empty((), dtype=self.dtype).element_size()
            cf = -(-W * es // 64) * 64 // es
            self._work = torch.zeros((8 * W + 11) * N + cf * max(1, min(64, N // 64)),
                                     dtype=self.dtype)
        else:
            self._gradfn = self._make_gradfn()

    def kernel_threads(self) -> int:
        """Threads the kernel splits each member's units over: ``torch.get_num_threads()``,
        at most the CPUs this process may run on (its affinity: the kernel's barrier spins, so
        a team larger than the CPUs is many times slower) and one per ``MIN_UNITS_PER_THREAD``
        units. Any count gives the same bits (the cuts fall on multiples of 64 units;
        ``csrc/bptt.c``)."""
        N = self.model0.width
        return loader.team_size(torch.get_num_threads(), N // MIN_UNITS_PER_THREAD)

    def _model_kind(self) -> Optional[str]:
        """'elman' / 'gru' for the models with hand-written engines, else None."""
        m = self.model0
        if not (all(p.requires_grad for p in m.parameters())
                and self.dtype in (torch.float32, torch.float64)):
            return None
        kind = family_of(m).bptt_engine
        if kind == "elman" and m.act.name not in loader.ACT_CODES:
            return None
        return kind

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
        lib = (KERNEL.build(0, act) if unchecked else KERNEL.library(act=act)) if cpu else None
        if lib is None:
            if engine == "kernel":
                why = "the model is not on the CPU" if not cpu else KERNEL.status(act=act)
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
        with torch.no_grad(), without_subnormals(X.device):  # the window's δ_k underflow
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
        # each member's units split over a team of threads (bit-identical for any team); it
        # returns how many ran
        self.last_kernel_threads = fn(
            *head, *(None if t is None else t.data_ptr() for t in ts), Xc.data_ptr(), xs,
            Yc.data_ptr(), ys, oc.data_ptr(), T, lr, m.output_scale, m.recurrent_scale,
            self._work.data_ptr(), self.kernel_threads())
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
        out = output_buffer(out, (T,) if single else (E, T), self.dtype, self.device)
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
