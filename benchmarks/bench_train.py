"""Training throughput: the online RTRL step vs a naive autograd loop (issue: core, fast training).

Naive baseline: ``nn.Module`` forward of one step with the memory detached (truncated gradient),
``loss.backward()``, ``torch.optim.SGD.step()`` — per sequence element. Same inputs, one process.
"""

from __future__ import annotations

import time

import torch

from ntk_rnn import MeanFieldRNN, OnlineState, rtrl_step

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


def naive_steps_per_s(model, X, Y, lr) -> float:
    net = NaiveCell(model)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    S = torch.zeros(model.width)
    t = time.perf_counter()
    for k in range(X.shape[0]):
        y_hat, S = net(X[k], S.detach())
        loss = 0.5 * (Y[k] - y_hat) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return X.shape[0] / (time.perf_counter() - t)


def ours_steps_per_s(model, X, Y, lr, gradient="rtrl") -> float:
    st = OnlineState.zeros(model)
    y_hat = torch.empty_like(Y)
    t = time.perf_counter()
    for k in range(X.shape[0]):
        y_hat[k] = rtrl_step(model, st, X[k], Y[k], lr, gradient)
    return X.shape[0] / (time.perf_counter() - t)


def main(widths=(1024, 16384), d: int = 4, steps: int = 3000) -> None:
    print(f"\n== training throughput (d={d}, float32, CPU) — {machine()}")
    print(f"{'N':>7} {'naive steps/s':>14} {'rtrl steps/s':>13} {'trunc steps/s':>14} "
          f"{'rtrl/naive':>10}")
    g = torch.Generator().manual_seed(0)
    for N in widths:
        X = torch.randn(steps, d, generator=g)
        Y = torch.tanh(X[:, 0])
        model = MeanFieldRNN(d, N, seed=0)
        lr = model.learning_rate(1.0)
        ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X[:200], Y[:200], lr)  # warm-up
        naive = naive_steps_per_s(model, X, Y, lr)
        rtrl = ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X, Y, lr)
        trunc = ours_steps_per_s(MeanFieldRNN(d, N, seed=0), X, Y, lr, "truncated")
        print(f"{N:>7} {naive:>14.0f} {rtrl:>13.0f} {trunc:>14.0f} {rtrl / naive:>9.1f}x")


if __name__ == "__main__":
    main()
