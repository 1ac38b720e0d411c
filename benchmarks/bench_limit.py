"""Benchmark of the limit kernel (theory §5): 128 AR(1) windows, d = 1, L = 24, tol = 5e-4.

    python -m benchmarks.bench_limit [--windows 128] [--length 24] [--dim 1] [--tol 5e-4]
                                     [--methods auto rqmc quadrature] [--threads 2]

Prints, per method, the wall time, the estimated max absolute error, the points used, and the
largest difference to the most accurate of the runs (a consistency check).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ntk_rnn import InitLaw, MeanFieldRNN
from ntk_rnn.limit.kernel import limit_ntk


def ar1_windows(n: int, L: int, d: int, a: float = 0.8, seed: int = 0) -> torch.Tensor:
    """n consecutive windows of a stationary AR(1) chain X_k = a X_{k-1} + √(1-a²) ε_k."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n + L + 100, d, generator=g, dtype=torch.float64)
    X = torch.zeros_like(eps)
    for k in range(1, X.shape[0]):
        X[k] = a * X[k - 1] + math.sqrt(1 - a * a) * eps[k]
    return torch.stack([X[100 + i: 100 + i + L] for i in range(n)])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1)
    ap.add_argument("--tol", type=float, default=5e-4)
    ap.add_argument("--methods", nargs="+", default=["auto", "rqmc", "quadrature"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = MeanFieldRNN(args.dim, 8, init=InitLaw(), dtype=torch.float64)
    x = ar1_windows(args.windows, args.length, args.dim)
    print(f"limit_ntk: {args.windows} windows, d={args.dim}, L={args.length}, tol={args.tol:g}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for method in args.methods:
        if method == "quadrature" and args.dim > 2:
            continue
        t0 = time.perf_counter()
        K = limit_ntk(model, x, tol=args.tol, method=method, seed=0)
        rows.append(dict(request=method, method=K.method, seconds=time.perf_counter() - t0,
                         error=K.error, points=K.n_points, converged=K.converged, K=K.value))
    best = min(rows, key=lambda r: r["error"])["K"]
    scale = float(best.diagonal().mean())
    for r in rows:
        diff = float((r["K"] - best).abs().max())
        print(f"  {r['request']:>10} -> {r['method']:<10} {r['seconds']:7.2f} s   "
              f"error {r['error']:.2e} (rel {r['error'] / scale:.1e})   points {r['points']:>8}   "
              f"converged {r['converged']}   max|K - best| {diff:.1e}")
    return [{k: v for k, v in r.items() if k != "K"} for r in rows]


if __name__ == "__main__":
    main()
