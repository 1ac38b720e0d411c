"""Empirical NTK between the last-step outputs of windows (theory §4).

    K(x̄, x̄') = s · ∇_θ f_θ(x̄) · ∇_θ f_θ(x̄'),   s = N^{2β−1} (``model.ntk_scale``), else 1

for windows x (n, L, d), x2 (m, L', d), an (n, m) tensor. f is the model's output at the last step
of the window (per window a scalar, or a time series whose last entry is taken), θ its trainable
parameters, frozen. Methods (``Method``):

* ``"jacobian"``  — any nn.Module: per-window Jacobians ``vmap(jacrev(f))`` (torch.func, the
  PyTorch tutorial's recipe), then K = Σ_params J Jᵀ. The rows of a block of x are kept and x2
  streams past them a few windows per ``vmap`` call (``JACREV_WORK``: large calls were measured
  slower per window). Cost n + m⌈n/rows⌉ window gradients + 2nmP; memory ≈ rows·P +
  sub·(P + 4(P + A)) ≤ ``MEMORY_BUDGET`` (A: the activations one window saves for backward;
  ``Footprint``) + the result.
* ``"ntk_vp"``    — any nn.Module: NTK-vector products, column j = J(x) g_j with g_j = J(x2)ᵀ e_j
  the gradient of window j of x2 (a vjp), pushed through the windows of x by a jvp; chunks of
  columns and of rows, so memory ≈ chunk·(P + 4(P + A)) + 2·chunk·rows·A ≤ ``MEMORY_BUDGET`` (+ the
  (n, m) result) whatever n, m and P. Cost m window gradients + n·m window jvps: for when
  the Jacobians do not fit, not for speed.
* ``"structured"`` — models whose family has a structured kernel (``structured.KERNELS``,
  keyed by ``family_of(model).structure``): MeanFieldRNN D: per-unit features
  φ_i = (S_i, c_i P_i, c_i Q_i) in one vectorised pass, then K = (1/N) Φ Φ'ᵀ (``structured.py``),
  O((n+m) N L d + n m N d); ElmanRNN, GRURNN: per-step backward vectors δ_k and states h_{k−1}
  of one batched forward/backward pass, the weight-matrix blocks Σ_{k,k'} (δ_k·δ'_{k'})
  (h_{k−1}·h'_{k'−1}) from Gram matrices (``recurrent.py``), O((n+m) L N² + n m L L' N).
* ``"auto"``      — ``choose_method``: structured where available; otherwise whichever of
  jacobian and ntk_vp has the lower cost estimate (``method_costs``, fitted to measurements)
  given the memory budget.

Models that accept ``forward(x, last_only=True)`` (MeanFieldRNN) are asked for the last output
only. A module that fails under ``vmap`` (e.g. nn.RNN/GRU/LSTM with their own zero initial
state) is handled a window at a time, with a warning. ``memory_budget`` (bytes) overrides
``MEMORY_BUDGET`` per call; kernels on probe sets too large for one call: ``ntk.large``.

The model is evaluated as it is (call ``.eval()`` first for dropout/batch-norm models); windows
must not interact inside a batch. Inputs are cast to the model's dtype; everything is computed
on the model's device.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

from ..errors import ConfigError
from ..models.recurrence import ONLINE_GRADIENTS, OnlineGradient, online_gradient
from . import structured as st

Method = Literal["auto", "jacobian", "ntk_vp", "structured"]
METHODS: tuple[str, ...] = get_args(Method)

#: Bytes of working memory (Jacobians, tangents, saved activations) the generic methods size their
#: chunks to, besides the (n, m) result; also the threshold in ``choose_method``. 2 GiB (as
#: ``large.DEFAULT_MEMORY_BUDGET``): with 512 MiB a GRU of width 2048 (P = 12.6 M) kept the rows
#: of 5 windows and recomputed the other side's gradients 7 times, more than the tutorial's
#: recipe, which holds both sides' Jacobians and the peak of one vmap over all windows.
MEMORY_BUDGET = 2**31


# --- input checks -------------------------------------------------------------------------------
def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ConfigError(f"{type(model).__name__} has no floating-point parameters; no NTK to compute")


def _check_windows(model: nn.Module, x: object, name: str) -> Tensor:
    """Windows as (n, L, d); for MeanFieldRNN via ``model.check_windows`` ((L, d) → n = 1)."""
    if not isinstance(x, Tensor):
        raise ConfigError(
            f"{name} must be a torch.Tensor of windows (n, L, d); got {type(x).__name__}"
        )
    if st.supports_structured(model):
        model.check_windows(x, name)
    elif x.dim() != 3 or x.shape[1] < 1:
        raise ConfigError(
            f"{name} has shape {tuple(x.shape)}; expected windows (n, L, d) with L >= 1"
        )
    return x.unsqueeze(0) if x.dim() == 2 else x


def check_inputs(
    model: nn.Module, x: object, x2: object = None
) -> tuple[Tensor, Tensor | None]:
    """Validate windows x (and x2) for ``model`` (ConfigError); return them in the model's dtype.

    x and x2 must share dtype and device, the device must be the model's, and the feature size
    d must agree; the lengths L and L' may differ.
    """
    x = _check_windows(model, x, "x")
    if x2 is not None:
        x2 = _check_windows(model, x2, "x2")
        if x2.dtype != x.dtype or x2.device != x.device:
            raise ConfigError(
                f"x and x2 must share dtype and device; got x: {x.dtype} on {x.device}, "
                f"x2: {x2.dtype} on {x2.device}"
            )
        if x2.shape[-1] != x.shape[-1]:
            raise ConfigError(
                f"x has feature size d={x.shape[-1]} but x2 has d={x2.shape[-1]}; they must agree"
            )
    dtype, device = _model_dtype_device(model)
    if x.device != device:
        raise ConfigError(
            f"windows are on {x.device} but the model is on {device}; move one of them"
        )
    return x.to(dtype), (None if x2 is None else x2.to(dtype))


def check_method(model: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not known; choose one of {list(METHODS)}")
    if method == "structured" and st.structure_of(model) is None:
        raise ConfigError(
            f"method='structured' needs a model with a structured kernel (MeanFieldRNN with "
            f"diagonal recurrence, ElmanRNN, GRURNN); for {type(model).__name__} use "
            f"'jacobian', 'ntk_vp' or 'auto'"
        )


# --- generic engines (torch.func) ---------------------------------------------------------------
def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters; no NTK to compute")
    return params


def _last_step(out: Tensor, n: int) -> Tensor:
    """One scalar per window: outputs (n,), (n, 1), (n, L) or (n, L, 1) → the last step, (n,)."""
    y = out[..., 0] if out.dim() == 3 and out.shape[-1] == 1 else out
    if y.dim() == 2:
        y = y[:, -1]
    if y.dim() != 1 or y.shape[0] != n:
        raise ConfigError(
            f"model output has shape {tuple(out.shape)} for {n} windows; expected one output per "
            "window (n,), (n, 1), or a time series (n, L) / (n, L, 1) whose last step is used"
        )
    return y


def _forward_kwargs(model: nn.Module) -> dict:
    """{"last_only": True} when ``forward`` takes it (MeanFieldRNN: only Ŷ_L is computed)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    return {"last_only": True} if "last_only" in sig.parameters else {}


