"""Structured empirical NTK of networks whose weight matrices are applied at every step: ElmanRNN
and GRURNN ("structured derivatives" of Novak, Sohl-Dickstein & Schoenholz, *Fast Finite Width
Neural Tangent Kernel*, ICML 2022, for recurrent weights).

A matrix W applied as W h_{k−1} at every step k of a window has the gradient Σ_k δ_k ⊗ h_{k−1}
(δ_k the backward vector at its output, h_{k−1} its input), so its block of the kernel is

    ∇_W f(x̄) · ∇_W f(x̄') = Σ_{k,k'} (δ_k · δ'_{k'}) (h_{k−1} · h'_{k'−1})

— two Gram matrices over (window, step) pairs with inner size N, O(n m L L' N), instead of a
Gram of N²-column Jacobians. δ_k and h_{k−1} of every window come from one batched forward and
one backward pass over the window (O(n L N²) as GEMMs). Biases give Σ_{k,k'} δ_k · δ'_{k'} and
the readout c gives S_L · S'_L. Everything is multiplied by ``ntk_scale · output_scale²``
(= N^{2β−1} N^{−2β} = 1/N for the package's models), the normalised kernel of theory §4.

* ElmanRNN, S_{k+1} = σ(w X_k + g A S_k), g = N^{−γ}, f = c·S_L:
  δ_k = σ'(z_k) ⊙ e_{k+1}, e_L = c, e_k = g Aᵀ δ_k;
  blocks c: S_L·S'_L, w: Σ (δ_k·δ'_{k'})(X_k·X'_{k'}), A: g² Σ (δ_k·δ'_{k'})(S_k·S'_{k'}).
* GRURNN (gates r, z, n, ``nn.GRUCell`` order), backward vectors of the gate pre-activations
  δ_r, δ_z, δ_n; the input weights W_ih and b_ih see Δ_i = (δ_r, δ_z, δ_n), the recurrent
  weights W_hh (times g) and b_hh see Δ_h = (δ_r, δ_z, r ⊙ δ_n) (W_hn h enters inside r ⊙ (·)).

The functions here take windows already checked and cast (``empirical.check_inputs``) and return
the kernel, or with ``blocks=True`` one kernel per parameter name (as ``ntk_blocks``); they are
reached through the structure table of :mod:`.structured` (``family_of(model).structure``).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from ..csrc import loader
from . import _features_c

#: Entries of one (rows·L, m·L') Gram block: rows of windows are taken so that each Gram matrix
#: stays ≤ this size (2^22: 16 MiB in float32).
GRAM_ELEMENTS = 2**22
#: Windows of x per thread at least (fewer: one thread; 4 windows at N = 256 took 4.2 ms on
#: 2 threads against 1.8 ms on one).
MIN_WINDOWS_PER_THREAD = 8


def _scale(model: nn.Module) -> float:
    return float(model.ntk_scale) * float(model.output_scale) ** 2


def _both_passes(passes: Callable[[nn.Module, Tensor], dict[str, Tensor]], model: nn.Module,
                 x: Tensor, x2: Tensor | None, parts: int = 1
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The passes of x and x2 (x2 None: the same); windows of equal length go through one pass
    (GEMMs with n + m rows use the CPU better than two with n and m). The windows of a pass are
    split over ``parts`` threads (:func:`._features_c.run_flushed`)."""
    def run(w: Tensor) -> dict[str, Tensor]:
        cuts = [w.shape[0] * t // parts for t in range(parts + 1)]
        got = _features_c.run_flushed([functools.partial(passes, model, w[a:b])
                                       for a, b in zip(cuts[:-1], cuts[1:]) if b > a], parts)
        return got[0] if len(got) == 1 else {k: torch.cat([F[k] for F in got]) for k in got[0]}

    if x2 is None:
        F = run(x)
        return F, F
    if x2.shape[1] != x.shape[1]:
        return run(x), run(x2)
    n = x.shape[0]
    F = run(torch.cat([x, x2]))
    return {k: v[:n] for k, v in F.items()}, {k: v[n:] for k, v in F.items()}


def _parts(x: Tensor) -> int:
    """Threads for the passes and Grams: torch's intra-op threads on the CPU, at most one per
    ``MIN_WINDOWS_PER_THREAD`` windows of x; 1 elsewhere."""
    if x.device.type != "cpu":
        return 1
    return loader.team_size(torch.get_num_threads(), x.shape[0] // MIN_WINDOWS_PER_THREAD)


# --- per-window passes ----------------------------------------------------------------------------
def elman_passes(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Forward and backward over windows x (n, L, d) of an ElmanRNN, θ frozen: {"S": the states
    S_0..S_{L−1} (n, L, N) (S_0 = 0), "SL": S_L (n, N), "d": δ_0..δ_{L−1} (n, L, N)}."""
    n, L, _ = x.shape
    A, w, c = (t.detach() for t in (model.A, model.w, model.c))
    g, act = float(model.recurrent_scale), model.act
    N = A.shape[0]
    S = x.new_zeros(n, L + 1, N)
    D = x.new_empty(n, L, N)  # σ'(z_k), then δ_k in place
    u = torch.matmul(x, w.T)  # (n, L, N)
    for k in range(L):
        z = torch.addmm(u[:, k], S[:, k], A.T, alpha=g) if k else u[:, k]
        s, ds = act.value_and_deriv(z)
        S[:, k + 1] = s
        D[:, k] = ds
    e = c.expand(n, N)
    for k in range(L - 1, -1, -1):
        dk = D[:, k].mul_(e)
        if k:
            e = torch.mm(dk, A).mul_(g)
    return {"S": S[:, :L], "SL": S[:, L], "d": D}


def gru_passes(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Forward and backward over windows x (n, L, d) of a GRURNN, θ frozen: {"h": states
    h_0..h_{L−1} (n, L, N), "hL": h_L, "rz": (δ_r, δ_z) (n, L, 2N), "n": δ_n (n, L, N),
    "rn": r ⊙ δ_n (n, L, N)}."""
    n, L, _ = x.shape
    cell, c = model.cell, model.c.detach()
    Wih, Whh = cell.weight_ih.detach(), cell.weight_hh.detach()
    bias = bool(model.bias)
    g = float(model.recurrent_scale)
    N = Whh.shape[1]
    gi = torch.matmul(x, Wih.T)  # (n, L, 3N)
    if bias:
        gi = gi + cell.bias_ih.detach()
    H = x.new_zeros(n, L + 1, N)
    R, Z, Nn, Hn = (x.new_empty(n, L, N) for _ in range(4))
    for k in range(L):
        h = H[:, k]
        if k:
            gh = torch.mm(h, Whh.T).mul_(g)
            if bias:
                gh += cell.bias_hh.detach()
        else:  # h_0 = 0
            gh = (cell.bias_hh.detach() if bias else x.new_zeros(3 * N)).expand(n, 3 * N)
        i_r, i_z, i_n = gi[:, k].chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r, out=R[:, k])
        z = torch.sigmoid(i_z + h_z, out=Z[:, k])
        nk = torch.tanh(torch.addcmul(i_n, r, h_n), out=Nn[:, k])
        Hn[:, k] = h_n
        H[:, k + 1] = nk + z * (h - nk)
    Drz = x.new_empty(n, L, 2 * N)
    Dn, Drn = x.new_empty(n, L, N), x.new_empty(n, L, N)
    e = c.expand(n, N)
    for k in range(L - 1, -1, -1):
        r, z, nk, h = R[:, k], Z[:, k], Nn[:, k], H[:, k]
        dn = torch.mul(e * (1 - z), 1 - nk * nk, out=Dn[:, k])  # δ_n
        torch.mul(e * (h - nk), z * (1 - z), out=Drz[:, k, N:])  # δ_z
        torch.mul(dn * Hn[:, k], r * (1 - r), out=Drz[:, k, :N])  # δ_r
        torch.mul(r, dn, out=Drn[:, k])  # r ⊙ δ_n
        if k:
            e = torch.addmm(e * z, Drz[:, k], Whh[: 2 * N], alpha=g)
            e.addmm_(Drn[:, k], Whh[2 * N:], alpha=g)
    return {"h": H[:, :L], "hL": H[:, L], "rz": Drz, "n": Dn, "rn": Drn}


# --- Gram assembly --------------------------------------------------------------------------------
def _gram(a: Tensor, b: Tensor) -> Tensor:
    """(r, L, M), (m, L', M) → (r, L, m, L'): all (window, step) inner products."""
    r, L, M = a.shape
    m, L2, _ = b.shape
    return torch.mm(a.reshape(r * L, M), b.reshape(m * L2, M).T).view(r, L, m, L2)


def _pair_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ_{k,k'} a_{i k j k'} b_{i k j k'} → (r, m)."""
    return (a * b).sum((1, 3))


def _row_blocks(n: int, L: int, mL2: int, chunk: int | None, parts: int = 1
                ) -> list[tuple[int, int]]:
    """Row ranges of x: each Gram block ≤ ``GRAM_ELEMENTS`` (or ``chunk`` rows), and at least
    ``parts`` ranges when there are that many rows."""
    rows = chunk or min(max(1, GRAM_ELEMENTS // max(1, L * mL2)), -(-n // parts))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _kernel(model: nn.Module, x: Tensor, x2: Tensor | None, names: tuple[str, ...],
            blocks: bool, chunk_size: int | None,
            passes: Callable[[nn.Module, Tensor], dict[str, Tensor]], last: str,
            fill: Callable[..., None]) -> Tensor | dict[str, Tensor]:
    """The passes of both sides, the readout block "c" from the last states ``F[last]``, then
    ``fill(out, rows, F1, F2, x, x2)`` for each block of rows of x (the Gram blocks), all with
    subnormals flushed (the δ_k underflow; :func:`._features_c.run_flushed`)."""
    parts = _parts(x)
    x2_ = x if x2 is None else x2
    n, m = x.shape[0], x2_.shape[0]
    with torch.inference_mode():
        F1, F2 = _both_passes(passes, model, x, x2, parts)
        out = {k: x.new_empty(n, m) for k in names}
        if "c" in out:
            torch.mm(F1[last], F2[last].T, out=out["c"])
        _features_c.run_flushed(
            [functools.partial(fill, out, slice(i0, i1), F1, F2, x, x2_)
             for i0, i1 in _row_blocks(n, x.shape[1], m * x2_.shape[1], chunk_size, parts)],
            parts)
    return _finish(model, out, blocks, x2 is None)


def elman_kernel(model: nn.Module, x: Tensor, x2: Tensor | None = None, *,
                 blocks: bool = False, chunk_size: int | None = None,
                 names: tuple[str, ...] | None = None) -> Tensor | dict[str, Tensor]:
    """Normalised NTK of an ElmanRNN between windows x (n, L, d) and x2 (m, L', d) (default x),
    from the per-step δ's and states (module docstring). ``blocks``: {"c", "w", "A"} kernels;
    ``names``: only these blocks (the trainable ones); ``chunk_size``: windows of x per Gram
    block (default: Gram blocks ≤ ``GRAM_ELEMENTS``)."""
    g2 = float(model.recurrent_scale) ** 2

    def fill(out: dict, rows: slice, F1: dict, F2: dict, x: Tensor, x2: Tensor) -> None:
        Dd = _gram(F1["d"][rows], F2["d"])
        if "w" in out:
            out["w"][rows] = _pair_sum(Dd, _gram(x[rows], x2))
        if "A" in out:
            out["A"][rows] = _pair_sum(Dd, _gram(F1["S"][rows], F2["S"])).mul_(g2)

    return _kernel(model, x, x2, tuple(names or ("c", "w", "A")), blocks, chunk_size,
                   elman_passes, "SL", fill)


def gru_kernel(model: nn.Module, x: Tensor, x2: Tensor | None = None, *,
               blocks: bool = False, chunk_size: int | None = None,
               names: tuple[str, ...] | None = None) -> Tensor | dict[str, Tensor]:
    """Normalised NTK of a GRURNN (as :func:`elman_kernel`); blocks named as its parameters:
    "c", "cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh"."""
    names = tuple(names or ("c", "cell.weight_ih", "cell.weight_hh") + (
        ("cell.bias_ih", "cell.bias_hh") if model.bias else ()))
    g2 = float(model.recurrent_scale) ** 2
    need_i = "cell.weight_ih" in names or "cell.bias_ih" in names
    need_h = "cell.weight_hh" in names or "cell.bias_hh" in names

    def fill(out: dict, rows: slice, F1: dict, F2: dict, x: Tensor, x2: Tensor) -> None:
        Grz = _gram(F1["rz"][rows], F2["rz"])
        if need_i:  # Δ_i·Δ'_i = δ_r·δ'_r + δ_z·δ'_z + δ_n·δ'_n
            Gi = _gram(F1["n"][rows], F2["n"]).add_(Grz)
            if "cell.weight_ih" in out:
                out["cell.weight_ih"][rows] = _pair_sum(Gi, _gram(x[rows], x2))
            if "cell.bias_ih" in out:
                out["cell.bias_ih"][rows] = Gi.sum((1, 3))
        if need_h:  # Δ_h·Δ'_h = δ_r·δ'_r + δ_z·δ'_z + (r δ_n)·(r' δ'_n)
            Gh = _gram(F1["rn"][rows], F2["rn"]).add_(Grz)
            if "cell.weight_hh" in out:
                out["cell.weight_hh"][rows] = _pair_sum(Gh, _gram(F1["h"][rows], F2["h"])).mul_(g2)
            if "cell.bias_hh" in out:
                out["cell.bias_hh"][rows] = Gh.sum((1, 3))

    return _kernel(model, x, x2, names, blocks, chunk_size, gru_passes, "hL", fill)


def _finish(model: nn.Module, out: dict[str, Tensor], blocks: bool, sym: bool
            ) -> Tensor | dict[str, Tensor]:
    """Scaled normal tensors (out of inference mode); ``sym`` (x2 = x): made exactly symmetric."""
    s = _scale(model)
    if sym:
        out = {k: torch.add(v, v.T).mul_(0.5 * s) for k, v in out.items()}
    else:
        out = {k: v.clone().mul_(s) for k, v in out.items()}
    if blocks:
        return out
    it = iter(out.values())
    K = next(it)
    for v in it:
        K.add_(v)
    return K


#: family structure key → kernel function (model, x, x2, *, blocks, chunk_size, names)
KERNELS: dict[str, Callable[..., Tensor | dict[str, Tensor]]] = {
    "elman": elman_kernel,
    "gru": gru_kernel,
}


def window_bytes(model: nn.Module, L: int, structure: str) -> int:
    """Bytes kept per window by the passes (states and backward vectors): what a memory budget
    divides (``ntk.large``)."""
    N = int(model.width)
    per_step = 2 * N if structure == "elman" else 5 * N
    return (L + 1) * per_step * next(model.parameters()).element_size()
