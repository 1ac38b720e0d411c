"""NTK on large probe sets: kernels in blocks within a memory budget, and matrix-free metrics.

Blocked kernel — :func:`blocked_ntk` computes the same K = s ∇f(x̄)·∇f(x̄') as ``empirical_ntk``
with a bound on the working memory (``memory_budget`` bytes, default 2 GiB, a laptop):

* ``structured`` (MeanFieldRNN, Model D): the kernel is a sum over units, K = (1/N) Σ_u Φ_u Φ'_uᵀ,
  so ``structured_ntk`` runs with a unit block sized to the budget (features of every window for
  that block of units, both sides) — nothing is recomputed, Φ (n × N(d+2), 6 GB at n = 4096,
  N = 65536, float32) is never formed. Windows are blocked too only when even 256 units of all
  windows would not fit.
* ``structured`` (ElmanRNN, GRURNN: per-step backward vectors and states, ``ntk.recurrent``):
  by blocks of windows, the passes of a row block and a column block within the budget.
* ``jacobian``: rows of J (per-window gradients, ``vmap(jacrev)`` in sub-chunks) for a block of
  windows of x are kept, J of blocks of x2 is computed against them; blocks sized to the budget.
  The x2 side is recomputed once per block of x (symmetric: upper block triangle only).
* ``ntk_vp``: ``ntk_vp_kernel`` with the budget (its memory does not grow with n, m or P).

The (n, m) result itself counts against the budget unless ``out`` is given (e.g. a memory-mapped
tensor, ``torch.from_file(path, shared=True, size=n*m).view(n, m)``); blocks are written into it.

Matrix-free — :class:`KernelOperator` gives K V (K = K(x, x), n × n) without forming K:
structured: one pass over unit blocks per product, K V = (1/N) Σ_u Φ_u (Φ_uᵀ V); generic: two
passes over window blocks, g = Σ_R J_Rᵀ V_R then (K V)_R = s J_R g. Feature blocks are kept
between products while they fit half the budget (then later products are only GEMMs). Each
product of k vectors costs at most one (structured) or two (generic) feature passes over x.
Metrics on it, each returned as an :class:`Estimate` (value, error, what the error means):

* :func:`trace` — exact from the diagonal (one pass; ``method="exact"``), or Hutch++ (Meyer et
  al. 2021) from ``num_matvecs`` products: tr(Qᵀ K Q) on a sketched range Q plus Hutchinson on
  the rest; error = one standard error of the Hutchinson part (the deflated part is exact),
  for PSD K |error| ≤ ε tr K with O(1/ε) products.
* :func:`frobenius_norm` — ‖K‖_F = (tr K²)^{1/2}, Hutch++ on K² (2 products each); error
  propagated from the standard error of tr K² (δ‖K‖ = δ(tr K²) / (2‖K‖)).
* :func:`top_eigenvalues` — Lanczos (``scipy.sparse.linalg.eigsh`` on a ``LinearOperator`` of
  kernel-vector products, ``which="LA"``); error = the residual ‖K u − θ u‖ of each Ritz pair, a
  guaranteed bound: an eigenvalue of K lies within it of θ (and within r²/gap when separated).
* :func:`target_alignment` — yᵀ K y / (‖K‖_F ‖y‖²): yᵀ K y exact (one product), ‖K‖_F by
  :func:`frobenius_norm` (or exact if given); error propagated from it.
* :func:`intrinsic_dimension` — tr K / λ_max from the two above, error propagated.

Randomised estimates use a seeded generator (``seed``): reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.mean_field import MeanFieldRNN
from . import empirical as emp
from . import recurrent as rc
from . import structured as st

#: Default working-memory budget of the blocked kernel and the kernel operator: 2 GiB.
DEFAULT_MEMORY_BUDGET = 2 * 2**30

#: Smallest unit block worth a GEMM (structured) before windows are blocked instead.
MIN_UNITS = 256

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "Estimate", "KernelOperator", "blocked_ntk", "trace",
    "frobenius_norm", "top_eigenvalues", "target_alignment", "intrinsic_dimension",
]


def _check_budget(memory_budget: object) -> int:
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ConfigError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
    return memory_budget


def _resolve(model: nn.Module, method: str, x: Tensor, x2: Tensor | None, budget: int,
             operator: bool = False) -> str:
    """The method to run. ``operator`` (KernelOperator): its structured products are per unit
    block, so only Model D's kernel ("units") is structured there; the recurrent structured
    kernels (Elman, GRU) serve :func:`blocked_ntk` by blocks of windows."""
    emp.check_method(model, method)
    key = st.structure_of(model)
    if operator and method == "structured" and key != "units":
        raise ConfigError(
            f"KernelOperator's structured products are per unit block (Model D); for "
            f"{type(model).__name__} use method 'jacobian', 'ntk_vp' or 'auto'")
    if method != "auto":
        return method
    if key is not None and (key == "units" or not operator):
        return "structured"
    m = None if x2 is None else x2.shape[0]
    return emp.generic_method(model, x.shape[0], m, x=x, memory_budget=budget)


def _frozen_rows(model: MeanFieldRNN) -> list[int]:
    """Rows of the (d+2) per-unit features [S, cQ, cP_1..cP_d] of trainable parameters."""
    rows = []
    if model.c.requires_grad:
        rows.append(0)
    if model.b.requires_grad:
        rows.append(1)
    if model.w.requires_grad:
        rows.extend(range(2, model.input_dim + 2))
    if not rows:
        raise ConfigError("MeanFieldRNN has no trainable parameters; no NTK to compute")
    return rows


# --- blocked kernel ------------------------------------------------------------------------------
def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class _JacobianRows:
    """√s · J for blocks of windows (rows of the flattened Jacobian, all trainable parameters),
    computed by ``vmap(jacrev)`` a sub-chunk at a time so its activations stay within ``work``."""

    def __init__(self, model: nn.Module, x: Tensor, work: int) -> None:
        params, buffers = emp.trainable_params(model), dict(model.named_buffers())
        self.J = emp.jacobian_fn(model, params, buffers, list(params))
        self.fp = emp.footprint(model, x)
        self.scale = math.sqrt(float(getattr(model, "ntk_scale", 1.0)))
        self.sub = max(1, work // (self.fp.param_bytes + self.fp.jacrev_bytes))
        self.P = self.fp.params

    def __call__(self, xs: Tensor) -> Tensor:
        out = xs.new_empty(xs.shape[0], self.P)
        for i0, i1 in _blocks(xs.shape[0], self.sub):
            torch.cat(list(self.J(xs[i0:i1]).values()), dim=1, out=out[i0:i1])
        return out.mul_(self.scale)


def _alloc_out(n: int, m: int, like: Tensor, out: Tensor | None, budget: int) -> tuple[Tensor, int]:
    """The result tensor and the working budget left beside it."""
    size = n * m * like.element_size()
    if out is None:
        if size > budget // 2:
            raise ConfigError(
                f"the ({n}, {m}) kernel alone takes {size / 2**30:.2f} GiB, over half of "
                f"memory_budget={budget / 2**30:.2f} GiB: pass out= (e.g. a memory-mapped tensor, "
                "torch.from_file(path, shared=True, size=n*m).view(n, m)), raise the budget, "
                "or use the matrix-free metrics (KernelOperator)"
            )
        return like.new_empty(n, m), budget - size
    if not isinstance(out, Tensor) or tuple(out.shape) != (n, m) or out.dtype != like.dtype:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"out must be a ({n}, {m}) {like.dtype} tensor; got {shape}")
    return out, budget


def _structured_plan(x: Tensor, x2: Tensor | None, work: int) -> tuple[int, int, int]:
    """(rows, cols, bytes per unit and window) for the structured blocked kernel: φ (and the
    coefficients when factorised) of both sides for a block of units take ≤ work/2, the
    kernel block that ``structured_ntk`` returns ≤ work/4."""
    n, L1, d = x.shape
    x2_ = x if x2 is None else x2
    m, L2, _ = x2_.shape
    s = x.element_size()
    fac = st.use_factorised(L1, L2, d)
    per_unit_window = (d + 2 + (max(L1, L2) if fac else 0)) * s
    if (n + m) * per_unit_window * MIN_UNITS <= work // 2 and n * m * s <= work // 4:
        return n, m, per_unit_window
    side = max(1, min(work // 2 // (2 * per_unit_window * MIN_UNITS),
                      math.isqrt(max(0, work // 4 // s))))
    return side, side, per_unit_window


def _structured_blocked(model, x, x2, out, work: int) -> None:
    n = x.shape[0]
    sym = x2 is None
    x2_ = x if sym else x2
    m = x2_.shape[0]
    rows, cols, per_unit_window = _structured_plan(x, x2, work)
    for i0, i1 in _blocks(n, rows):
        for j0, j1 in _blocks(m, cols):
            if sym and j1 <= i0:
                continue
            nb = (i1 - i0) + (j1 - j0)
            units = max(1, min(model.width, work // 2 // (nb * per_unit_window)))
            xi = x[i0:i1]
            xj = None if (sym and (i0, i1) == (j0, j1)) else x2_[j0:j1]
            out[i0:i1, j0:j1] = emp.structured_kernel(model, xi, xj, units)
            if sym and (i0, i1) != (j0, j1):
                out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T


def _recurrent_blocked(model, x, x2, out, work: int) -> None:
    """The recurrent structured kernels (Elman, GRU) by blocks of windows: the passes of a block
    of rows and one of columns (``recurrent.window_bytes`` per window) take ≤ work/2; the Gram
    blocks inside are bounded by ``recurrent.GRAM_ELEMENTS``."""
    sym = x2 is None
    x2_ = x if sym else x2
    n, m = x.shape[0], x2_.shape[0]
    per = max(rc.window_bytes(model, x.shape[1], st.structure_of(model)),
              rc.window_bytes(model, x2_.shape[1], st.structure_of(model)))
    side = max(1, work // 2 // (2 * per))
    for i0, i1 in _blocks(n, side):
        for j0, j1 in _blocks(m, side):
            if sym and j1 <= i0:
                continue
            xj = None if (sym and (i0, i1) == (j0, j1)) else x2_[j0:j1]
            out[i0:i1, j0:j1] = emp.structured_kernel(model, x[i0:i1], xj, None)
            if sym and (i0, i1) != (j0, j1):
                out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T


def _jacobian_blocked(model, x, x2, out, work: int) -> None:
    sym = x2 is None
    x2_ = x if sym else x2
    n, m = x.shape[0], x2_.shape[0]
    rows_of = _JacobianRows(model, x, work // 4)
    row_bytes = rows_of.P * x.element_size()
    # a block of x rows and one of x2 rows kept, each ≤ 3/8 of the budget
    size = max(1, (3 * work // 8) // row_bytes)
    cache = rows_of(x2_) if not sym and m <= size else None
    for i0, i1 in _blocks(n, size):
        Ji = rows_of(x[i0:i1])
        for j0, j1 in _blocks(m, size):
            if sym and j1 <= i0:
                continue
            if sym and j0 == i0:
                Jj = Ji
            elif cache is not None:
                Jj = cache
            else:
                Jj = rows_of(x2_[j0:j1])
            out[i0:i1, j0:j1] = Ji @ Jj.T
            if sym and j0 != i0:
                out[j0:j1, i0:i1] = out[i0:i1, j0:j1].T
            del Jj


def blocked_ntk(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, *, method: emp.Method = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET, out: Tensor | None = None,
) -> Tensor:
    """K(x̄, x̄') as ``empirical_ntk``, with working memory ≤ ``memory_budget`` bytes (module
    docstring). ``out``: a preallocated (n, m) tensor to fill (then the result does not count
    against the budget); without it, the result must fit half the budget. Memory is bounded up to
    the footprint estimates of ``empirical.Footprint`` (generic methods) and small buffers."""
    budget = _check_budget(memory_budget)
    x, x2 = emp.check_inputs(model, x, x2)
    method = _resolve(model, method, x, x2, budget)
    n, m = x.shape[0], (x if x2 is None else x2).shape[0]
    units = st.structure_of(model) == "units"
    if method == "structured" and units and out is None and n and m and \
            n * m * x.element_size() <= budget // 2:
        work = budget - n * m * x.element_size()
        rows, cols, per_unit_window = _structured_plan(x, x2, work)
        if (rows, cols) == (n, m):  # one block: structured_ntk's own result, no copy
            units = max(1, min(model.width, work // 2 // ((n + m) * per_unit_window)))
            return emp.structured_kernel(model, x, x2, units)
    K, work = _alloc_out(n, m, x, out, budget)
    if n == 0 or m == 0:
        return K
    if method == "structured" and units:
        _structured_blocked(model, x, x2, K, work)
    elif method == "structured":
        _recurrent_blocked(model, x, x2, K, work)
    elif method == "jacobian":
        _jacobian_blocked(model, x, x2, K, work)
    else:
        scale = float(getattr(model, "ntk_scale", 1.0))
        if out is None:
            K.copy_(emp.ntk_vp_kernel(model, x, x2, memory_budget=work // 2).mul_(scale))
        else:  # result blocks of ≤ work/4 bytes
            side = max(1, math.isqrt(work // 4 // x.element_size()))
            x2_ = x if x2 is None else x2
            for i0, i1 in _blocks(n, side):
                for j0, j1 in _blocks(m, side):
                    K[i0:i1, j0:j1] = emp.ntk_vp_kernel(
                        model, x[i0:i1], x2_[j0:j1], memory_budget=work // 2).mul_(scale)
    return K


# --- matrix-free kernel products -----------------------------------------------------------------
class KernelOperator:
    """K = K(x, x) (n × n) as products K V, never formed (module docstring).

    ``method``: "structured" (MeanFieldRNN, Model D; per unit block), "jacobian" or "ntk_vp"
    (both: per-window gradients by window blocks), "auto" (structured where available).
    ``memory_budget`` bounds the working memory; feature blocks are cached up to half of it.
    ``matvecs`` counts the columns multiplied so far.
    """

    def __init__(
        self, model: nn.Module, x: Tensor, *, method: emp.Method = "auto",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.budget = _check_budget(memory_budget)
        x, _ = emp.check_inputs(model, x)
        self.model, self.x = model, x
        self.method = _resolve(model, method, x, None, self.budget, operator=True)
        self.n = x.shape[0]
        self.dtype, self.device = x.dtype, x.device
        self.matvecs = 0
        self._cache: dict[int, Tensor] = {}
        self._cached_bytes = 0
        s = x.element_size()
        if self.method == "structured":
            n, L, d = x.shape
            self._rows = _frozen_rows(model)
            per_unit = n * (d + 2) * s
            self._units = max(1, min(model.width, (self.budget // 4) // per_unit))
            self._sub = self._unit_model(self._units)
            self._spans = _blocks(model.width, self._units)
        else:
            self._jrows = _JacobianRows(model, x, self.budget // 4)
            self._spans = _blocks(self.n, max(1, (self.budget // 4) // (self._jrows.P * s)))

    def _unit_model(self, width: int) -> MeanFieldRNN:
        """A MeanFieldRNN of ``width`` units to hold one unit block's (c, w, b): its features are
        those units' features (they do not depend on N; the 1/N is applied here)."""
        m = self.model
        return MeanFieldRNN(m.input_dim, width, beta=m.beta, activation=m.act,
                            init={"b": "constant", "rho": 0.0}, dtype=self.dtype,
                            device=self.device).requires_grad_(False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _block(self, k: int) -> Tensor:
        """Feature block k: structured (n, p_u) for a unit block, else (r, P) for a window block;
        K = Σ_u F_u F_uᵀ (structured) or K = F Fᵀ with F the window blocks stacked."""
        if k in self._cache:
            return self._cache[k]
        a, b = self._spans[k]
        if self.method == "structured":
            sub, model = self._sub, self.model
            if b - a != sub.width:
                sub = self._unit_model(b - a)
            with torch.no_grad():
                for name in ("c", "w", "b"):
                    getattr(sub, name).copy_(getattr(model, name).detach()[a:b])
            F = st.unit_feature_matrix(sub, self.x).view(self.n, -1, b - a)
            F = F[:, self._rows].reshape(self.n, -1).div_(math.sqrt(model.width))
        else:
            F = self._jrows(self.x[a:b])
        nbytes = F.numel() * F.element_size()
        if self._cached_bytes + nbytes <= self.budget // 2:
            self._cache[k] = F
            self._cached_bytes += nbytes
        return F

    def matmat(self, V: Tensor) -> Tensor:
        """K V for V (n, k) (or (n,))."""
        vec = V.dim() == 1
        V = (V[:, None] if vec else V).to(self.dtype)
        if V.shape[0] != self.n:
            raise ConfigError(f"V has {V.shape[0]} rows; the kernel is {self.n} × {self.n}")
        self.matvecs += V.shape[1]
        with torch.no_grad():
            if self.method == "structured":
                out = V.new_zeros(self.n, V.shape[1])
                for k in range(len(self._spans)):
                    F = self._block(k)
                    out.addmm_(F, F.T @ V)
            else:
                g = None
                for k, (a, b) in enumerate(self._spans):
                    F = self._block(k)
                    t = F.T @ V[a:b]
                    g = t if g is None else g.add_(t)
                out = torch.cat([self._block(k) @ g for k in range(len(self._spans))])
        return out[:, 0] if vec else out

    def diagonal(self) -> Tensor:
        """diag K, exact: squared row norms of the features (one feature pass)."""
        d = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for k, (a, b) in enumerate(self._spans):
                F = self._block(k)
                if self.method == "structured":
                    d += F.square().sum(1)
                else:
                    d[a:b] = F.square().sum(1)
        return d

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64) of these products."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(self.n, -1))
            out = self.matmat(V.to(self.device))
            return out.to("cpu", torch.float64).numpy().reshape(np.shape(v))

        return LinearOperator((self.n, self.n), matvec=mv, matmat=mv, rmatvec=mv,
                              dtype=np.float64)