def _outputs(model: nn.Module, params: dict, buffers: dict, xs: Tensor, kw: dict) -> Tensor:
    return _last_step(functional_call(model, (params, buffers), (xs,), kw), xs.shape[0])


def _check_chunk(chunk_size: object) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive integer or None")


@dataclass(frozen=True)
class Footprint:
    """Per-window cost of a model for the generic methods, measured on one window.

    ``params``: trainable parameter count P; ``param_bytes``: P × itemsize; ``act_bytes`` A: bytes
    of the activations the forward saves for backward (``saved_tensors_hooks``; parameters and
    buffers excluded) — the reverse-mode memory per window, and our proxy for the tangents a jvp
    keeps alive; ``flops`` F: the forward's matmul FLOPs read off the autograd graph (mm, addmm,
    bmm, baddbmm, mv, dot, convolution) plus one per saved activation entry (elementwise work).
    """

    params: int
    param_bytes: int
    act_bytes: int
    flops: float

    @property
    def jacrev_bytes(self) -> int:
        """Peak bytes per window of ``vmap(jacrev)``: 4 (P + A) (the saved activations, the
        backward's buffers of the same size, the gradient and its copy; measured 3.6–4.4× on
        MeanFieldRNN D and F)."""
        return 4 * (self.param_bytes + self.act_bytes)

    @property
    def jvp_bytes(self) -> int:
        """Peak bytes per (window, tangent) pair of a vmapped ``jvp``: 2 A (measured 1.9–2.0×)."""
        return 2 * self.act_bytes


