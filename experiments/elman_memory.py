"""What each recurrent scaling keeps of the past, in the limit (issue 25, item 3; theory §9).

    nice python -m experiments.elman_memory

For stationary VAR(1) windows x̄ (L = 24) and x̄'_j that share x̄'s last j inputs and have
independent inputs before them, the closed-form limit kernel's memory profile

    m(j) = mean over windows of |K_∞(x̄, x̄) − K_∞(x̄, x̄'_j)| / K_∞(x̄, x̄)

is 0 at j = L and measures how much of K depends on inputs more than j steps back: for a
memoryless limit m(j) = 0 for every j ≥ 1. Models: Elman NTK scaling (tanh, σ_A = 1 and 0.6),
mean-field with mean(A) = 0 (tanh: memoryless), mean-field sigmoid with mean(A) = 0.8 and 2.0
(memory through the mean state S̄; E[σ'] ≤ 1/4, so |mean(A)|·E[σ'] < 1 and the zero state is
stable), mean-field tanh with mean(A) = 1.5 (odd σ: S̄ ≡ 0, memoryless). Results:
``experiments/results/elman_memory.json``, figure ``experiments/figures/elman_memory.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ntk_rnn import ElmanRNN
from ntk_rnn.data import VAR1
from ntk_rnn.limit import elman_limit_ntk

HERE = Path(__file__).resolve().parent
CASES = {
    "NTK, tanh, σ_A=1": dict(recurrent_scaling="ntk", activation="tanh"),
    "NTK, tanh, σ_A=0.6": dict(recurrent_scaling="ntk", activation="tanh", A_std=0.6),
    "MF, tanh, mean(A)=0": dict(recurrent_scaling="mean_field", activation="tanh"),
    "MF, tanh, mean(A)=1.5": dict(recurrent_scaling="mean_field", activation="tanh",
                                  A_mean=1.5),
    "MF, sigmoid, mean(A)=0.8": dict(recurrent_scaling="mean_field", activation="sigmoid",
                                     A_mean=0.8),
    "MF, sigmoid, mean(A)=2": dict(recurrent_scaling="mean_field", activation="sigmoid",
                                   A_mean=2.0),
}
L, N_WIN = 24, 16


def profile(model, x, y):
    diag = torch.diagonal(elman_limit_ntk(model, x, tol=1e-3).value)
    out = []
    for j in range(L + 1):
        xj = y.clone()
        if j:
            xj[:, L - j:] = x[:, L - j:]
        cross = elman_limit_ntk(model, x, xj, tol=1e-3).value.diagonal()
        out.append(float(((diag - cross).abs() / diag.abs()).mean()))
    return out


def main():
    start = time.time()
    src = VAR1()
    x, _ = src.windows(N_WIN, L, torch.Generator().manual_seed(1))
    y, _ = src.windows(N_WIN, L, torch.Generator().manual_seed(2))
    x, y = x.double(), y.double()
    res = {name: profile(ElmanRNN(1, 8, **kw), x, y) for name, kw in CASES.items()}
    res_all = {"profiles": res, "L": L, "windows": N_WIN, "wall_seconds": time.time() - start}
    (HERE / "results" / "elman_memory.json").write_text(json.dumps(res_all, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, m in res.items():
        ax.semilogy(range(1, L), [max(v, 1e-16) for v in m[1:L]], "o-", ms=3, label=name)
    ax.set_xlabel("j (inputs shared at the end of the window)")
    ax.set_ylabel("|K(x,x) − K(x,x'_j)| / K(x,x)")
    ax.set_title("What the infinite-width Elman kernel keeps of the past")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "figures" / "elman_memory.png", dpi=120)
    print(json.dumps({k: [round(v, 5) for v in m[:8]] for k, m in res.items()}, indent=1),
          f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
