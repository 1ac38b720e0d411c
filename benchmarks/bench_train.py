"""Training throughput: the online RTRL step vs a naive autograd loop (issue: core, fast training).

Naive baseline: ``nn.Module`` forward of one step with the memory detached (truncated gradient),
``loss.backward()``, ``torch.optim.SGD.step()`` — per sequence element. Same inputs, one process,
the same torch thread count for every column (default 1: at these sizes extra threads only add
synchronisation; ``benchmarks.bench_scaling`` measures where they start to pay).

    python -m benchmarks.bench_train [--widths 1024 16384] [--steps 3000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from ntk_rnn import MeanFieldRNN, OnlineState, rtrl_step
from ntk_rnn.online.fast import KERNEL, FastStepper

from .common import machine


class NaiveCell(torch.nn.Module):
    def __init__(self, model: MeanFieldRNN):
        super().__init__()
        self.c = torch.nn.Parameter(model.c.detach().clone())
        self.w = torch.nn.Parameter(model.w.detach().clone())
        self.b = torch.nn.Parameter(model.b.detach().clone())
        self.scale = model.output_scale

    def forward(self, x, S):
        S = torch.tanh(self.w @ x + self.b * S)
        return self.scale * torch.dot(self.c, S), S


def naive_runner(model: MeanFieldRNN, lr: float):
    """``run(X, Y) -> seconds``: the naive loop, its module, optimiser and memory kept between
    calls (so repeated timings measure steps only)."""
    net = NaiveCell(model)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    S = torch.zeros(model.width, dtype=model.c.dtype)

    def run(X, Y) -> float:
        nonlocal S
        t = time.perf_counter()
        for k in range(X.shape[0]):
            y_hat, S = net(X[k], S.detach())
            loss = 0.5 * (Y[k] - y_hat) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    return run


def naive_steps_per_s(model, X, Y, lr) -> float:
    return X.shape[0] / naive_runner(model, lr)(X, Y)


def ours_steps_per_s(model, X, Y, lr, gradient="rtrl") -> float:
    st = OnlineState.zeros(model)
    y_hat = torch.empty_like(Y)
    t = time.perf_counter()
    for k in range(X.shape[0]):
        y_hat[k] = rtrl_step(model, st, X[k], Y[k], lr, gradient)
    return X.shape[0] / (time.perf_counter() - t)


def fast_steps_per_s(model, X, Y, lr, gradient="rtrl", backend="auto") -> float:
    stepper = FastStepper(model, lr, gradient, backend=backend)
    y_hat = torch.empty_like(Y)
    t = time.perf_counter()
    stepper.run_chunk(X, Y, out=y_hat)
    return X.shape[0] / (time.perf_counter() - t)


def main(widths=(1024, 16384), d: int = 4, steps: int = 3000, threads: int = 1) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(f"\n== training throughput (d={d}, float32, CPU, {threads} torch thread(s)) — "
              f"{machine()}")
        print(f"compiled kernel: {KERNEL.status(d)}")
        print(f"{'N':>7} {'naive steps/s':>14} {'rtrl steps/s':>13} {'trunc steps/s':>14} "
              f"{'fast steps/s':>13} {'rtrl/naive':>10} {'fast/naive':>10}")
        g = torch.Generator().manual_seed(0)
        for N in widths:
            X = torch.randn(steps, d, generator=g)
            Y = torch.tanh(X[:, 0])
            model = MeanFieldRNN(d, N, seed=0)
            lr = model.learning_rate(1.0)
            ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X[:200], Y[:200], lr)  # warm-up
            fast_steps_per_s(MeanFieldRNN(d, N, seed=0), X[:200], Y[:200], lr)  # (builds kernel)
            naive = naive_steps_per_s(model, X, Y, lr)
            rtrl = ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X, Y, lr)
            trunc = ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X, Y, lr, "one_step")
            fast = fast_steps_per_s(MeanFieldRNN(d, N, seed=0), X, Y, lr)
            print(f"{N:>7} {naive:>14.0f} {rtrl:>13.0f} {trunc:>14.0f} {fast:>13.0f} "
                  f"{rtrl / naive:>9.1f}x {fast / naive:>9.1f}x")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    main(tuple(a.widths), steps=a.steps, threads=a.threads)