_MATMUL_OPERANDS = {  # autograd node name prefix → (first, second operand) attribute stems
    "MmBackward": ("self", "mat2"), "BmmBackward": ("self", "mat2"),
    "AddmmBackward": ("mat1", "mat2"), "BaddbmmBackward": ("batch1", "batch2"),
    "MvBackward": ("self", "vec"), "DotBackward": ("self", "tensor"),
}


def _saved_shape(fn: object, stem: str) -> tuple[int, ...] | None:
    for attr in (f"_saved_{stem}_sym_sizes", f"_saved_{stem}"):
        try:
            v = getattr(fn, attr)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(v, Tensor):
            return tuple(v.shape)
        if v is not None:
            return tuple(int(s) for s in v)
    return None


def _node_flops(fn: object) -> float:
    """Multiply-add FLOPs of one autograd node's forward op (0 for non-matmul ops)."""
    name = fn.name()
    for prefix, (a, b) in _MATMUL_OPERANDS.items():
        if name.startswith(prefix):
            sa, sb = _saved_shape(fn, a), _saved_shape(fn, b)
            if sa is None:
                return 0.0
            cols = sb[-1] if sb is not None and len(sb) >= 2 else 1
            return 2.0 * math.prod(sa) * cols
    if name.startswith("ConvolutionBackward"):  # ≈ 2 |weight| × output positions (stride 1)
        sw, sx = _saved_shape(fn, "weight"), _saved_shape(fn, "input")
        if sw is None or sx is None:
            return 0.0
        return 2.0 * math.prod(sw) * sx[0] * math.prod(sx[2:])
    return 0.0


def _graph_flops(root: object) -> float:
    seen, stack, total = set(), [root], 0.0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        total += _node_flops(fn)
        stack.extend(g for g, _ in fn.next_functions)
    return total


_FOOTPRINTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def footprint(model: nn.Module, x: Tensor | None = None, only: str | None = None) -> Footprint:
    """Measure :class:`Footprint` by one forward on the window x[:1] (grad on the parameters);
    cached per model, window shape, dtype and trainable set.

    Without x (or with no windows) a dense net is assumed: A = P entries, F = 2P.
    """
    params, buffers = trainable_params(model), dict(model.named_buffers())
    params_d = params if only is None else {only: params[only]}
    n_params = sum(p.numel() for p in params_d.values())
    itemsize = next(iter(params.values())).element_size()
    if x is None or x.shape[0] == 0:
        return Footprint(n_params, n_params * itemsize, n_params * itemsize, 2.0 * n_params)
    key = (tuple(x.shape[1:]), x.dtype, x.device, tuple(params), only)
    cache = _FOOTPRINTS.setdefault(model, {})
    if key in cache:
        return cache[key]
    leaf = {k: v.clone().requires_grad_(k in params_d) for k, v in params.items()}
    skip = {t.untyped_storage().data_ptr() for t in (*leaf.values(), *buffers.values())}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _outputs(model, leaf, buffers, x[:1], _forward_kwargs(model))
    flops = 0.0 if y.grad_fn is None else _graph_flops(y.grad_fn)
    act = sum(saved.values())
    fp = cache[key] = Footprint(n_params, n_params * itemsize, act, flops + act / itemsize)
    return fp


def _budget(memory_budget: int | None) -> int:
    if memory_budget is None:
        return MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ConfigError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
    return memory_budget


#: Cost (FLOP-equivalents of a GEMM) of one gradient entry materialised by a window's backward
#: under ``vmap(jacrev)``, and of one tangent entry read by a jvp: fitted to ElmanRNN at N = 1024,
#: L = 16, 1 thread, AVX2 (153 ms per window gradient, 78 ms per jvp, GEMM 33 GFLOP/s): per-window
#: gradients of weight matrices are bound by memory traffic, not FLOPs (3F alone predicted the
#: jacobian method 50× too cheap there).
GRAD_ENTRY = 300.0
TANGENT_ENTRY = 150.0

