"""Structured empirical NTK of MeanFieldRNN (Model D): per-unit features, then one GEMM (theory §4);
and :data:`KERNELS`, the table from a model family's ``structure`` key to its structured kernel
(Model D's here, ElmanRNN's and GRURNN's in :mod:`.recurrent`).

    K^N(x̄, x̄') = N^{2β−1} ∇_θ f(x̄) · ∇_θ f(x̄') = (1/N) Σ_i φ_i(x̄) · φ_i(x̄'),
    φ_i = (S_i, c_i Q_i, c_i P_i) ∈ R^{d+2}   (last step of the window, θ frozen)

so K = (1/N) Φ Φ'ᵀ with Φ of shape (n, N(d+2)). The features come from one vectorised pass:

* forward over the window, all units and windows at once:
  ``z_k = w·X_k + b S_k``, ``S_{k+1} = σ(z_k)``, ``D_k = σ'(z_k)``;
* the RTRL recursions ``P_{k+1} = D_k (X_k + b P_k)``, ``Q_{k+1} = D_k (S_k + b Q_k)`` unrolled:

      P_L = Σ_k a_k X_k,   Q_L = Σ_k a_k S_k,   a_{L−1} = D_{L−1},  a_{k−1} = b D_{k−1} a_k,

  so only the scalar coefficients a_{i,k} are recursed (backwards, O(n N L)) and P is one
  batched GEMM ``(d, L) @ (L, N)`` per window instead of a d-fold larger elementwise recursion.
  ``truncated=True`` (``gradient: one_step``, theory §3) keeps only a_{L−1}.
* when ``L·L' < d`` the P·P' term is cheaper factorised through the coefficients:
  ``Σ_i c_i² P_i·P'_i = Σ_{k,k'} (X_k·X'_{k'}) Σ_i c_i² a_{i,k} a'_{i,k'}`` (a GEMM with inner size
  N over (n L, m L') instead of one over (n, m) with inner size N d).

Work is split into blocks of units (the kernel is a sum over units, so nothing is recomputed)
and of windows, each buffer ≤ ``BLOCK_ELEMENTS`` entries, which keeps memory bounded and the
per-step slices in cache. tanh is evaluated as 2·sigmoid(2z) − 1 (``Activation.sigmoid_form``),
equal to round-off and several times faster than ``torch.tanh`` on CPU.

On the CPU (float32/float64, tanh/sigmoid/erf) the features of a block come from a compiled C
kernel (:mod:`._features_c`, ``csrc/features.c``: the same recursion fused per unit, the state of
128 units in L1, tanh inline in float32) where it was measured faster than this torch path on
the machine (``_features_c.choice``: timed at first use, cached with the compiled object;
``NTK_RNN_FEATURES=c|torch`` forces one); the torch path below stays the reference and the CUDA
path. With T = ``torch.get_num_threads()`` > 1 the units are split into T ranges, one
per thread, each doing its features and its own Gram GEMMs single-threaded; the T partial kernels
are summed (no hand-over between a threaded feature pass and a threaded GEMM per block). Those
threads flush subnormals to zero (:mod:`ntk_rnn.subnormals`): on the torch path the coefficients
a_k = Π g D underflow when |b| is small (N = 4096, n = m = 128, L = 32, 1 thread: 299 ms
without the flush, 117 ms with it); the flushed values are below 1e-38.
``USE_C = False`` (or ``NTK_RNN_NO_KERNEL=1``) turns the kernel off.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..csrc import loader
from ..models.family import family_of
from ..models.mean_field import MeanFieldRNN
from ..subnormals import without_subnormals
from . import _features_c, recurrent

#: Use the compiled per-unit features (:mod:`._features_c`) on the CPU where they build and pass
#: their self-check; False forces the torch path below (the reference).
USE_C = True

#: Entries per (windows × steps × units) work buffer: 2^19 (2 MiB in float32) keeps buffers
#: below glibc's mmap threshold (no page faults on reuse) and the per-step slices in cache.
BLOCK_ELEMENTS = 2**19

#: Units per block with the compiled features (per thread: the φ of both sides, (n + m)(d + 2)
#: entries per unit, then one Gram GEMM per block): None sizes blocks to ``C_BLOCK_BYTES``, a
#: number fixes them. Larger blocks mean fewer, larger GEMMs: on AVX2 (AMD EPYC, 1 thread, N =
#: 4096, n = m = 128, L = 32, d = 4) 2048 units took 41–46 ms of CPU against 48–52 ms with 512.
C_BLOCK_UNITS: int | None = None
#: Bytes of the φ of both sides of one block when ``C_BLOCK_UNITS`` is None (2048 units at
#: n = m = 128, d = 4, float32), at least 512 units and at most N.
C_BLOCK_BYTES = 6 * 2**20
#: The C kernel's chunk of units (float32): thread ranges are cut on its multiples.
C_CHUNK = 128

BLOCK_NAMES = ("c", "w", "b")



def supports_structured(model: object) -> bool:
    """True for models with the per-unit feature path (family structure "units": MeanFieldRNN
    with diagonal recurrence). Any structured kernel at all: :func:`structure_of`."""
    return family_of(model).structure == "units"


def structure_of(model: object) -> str | None:
    """The key of ``model``'s structured kernel in :data:`KERNELS` (its family's ``structure``:
    "units", "elman", "gru"), or None when it has none (torch.func methods only)."""
    key = family_of(model).structure
    return key if key in KERNELS else None


def block_names(model: object) -> tuple[str, ...]:
    """The blocks of ``model``'s structured kernel (parameter names; Model D: c, w, b)."""
    key = structure_of(model)
    if key == "units":
        return BLOCK_NAMES
    return tuple(k for k, _ in model.named_parameters())


