"""Empirical NTK speed and memory, every ratio against the PyTorch tutorial on a plain module.

Baseline ("Neural Tangent Kernels" tutorial of torch.func, applied as a user would): a plain
module written by hand — ``S = tanh(x_k @ w.T + b * S)`` for k = 1..L, output N^{-β} c·S_L, one
scalar per window — holding MeanFieldRNN's c, w, b, and the tutorial's two recipes verbatim:

* jacobian contraction: ``vmap(jacrev(fnet_single))`` on both inputs, then
  ``einsum('Naf,Mbf->NMab')`` per parameter, summed (``fnet_single`` unsqueezes one window to a
  batch of one, as in the tutorial);
* NTK-vector products: ``vmap(vmap(get_ntk))`` over the window pairs, each a ``vjp`` on the x1
  window and a ``jvp`` on the x2 window.

Rows: those baselines; the tutorial's jacobian recipe on ``MeanFieldRNN`` itself (forward
returning all L outputs, ``[:, -1]`` taken — what a user of our model gets); ``empirical_ntk``
with each method; the structured engine's final Gram GEMM on prebuilt features (its floor); and
Model F (feedback) against a plain feedback loop. Same inputs, one process, 1 and 2 threads
(``torch.set_num_threads``), min of several repeats (one run for rows over ~5 s). Peak memory of
each method is measured in a fresh subprocess (``resource.getrusage`` ru_maxrss, 1 thread).

Run: ``python -m benchmarks.bench_ntk`` (N = 4096, n = m = 128, L = 32, d = 4, float32, a few
minutes); ``--quick`` (or ``NTK_BENCH_QUICK=1`` for ``make bench``): N = 1024, n = m = 32, L = 16.
``--large [--quick] [--threads 1]``: ``blocked_ntk`` on n = 4096 windows at N = 65536 within a
2 GiB budget (structured and jacobian; tens of minutes on one core), time and peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ntk_rnn import MeanFieldRNN
from ntk_rnn.ntk import _features_c, empirical_ntk, relative_frobenius, unit_feature_matrix

from .common import isa, machine

FULL = dict(N=4096, n=128, L=32, d=4)
QUICK = dict(N=1024, n=32, L=16, d=4)


# --- the baseline: a module as a user would write it ---------------------------------------------
class PlainRNN(nn.Module):
    """Model D written by hand: an explicit loop, one output per window (B, L, d) → (B,)."""

    def __init__(self, c: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.c, self.w, self.b = (nn.Parameter(t.detach().clone()) for t in (c, w, b))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.new_zeros(x.shape[0], self.c.shape[0])
        for k in range(x.shape[1]):
            S = torch.tanh(x[:, k] @ self.w.T + self.b * S)
        return self.scale * (S @ self.c)


class PlainFeedback(PlainRNN):
    """Model F written by hand: m ← N^{-β} c·tanh(w x_k + b m), output m_L (B,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.new_zeros(x.shape[0])
        for k in range(x.shape[1]):
            m = self.scale * (torch.tanh(x[:, k] @ self.w.T + m[:, None] * self.b) @ self.c)
        return m


def plain_copy(model: MeanFieldRNN) -> PlainRNN:
    cls = PlainFeedback if model.recurrence == "feedback" else PlainRNN
    return cls(model.c, model.w, model.b, model.output_scale)


# --- the tutorial's recipes, verbatim up to the output selection ---------------------------------
def tutorial_jacobian(net: nn.Module, x1, x2, scale: float = 1.0, select=None) -> torch.Tensor:
    """empirical_ntk_jacobian_contraction of the tutorial; ``select`` picks one output from the
    batch-of-one forward (default: the module already returns one scalar per window)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        out = functional_call(net, params, (x.unsqueeze(0),))
        return (out if select is None else select(out)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(1)[:, None] for j in jac1.values()]  # (N, a=1, f)
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(1)[:, None] for j in jac2.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)[:, :, 0, 0] * scale


def tutorial_ntk_vp(net: nn.Module, x1, x2, scale: float = 1.0) -> torch.Tensor:
    """empirical_ntk_ntk_vps of the tutorial (compute='full', one output per window)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def func(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis.view(output.numel(), -1).view(-1))  # scalar output

    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)[..., 0] * scale


