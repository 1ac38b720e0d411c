"""NTK callback overhead (issue: callbacks): the `make run` defaults with and without the NTK
callback in one process, and the cost of one callback call at N = 4096 with 128 probes."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ntk_rnn.run import Trainer

from .common import machine


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from ntk_rnn.run.config import register_configs

    register_configs()
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_wall(*overrides: str) -> tuple[float, dict]:
    """Wall time of building the run and training it (limit kernel included)."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        m = Trainer.from_config(_compose(*overrides), d).fit()
        return time.perf_counter() - t, m


def main(repeats: int = 2) -> None:
    print(f"\n== NTK callback overhead at the `make run` defaults — {machine()}")
    ntk = ["callbacks=[ntk,checkpoint]"]
    quiet = ["callbacks.ntk.image_every_n_steps=0", "callbacks.ntk.histogram_every_n_steps=0"]
    rows = {"callbacks=[checkpoint] (no NTK)": ["callbacks=[checkpoint]"],
            "  + NTK scalars only (limit=false, no images)": ntk + quiet
            + ["callbacks.ntk.limit=false"],
            "  + K_inf once (limit=true, no images)": ntk + quiet,
            "  + images/histograms = make run": ntk}
    best = {}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for name, ov in rows.items():
            w, m = run_wall(*ov)
            best[name] = min(best.get(name, float("inf")), w)
    walls = list(best.values())
    base, full = walls[0], walls[-1]
    prev = base
    for name, w in best.items():
        extra = "" if w is base else f"  (+{w - prev:5.2f} s)"
        print(f"  {name:48s} {w:7.2f} s{extra}")
        prev = w
    print(f"  NTK callback share of the run's wall time: {(full - base) / full:.1%} "
          "(aim <= 20%); training itself is the first row")

    from ntk_rnn.callbacks import NTKCallback

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer.from_config(_compose("model.width=4096", "train.steps=1", "callbacks=[ntk]",
                              "callbacks.ntk.n_probes=128", "callbacks.ntk.limit=false",
                              "callbacks.ntk.image_every_n_steps=0",
                              "callbacks.ntk.histogram_every_n_steps=0",
                              "logger.tensorboard=false"),
                     d)
        cb = next(c for c in tr.callbacks if isinstance(c, NTKCallback))
        cb.on_train_start(tr.state)
        times = []
        for k in range(5):
            t = time.perf_counter()
            cb.on_step_end(k + 1, tr.state)
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"  one NTK callback call, N=4096, 128 probes (L=24, d=1, {torch.get_num_threads()} "
              f"threads): {times[len(times) // 2] * 1e3:.1f} ms (median of 5)")


if __name__ == "__main__":
    main()