def unit_block_size(model: MeanFieldRNN, n: int, L: int) -> int:
    """Units per block: as many as fit BLOCK_ELEMENTS for n windows of L steps (at least 256)."""
    return max(1, min(model.width, max(256, BLOCK_ELEMENTS // max(1, n * L))))


def use_factorised(L1: int, L2: int, d: int) -> bool:
    """Cost model for the P·P' term: the factorised GEMM has inner work L1·L2 per unit, Φ has d."""
    return L1 * L2 < d


# --- per-unit features --------------------------------------------------------------------------
class _Workspace:
    """Buffers reused across the blocks of one call: fresh multi-MiB buffers cost page faults."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, key: str, like: Tensor, *shape: int) -> Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = like.new_empty(numel)
        return buf[:numel].view(shape)


def _forward(model: MeanFieldRNN, x: Tensor, units: slice, Z: Tensor, H: Tensor) -> float:
    """Z ← σ'(z_k)/r and H ← S_0..S_L (memories) for windows x (n, L, d), all ``units``; returns r.

    z_k = b S_k + w·X_k, S_{k+1} = σ(z_k), S_0 = 0 (the forward of ``models.recurrence.
    spq_step``; the P, Q recursion is unrolled by the caller): per step one elementwise op, one
    small GEMM (added in place) and σ. A σ of sigmoid form, σ(z) = a·sigmoid(k z) + c
    (``Activation.sigmoid_form``; tanh = 2·sigmoid(2z) − 1, several times faster than
    ``torch.tanh`` on CPU), runs in s = sigmoid(k z): k z_k = k c b + k a b s_k + k w·X_k,
    s_0 = −c/a, S = a s + c, σ' = a k s(1 − s), r = a k.
    """
    L = x.shape[1]
    act = model.act
    w, b = model.w.detach()[units], model.b.detach()[units]
    form = act.sigmoid_form
    if form is None:
        H[:, 0].zero_()
        for k in range(L):  # Z[:, k] ← z_k, H[:, k+1] ← σ(z_k)
            torch.mul(H[:, k], b, out=Z[:, k]).addmm_(x[:, k], w.T)
            H[:, k + 1] = act.fn(Z[:, k])
        Z.copy_(act.deriv(Z))
        return 1.0
    ks, a, c = form
    wT, rec = (w.T, b) if (ks, a) == (1.0, 1.0) else (ks * w.T, (ks * a) * b)
    shift = (ks * c) * b if c else None
    H[:, 0].fill_(-c / a if c else 0.0)
    for k in range(L):  # Z[:, k] ← k z_k, H[:, k+1] ← s_{k+1} = sigmoid(k z_k)
        if shift is not None:
            z = torch.addcmul(shift, H[:, k], rec, out=Z[:, k])
        else:
            z = torch.mul(H[:, k], rec, out=Z[:, k])
        z.addmm_(x[:, k], wT)
        torch.sigmoid(z, out=H[:, k + 1])
    Hn = H[:, 1:]
    torch.addcmul(Hn, Hn, Hn, value=-1.0, out=Z)  # s (1 − s) = σ'/r: the caller folds r in
    if (a, c) != (1.0, 0.0):
        torch.add(H.new_full((), c), H, alpha=a, out=H)  # S = a s + c
    return ks * a


def _window_chunk(
    model: MeanFieldRNN, x: Tensor, xT: Tensor, units: slice, truncated: bool, phi: Tensor,
    coef: Tensor | None, ws: _Workspace,
) -> None:
    """Features of windows x (n, L, d) (xT = x transposed, contiguous) for ``units``, into phi
    (n, d+2, Nb) as rows [S_L, Q_L, P_L (d rows)] before the c factor; with ``coef`` (n, L, Nb)
    the coefficients a_{i,k} go there instead of the P rows."""
    n, L, d = x.shape
    Nb = phi.shape[-1]
    Z = ws.take("Z", x, n, L, Nb)
    H = ws.take("H", x, n, L + 1, Nb)
    r = _forward(model, x, units, Z, H)  # Z = D / r, H = S
    phi[:, 0] = H[:, L]
    Z[:, L - 1].mul_(r)  # D_{L−1}
    if truncated:  # a_{L−1} = D_{L−1}, all other coefficients 0
        DL = Z[:, L - 1]
        torch.mul(DL, H[:, L - 1], out=phi[:, 1])
        if coef is not None:
            coef.zero_()
            coef[:, L - 1] = DL
        else:
            torch.mul(x[:, L - 1].unsqueeze(-1), DL.unsqueeze(1), out=phi[:, 2:])
        return
    # a_{L−1} = D_{L−1};  a_{k−1} = b D_{k−1} a_k  (in place: Z turns from D into a)
    Z[:, : L - 1].mul_(r * model.b.detach()[units])
    for k in range(L - 1, 0, -1):
        Z[:, k - 1].mul_(Z[:, k])
    Hs = H[:, :L].mul_(Z)  # a_k S_k
    torch.sum(Hs, dim=1, out=phi[:, 1])  # Q = Σ_k a_k S_k
    if coef is not None:
        coef.copy_(Z)
    else:  # P = Σ_k a_k X_k: one (d, L) @ (L, Nb) product per window
        phi[:, 2:] = torch.bmm(xT, Z, out=ws.take("P", x, n, d, Nb))


def _block_features(
    model: MeanFieldRNN, x: Tensor, xT: Tensor, units: slice, truncated: bool, factorised: bool,
    ws: _Workspace, side: str = "1", use_c: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """φ for one block of units, all windows: (n, d+2, Nb) with rows [S, cQ, cP], and the
    c-scaled coefficients c_i a_{i,k} (n, L, Nb) when ``factorised`` (the cP rows are then not
    written). Views into ``ws``. ``use_c``: the compiled kernel (default: ``USE_C`` and usable
    here, i.e. CPU, float32/64, tanh/sigmoid/erf, a C compiler) or the torch path (False).
    The C kernel splits the windows over ``torch.get_num_threads()`` threads."""
    n, L, d = x.shape
    c = model.c.detach()[units]
    Nb = c.shape[0]
    phi = ws.take("phi" + side, x, n, d + 2, Nb)
    coef = ws.take("coef" + side, x, n, L, Nb) if factorised else None
    if use_c is None:
        use_c = USE_C and _features_c.preferred(model, x)
    if use_c:
        _features_c.block_features(model, x, units, truncated, phi, coef)
        return phi, coef
    step = max(1, BLOCK_ELEMENTS // (L * Nb))
    for i0 in range(0, n, step):
        rows = slice(i0, i0 + step)
        _window_chunk(model, x[rows], xT[rows], units, truncated, phi[rows],
                      None if coef is None else coef[rows], ws)
    phi[:, 1:].mul_(c)
    if coef is not None:
        coef.mul_(c)
    return phi, coef


def _torch_features_runner(model: MeanFieldRNN, x: Tensor, units: slice):
    """The torch path of ``_block_features`` on ``units`` of ``model`` for windows x, ready to
    time (``_features_c.measure`` compares it with the compiled kernel)."""
    xT, ws = x.transpose(1, 2).contiguous(), _Workspace()
    return lambda: _block_features(model, x, xT, units, False, False, ws, use_c=False)


_features_c.TORCH_FEATURES = _torch_features_runner


def unit_feature_matrix(model: MeanFieldRNN, x: Tensor, truncated: bool = False) -> Tensor:
    """Φ (n, N(d+2)) with K^N = (1/N) Φ Φ'ᵀ: per unit the features (S_i, c_i Q_i, c_i P_i).

    ``truncated=True`` gives the features of the truncated gradient g (theory §4). x (n, L, d)
    must already be in the model's dtype and device.
    """
    n, L, d = x.shape
    N = model.width
    Nb = unit_block_size(model, n, L)
    xT, ws = x.transpose(1, 2).contiguous(), _Workspace()
    out = x.new_empty(n, d + 2, N)  # a normal tensor, filled in inference mode (less overhead)
    with torch.inference_mode(), without_subnormals(x.device):  # (the torch path's a_k underflow)
        if USE_C and _features_c.preferred(model, x):  # no work buffers: all units in one call
            _features_c.block_features(model, x, slice(0, N), truncated, out, None)
            return out.view(n, -1)
        for u0 in range(0, N, Nb):
            units = slice(u0, min(u0 + Nb, N))
            out[:, :, units], _ = _block_features(model, x, xT, units, truncated, False, ws)
    return out.view(n, -1)


# --- kernel assembly ----------------------------------------------------------------------------
def _pp_factorised(A1: Tensor, A2: Tensor, G: Tensor) -> Tensor:
    """Σ_i c_i² P_i·P'_i = Σ_{k,k'} G_{k,k'} Σ_i (c a_{i,k})(c a'_{i,k'}), G_{kk'} = X_k·X'_{k'}."""
    n, L1, Nb = A1.shape
    m, L2, _ = A2.shape
    T = torch.mm(A1.reshape(n * L1, Nb), A2.reshape(m * L2, Nb).T).view(n, L1, m, L2)
    return (T * G).sum((1, 3))


def _accumulate(K: Tensor | dict[str, Tensor], F1: Tensor, A1: Tensor | None, F2: Tensor,
                A2: Tensor | None, G: Tensor | None) -> None:
    """K += the contribution of one block of units (features F, coefficients A; G = X·X')."""
    n, m = F1.shape[0], F2.shape[0]
    if isinstance(K, dict):
        K["c"].addmm_(F1[:, 0], F2[:, 0].T)
        K["b"].addmm_(F1[:, 1], F2[:, 1].T)
        if G is not None:
            K["w"].add_(_pp_factorised(A1, A2, G))
        else:
            K["w"].addmm_(F1[:, 2:].reshape(n, -1), F2[:, 2:].reshape(m, -1).T)
    elif G is not None:
        K.addmm_(F1[:, :2].reshape(n, -1), F2[:, :2].reshape(m, -1).T)
        K.add_(_pp_factorised(A1, A2, G))
    else:
        K.addmm_(F1.view(n, -1), F2.view(m, -1).T)


def _unit_range(
    model: MeanFieldRNN, x: Tensor, x2: Tensor, truncated2: bool, same: bool, G: Tensor | None,
    K: Tensor | dict[str, Tensor], u0: int, u1: int, Nb: int, use_c: bool | None,
) -> None:
    """K += Σ over units u0..u1-1 of φ_i(x̄)·φ_i(x̄') (not yet /N), in blocks of Nb units, with
    torch (and the C kernel) on this thread's ``torch.get_num_threads()`` threads. K (zeros, or
    {block name: zeros}) is made by the caller outside inference mode: it stays a normal
    tensor."""
    factorise = G is not None
    ws = _Workspace()
    xT = x.transpose(1, 2).contiguous()
    x2T = xT if x2 is x else x2.transpose(1, 2).contiguous()
    for b0 in range(u0, u1, Nb):
        units = slice(b0, min(b0 + Nb, u1))
        F1, A1 = _block_features(model, x, xT, units, False, factorise, ws, "1", use_c)
        F2, A2 = (F1, A1) if same else _block_features(
            model, x2, x2T, units, truncated2, factorise, ws, "2", use_c)
        _accumulate(K, F1, A1, F2, A2, G)


def _thread_ranges(N: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous unit ranges, the cuts on multiples of the C kernel's chunk."""
    cuts = [0] + [min(N, round(N * t / parts / C_CHUNK) * C_CHUNK) for t in range(1, parts)] + [N]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def structured_ntk(
    model: MeanFieldRNN, x: Tensor, x2: Tensor | None = None, *, truncated2: bool = False,
    unit_chunk: int | None = None, blocks: bool = False, factorise: bool | None = None,
) -> Tensor | dict[str, Tensor]:
    """K = (1/N) Σ_i φ_i(x̄) · φ_i(x̄') for windows x (n, L, d), x2 (m, L', d) (default x2 = x).

    ``truncated2``: use the truncated-gradient features g on the x2 side (training kernel of
    ``gradient: one_step``). ``unit_chunk``: units per block (default: ``unit_block_size``, or
    ``C_BLOCK_UNITS`` / ``C_BLOCK_BYTES`` with the compiled features). ``blocks``: return
    {"c": S·S', "w": c² P·P', "b": c² Q·Q'} (each /N) instead of the sum. ``factorise``: force
    the coefficient factorisation of P·P' on/off (default ``use_factorised``). Inputs must
    already be validated, in the model's dtype and device.

    On the CPU with ``torch.get_num_threads()`` = T > 1 the units are split into T ranges, one
    per thread, each computing its features and its own Gram GEMMs (torch on one thread there),
    and the T partial kernels are summed: no hand-over between a threaded feature pass and a
    threaded GEMM per block, so both scale with T. Subnormals are flushed to zero on those
    threads (:func:`._features_c.run_flushed`): the torch path's coefficients a_k underflow.
    """
    n, L1, d = x.shape
    same = (x2 is None or x2 is x) and not truncated2
    x2 = x if x2 is None else x2
    m, L2, _ = x2.shape
    N = model.width
    if factorise is None:
        factorise = use_factorised(L1, L2, d)
    G = None
    if factorise:  # X_k · X'_{k'} for all window pairs and steps
        G = torch.mm(x.reshape(n * L1, d), x2.reshape(m * L2, d).T).view(n, L1, m, L2)
    use_c = USE_C and _features_c.preferred(model, x) and (
        x2 is x or _features_c.preferred(model, x2))
    if not use_c:
        Nb = unit_chunk or unit_block_size(model, max(n, m), max(L1, L2))
    else:
        rows = d + 2 + (max(L1, L2) if factorise else 0)  # φ (and coefficients) per window
        per_unit = (n + (0 if same else m)) * rows * x.element_size()
        Nb = unit_chunk or C_BLOCK_UNITS or max(512, C_BLOCK_BYTES // max(1, per_unit))
    parts = 1 if x.device.type != "cpu" else loader.team_size(torch.get_num_threads(),
                                                              N // C_CHUNK)
    # T > 1: one unit range per thread, torch single-threaded there; subnormals flushed
    ranges = _thread_ranges(N, parts)
    Ks = [{k: x.new_zeros(n, m) for k in BLOCK_NAMES} if blocks else x.new_zeros(n, m)
          for _ in ranges]
    _features_c.run_flushed(
        [functools.partial(_unit_range, model, x, x2, truncated2, same, G, K, u0, u1, Nb, use_c)
         for K, (u0, u1) in zip(Ks, ranges)], parts, x.device)
    K = Ks[0]
    for other in Ks[1:]:
        if blocks:
            for k in K:
                K[k].add_(other[k])
        else:
            K.add_(other)
    if blocks:
        return {k: v.div_(N) for k, v in K.items()}
    return K.div_(N)


def _units_kernel(model: MeanFieldRNN, x: Tensor, x2: Tensor | None = None, *,
                  blocks: bool = False, chunk_size: int | None = None,
                  names: tuple[str, ...] | None = None) -> Tensor | dict[str, Tensor]:
    """:func:`structured_ntk` with the signature of :data:`KERNELS` (``names``: the blocks kept,
    the others frozen; ``chunk_size``: units per block)."""
    if names is None or set(names) >= set(BLOCK_NAMES):
        return structured_ntk(model, x, x2, unit_chunk=chunk_size, blocks=blocks)
    B = structured_ntk(model, x, x2, unit_chunk=chunk_size, blocks=True)
    B = {k: v for k, v in B.items() if k in names}
    return B if blocks else sum(B.values())


#: family structure key (``family_of(model).structure``) → structured kernel
#: ``f(model, x, x2=None, *, blocks, chunk_size, names)``: the one dispatch of method "structured"
KERNELS = {"units": _units_kernel, **recurrent.KERNELS}