# --- timing --------------------------------------------------------------------------------------
def min_times(fn: Callable[[], object], repeats: int) -> tuple[float, float, int, object]:
    """(min wall time, min CPU time of this process, runs, result): one warm-up and ``repeats``
    runs; when the warm-up takes > 5 s, the min of it and one more run. CPU time
    (``time.process_time``, all threads) is what a loaded machine hardly distorts for one
    thread: the ratios of 1-thread rows are printed in both."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    if first > 5.0:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return (min(first, time.perf_counter() - t), min(first_cpu, time.process_time() - c), 2,
                out)
    times, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(times), min(cpus), repeats, out


def min_time(fn: Callable[[], object], repeats: int) -> tuple[float, int, object]:
    """(min wall time, runs, result) of :func:`min_times`."""
    wall, _, runs, out = min_times(fn, repeats)
    return wall, runs, out


def setup(N: int, n: int, L: int, d: int, recurrence: str = "diagonal"):
    model = MeanFieldRNN(d, N, seed=0, recurrence=recurrence)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
    return model, plain_copy(model), x1, x2


def candidates(model, plain, x1, x2) -> dict[str, Callable[[], torch.Tensor]]:
    """Every timed computation of K(x1, x2), by row label."""
    s = model.ntk_scale
    rows = {
        "tutorial jacobian, plain module [baseline]":
            lambda: tutorial_jacobian(plain, x1, x2, s),
        "tutorial ntk-vp, plain module":
            lambda: tutorial_ntk_vp(plain, x1, x2, s),
        "tutorial jacobian on MeanFieldRNN (all L out, [:, -1])":
            lambda: tutorial_jacobian(model, x1, x2, s, select=lambda y: y[:, -1]),
        "empirical_ntk jacobian": lambda: empirical_ntk(model, x1, x2, method="jacobian"),
        "empirical_ntk ntk_vp": lambda: empirical_ntk(model, x1, x2, method="ntk_vp"),
    }
    if model.recurrence == "diagonal":
        rows["empirical_ntk structured"] = lambda: empirical_ntk(model, x1, x2, method="structured")
    return rows


BASE = "tutorial jacobian, plain module [baseline]"
GEMM = "  structured's Gram GEMM alone F1 F2^T"


def _table(model, plain, x1, x2, repeats: int, skip: set[str], agreement: bool) -> dict:
    """Time every row (min of ``repeats``) and print ms, time / baseline and speed-up; with
    ``agreement`` also each result's relative Frobenius difference from the reference."""
    rows = {k: v for k, v in candidates(model, plain, x1, x2).items() if k not in skip}
    times, cpu, runs, outs = {}, {}, {}, {}
    for name, fn in rows.items():
        times[name], cpu[name], runs[name], outs[name] = min_times(fn, repeats)
    if model.recurrence == "diagonal":
        F1, F2 = unit_feature_matrix(model, x1), unit_feature_matrix(model, x2)
        times[GEMM], cpu[GEMM], runs[GEMM], _ = min_times(lambda: F1 @ F2.T, repeats)
    ref = "empirical_ntk structured" if "empirical_ntk structured" in outs else BASE
    base, base_cpu = times[BASE], cpu[BASE]
    print(f"{'K(x1, x2)':<56} {'min ms':>10} {'runs':>4}  {'time/baseline':>13}  "
          f"{'speed-up':>8} {'CPU ms':>9} {'CPU speed-up':>12}"
          + ("  rel. diff vs " + ref.split()[-1] if agreement else "") + "  [ISA, load]")
    tag = f"  [{isa()}, load {os.getloadavg()[0]:.2f}]"
    for name, t in times.items():
        diff = ""
        if agreement and name in outs and name != ref:
            diff = f"  {relative_frobenius(outs[name], outs[ref]):.1e}"
        print(f"{name:<56} {t * 1e3:10.1f} {runs[name]:>4}  {t / base:12.2f}x  "
              f"{base / t:7.1f}x {cpu[name] * 1e3:9.1f} {base_cpu / cpu[name]:11.1f}x{diff}{tag}")
    if GEMM in times and "empirical_ntk structured" in times:
        st_name = "empirical_ntk structured"
        print(f"{'  structured / its own Gram GEMM (wall; CPU)':<56} "
              f"{times[st_name] / times[GEMM]:10.2f}x {cpu[st_name] / cpu[GEMM]:.2f}x{tag}")
    return times


