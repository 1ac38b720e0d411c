"""The online trainer: config composition, a short run, outputs, errors, multirun."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import open_dict

from ntk_rnn.checkpoint import load_checkpoint
from ntk_rnn.errors import ConfigError, TrainingDiverged
from ntk_rnn.run import Trainer
from ntk_rnn.run.config import num_steps

from .conftest import BARE, CALLBACKS_OFF, CONF, make_cfg, run_cli

SINE = ["data=custom", "data._target_=tests.custom_sources.SineChain", CALLBACKS_OFF]


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
    if group == "model" and option == "custom":
        overrides.append("model._target_=tests.custom_models.TinyRNN")
    if group == "data" and option == "csv":
        overrides.append(f"data.path={CONF}/../tests/data/tiny.csv")
    cfg = make_cfg(*overrides)
    if group in ("hydra", "experiment"):
        return  # launchers and sweep settings: composed; their jobs are built like any other
    with open_dict(cfg):  # instantiate what was composed, small: every object is built
        if "width" in cfg.model:
            cfg.model.width = min(int(cfg.model.width), 16)
        cfg.train.steps = 4
    tr = Trainer.from_config(cfg, None)
    assert tr.model is not None and tr.n_steps == 4 and len(tr.callbacks) == \
        len([k for k, v in (cfg.callbacks or {}).items() if v is not None])


@pytest.mark.parametrize("target, msg", [
    ("WrongOutput", r"model._target_=WrongOutput: forward maps windows .* to \(2,\)"),
    ("NoParameters", "model._target_=NoParameters has no parameters"),
    ("NoInputDim", r"model._target_=tests.custom_models.NoInputDim must take \['input_dim'\]"),
])
def test_bad_custom_models_fail_before_training(tmp_path, target, msg):
    cfg = make_cfg("model=custom", f"model._target_=tests.custom_models.{target}", *SINE[:2],
                   CALLBACKS_OFF, "train.steps=4")
    with pytest.raises(ConfigError, match=msg):
        Trainer.from_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_user_code_keeps_its_traceback(tmp_path):
    cfg = make_cfg("model=custom", "model._target_=tests.custom_models.Raises", *SINE[:2],
                   CALLBACKS_OFF, "train.steps=4")
    with pytest.raises(Exception, match="model: tests.custom_models.Raises raised ValueError") as e:
        Trainer.from_config(cfg, tmp_path / "run")
    tb = e.value.__cause__.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename.endswith("custom_models.py")  # the user's own line


@pytest.mark.e2e
def test_custom_model_trains_by_bptt_from_the_cli(tmp_path):
    r = run_cli("model=custom", "model._target_=tests.custom_models.TinyRNN", "+model.width=8",
                "train.steps=64", "callbacks=[ntk]", "callbacks.ntk.every_n_steps=32",
                "callbacks.ntk.n_probes=8", "callbacks.ntk.probe_length=6",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["gradient"] == "bptt" and m["status"] == "completed"
    assert "ntk_drift_from_init" in m


def test_short_run_reduces_running_mse(tmp_path):
    cfg = make_cfg(*SINE, "model.width=256", "train.horizon=8", "dtype=float64",
                   "train.mse_window=128")
    tr = Trainer.from_config(cfg, tmp_path)
    m = tr.fit()
    first = next(v for k, v in tr.history["train/running_mse"] if k >= 128)  # the first window
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
        ("train.gradient=sgd", "train.gradient"),
        ("dtype=float16", "dtype"),
    ],
)
def test_config_validation_names_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Trainer.from_config(make_cfg(*SINE, override), tmp_path)


def test_custom_source_with_wrong_shape_fails_clearly(tmp_path):
    cfg = make_cfg("data=custom", "data._target_=tests.custom_sources.WrongShape",
                   *BARE)
    with pytest.raises(ConfigError, match=r"expected X \(T, 1\)"):
        Trainer.from_config(cfg, tmp_path).fit()


def test_builtin_keys_with_foreign_target_fail_clearly(tmp_path):
    cfg = make_cfg("data._target_=tests.custom_sources.SineChain", CALLBACKS_OFF)
    with pytest.raises(ConfigError, match="data=custom"):
        Trainer.from_config(cfg, tmp_path)


def test_divergence_stops_with_logs_and_last_good_checkpoint(tmp_path):
    cfg = make_cfg(*SINE, "model.width=32", "train.alpha=1e6", "train.horizon=20",
                   "train.divergence_threshold=1e3")
    with pytest.raises(TrainingDiverged, match="lower train.alpha"):
        Trainer.from_config(cfg, tmp_path).fit()
    ck = load_checkpoint(tmp_path / "checkpoints/last_good.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    plain = torch.load(tmp_path / "checkpoints/last_good.pt", weights_only=True)
    assert all(torch.equal(plain[k], ck["model"][k]) for k in ("c", "w", "b"))  # the good state
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
def test_trainer_backends_agree_with_reference_loop(tmp_path, gradient):
    """The default (fast) stepper and the plain rtrl_step loop end at the same parameters."""
    finals = {}
    for backend in ("auto", "eager", "reference"):
        cfg = make_cfg(CALLBACKS_OFF, "model.width=48", "train.steps=1000", "dtype=float64",
                       f"train.gradient={gradient}", f"train.backend={backend}")
        Trainer.from_config(cfg, tmp_path / backend).fit()
        finals[backend] = load_checkpoint(tmp_path / backend / "checkpoints/final.pt")["model"]
    ref = finals.pop("reference")
    for params in finals.values():
        for k in ref:
            assert (params[k] - ref[k]).norm() <= 1e-12 * ref[k].norm()


def test_custom_model_without_reset_parameters_is_reproducible(tmp_path):
    """TinyRNN draws θ_0 from torch's global RNG in its constructor: the run seed fixes it."""
    cfg = ["model=custom", "model._target_=tests.custom_models.TinyRNN", *SINE[:2],
           CALLBACKS_OFF, "train.steps=40"]
    torch.manual_seed(123)
    a = Trainer.from_config(make_cfg(*cfg), None).fit()
    torch.manual_seed(456)
    b = Trainer.from_config(make_cfg(*cfg), None).fit()
    c = Trainer.from_config(make_cfg(*cfg, "seed=1"), None).fit()
    assert a["running_mse"] == b["running_mse"] != c["running_mse"]