# --- matrix-free metrics -------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A metric with its error. ``kind``: "exact" (round-off only), "bound" (guaranteed: the true
    value lies within ``error``), "stderr" (one standard error of a randomised estimate: about
    68% of seeds within it, 95% within two). ``matvecs``: kernel-vector products used."""

    value: float | Tensor
    error: float | Tensor
    kind: str
    matvecs: int

    def __float__(self) -> float:
        return float(self.value)


MatMat = Callable[[Tensor], Tensor]


def _op(K: KernelOperator | Tensor) -> tuple[MatMat, int, torch.dtype, torch.device]:
    if isinstance(K, KernelOperator):
        return K.matmat, K.n, K.dtype, K.device
    if isinstance(K, Tensor) and K.dim() == 2 and K.shape[0] == K.shape[1]:
        return (lambda V: K @ V), K.shape[0], K.dtype, K.device
    raise ConfigError("K must be a KernelOperator or a square kernel tensor (n, n)")


def _rademacher(n: int, k: int, gen: torch.Generator, dtype, device) -> Tensor:
    return (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(dtype=dtype, device=device)


def _hutchpp(
    mm: MatMat, n: int, num: int, gen: torch.Generator, dtype, device
) -> tuple[float, float]:
    """Hutch++ trace of the (PSD) operator mm with ``num`` products: (estimate, stderr)."""
    k = max(1, num // 3)
    if 3 * k >= n:  # as many products as the dimension: exact, tr = Σ e_iᵀ A e_i
        eye = torch.eye(n, dtype=dtype, device=device)
        return float(torch.diagonal(mm(eye)).sum()), 0.0
    S = _rademacher(n, k, gen, dtype, device)
    Q, _ = torch.linalg.qr(mm(S))
    t_top = float((Q * mm(Q)).sum())
    G = _rademacher(n, k, gen, dtype, device)
    G = G - Q @ (Q.T @ G)
    samples = (G * mm(G)).sum(0)  # gᵢᵀ (I−QQᵀ) A (I−QQᵀ) gᵢ
    est = t_top + float(samples.mean())
    err = float(samples.std()) / math.sqrt(k) if k > 1 else abs(float(samples[0]))
    return est, err


def trace(
    K: KernelOperator | Tensor, method: str = "exact", num_matvecs: int = 30, seed: int = 0,
) -> Estimate:
    """tr K: ``"exact"`` from the diagonal (KernelOperator: one feature pass), or ``"hutchpp"``
    from ``num_matvecs`` products (error: one standard error)."""
    if method == "exact":
        if isinstance(K, KernelOperator):
            return Estimate(float(K.diagonal().sum()), 0.0, "exact", 0)
        _op(K)
        return Estimate(float(torch.trace(K)), 0.0, "exact", 0)
    if method != "hutchpp":
        raise ConfigError(f"method={method!r}: choose 'exact' or 'hutchpp'")
    mm, n, dtype, device = _op(K)
    count = [0]

    def counted(V: Tensor) -> Tensor:
        count[0] += V.shape[1]
        return mm(V)

    gen = torch.Generator().manual_seed(seed)
    est, err = _hutchpp(counted, n, num_matvecs, gen, dtype, device)
    return Estimate(est, err, "stderr" if err else "exact", count[0])


def frobenius_norm(K: KernelOperator | Tensor, num_matvecs: int = 30, seed: int = 0) -> Estimate:
    """‖K‖_F = (tr K²)^{1/2} by Hutch++ on K² (each of its ``num_matvecs`` products is two
    kernel products); error: one standard error, propagated to the square root."""
    mm, n, dtype, device = _op(K)
    count = [0]

    def sq(V: Tensor) -> Tensor:
        count[0] += 2 * V.shape[1]
        return mm(mm(V))

    gen = torch.Generator().manual_seed(seed)
    est, err = _hutchpp(sq, n, num_matvecs, gen, dtype, device)
    norm = math.sqrt(max(est, 0.0))
    return Estimate(norm, err / (2 * norm) if norm > 0 else err, "stderr" if err else "exact",
                    count[0])


def top_eigenvalues(
    K: KernelOperator | Tensor, k: int, tol: float = 1e-10, maxiter: int | None = None,
) -> Estimate:
    """The k largest eigenvalues of symmetric K by Lanczos (``eigsh``, which="LA"), descending;
    ``error``: the residual norms ‖K u − θ u‖, guaranteed bounds (module docstring)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    mm, n, dtype, device = _op(K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ConfigError(f"k={k!r} must be an integer in [1, {n - 1}] (Lanczos needs k < n)")
    count = [0]

    def mv(v: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(n, -1)).to(device, dtype)
        count[0] += V.shape[1]
        return mm(V).to("cpu", torch.float64).numpy().reshape(np.shape(v))

    op = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    theta, U = eigsh(op, k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0)
    order = np.argsort(theta)[::-1]
    theta, U = theta[order], U[:, order]
    Ut = torch.as_tensor(np.ascontiguousarray(U)).to(device, dtype)
    R = mm(Ut) - Ut * torch.as_tensor(theta.copy()).to(device, dtype)
    count[0] += k
    res = torch.linalg.norm(R, dim=0).to(torch.float64).cpu()
    return Estimate(torch.as_tensor(theta.copy()), res, "bound", count[0])


def target_alignment(
    K: KernelOperator | Tensor, y: Tensor, frobenius: Estimate | float | None = None,
    num_matvecs: int = 30, seed: int = 0,
) -> Estimate:
    """yᵀ K y / (‖K‖_F ‖y‖²): the quadratic form exact (one product); ‖K‖_F given
    (``frobenius``, an Estimate or exact float) or by :func:`frobenius_norm`; error propagated."""
    mm, n, dtype, device = _op(K)
    if not isinstance(y, Tensor) or y.numel() != n or y.dim() > 2:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"y must have shape ({n},) to match K; got {shape}")
    y = y.reshape(-1).to(device, dtype)
    quad = float(y @ mm(y[:, None])[:, 0])
    if frobenius is None:
        frobenius = frobenius_norm(K, num_matvecs, seed)
    if not isinstance(frobenius, Estimate):
        frobenius = Estimate(float(frobenius), 0.0, "exact", 0)
    fro, dfro = float(frobenius.value), float(frobenius.error)
    value = quad / (fro * float(y @ y))
    return Estimate(value, abs(value) * dfro / fro, frobenius.kind, frobenius.matvecs + 1)


def intrinsic_dimension(K: KernelOperator | Tensor, tol: float = 1e-10) -> Estimate:
    """tr K / λ_max (PSD K): exact trace, Lanczos λ_max; error propagated from its bound."""
    tr = trace(K, "exact")
    lam = top_eigenvalues(K, 1, tol=tol)
    lmax, dl = float(lam.value[0]), float(lam.error[0])
    value = tr.value / lmax
    return Estimate(value, value * dl / max(lmax - dl, 1e-300), "bound", lam.matvecs)