# --- memory (one method per subprocess) ----------------------------------------------------------
def _vm(field: str) -> float | None:
    """/proc/self/status field in MB (VmRSS, VmHWM), None where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _measure_child(label: str, size: dict, recurrence: str) -> None:
    """Run one row once in this (fresh) process and print its peak RSS as JSON.

    A warm-up on 2 windows first (one-time costs: compiled kernels, torch.func's set-up), then the
    peak is reset to the current RSS so it measures this call: VmHWM after /proc/self/clear_refs,
    or ru_maxrss where that is not available (then imports count too)."""
    torch.set_num_threads(1)
    model, plain, x1, x2 = setup(**size, recurrence=recurrence)
    candidates(model, plain, x1[:2], x2[:2])[label]()
    fn = candidates(model, plain, x1, x2)[label]
    gc.collect()
    reset = _reset_peak()
    before = _vm("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    fn()
    t = time.perf_counter() - t
    peak = _vm("VmHWM") if reset else None
    peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_mb": before, "seconds": t, "reset": reset}))


def peak_memory(label: str, size: dict, recurrence: str = "diagonal") -> dict | None:
    """Peak RSS of one row's computation, in a fresh interpreter (1 thread)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_ntk", "--measure", label,
           "--size", json.dumps(size), "--recurrence", recurrence]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


LARGE = dict(N=65536, n=4096, L=32, d=4)


def _large_child(method: str, size: dict, budget: int, threads: int) -> None:
    """blocked_ntk(x, x) on one large probe set in this fresh process: time and peak RSS."""
    from ntk_rnn.ntk import blocked_ntk

    torch.set_num_threads(threads)
    model, _, x, _ = setup(**size)
    blocked_ntk(model, x[:8], method=method, memory_budget=budget)  # warm-up
    gc.collect()
    reset = _reset_peak()
    before = _vm("VmRSS") or 0.0
    t = time.perf_counter()
    K = blocked_ntk(model, x, method=method, memory_budget=budget)
    t = time.perf_counter() - t
    peak = (_vm("VmHWM") if reset else None) or resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
    sub = torch.randperm(size["n"], generator=torch.Generator().manual_seed(0))[:64]
    check = relative_frobenius(K[sub][:, sub], empirical_ntk(model, x[sub], method="structured"))
    print(json.dumps({"peak_mb": peak, "before_mb": before, "seconds": t, "reset": reset,
                      "check": check}))


def large_main(quick: bool = False, budget: int = 2 * 2**30, threads: int = 1,
               methods: tuple[str, ...] = ("structured", "jacobian")) -> None:
    """The kernel of n = 4096 windows at N = 65536 (Φ alone: 6 GB in float32) by ``blocked_ntk``
    within ``budget`` bytes, each method in a fresh process; ``quick``: n = 1024, N = 16384."""
    size = dict(N=16384, n=1024, L=32, d=4) if quick else LARGE
    phi = size["n"] * size["N"] * (size["d"] + 2) * 4
    print(f"\n== blocked NTK K(x, x), N={size['N']}, n={size['n']}, L={size['L']}, d={size['d']}, "
          f"float32, memory_budget={budget / 2**30:.2f} GiB, {threads} thread(s); Φ alone would be "
          f"{phi / 2**30:.1f} GiB — {machine()}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for method in methods:
        cmd = [sys.executable, "-m", "benchmarks.bench_ntk", "--large-child", method,
               "--size", json.dumps(size), "--budget", str(budget), "--threads", str(threads)]
        try:
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=7200)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError):
            print(f"{method:<12} failed: {out.stderr.strip()[-300:] if 'out' in dir() else ''}")
            continue
        print(f"{method:<12} {r['seconds']:8.1f} s   peak RSS {r['peak_mb']:7.0f} MB (before the "
              f"call {r['before_mb']:.0f} MB, +{r['peak_mb'] - r['before_mb']:.0f} MB)   "
              f"64x64 sub-block vs structured: rel. diff {r['check']:.1e}")