#: Bytes of one ``vmap(jacrev)`` call's working set (the gradients of a sub-chunk of windows and
#: the peak of computing them), whatever the budget: a weight matrix applied at every step gets
#: one P-sized outer product per use in the backward, and larger sub-chunks were measured slower
#: per window (ElmanRNN N = 1024, L = 16, 1 thread, AVX2: 153 / 166 / 463 ms per window with
#: 1 / 4 / 16 windows per call), as is the tutorial's one call over all windows.
JACREV_WORK = 2**27


def _jacobian_plan(fp: Footprint, chunk_size: int | None, budget: int | None = None
                   ) -> tuple[int, int]:
    """(sub, rows): windows per ``vmap(jacrev)`` call, and windows of x whose Jacobian rows are
    kept while the x2 side streams past them in sub-chunks. rows·P + sub·(P + ``jacrev_bytes``)
    ≤ the budget (default MEMORY_BUDGET); ``chunk_size`` sets both."""
    if chunk_size is not None:
        return chunk_size, chunk_size
    b = _budget(budget)
    per = fp.param_bytes + fp.jacrev_bytes
    sub = max(1, min(JACREV_WORK, b // 4) // per)
    return sub, max(sub, (b - sub * per) // max(1, fp.param_bytes))


def _jacobian_chunk(fp: Footprint, chunk_size: int | None, budget: int | None = None) -> int:
    """Windows of x whose Jacobian rows are kept at once (``_jacobian_plan``'s rows)."""
    return _jacobian_plan(fp, chunk_size, budget)[1]


def _jacobian_passes(n: int, m: int, rows: int, sym: bool) -> tuple[int, bool]:
    """(window gradients computed, swap): x kept in blocks of ``rows`` and x2 streamed once per
    block (n + m⌈n/rows⌉), or the other way round when that is fewer (``swap``). Symmetric:
    the upper block triangle, ≈ n + n(⌈n/rows⌉ − 1)/2."""
    if sym:
        b = math.ceil(n / rows)
        return n + (n * (b - 1)) // 2, False
    a, b = n + m * math.ceil(n / rows), m + n * math.ceil(m / rows)
    return (a, False) if a <= b else (b, True)


def _vp_chunks(
    fp: Footprint, n: int, m: int, chunk_size: int | None, budget: int | None = None
) -> tuple[int, int]:
    """(columns, rows) per NTK-vector-product batch: the columns' gradients (c P kept, c ·
    ``jacrev_bytes`` while computed) take ≤ budget/2, the vmapped jvp over rows × columns
    (``jvp_bytes`` per pair) the other half."""
    half = _budget(budget) // 2
    per_col = fp.param_bytes + fp.jacrev_bytes
    per_pair = max(1, fp.jvp_bytes)
    if chunk_size is not None:
        c = chunk_size
    else:  # balanced c ≈ r, so that neither a long loop of tiny jvps nor of tiny vjps results
        balanced = math.isqrt(max(1, half // per_pair))
        c = min(m, max(1, half // per_col), max(1, balanced))
    r = min(n, max(1, half // (c * per_pair)))
    return max(1, c), max(1, r)


def jacobian_fn(model: nn.Module, params: dict, buffers: dict, diff: list[str]):
    """xs (c, L, d) → {name: (c, numel)}: per-window gradients ``vmap(jacrev(f))`` w.r.t. ``diff``
    (the torch.func tutorial's recipe; f is one window's last output)."""
    kw = _forward_kwargs(model)
    rest = {k: v for k, v in params.items() if k not in diff}

    def one(p: dict, xi: Tensor) -> Tensor:
        return _outputs(model, {**rest, **p}, buffers, xi.unsqueeze(0), kw)[0]

    jac = vmap(jacrev(one), in_dims=(None, 0))
    sub = {k: params[k] for k in diff}

    def J(xs: Tensor) -> dict[str, Tensor]:
        try:
            out = jac(sub, xs)
        except RuntimeError as e:  # an op without a batching rule: one window at a time
            _warn_no_vmap(model, e)
            rows = [jacrev(one)(sub, xi) for xi in xs]
            out = {k: torch.stack([r[k] for r in rows]) for k in sub}
        return {k: v.reshape(xs.shape[0], -1) for k, v in out.items()}

    return J


def _warn_no_vmap(model: nn.Module, err: Exception) -> None:
    warnings.warn(
        f"empirical NTK: {type(model).__name__} fails under torch.func.vmap ({str(err)[:120]!r}); "
        "falling back to a loop over windows (slower). nn.RNN/GRU/LSTM: pass an initial state "
        "made from the input, e.g. torch.zeros_like(x[:, :1, :1]).expand(...), not None",
        RuntimeWarning, stacklevel=4,
    )


def jacobian_blocks(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, chunk_size: int | None = None,
    fp: Footprint | None = None, memory_budget: int | None = None,
) -> dict[str, Tensor]:
    """{name: J_name(x) J_name(x2)ᵀ} (unscaled) from per-window Jacobians vmap(jacrev(f)).

    Windows are taken ``chunk_size`` at a time on each side (default: as many as keep a chunk's
    Jacobian and saved activations, both sides, within ``memory_budget`` bytes, default
    MEMORY_BUDGET); the x2 chunks' Jacobians are recomputed once per x chunk when more than one
    chunk is needed. x2=None: symmetric, only the upper block triangle is computed.
    Memory ≈ chunk (2P + 4(P + A)) (see ``Footprint``) + the result.
    """
    return _jacobian_kernel(model, x, x2, chunk_size, fp, memory_budget, total=False)


def _jacobian_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None, chunk_size: int | None,
    fp: Footprint | None, memory_budget: int | None, total: bool,
) -> dict[str, Tensor] | Tensor:
    """``jacobian_blocks``, or with ``total`` their sum accumulated in one (n, m) tensor.

    The Jacobian rows of a block of ``rows`` windows of x are kept, computed ``sub`` windows per
    ``vmap(jacrev)`` call (``_jacobian_plan``); the x2 side streams past them ``sub`` windows at
    a time, once per block (or x2 is kept and x streams, when that computes fewer gradients)."""
    params, buffers = trainable_params(model), dict(model.named_buffers())
    sym = x2 is None
    n, m = x.shape[0], (x if sym else x2).shape[0]
    if chunk_size is None:
        fp = fp or footprint(model, x)
    sub, rows = _jacobian_plan(fp, chunk_size, memory_budget)
    if not sym and _jacobian_passes(n, m, rows, False)[1]:
        K = _jacobian_kernel(model, x2, x, chunk_size, fp, memory_budget, total)
        return K.T.contiguous() if total else {k: v.T.contiguous() for k, v in K.items()}
    J = jacobian_fn(model, params, buffers, list(params))
    x2 = x if sym else x2
    names = ["total"] if total else list(params)
    K = {k: x.new_zeros(n, m) for k in names}

    def add(i0: int, i1: int, j0: int, j1: int, Ji: dict, Jj: dict) -> None:
        # each product on its own, then added: addmm_ onto an accumulator already holding other
        # blocks let float32 lose ~10x more (GRU, N = 512: rel. 1.2e-6 against 3.5e-8; BLAS adds
        # its partial sums over the long inner dimension into the larger existing values)
        for k in params:
            dst = K["total"] if total else K[k]
            dst[i0:i1, j0:j1] += Ji[k] @ Jj[k].T

    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        parts = [J(x[a:min(i1, a + sub)]) for a in range(i0, i1, sub)]
        Ji = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts])
                                               for k in params}
        del parts
        if sym:
            add(i0, i1, i0, i1, Ji, Ji)  # the diagonal block in one product
        # x2's rows go into the contraction `cols` at a time (what the budget leaves beside the
        # kept rows): one product per sub-chunk would read the kept rows once per sub-chunk
        cols = max(sub, (_budget(memory_budget) - (i1 - i0) * fp.param_bytes
                         - sub * (fp.param_bytes + fp.jacrev_bytes)) // max(1, fp.param_bytes)
                   ) if chunk_size is None else sub
        for c0 in range(i1 if sym else 0, m, cols):
            c1 = min(m, c0 + cols)
            parts = [J(x2[a:min(c1, a + sub)]) for a in range(c0, c1, sub)]
            Jj = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts])
                                                   for k in params}
            del parts
            add(i0, i1, c0, c1, Ji, Jj)
            del Jj
        if sym:
            for dst in K.values():
                dst[i1:, i0:i1] = dst[i0:i1, i1:].T
    return K["total"] if total else K


def ntk_vp_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, chunk_size: int | None = None,
    only: str | None = None, fp: Footprint | None = None, memory_budget: int | None = None,
) -> Tensor:
    """J(x) J(x2)ᵀ (unscaled) by NTK-vector products, no Jacobian of x stored.

    Column j of K is K e_j = J(x) (J(x2)ᵀ e_j): the vjp J(x2)ᵀ e_j is window j's gradient g_j
    (computed for ``chunk_size`` windows of x2 at once, ``vmap(jacrev)`` over those windows only),
    then J(x) g_j is one jvp over the windows of x, vmapped over the chunk's g_j and taken a block
    of rows at a time. Memory ≈ chunk (P + 4(P + A)) + 2 chunk·rows·A ≤ ``memory_budget``
    (default MEMORY_BUDGET; P parameters, A
    saved activations per window, see ``Footprint``) + the (n, m) result; cost ≈ m backward
    passes over one window + n·m jvp passes over one window. x2=None: symmetric, the blocks
    above the diagonal are mirrored. ``only``: restrict θ to one named parameter (its block of
    the kernel).
    """
    params, buffers = trainable_params(model), dict(model.named_buffers())
    diff = list(params) if only is None else [only]
    kw = _forward_kwargs(model)
    sym = x2 is None
    x2 = x if sym else x2
    n, m = x.shape[0], x2.shape[0]
    fp = fp or footprint(model, x, only)
    c, r = _vp_chunks(fp, n, m, chunk_size, memory_budget)
    J = jacobian_fn(model, params, buffers, diff)
    rest = {k: v for k, v in params.items() if k not in diff}
    primal = {k: params[k] for k in diff}
    K = x.new_zeros(n, m)
    with warnings.catch_warnings():  # torch's forward-AD decompositions use torch.jit.script once
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        for j0 in range(0, m, c):
            j1 = min(m, j0 + c)
            g = J(x2[j0:j1])  # {name: (c, numel)}: the vjps J(x2)ᵀ e_j of the chunk
            g = {k: v.view(j1 - j0, *primal[k].shape) for k, v in g.items()}
            for i0 in range(0, j1 if sym else n, r):
                i1 = min(j1 if sym else n, i0 + r)
                xs = x[i0:i1]

                def push(t: dict, xs=xs) -> Tensor:  # J(xs) t
                    f = lambda p: _outputs(model, {**rest, **p}, buffers, xs, kw)  # noqa: E731
                    return jvp(f, (primal,), (t,))[1]

                try:
                    blk = vmap(push)(g).T  # (rows, c)
                except RuntimeError as e:  # no batching rule: one column at a time
                    _warn_no_vmap(model, e)
                    blk = torch.stack([push({k: v[j] for k, v in g.items()})
                                       for j in range(j1 - j0)], dim=1)
                K[i0:i1, j0:j1] = blk
                if sym:
                    K[j0:j1, i0:i1] = blk.T
    if sym:  # the diagonal blocks were computed both ways round: make K exactly symmetric
        K = (K + K.T).mul_(0.5)
    return K


# --- structured engine, restricted to the trainable blocks -------------------------------------
def structured_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None, chunk_size: int | None,
    blocks: bool = False, truncated2: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The model's structured kernel (``st.KERNELS[family structure]``) over the trainable
    parameters only, as the generic engines do. ``truncated2``: Model D only."""
    key = st.structure_of(model)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    names = tuple(k for k in st.block_names(model) if k in trainable)
    if not names:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters; no NTK to compute")
    if truncated2:
        if len(names) == len(st.BLOCK_NAMES):
            return st.structured_ntk(model, x, x2, truncated2=True, unit_chunk=chunk_size,
                                     blocks=blocks)
        B = st.structured_ntk(model, x, x2, truncated2=True, unit_chunk=chunk_size, blocks=True)
        B = {k: v for k, v in B.items() if k in names}
        return B if blocks else sum(B.values())
    return st.KERNELS[key](model, x, x2, blocks=blocks, chunk_size=chunk_size, names=names)


# --- public API ---------------------------------------------------------------------------------
def method_costs(
    model: nn.Module, n: int, m: int | None = None, fp: Footprint | None = None,
    x: Tensor | None = None, memory_budget: int | None = None,
) -> dict[str, tuple[float, float]]:
    """{"jacobian": (cost, bytes), "ntk_vp": (cost, bytes)}: the estimates ``choose_method``
    compares, for n × m windows (m=None: symmetric), from the model's :class:`Footprint`
    (P parameters, A saved-activation bytes and F forward FLOPs per window; measured on x[:1]).
    Costs are in FLOP-equivalents of a GEMM.

    A window's gradient by ``vmap(jacrev)`` costs G = 3F (forward + backward) + ``GRAD_ENTRY``
    per gradient entry it materialises, max(P, F/2) (one outer product per use of a weight: F/2
    entries for a matrix applied at every step). One jvp of a window along one tangent costs
    G_v = 3F + ``TANGENT_ENTRY`` · F/2 (the tangent entries it reads).
    jacobian: G per window gradient computed — n + m⌈n/rows⌉ of them with ``rows`` windows of x
    kept (``_jacobian_plan``; or the other way round, whichever is fewer; symmetric: the upper
    block triangle) — and the contraction 2nmP.
    ntk_vp: m window gradients and n·m jvps: G m + G_v n m, in memory ≈ MEMORY_BUDGET.
    """
    fp = fp or footprint(model, x)
    budget = _budget(memory_budget)
    sym = m is None
    m_ = n if sym else m
    F, P = fp.flops, fp.params
    G = 3 * F + GRAD_ENTRY * max(P, F / 2)
    Gv = 3 * F + TANGENT_ENTRY * F / 2
    sub, rows = _jacobian_plan(fp, None, budget)
    grads, _ = _jacobian_passes(n, m_, rows, sym)
    gemm = (1.0 if sym else 2.0) * n * m_ * P
    jac = (G * grads + gemm, float(min(rows, max(n, m_)) * fp.param_bytes
                                   + sub * (fp.param_bytes + fp.jacrev_bytes)))
    pairs = n * (n + 1) / 2 if sym else n * m_
    full = (n + m_) * fp.param_bytes + min(n, m_) * fp.jacrev_bytes
    vp = (G * m_ + Gv * pairs, float(min(full, budget)))
    return {"jacobian": jac, "ntk_vp": vp}


def choose_method(
    model: nn.Module, n: int, m: int | None = None, *, x: Tensor | None = None,
    fp: Footprint | None = None, memory_budget: int | None = None,
) -> str:
    """The method "auto" picks for n × m windows (m=None: symmetric K(x, x)).

    Rule (the choice neural-tangents makes between its implementations, from cost estimates):

    1. ``structured`` if the model's family has a structured kernel (``structured.KERNELS``:
       MeanFieldRNN D's per-unit features, ElmanRNN's and GRURNN's per-step backward vectors
       and states) — no per-window Jacobian at all; measured 57–100× faster than the
       tutorial's jacobian recipe on Elman/GRU (``benchmarks.bench_recurrent``).
    2. else the cheaper of ``jacobian`` and ``ntk_vp`` as estimated by ``method_costs``
       (ties: jacobian), whose per-window costs include the memory traffic of materialised
       gradients and tangents, fitted to measurements. Both keep to MEMORY_BUDGET by chunking,
       so the budget enters through the recomputed window gradients.

    ``x``: windows to measure the footprint on (one window is run); without it a dense net's
    footprint is assumed (A = P entries, F = 2P). ``memory_budget``: bytes (default
    MEMORY_BUDGET).
    """
    if st.structure_of(model) is not None:
        return "structured"
    return generic_method(model, n, m, x=x, fp=fp, memory_budget=memory_budget)


def generic_method(
    model: nn.Module, n: int, m: int | None = None, *, x: Tensor | None = None,
    fp: Footprint | None = None, memory_budget: int | None = None,
) -> str:
    """The cheaper of "jacobian" and "ntk_vp" by ``method_costs`` (ties: jacobian): rule 2 of
    :func:`choose_method`, for models without a structured kernel (or callers that cannot use
    it)."""
    costs = method_costs(model, n, m, fp=fp, x=x, memory_budget=memory_budget)
    return "jacobian" if costs["jacobian"][0] <= costs["ntk_vp"][0] else "ntk_vp"


def _empty(x: Tensor, x2: Tensor | None) -> bool:
    return x.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0)


def _resolve(
    model: nn.Module, method: str, x: Tensor, x2: Tensor | None, chunk_size: object,
    memory_budget: int | None = None,
) -> str:
    check_method(model, method)
    _check_chunk(chunk_size)
    _budget(memory_budget)
    if method == "auto":
        if _empty(x, x2):
            return "structured" if st.structure_of(model) is not None else "jacobian"
        return choose_method(model, x.shape[0], None if x2 is None else x2.shape[0], x=x,
                             memory_budget=memory_budget)
    return method


def ntk_blocks(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, method: Method = "auto",
    chunk_size: int | None = None, memory_budget: int | None = None,
) -> dict[str, Tensor]:
    """Per-parameter-block kernels K_θb = s ∇_θb f(x̄)·∇_θb f(x̄'); they sum to ``empirical_ntk``.

    Keys: "c", "w", "b" for MeanFieldRNN; the parameter names for other modules.
    """
    x, x2 = check_inputs(model, x, x2)
    method = _resolve(model, method, x, x2, chunk_size, memory_budget)
    if _empty(x, x2):
        names = trainable_params(model)
        return {k: x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0]) for k in names}
    if method == "structured":
        return structured_kernel(model, x, x2, chunk_size, blocks=True)
    scale = float(getattr(model, "ntk_scale", 1.0))
    if method == "jacobian":
        blocks = jacobian_blocks(model, x, x2, chunk_size, memory_budget=memory_budget)
    else:
        blocks = {k: ntk_vp_kernel(model, x, x2, chunk_size, only=k, memory_budget=memory_budget)
                  for k in trainable_params(model)}
    return {k: v.mul_(scale) for k, v in blocks.items()}


def empirical_ntk(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, method: Method = "auto",
    chunk_size: int | None = None, memory_budget: int | None = None,
) -> Tensor:
    """Normalised empirical NTK K(x̄, x̄') = s ∇_θ f(x̄)·∇_θ f(x̄'), (n, m) (theory §4).

    s = N^{2β−1} (``model.ntk_scale``; for MeanFieldRNN K = (1/N) Σ_i φ_i·φ'_i), 1 for modules
    without ``ntk_scale``. x (n, L, d), x2 (m, L', d) (default x2 = x). ``chunk_size`` bounds
    memory: windows per block for "jacobian", identity columns per vmap for "ntk_vp", units per
    block for "structured" (default: automatic). See the module docstring for the methods.
    """
    x, x2 = check_inputs(model, x, x2)
    method = _resolve(model, method, x, x2, chunk_size, memory_budget)
    if _empty(x, x2):
        return x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0])
    if method == "structured":
        return structured_kernel(model, x, x2, chunk_size)
    scale = float(getattr(model, "ntk_scale", 1.0))
    if method == "jacobian":
        K = _jacobian_kernel(model, x, x2, chunk_size, None, memory_budget, total=True)
    else:
        K = ntk_vp_kernel(model, x, x2, chunk_size, memory_budget=memory_budget)
    return K.mul_(scale)


def training_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, gradient: OnlineGradient = "one_step",
    method: Method = "auto", chunk_size: int | None = None,
) -> Tensor:
    """The kernel that drives training: K_tr(x̄, x̄') = N^{2β−1} ∇_θ f(x̄) · g(x̄') (theory §4).

    g is the gradient the update uses: ``"rtrl"`` — the exact gradient, so K_tr = empirical_ntk
    (any method); ``"one_step"`` (formerly ``"truncated"``, deprecated) — the gradient of the last
    step (memory treated as an input: P, Q without the b P, b Q terms), MeanFieldRNN only,
    asymmetric, computed by the structured engine.
    """
    gradient = online_gradient(gradient)
    if gradient not in ONLINE_GRADIENTS:
        raise ConfigError(f"gradient={gradient!r} is not known; choose one of "
                          f"{list(ONLINE_GRADIENTS)}")
    if gradient == "rtrl":
        return empirical_ntk(model, x, x2, method=method, chunk_size=chunk_size)
    if not st.supports_structured(model):
        raise ConfigError(
            f"gradient='one_step' needs a MeanFieldRNN with diagonal recurrence; "
            f"{type(model).__name__} has no one-step gradient (use gradient='rtrl')"
        )
    check_method(model, method)
    if method not in ("auto", "structured"):
        raise ConfigError(
            f"gradient='one_step' is computed by method='structured' (or 'auto'); got {method!r}"
        )
    _check_chunk(chunk_size)
    x, x2 = check_inputs(model, x, x2)
    if _empty(x, x2):
        return x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0])
    return structured_kernel(model, x, x2, chunk_size, truncated2=True)
