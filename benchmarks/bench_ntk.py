"""Empirical NTK speed: the PyTorch tutorial's Jacobian contraction vs the structured engine.

Baseline (torch.func "Neural Tangent Kernels" tutorial): ``vmap(jacrev(fnet_single))`` for both
inputs, then ``einsum('Naf,Mbf->NMab')`` per parameter, summed. Ours: ``method="structured"``
(per-unit features, one Gram GEMM), also compared to that final GEMM alone, Φ Φ'ᵀ on prebuilt
features. Same model and inputs, one process; median of several repeats.
Run: ``python -m benchmarks.bench_ntk``.
"""

from __future__ import annotations

import os

import torch
from torch.func import functional_call, jacrev, vmap

from ntk_rnn import MeanFieldRNN
from ntk_rnn.ntk import empirical_ntk, relative_frobenius, unit_feature_matrix

from .common import best_time, machine


def tutorial_ntk(model: MeanFieldRNN, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The tutorial's empirical_ntk_jacobian_contraction, output = last step, scaled N^{2β−1}."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),))[:, -1]  # (1,) = one output

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    pairs = zip(jac1, jac2, strict=True)
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in pairs])
    return result.sum(0)[:, :, 0, 0] * model.ntk_scale


def _table(model, x1, x2, repeats: int) -> None:
    F1, F2 = unit_feature_matrix(model, x1), unit_feature_matrix(model, x2)
    t_tut = best_time(lambda: tutorial_ntk(model, x1, x2), repeats=3)
    t_str = best_time(lambda: empirical_ntk(model, x1, x2, method="structured"), repeats)
    t_gemm = best_time(lambda: F1 @ F2.T, repeats)
    t_sym = best_time(lambda: empirical_ntk(model, x1, method="structured"), repeats)
    t_gsym = best_time(lambda: F1 @ F1.T, repeats)
    rows = [
        ("tutorial vmap(jacrev)+einsum, K(x1,x2)", t_tut, ""),
        ("structured, K(x1,x2)", t_str, f"{t_tut / t_str:.1f}x faster than tutorial (aim >= 25)"),
        ("  its Gram GEMM alone F1 F2^T", t_gemm,
         f"structured = {t_str / t_gemm:.2f}x GEMM (aim <= 5)"),
        ("structured, K(x1,x1)", t_sym, f"structured = {t_sym / t_gsym:.2f}x GEMM"),
        ("  its Gram GEMM alone F1 F1^T", t_gsym, ""),
    ]
    print(f"{'method':<42} {'median ms':>10}  note")
    for name, t, note in rows:
        print(f"{name:<42} {t * 1e3:10.2f}  {note}")


def main(N: int = 4096, n: int = 128, L: int = 32, d: int = 4, repeats: int = 7,
         threads: tuple[int | None, ...] = (None, 1)) -> None:
    """One table per thread count (None = torch's default), all methods timed under it."""
    print(f"\n== empirical NTK (N={N}, n=m={n}, L={L}, d={d}, float32, CPU) — {machine()}")
    model = MeanFieldRNN(d, N, seed=0)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
    err = relative_frobenius(empirical_ntk(model, x1, x2, method="structured"),
                             tutorial_ntk(model, x1, x2))
    print(f"   relative Frobenius difference structured vs tutorial: {err:.2e}")
    default = torch.get_num_threads()
    for t in dict.fromkeys(default if t is None else t for t in threads):
        torch.set_num_threads(t)
        print(f"-- {t} thread(s), load average {os.getloadavg()[0]:.2f} "
              "(other processes make timings noisy)")
        _table(model, x1, x2, repeats)
    torch.set_num_threads(default)


if __name__ == "__main__":
    main()