def test_bptt_model_resumes_bit_identically(tmp_path):
    """A model trained by truncated BPTT resumes from a mid-run checkpoint to exactly the state an
    uninterrupted run reaches (its window buffer and kept memory are in the checkpoint)."""
    cfg = ["model=elman", "model.width=12", *SINE[:2], "callbacks=[checkpoint]",
           "callbacks.checkpoint.every_n_steps=40", "callbacks.checkpoint.keep_last=5",
           "train.steps=100", "dtype=float64"]
    Trainer.from_config(make_cfg(*cfg), tmp_path / "a").fit()
    b = tmp_path / "b"
    Trainer.from_config(make_cfg(*cfg), b).fit()
    for f in ("checkpoints/final.pt", "checkpoints/step_000000080.pt",
              "checkpoints/step_000000100.pt", "metrics.json"):
        (b / f).unlink()
    tr = Trainer.from_config(make_cfg(*cfg, "train.resume=true"), b)
    assert tr.step == 40
    tr.fit()
    fa, fb = (load_checkpoint(d / "checkpoints/final.pt") for d in (tmp_path / "a", b))
    for part in ("model", "online"):
        assert fa[part].keys() == fb[part].keys()
        assert all(torch.equal(fa[part][k], fb[part][k]) for k in fa[part]), part
    assert torch.equal(fa["sq_err"], fb["sq_err"])


def test_python_api_writes_nothing_and_equals_the_config_run(tmp_path, monkeypatch):
    """run_dir=None: no file anywhere (checkpoint callback included); the same settings from
    Python and from a composed config give the same numbers (θ_0 from the seed)."""
    from ntk_rnn import CheckpointCallback, MeanFieldRNN, NTKCallback
    from ntk_rnn.data import VAR1

    monkeypatch.chdir(tmp_path)
    cbs = [CheckpointCallback(every_n_steps=10),
           NTKCallback(every_n_steps=16, n_probes=8, probe_length=6, limit=False)]
    tr = Trainer(model=MeanFieldRNN(input_dim=1, width=32, seed=99), data=VAR1(), alpha=2.0,
                 horizon=2.0, callbacks=cbs, seed=3, run_dir=None)
    m = tr.fit()
    assert list(tmp_path.iterdir()) == []
    assert [s for s, _ in tr.history["ntk/drift_from_init"]] == [0, 16, 32, 48, 64]
    cfg = make_cfg("model.width=32", "train.alpha=2.0", "train.horizon=2.0", "seed=3",
                   CALLBACKS_OFF)
    assert Trainer.from_config(cfg, None).fit()["running_mse"] == m["running_mse"]
