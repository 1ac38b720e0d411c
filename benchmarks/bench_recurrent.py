"""Empirical NTK of ElmanRNN and GRURNN against the torch.func tutorial on a plain module.

Baseline: the tutorial's jacobian-contraction recipe (``bench_ntk.tutorial_jacobian``:
``vmap(jacrev)`` on both inputs, ``einsum`` per parameter) on a module written by hand as a user
would — an explicit loop ``S = σ(x_k wᵀ + g S Aᵀ)`` (Elman) or the GRU gate formulas (GRU),
output N^{-β} c·S_L — holding the model's parameters. Rows: the baseline, ``empirical_ntk`` with
the default method (``auto``: the structured kernel of ``ntk.recurrent``), and
``empirical_ntk(method="jacobian")`` (the generic path, which must not cost more than the
tutorial). Same inputs, one process, 1 thread, min of several runs (one or two for rows over
5 s); each row prints the CPU's vector ISA, the load average and the relative difference from
the baseline's kernel (float32: ≤ 1e-5 expected).

Run: ``python -m benchmarks.bench_recurrent`` (N = 2048, 32 windows of length 16 on each side,
d = 1, float32: several minutes, the tutorial rows dominate); ``--quick`` (or
``NTK_BENCH_QUICK=1``): N = 512.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from ntk_rnn import GRURNN, ElmanRNN
from ntk_rnn.ntk import choose_method, empirical_ntk, relative_frobenius

from .bench_ntk import min_times, tutorial_jacobian
from .common import isa, machine

FULL = dict(N=2048, n=32, L=16, d=1)
QUICK = dict(N=512, n=32, L=16, d=1)


class PlainElman(nn.Module):
    """Elman written by hand: S ← σ(x_k wᵀ + g S Aᵀ), output N^{-β} c·S_L, (B, L, d) → (B,)."""

    def __init__(self, model: ElmanRNN) -> None:
        super().__init__()
        self.c, self.w, self.A = (nn.Parameter(t.detach().clone())
                                  for t in (model.c, model.w, model.A))
        self.g, self.scale, self.act = model.recurrent_scale, model.output_scale, model.act.fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.new_zeros(x.shape[0], self.c.shape[0])
        for k in range(x.shape[1]):
            S = self.act(x[:, k] @ self.w.T + self.g * S @ self.A.T)
        return self.scale * (S @ self.c)


class PlainGRU(nn.Module):
    """GRU written by hand (nn.GRUCell's formulas; torch.gru_cell has no vmap rule), output
    N^{-β} c·h_L."""

    def __init__(self, model: GRURNN) -> None:
        super().__init__()
        cell = model.cell
        self.c = nn.Parameter(model.c.detach().clone())
        self.W_ih = nn.Parameter(cell.weight_ih.detach().clone())
        self.W_hh = nn.Parameter(cell.weight_hh.detach().clone())
        self.b_ih = nn.Parameter(cell.bias_ih.detach().clone())
        self.b_hh = nn.Parameter(cell.bias_hh.detach().clone())
        self.g, self.scale = model.recurrent_scale, model.output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.c.shape[0])
        for k in range(x.shape[1]):
            i_r, i_z, i_n = (x[:, k] @ self.W_ih.T + self.b_ih).chunk(3, -1)
            h_r, h_z, h_n = (self.g * h @ self.W_hh.T + self.b_hh).chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        return self.scale * (h @ self.c)


def setup(kind: str, N: int, n: int, L: int, d: int):
    """(model, plain module, x1, x2) for kind 'elman-mean_field', 'elman-ntk' or 'gru'."""
    if kind == "gru":
        model = GRURNN(d, N, seed=0)
        plain: nn.Module = PlainGRU(model)
    else:
        model = ElmanRNN(d, N, recurrent_scaling=kind.split("-", 1)[1], seed=0)
        plain = PlainElman(model)
    g = torch.Generator().manual_seed(0)
    return model, plain, torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)


BASE = "tutorial jacobian, plain module [baseline]"


def rows(model, plain, x1, x2) -> dict:
    s = model.ntk_scale
    return {
        BASE: lambda: tutorial_jacobian(plain, x1, x2, s),
        f"empirical_ntk default ({choose_method(model, len(x1), len(x2), x=x1)})":
            lambda: empirical_ntk(model, x1, x2),
        "empirical_ntk method=jacobian": lambda: empirical_ntk(model, x1, x2, method="jacobian"),
    }


def main(quick: bool | None = None, kinds=("elman-mean_field", "elman-ntk", "gru"),
         repeats: int = 3, skip: tuple[str, ...] = ()) -> dict:
    if quick is None:
        quick = bool(os.environ.get("NTK_BENCH_QUICK"))
    size = QUICK if quick else FULL
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\n== empirical NTK of ElmanRNN / GRURNN (N={size['N']}, n=m={size['n']} windows, "
          f"L={size['L']}, d={size['d']}, float32, 1 thread) — {machine()}")
    print("   baseline: the torch.func tutorial's jacobian recipe on a plain hand-written module "
          "with the same parameters and inputs")
    out = {}
    try:
        for kind in kinds:
            model, plain, x1, x2 = setup(kind, **size)
            print(f"\n-- {kind}")
            print(f"{'K(x1, x2)':<46} {'min ms':>10} {'runs':>4} {'time/base':>10} "
                  f"{'speed-up':>9} {'CPU ms':>10} {'CPU speed-up':>12} {'rel.diff':>9}  "
                  "ISA, load")
            times, cpu, Ks = {}, {}, {}
            for name, fn in rows(model, plain, x1, x2).items():
                if any(s in name for s in skip):
                    continue
                times[name], cpu[name], runs, Ks[name] = min_times(fn, repeats)
                base, base_cpu = times.get(BASE), cpu.get(BASE)
                ratio = (f"{times[name] / base:9.3f}x {base / times[name]:8.1f}x "
                         f"{cpu[name] * 1e3:10.1f} {base_cpu / cpu[name]:11.1f}x") if base else \
                    f"{'-':>10} {'-':>9} {cpu[name] * 1e3:10.1f} {'-':>12}"
                diff = relative_frobenius(Ks[name], Ks[BASE]) if BASE in Ks else float("nan")
                print(f"{name:<46} {times[name] * 1e3:10.1f} {runs:>4} {ratio} {diff:9.1e}  "
                      f"[{isa()}, load {os.getloadavg()[0]:.2f}]", flush=True)
            out[kind] = times
    finally:
        torch.set_num_threads(old)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=512")
    ap.add_argument("--kinds", nargs="+", default=["elman-mean_field", "elman-ntk", "gru"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="substrings of row labels not to run")
    args = ap.parse_args()
    main(quick=args.quick or None, kinds=tuple(args.kinds), repeats=args.repeats,
         skip=tuple(args.skip))
