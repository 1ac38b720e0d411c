"""The online trainer: config composition, a short run, outputs, errors, multirun."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from ntk_rnn.checkpoint import load_checkpoint
from ntk_rnn.run.config import num_steps
from ntk_rnn.errors import ConfigError, TrainingDiverged
from ntk_rnn.run import Trainer

from .conftest import CONF, make_cfg, run_cli

SINE = ["data=custom", "data._target_=tests.custom_sources.SineChain", "callbacks=none"]


def all_config_options():
    groups = [p for p in Path(CONF).iterdir() if p.is_dir()]
    for g in sorted(groups):
        for f in sorted(g.glob("*.yaml")):
            yield g.name, f.stem


@pytest.mark.parametrize("group, option", list(all_config_options()))
def test_every_config_composes(group, option):
    overrides = [f"{group}={option}"] if group != "experiment" else [f"+experiment={option}"]
    if group == "data" and option == "custom":
        overrides.append("data._target_=tests.custom_sources.SineChain")
    cfg = make_cfg(*overrides)
    assert cfg.model.width >= 1


def test_short_run_reduces_running_mse(tmp_path):
    cfg = make_cfg(*SINE, "model.width=256", "train.horizon=8", "dtype=float64",
                   "train.mse_window=128")
    tr = Trainer.from_config(cfg, tmp_path)
    m = tr.fit()
    first = float(tr.sq_err[:128].mean())
    assert m["status"] == "completed" and m["steps"] == 8 * 256
    assert m["running_mse"] < 0.5 * first, (first, m["running_mse"])
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints/final.pt").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 2048
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["width"] == 256
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_steps_horizon_and_reproducibility(tmp_path):
    cfg = make_cfg(*SINE, "model.width=64", "train.horizon=1.5")
    assert num_steps(cfg) == 96
    assert num_steps(make_cfg(*SINE, "train.steps=7")) == 7
    a = Trainer.from_config(cfg, tmp_path / "a").fit()
    b = Trainer.from_config(cfg, tmp_path / "b").fit()
    assert a["running_mse"] == b["running_mse"]
    pa = load_checkpoint(tmp_path / "a/checkpoints/final.pt")["model"]
    pb = load_checkpoint(tmp_path / "b/checkpoints/final.pt")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.beta=1.5", "model.beta"),
        ("model.width=0", "model.width"),
        ("model.init.rho=1.5", "model.init.rho"),
        ("train.alpha=-1", "train.alpha"),
        ("train.gradient=bptt", "train.gradient"),
        ("dtype=float16", "dtype"),
    ],
)
def test_config_validation_names_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Trainer.from_config(make_cfg(*SINE, override), tmp_path)


def test_custom_source_with_wrong_shape_fails_clearly(tmp_path):
    cfg = make_cfg("data=custom", "data._target_=tests.custom_sources.WrongShape",
                   "callbacks=none", "model.width=8")
    with pytest.raises(ConfigError, match=r"expected X \(T, 1\)"):
        Trainer.from_config(cfg, tmp_path).fit()


def test_builtin_keys_with_foreign_target_fail_clearly(tmp_path):
    cfg = make_cfg("data._target_=tests.custom_sources.SineChain", "callbacks=none")
    with pytest.raises(ConfigError, match="data=custom"):
        Trainer.from_config(cfg, tmp_path)


def test_divergence_stops_with_logs_and_last_good_checkpoint(tmp_path):
    cfg = make_cfg(*SINE, "model.width=32", "train.alpha=1e6", "train.horizon=20",
                   "train.divergence_threshold=1e3")
    with pytest.raises(TrainingDiverged, match="lower train.alpha"):
        Trainer.from_config(cfg, tmp_path).fit()
    ck = load_checkpoint(tmp_path / "checkpoints/last_good.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "args, field",
    [
        (["model.beta=1.5"], "model.beta"),
        (["model.width=0"], "model.width"),
        (["model.init.rho=2.0"], "model.init.rho"),
    ],
)
def test_cli_bad_input_one_clear_line(tmp_path, args, field):
    r = run_cli(*SINE, f"hydra.run.dir={tmp_path}", *args)
    assert r.returncode == 2
    assert field in r.stderr and "Traceback" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ntk_rnn:")]
    assert len(err_lines) == 1


def test_cli_run_and_multirun(tmp_path):
    r = run_cli(*SINE, "model.width=16", "train.horizon=1", f"hydra.run.dir={tmp_path}/single")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "single/metrics.json").exists()
    r = run_cli("-m", *SINE, "model.width=8,16", "model.beta=0.6,0.9", "seed=0,1",
                "train.horizon=1", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 8
    for p in runs:
        m = json.loads(p.read_text())
        assert m["status"] == "completed" and math.isfinite(m["running_mse"])


@pytest.mark.parametrize("gradient", ["rtrl", "truncated"])
def test_trainer_backends_agree_with_reference_loop(tmp_path, gradient):
    """The default (fast) stepper and the plain rtrl_step loop end at the same parameters."""
    finals = {}
    for backend in ("auto", "eager", "reference"):
        cfg = make_cfg("callbacks=none", "model.width=48", "train.steps=1000", "dtype=float64",
                       f"train.gradient={gradient}", f"train.backend={backend}")
        Trainer.from_config(cfg, tmp_path / backend).fit()
        finals[backend] = load_checkpoint(tmp_path / backend / "checkpoints/final.pt")["model"]
    ref = finals.pop("reference")
    for params in finals.values():
        for k in ref:
            assert (params[k] - ref[k]).norm() <= 1e-12 * ref[k].norm()