def main(quick: bool | None = None, threads: tuple[int, ...] = (1, 2), repeats: int = 5,
         memory: bool = True, skip: tuple[str, ...] = ()) -> None:
    """The fair table for Model D (and Model F) at each thread count, then peak memory."""
    if quick is None:
        quick = bool(os.environ.get("NTK_BENCH_QUICK"))
    size = QUICK if quick else FULL
    skip_ = set(skip)
    print(f"\n== empirical NTK (N={size['N']}, n=m={size['n']}, L={size['L']}, d={size['d']}, "
          f"float32, CPU{', quick sizes' if quick else ''}) — {machine()}")
    print("   baseline: the torch.func tutorial's recipes on a plain user-written module with the "
          "same c, w, b and inputs")
    model, _, x1, _ = setup(**size)
    rec = _features_c.record(model)
    print(f"   per-unit features of the structured rows: {rec['backend']} — {rec['reason']}")
    default = torch.get_num_threads()
    for recurrence in ("diagonal", "feedback"):
        model, plain, x1, x2 = setup(**size, recurrence=recurrence)
        print(f"\n-- Model {'D' if recurrence == 'diagonal' else 'F'} ({recurrence}); "
              f"plain module: {type(plain).__name__}")
        for i, t in enumerate(threads):
            torch.set_num_threads(t)
            print(f"- {t} thread(s), load average {os.getloadavg()[0]:.2f} "
                  "(other processes on this machine make timings noisy)")
            _table(model, plain, x1, x2, repeats, skip_, agreement=i == 0)
        torch.set_num_threads(default)
    if memory:
        print("\n-- peak RSS of one K(x1, x2), Model D, fresh process, 1 thread, after a warm-up "
              "(RSS before the call in brackets; the increase is the method's working memory)")
        model, plain, x1, x2 = setup(**size)
        for label in candidates(model, plain, x1, x2):
            if label in skip_:
                continue
            r = peak_memory(label, size)
            if r is None:
                print(f"{label:<56} failed (killed or out of memory?)")
            else:
                print(f"{label:<56} {r['peak_mb']:8.0f} MB  ({r['before_mb']:.0f} MB, "
                      f"+{r['peak_mb'] - r['before_mb']:.0f} MB)  {r['seconds']:.1f} s"
                      + ("" if r["reset"] else "  [peak includes imports]"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=1024, n=m=32, L=16")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], help="row labels not to run")
    ap.add_argument("--large", action="store_true",
                    help="blocked_ntk on n=4096 windows at N=65536 (with --quick: n=1024, N=16384)")
    ap.add_argument("--budget", type=int, default=2 * 2**30, help="memory budget for --large")
    ap.add_argument("--methods", nargs="+", default=["structured", "jacobian"],
                    help="methods for --large")
    ap.add_argument("--large-child", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--recurrence", default="diagonal", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        _measure_child(args.measure, json.loads(args.size), args.recurrence)
    elif args.large_child:
        _large_child(args.large_child, json.loads(args.size), args.budget, args.threads[0])
    elif args.large:
        large_main(quick=args.quick, budget=args.budget, threads=args.threads[0],
                   methods=tuple(args.methods))
    else:
        main(quick=args.quick or None, threads=tuple(args.threads), repeats=args.repeats,
             memory=not args.no_memory, skip=tuple(args.skip))
