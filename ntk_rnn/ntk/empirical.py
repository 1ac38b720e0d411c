"""Empirical NTK between the last-step outputs of windows (theory §4).

    K(x̄, x̄') = s · ∇_θ f_θ(x̄) · ∇_θ f_θ(x̄'),   s = N^{2β−1} (``model.ntk_scale``), else 1

for windows x (n, L, d), x2 (m, L', d), an (n, m) tensor. f is the model's output at the last step
of the window (per window a scalar, or a time series whose last entry is taken), θ its trainable
parameters, frozen. Methods (``Method``):

* ``"jacobian"``  — any nn.Module: per-window Jacobians ``vmap(jacrev(f))`` (torch.func), then
  K = Σ_params J Jᵀ. Cost (n+m) backward passes + n m P; memory (chunk) × P per side.
* ``"ntk_vp"``    — any nn.Module: NTK-vector products K v = J (J'ᵀ v) (a vjp then a jvp) on the
  columns of the identity, ``chunk_size`` columns at a time. Memory O(chunk × P), no Jacobian
  is stored: for when the parameter count P dwarfs the number of windows.
* ``"structured"`` — MeanFieldRNN only: per-unit features φ_i = (S_i, c_i P_i, c_i Q_i) in one
  vectorised pass, then K = (1/N) Φ Φ'ᵀ (see ``structured.py``). Cost O((n+m) N L d + n m N d).
* ``"auto"``      — ``choose_method``: structured where available; otherwise jacobian when the
  Jacobians of both inputs fit ``MEMORY_BUDGET`` bytes, else ntk_vp.

The model is evaluated as it is (call ``.eval()`` first for dropout/batch-norm models); windows
must not interact inside a batch. Inputs are cast to the model's dtype; everything is computed
on the model's device.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ..errors import ConfigError
from . import structured as st

Method = Literal["auto", "jacobian", "ntk_vp", "structured"]
METHODS: tuple[str, ...] = get_args(Method)
Gradient = Literal["rtrl", "truncated"]
GRADIENTS: tuple[str, ...] = get_args(Gradient)

#: Bytes of Jacobian (or of NTK-vector-product tangents) held at once by the generic methods.
MEMORY_BUDGET = 2**29


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


def _check_method(model: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not known; choose one of {list(METHODS)}")
    if method == "structured" and not st.supports_structured(model):
        raise ConfigError(
            f"method='structured' needs a MeanFieldRNN with diagonal recurrence (per-unit "
            f"features); for {type(model).__name__} use 'jacobian', 'ntk_vp' or 'auto'"
        )


# --- generic engines (torch.func) ---------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, Tensor]:
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


def _outputs(model: nn.Module, params: dict, buffers: dict, xs: Tensor) -> Tensor:
    return _last_step(functional_call(model, (params, buffers), (xs,)), xs.shape[0])


def _check_chunk(chunk_size: object) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive integer or None")


def _auto_chunk(n_params: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, MEMORY_BUDGET // (2 * n_params * itemsize))


def jacobian_blocks(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """{name: J_name(x) J_name(x2)ᵀ} (unscaled) from per-window Jacobians vmap(jacrev(f)).

    Windows are taken ``chunk_size`` at a time on each side (default: as many as fit
    MEMORY_BUDGET); the x2 chunks' Jacobians are recomputed once per x chunk when more than one
    chunk is needed. x2=None: symmetric, only the upper block triangle is computed.
    """
    params, buffers = _trainable(model), dict(model.named_buffers())
    n_params = sum(p.numel() for p in params.values())
    one = lambda p, xi: _outputs(model, p, buffers, xi.unsqueeze(0))[0]
    jac = vmap(jacrev(one), in_dims=(None, 0))

    def J(xs: Tensor) -> dict[str, Tensor]:
        return {k: v.reshape(xs.shape[0], -1) for k, v in jac(params, xs).items()}

    sym = x2 is None
    x2 = x if sym else x2
    n, m = x.shape[0], x2.shape[0]
    c = _auto_chunk(n_params, x.element_size(), chunk_size)
    K = {k: x.new_zeros(n, m) for k in params}
    cache = J(x2) if not sym and m <= c else None  # x2 side fits: compute it once
    for i0 in range(0, n, c):
        Ji = J(x[i0:i0 + c])
        for j0 in range(i0 if sym else 0, m, c):
            if sym and j0 == i0:
                Jj = Ji
            elif cache is not None:
                Jj = cache
            else:
                Jj = J(x2[j0:j0 + c])
            for k in K:
                blk = Ji[k] @ Jj[k].T
                K[k][i0:i0 + c, j0:j0 + c] = blk
                if sym and j0 != i0:
                    K[k][j0:j0 + c, i0:i0 + c] = blk.T
    return K


def ntk_vp_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, chunk_size: int | None = None,
    only: str | None = None,
) -> Tensor:
    """J(x) J(x2)ᵀ (unscaled) by NTK-vector products: column j is jvp_x(vjp_{x2}(e_j)).

    ``chunk_size`` identity columns are vmapped at once (default: as many as fit MEMORY_BUDGET).
    ``only``: restrict θ to one named parameter (its block of the kernel).
    """
    params, buffers = _trainable(model), dict(model.named_buffers())
    diff = params if only is None else {only: params[only]}
    n_params = sum(p.numel() for p in diff.values())
    x2 = x if x2 is None else x2
    m = x2.shape[0]
    f1 = lambda p: _outputs(model, {**params, **p}, buffers, x)
    f2 = lambda p: _outputs(model, {**params, **p}, buffers, x2)
    _, vjp_fn = vjp(f2, diff)

    def column(v: Tensor) -> Tensor:  # K v = J1 (J2ᵀ v)
        (tangent,) = vjp_fn(v)
        return jvp(f1, (diff,), (tangent,))[1]

    c = _auto_chunk(n_params, x.element_size(), chunk_size)
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    with warnings.catch_warnings():  # torch's forward-AD decompositions use torch.jit.script once
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        cols = [vmap(column)(eye[j0:j0 + c]) for j0 in range(0, m, c)]
    return torch.cat(cols).T


# --- structured engine, restricted to the trainable blocks -------------------------------------
def _structured(
    model: nn.Module, x: Tensor, x2: Tensor | None, chunk_size: int | None,
    blocks: bool = False, truncated2: bool = False,
) -> Tensor | dict[str, Tensor]:
    """structured_ntk over the trainable parameters only, as the generic engines do."""
    frozen = [k for k in st.BLOCK_NAMES if not getattr(model, k).requires_grad]
    if len(frozen) == len(st.BLOCK_NAMES):
        raise ConfigError(f"{type(model).__name__} has no trainable parameters; no NTK to compute")
    if not frozen:
        return st.structured_ntk(model, x, x2, truncated2=truncated2, unit_chunk=chunk_size,
                                 blocks=blocks)
    B = st.structured_ntk(model, x, x2, truncated2=truncated2, unit_chunk=chunk_size, blocks=True)
    B = {k: v for k, v in B.items() if k not in frozen}
    return B if blocks else sum(B.values())


# --- public API ---------------------------------------------------------------------------------
def choose_method(model: nn.Module, n: int, m: int | None = None) -> str:
    """The method "auto" picks for n × m windows (m=None: symmetric K(x, x)).

    structured if the model has it (cost O((n+m) N L d + n m N d), no Jacobian); else jacobian
    when the Jacobians of both sides, (n + m) P entries, fit MEMORY_BUDGET bytes (fewest passes:
    n + m backward passes); else ntk_vp (memory O(chunk × P), but m vjp+jvp passes over n windows).
    """
    if st.supports_structured(model):
        return "structured"
    dtype, _ = _model_dtype_device(model)
    n_params = sum(p.numel() for p in _trainable(model).values())
    rows = n + (0 if m is None else m)
    fits = rows * n_params * torch.empty((), dtype=dtype).element_size() <= MEMORY_BUDGET
    return "jacobian" if fits else "ntk_vp"


def _empty(x: Tensor, x2: Tensor | None) -> bool:
    return x.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0)


def _resolve(
    model: nn.Module, method: str, x: Tensor, x2: Tensor | None, chunk_size: object
) -> str:
    _check_method(model, method)
    _check_chunk(chunk_size)
    if method == "auto":
        return choose_method(model, x.shape[0], None if x2 is None else x2.shape[0])
    return method


def ntk_blocks(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, method: Method = "auto",
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-parameter-block kernels K_θb = s ∇_θb f(x̄)·∇_θb f(x̄'); they sum to ``empirical_ntk``.

    Keys: "c", "w", "b" for MeanFieldRNN; the parameter names for other modules.
    """
    x, x2 = check_inputs(model, x, x2)
    method = _resolve(model, method, x, x2, chunk_size)
    if _empty(x, x2):
        names = _trainable(model)
        return {k: x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0]) for k in names}
    if method == "structured":
        return _structured(model, x, x2, chunk_size, blocks=True)
    scale = float(getattr(model, "ntk_scale", 1.0))
    if method == "jacobian":
        blocks = jacobian_blocks(model, x, x2, chunk_size)
    else:
        blocks = {k: ntk_vp_kernel(model, x, x2, chunk_size, only=k) for k in _trainable(model)}
    return {k: v.mul_(scale) for k, v in blocks.items()}


