"""Issue 25, item 4: Model D's coherent drift with a mirrored initialisation (f_0 = 0 exactly).

    nice python -m experiments.drift_mirrored            # β = 0.6, α = 4, N = 2^12..2^14

The mean-field flow (experiments/drift_meanfield.py) drops the displacement caused by the
network's initial output f_0 = N^{−β} Σ c_i S_i, of size N^{1/2−β}: 0.38 rms at β = 0.6,
N = 2^14, comparable to the target. Units drawn in mirror pairs (c, w, b), (−c, w, b) (through
``model.init.sampler``; the law of each unit is unchanged) have f_0 = 0 exactly, so their
ensemble's coherent drift should follow the flow, while the plain initialisation's (the drift
study's, same seeds, same probes) may exceed it by the f_0 term.

Results: experiments/results/drift_mirrored.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from experiments.drift_study import EVERY_T, HORIZON, ParityCallback, ensemble_split
from ntk_rnn import MeanFieldRNN, Trainer
from ntk_rnn.data import VAR1
from ntk_rnn.models.init import InitLaw

HERE = Path(__file__).resolve().parent


def mirrored(width, input_dim, generator, dtype):
    """μ0's default law for width/2 units, each with its mirror (−c, w, b)."""
    c, w, b = InitLaw().sample(width // 2, input_dim, generator, dtype)
    return torch.cat([c, -c]), torch.cat([w, w]), torch.cat([b, b])


def run(N, beta, alpha, seeds, mirror):
    init = InitLaw(sampler=mirrored) if mirror else None
    model = MeanFieldRNN(input_dim=1, width=N, beta=beta, init=init, dtype=torch.float64)
    t0 = time.perf_counter()
    tr = Trainer(model=model, data=VAR1(), alpha=alpha, horizon=HORIZON,
                 callbacks=[ParityCallback(EVERY_T, 32, 16)], seed=0, run_dir=None,
                 ensemble_size=seeds)
    tr.fit()
    cbs = [[cb for cb in m.callbacks if isinstance(cb, ParityCallback)] for m in tr.members]
    out = ensemble_split(cbs)
    D = [cb[0].hist["D"][-1] for cb in cbs]
    return {"N": N, "beta": beta, "alpha": alpha, "mirror": mirror, "coherent": out,
            "D_t2": sum(D) / len(D), "wall_s": time.perf_counter() - t0}


def main():
    torch.set_num_threads(1)
    res = []
    path = HERE / "results" / "drift_mirrored.json"
    for N in (2 ** 12, 2 ** 13, 2 ** 14):
        r = run(N, 0.6, 4.0, 4, True)
        res.append(r)
        path.write_text(json.dumps(res, indent=1))
        c = r["coherent"]["2.0"]
        print(N, f"coherent {c['coherent']:.5f} fluct {c['fluct']:.5f} D {r['D_t2']:.4f} "
                 f"{r['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
