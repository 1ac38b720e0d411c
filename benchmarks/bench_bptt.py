"""Truncated-BPTT online training: BPTTStepper vs a naive per-step autograd loop (issue 16).

Naive baseline, per sequence element: the window of the last W inputs stacked into a new tensor,
the model's own ``forward`` run on it from the kept memory (the same truncation as the stepper,
so both compute the same numbers), ``torch.autograd.grad`` of ½(Y_k − Ŷ_k)², the SGD update, the
memory moved on — the graph of the whole window rebuilt every step. Both sides do one forward and
one backward of W steps per element (θ changes every step, so the window forward cannot be
reused); the stepper saves the dispatch and graph overhead: engine "kernel" (ElmanRNN, GRURNN:
compiled C forward/backward/update), "eager" (ElmanRNN: hand-written batched torch) and
"autograd" (the generic path of custom modules: plain autograd, so ≈ 1x). Same inputs, float32,
one process, the same torch thread count for both columns.

    python -m benchmarks.bench_bptt [--width 256] [--window 32] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from ntk_rnn.models import GRURNN, ElmanRNN
from ntk_rnn.online.bptt import KERNEL, BPTTStepper

from .common import machine

MODELS = {
    "elman (mean_field)": lambda d, N: ElmanRNN(d, N, seed=0),
    "elman (ntk)": lambda d, N: ElmanRNN(d, N, recurrent_scaling="ntk", seed=0),
    "gru": lambda d, N: GRURNN(d, N, seed=0),
}


def naive_seconds(model, lr: float, window: int, X, Y) -> float:
    params = list(model.parameters())
    mem = torch.zeros(1, model.memory_dim, dtype=X.dtype)
    buf = []
    t = time.perf_counter()
    for k in range(X.shape[0]):
        buf.append(X[k])
        y, H = model(torch.stack(buf).unsqueeze(0), h0=mem, return_states=True)
        grads = torch.autograd.grad(0.5 * (Y[k] - y[0, -1]) ** 2, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        if len(buf) == window:
            mem = H[:, 0].detach()
            buf.pop(0)
    return time.perf_counter() - t


def stepper_seconds(model, lr: float, window: int, X, Y, engine: str) -> float:
    st = BPTTStepper(model, lr, window, engine=engine)
    out = torch.empty_like(Y)
    t = time.perf_counter()
    st.run_chunk(X, Y, out=out)
    return time.perf_counter() - t


def main(width: int = 256, window: int = 32, d: int = 1, steps: int = 200,
         threads: int = 1, repeats: int = 3) -> dict:
    """Prints steps/s of both and the ratio per model and engine; returns
    {(model, engine): ratio}."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    ratios = {}
    try:
        print(f"\n== truncated BPTT online training (N={width}, window={window}, d={d}, "
              f"float32, CPU, {threads} torch thread(s); kernel: {KERNEL.status()}) — {machine()}")
        print(f"{'model':>20} {'engine':>9} {'naive steps/s':>14} {'bptt steps/s':>13} "
              f"{'bptt/naive':>10}")
        g = torch.Generator().manual_seed(0)
        X = torch.randn(steps, d, generator=g)
        Y = torch.tanh(X[:, 0])
        for name, make in MODELS.items():
            engines = ["kernel", "eager" if name.startswith("elman") else "autograd"]
            if not KERNEL.status().startswith("ok"):
                engines.remove("kernel")
            lr = make(d, width).learning_rate(1.0)
            warm = min(steps, 2 * window)
            naive_seconds(make(d, width), lr, window, X[:warm], Y[:warm])
            # interleaved repeats, the median of each: the machine may be shared
            naive, ours = [], {e: [] for e in engines}
            for _ in range(repeats):
                naive.append(naive_seconds(make(d, width), lr, window, X, Y))
                for e in engines:
                    stepper_seconds(make(d, width), lr, window, X[:warm], Y[:warm], e)
                    ours[e].append(stepper_seconds(make(d, width), lr, window, X, Y, e))
            tn = sorted(naive)[len(naive) // 2]
            for e in engines:
                te = sorted(ours[e])[len(ours[e]) // 2]
                ratios[(name, e)] = tn / te
                print(f"{name:>20} {e:>9} {steps / tn:>14.0f} {steps / te:>13.0f} "
                      f"{tn / te:>9.1f}x")
    finally:
        torch.set_num_threads(before)
    return ratios


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--d", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.width, a.window, a.d, a.steps, a.threads, a.repeats)