def empirical_ntk(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, method: Method = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Normalised empirical NTK K(x̄, x̄') = s ∇_θ f(x̄)·∇_θ f(x̄'), (n, m) (theory §4).

    s = N^{2β−1} (``model.ntk_scale``; for MeanFieldRNN K = (1/N) Σ_i φ_i·φ'_i), 1 for modules
    without ``ntk_scale``. x (n, L, d), x2 (m, L', d) (default x2 = x). ``chunk_size`` bounds
    memory: windows per block for "jacobian", identity columns per vmap for "ntk_vp", units per
    block for "structured" (default: automatic). See the module docstring for the methods.
    """
    x, x2 = check_inputs(model, x, x2)
    method = _resolve(model, method, x, x2, chunk_size)
    if _empty(x, x2):
        return x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0])
    if method == "structured":
        return _structured(model, x, x2, chunk_size)
    scale = float(getattr(model, "ntk_scale", 1.0))
    if method == "jacobian":
        K = sum(jacobian_blocks(model, x, x2, chunk_size).values())
    else:
        K = ntk_vp_kernel(model, x, x2, chunk_size)
    return K.mul_(scale)


def training_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, gradient: Gradient = "truncated",
    method: Method = "auto", chunk_size: int | None = None,
) -> Tensor:
    """The kernel that drives training: K_tr(x̄, x̄') = N^{2β−1} ∇_θ f(x̄) · g(x̄') (theory §4).

    g is the gradient the update uses: ``"rtrl"`` — the exact gradient, so K_tr = empirical_ntk
    (any method); ``"truncated"`` — the truncated gradient (memory treated as an input: P, Q
    without the b P, b Q terms), MeanFieldRNN only, asymmetric, computed by the structured engine.
    """
    if gradient not in GRADIENTS:
        raise ConfigError(f"gradient={gradient!r} is not known; choose one of {list(GRADIENTS)}")
    if gradient == "rtrl":
        return empirical_ntk(model, x, x2, method=method, chunk_size=chunk_size)
    if not st.supports_structured(model):
        raise ConfigError(
            f"gradient='truncated' needs a MeanFieldRNN with diagonal recurrence; "
            f"{type(model).__name__} has no truncated gradient (use gradient='rtrl')"
        )
    _check_method(model, method)
    if method not in ("auto", "structured"):
        raise ConfigError(
            f"gradient='truncated' is computed by method='structured' (or 'auto'); got {method!r}"
        )
    _check_chunk(chunk_size)
    x, x2 = check_inputs(model, x, x2)
    if _empty(x, x2):
        return x.new_zeros(x.shape[0], (x if x2 is None else x2).shape[0])
    return _structured(model, x, x2, chunk_size, truncated2=True)
