"""How the cost of one online SGD step grows with N, and what ensembles buy (issue: fast training).

    python -m benchmarks.bench_scaling [--min-log2 8] [--max-log2 18] [--target 0.12] [--compile]

1. Steps/s for N = 2^8..2^18 (d = 4, float32, CPU): the naive autograd loop (``bench_train``:
   nn.Module + backward() + torch.optim.SGD, truncated gradient) and the reference ``rtrl_step``,
   each at 1 torch thread and at all threads, then ``FastStepper`` (eager torch ops, 1 thread; and
   the compiled kernel). Each cell is the median of 3 timed runs, interleaved across methods, of
   ~``target`` seconds each (steps chosen per method and N). The knee: with per-step cost fitted
   as a + b·N, N_knee = a / b is where the part that grows with N equals the fixed overhead.
2. Ensembles at N = 1024: network-steps/s of E = 1, 4, 16 members trained as one computation vs 16
   single runs one after another (with ``rtrl_step`` and with ``FastStepper``).
3. ``--compile``: torch.compile of an 8-step block (compile time and steps/s) at N = 1024.
4. With CUDA: the same on the GPU (reference, eager, CUDA graphs; ensembles).

Timings on a shared machine are noisy; compare ratios within one run, not across machines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch

from ntk_rnn import MeanFieldRNN, OnlineState, rtrl_step
from ntk_rnn.online.ensemble import EnsembleStepper
from ntk_rnn.online.fast import KERNEL, FastStepper

from .bench_train import naive_runner
from .common import machine

Runner = Callable[[int], float]  # run n steps, return seconds


def _data(n: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X.to(device, dtype), torch.tanh(X[:, 0]).to(device, dtype)


class _Cursor:
    """Steps through a fixed data set cyclically, so repeated timings see fresh elements."""

    def __init__(self, X, Y):
        self.X, self.Y, self.k = X, Y, 0

    def take(self, n: int):
        if self.k + n > self.X.shape[0]:
            self.k = 0
        X, Y = self.X[self.k: self.k + n], self.Y[self.k: self.k + n]
        self.k += n
        return X, Y


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def naive(N: int, d: int, cur: _Cursor, threads: int) -> Runner:
    model = MeanFieldRNN(d, N, seed=0)
    run = naive_runner(model, model.learning_rate(1.0))

    def go(n: int) -> float:
        torch.set_num_threads(threads)
        return run(*cur.take(n))
    return go


def reference(N: int, d: int, cur: _Cursor, threads: int, device: str = "cpu") -> Runner:
    model = MeanFieldRNN(d, N, seed=0, device=device)
    st, lr = OnlineState.zeros(model), model.learning_rate(1.0)

    def go(n: int) -> float:
        torch.set_num_threads(threads)
        X, Y = cur.take(n)
        out = torch.empty_like(Y)
        _sync(device)
        t = time.perf_counter()
        for k in range(n):
            out[k] = rtrl_step(model, st, X[k], Y[k], lr)
        _sync(device)
        return time.perf_counter() - t
    return go


def fast(N: int, d: int, cur: _Cursor, backend: str, threads: int = 1,
         device: str = "cpu") -> Runner:
    model = MeanFieldRNN(d, N, seed=0, device=device)
    stepper = FastStepper(model, model.learning_rate(1.0), backend=backend)

    def go(n: int) -> float:
        torch.set_num_threads(threads)
        X, Y = cur.take(n)
        out = torch.empty_like(Y)
        _sync(device)
        t = time.perf_counter()
        stepper.run_chunk(X, Y, out=out)
        _sync(device)
        return time.perf_counter() - t
    return go


def measure(runners: dict[str, Runner], target: float, repeats: int = 3,
            max_steps: int = 1 << 19, min_steps: int = 4) -> dict[str, float]:
    """Median seconds per step of each runner; steps per timed run chosen so it lasts ~target."""
    steps = {}
    for name, run in runners.items():  # warm-up + calibration
        n = min_steps
        while True:
            dt = run(n)
            if dt > target / 8 or n >= max_steps:
                break
            n = min(max_steps, n * 4)
        steps[name] = int(min(max_steps, max(min_steps, target / max(dt / n, 1e-9))))
    per_step: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):  # interleaved: every method sees the same machine load pattern
        for name, run in runners.items():
            per_step[name].append(run(steps[name]) / steps[name])
    return {k: statistics.median(v) for k, v in per_step.items()}


def knee(Ns: list[int], t: list[float]) -> tuple[float, float, float]:
    """(a, b, a/b) of per-step cost t ≈ a + b N, least squares in relative error (weights 1/t²,
    so small and large N count alike)."""
    N, y = np.asarray(Ns, dtype=float), np.asarray(t, dtype=float)
    A = np.stack([np.ones_like(N), N], 1) / y[:, None]
    a, b = np.linalg.lstsq(A, np.ones_like(y), rcond=None)[0]
    return float(a), float(b), (float(a / b) if b > 0 else float("inf"))


def scaling_table(min_log2: int, max_log2: int, d: int, target: float, device: str = "cpu"
                  ) -> None:
    all_threads = torch.get_num_threads()
    Ns = [1 << j for j in range(min_log2, max_log2 + 1)]
    if device == "cpu":
        cols = {"naive@1t": None, f"naive@{all_threads}t": None, "rtrl_step@1t": None,
                f"rtrl_step@{all_threads}t": None, "fast eager@1t": None, "fast kernel": None}
    else:
        cols = {"rtrl_step": None, "fast eager": None, "fast graphs": None}
    print(f"{'N':>7} " + " ".join(f"{k:>15}" for k in cols) + "   (steps/s)")
    results: dict[str, list[float]] = {k: [] for k in cols}
    t0 = time.perf_counter()
    for N in Ns:
        X, Y = _data(1 << 19 if device == "cpu" else 1 << 16, d, device=device, seed=N)
        cur = _Cursor(X, Y)
        if device == "cpu":
            runners = {
                "naive@1t": naive(N, d, cur, 1),
                f"naive@{all_threads}t": naive(N, d, cur, all_threads),
                "rtrl_step@1t": reference(N, d, cur, 1),
                f"rtrl_step@{all_threads}t": reference(N, d, cur, all_threads),
                "fast eager@1t": fast(N, d, cur, "eager"),
            }
            if KERNEL.status(d).startswith("ok"):
                runners["fast kernel"] = fast(N, d, cur, "kernel")
        else:
            runners = {"rtrl_step": reference(N, d, cur, all_threads, device),
                       "fast eager": fast(N, d, cur, "eager", device=device),
                       "fast graphs": fast(N, d, cur, "graphs", device=device)}
        res = measure(runners, target, max_steps=X.shape[0])
        for k in cols:
            results[k].append(res.get(k, float("nan")))
        print(f"{N:>7} " + " ".join(f"{1 / results[k][-1]:>15.0f}" for k in cols), flush=True)
    torch.set_num_threads(all_threads)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if device == "cpu":
        best_naive = [min(a, b) for a, b in zip(results["naive@1t"],
                                                  results[f"naive@{all_threads}t"], strict=True)]
        fast_key = "fast kernel" if "fast kernel" in results and not math.isnan(
            results["fast kernel"][0]) else "fast eager@1t"
        print(f"\nspeed-up over the faster naive setting ({fast_key}):  " + "  ".join(
            f"N={N}: {bn / f:.0f}x" for N, bn, f in zip(Ns, best_naive, results[fast_key],
                                                        strict=True)))
        if 1024 in Ns:
            i = Ns.index(1024)
            ratio = best_naive[i] / results[fast_key][i]
            print(f"aim (issue): fast step >= 15x naive at N=1024, d={d}, float32 CPU: "
                  f"{ratio:.0f}x -> {'met' if ratio >= 15 else 'NOT met'}")
    print("\nknee (cost per step ~ a + b N; N_knee = a/b, beyond it the cost grows ~linearly):")
    for k, t in results.items():
        if any(math.isnan(v) for v in t) or len(t) < 3:
            continue
        a, b, nk = knee(Ns, t)
        per_unit = [ti / n * 1e9 for ti, n in zip(t, Ns)]
        if b <= 0 or a <= 0.1 * t[0]:  # no visible fixed cost: linear from the smallest N
            print(f"  {k:>15}: linear in N from N={Ns[0]} on (knee below it): "
                  f"{min(per_unit):.2f}..{max(per_unit):.2f} ns/unit/step over the range, "
                  f"{t[0] * 1e6:.2f} us/step at N={Ns[0]}")
            continue
        print(f"  {k:>15}: a = {a * 1e6:8.2f} us, b = {b * 1e9:7.3f} ns/unit, "
              f"N_knee ~ {nk:,.0f}")


def ensemble_table(N: int, d: int, target: float, Es=(1, 4, 16), n_seq: int = 16,
                   device: str = "cpu") -> None:
    X, Y = _data(1 << 16, d, device=device)
    own = torch.stack([X.roll(e, 0) for e in range(max(Es))])  # one stream per member
    Yown = torch.stack([Y.roll(e, 0) for e in range(max(Es))])
    runners: dict[str, Runner] = {}

    def ens_runner(E: int, backend: str, threads: int = 1) -> Runner:
        models = [MeanFieldRNN(d, N, seed=e, device=device) for e in range(E)]
        ens = EnsembleStepper(models, alpha=1.0, backend=backend, threads=threads)
        state = {"k": 0}

        def go(n: int) -> float:
            k = state["k"] if state["k"] + n <= X.shape[0] else 0
            state["k"] = k + n
            out = torch.empty(E, n, dtype=X.dtype, device=device)
            _sync(device)
            t = time.perf_counter()
            ens.run_chunk(own[:E, k: k + n], Yown[:E, k: k + n], out=out)
            _sync(device)
            return (time.perf_counter() - t) / E  # seconds per network-step
        return go

    def seq_runner(kind: str) -> Runner:
        cur = _Cursor(X, Y)
        singles = [reference(N, d, cur, 1, device) if kind == "rtrl_step"
                   else fast(N, d, cur, "auto", device=device) for _ in range(n_seq)]

        def go(n: int) -> float:
            m = max(1, n // n_seq)  # n network-steps split over the n_seq runs
            return sum(run(m) for run in singles) / (m * n_seq) * n
        return go

    backends = ["kernel", "eager"] if device == "cpu" else ["graphs", "eager"]
    if device == "cpu" and not KERNEL.status(d).startswith("ok"):
        backends = ["eager"]
    for be in backends:
        for E in Es:
            runners[f"ensemble {be} E={E}"] = ens_runner(E, be)
    if device == "cpu" and "kernel" in backends and torch.get_num_threads() > 1:
        runners[f"ensemble kernel E={max(Es)} threads=2"] = ens_runner(max(Es), "kernel", 2)
    runners[f"{n_seq} x rtrl_step"] = seq_runner("rtrl_step")
    runners[f"{n_seq} x FastStepper"] = seq_runner("fast")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = measure(runners, target, max_steps=X.shape[0])
    finally:
        torch.set_num_threads(before)
    print(f"{'':>34} {'network-steps/s':>16}")
    for k, v in res.items():
        print(f"{k:>34} {1 / v:>16.0f}")
    seq_ref, seq_fast = res[f"{n_seq} x rtrl_step"], res[f"{n_seq} x FastStepper"]
    best16 = min(v for k, v in res.items() if k.startswith("ensemble") and f"E={max(Es)}" in k)
    print(f"ensemble of {max(Es)} vs {n_seq} sequential single runs: {seq_ref / best16:.1f}x "
          f"(runs with rtrl_step), {seq_fast / best16:.1f}x (runs with FastStepper); aim "
          f">= 8x -> {'met' if seq_ref / best16 >= 8 else 'NOT met'} against rtrl_step runs")


def compile_row(N: int, d: int, K: int = 8, n: int = 4000) -> None:
    """torch.compile of a K-step block of the eager step (exact; the loop is unrolled)."""
    model = MeanFieldRNN(d, N, seed=0)
    c, w, b = (p.detach() for p in (model.c, model.w, model.b))
    S, P, Q = torch.zeros(N), torch.zeros(N, d), torch.zeros(N)
    scale, lr = model.output_scale, model.learning_rate(1.0)

    def block(c, w, b, S, P, Q, X, Y, out):
        for k in range(X.shape[0]):
            x = X[k]
            Sn = torch.tanh(w @ x + b * S)
            ds = 1 - Sn * Sn
            P.copy_(ds[:, None] * (x + b[:, None] * P))
            Q.copy_(ds * (S + b * Q))
            S.copy_(Sn)
            yh = torch.dot(c, Sn) * scale
            out[k] = yh
            g = (Y[k] - yh) * (lr * scale)
            gc = c * g
            w.add_(P * gc[:, None])
            b.add_(Q * gc)
            c.add_(Sn * g)

    X, Y = _data(n, d)
    out = torch.empty(n)
    torch.set_num_threads(1)
    t = time.perf_counter()
    f = torch.compile(block, fullgraph=True, dynamic=False)
    f(c, w, b, S, P, Q, X[:K], Y[:K], out[:K])
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for j in range(0, n - K + 1, K):
            f(c, w, b, S, P, Q, X[j: j + K], Y[j: j + K], out[j: j + K])
        times.append((time.perf_counter() - t) / (n // K * K))
    print(f"torch.compile, {K}-step block, N={N}: compile {compile_s:.1f} s, "
          f"{1 / statistics.median(times):.0f} steps/s")


def main(min_log2: int = 8, max_log2: int = 18, d: int = 4, target: float = 0.12,
         compile: bool = False) -> None:
    print(f"\n== scaling of online training with N (d={d}, float32) — {machine()}")
    print(f"compiled kernel: {KERNEL.status(d)}")
    t0 = time.perf_counter()
    scaling_table(min_log2, max_log2, d, target)
    print(f"\n== ensembles at N=1024 (d={d}, float32, CPU, own stream per member)")
    ensemble_table(1024, d, target)
    if compile:
        print()
        compile_row(1024, d)
    if torch.cuda.is_available():
        print(f"\n== GPU: {torch.cuda.get_device_name(0)}")
        scaling_table(10, max(max_log2, 20), d, target, device="cuda")
        ensemble_table(1024, d, target, Es=(1, 16, 64), device="cuda")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-log2", type=int, default=8)
    ap.add_argument("--max-log2", type=int, default=18)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.12, help="seconds per timed run")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    a = ap.parse_args()
    main(a.min_log2, a.max_log2, a.d, a.target, a.compile)
