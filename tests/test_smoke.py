"""`make smoke` (under a minute): the installed package works, from the command line and from
Python. A tiny CLI run from an empty directory (the package carries its config tree) and a tiny
Python run; the numbers are checked elsewhere."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.smoke, pytest.mark.e2e]


def test_cli_run_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package
    r = subprocess.run([sys.executable, "-m", "ntk_rnn.train", "model.width=8", "train.steps=32",
                        "callbacks=[ntk]", "callbacks.ntk.n_probes=4", "callbacks.ntk.top_k=2",
                        "callbacks.ntk.probe_length=3", "callbacks.ntk.limit_tol=1e-2",
                        "logger.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run complete" in r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 32


def test_python_run(tmp_path, tiny_model):
    from ntk_rnn import NTKCallback, Trainer
    from ntk_rnn.data import VAR1

    cb = NTKCallback(n_probes=4, probe_length=3, top_k=2, limit=False)
    metrics = Trainer(model=tiny_model, data=VAR1(), steps=32,
                      callbacks=[cb], seed=0, run_dir=tmp_path, progress=False).fit()
    assert metrics["status"] == "completed" and (tmp_path / "metrics.json").is_file()
