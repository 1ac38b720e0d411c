"""The experiment pipeline end to end (smoke mode: N = 16, 32, 64, one β, 2 seeds): the sweep
through the CLI as ensembles, the fits, figures and RESULTS section; and the ensemble sweep's
numbers equal the one-job-per-seed sweep's exactly."""

import math
from pathlib import Path

import pytest

from experiments import run_sweeps

KEYS = ("running_mse", "ntk_drift_from_init", "ntk_initial_distance_to_limit",
        "output_rmse_band", "output_rmse_t0")


@pytest.mark.e2e
def test_smoke_sweep_ensemble_equals_separate_jobs(tmp_path):
    runs = {}
    for name, extra in (("ens", []), ("sep", ["--no-ensemble"])):
        out = tmp_path / name
        run_sweeps.main(["--mode", "smoke", "--out", str(out), "--figdir", str(out / "fig"),
                         *extra])
        runs[name] = {(r["width"], r["seed"]): r for r in run_sweeps.collect(out)}
        assert sorted(runs[name]) == [(n, s) for n in (16, 32, 64) for s in (0, 1)]
        assert all(r["status"] == "completed" for r in runs[name].values())
        text = (out / "results_section.md").read_text()
        assert "| kernel drift (t=2) | 0.75 |" in text
        for fig in ("width_sweep", "tracking", "initial_kernel_error"):
            assert (out / "fig" / f"smoke_{fig}.png").stat().st_size > 10_000
    ens = tmp_path / "ens" / "runs"
    assert len(list(ens.glob("*/member_*/metrics.json"))) == 6  # 3 jobs of 2 members
    for k, r in runs["ens"].items():
        for key in KEYS:
            assert math.isfinite(r[key]) and r[key] == runs["sep"][k][key], (k, key)
    assert Path(runs["ens"][(64, 1)]["dir"]).name == "member_001"
