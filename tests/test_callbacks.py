"""NTK/checkpoint/progress callbacks: event files read back with TensorBoard's own reader."""

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ntk_rnn import MeanFieldRNN
from ntk_rnn.checkpoint import load_checkpoint
from ntk_rnn.errors import ConfigError
from ntk_rnn.ntk import empirical_ntk, relative_frobenius
from ntk_rnn.train import Trainer, train

from .conftest import make_cfg

NTK_SMALL = ["model.width=64", "train.horizon=2", "callbacks=[ntk,checkpoint]",
             "callbacks.ntk.every_n_steps=16", "callbacks.ntk.n_probes=12",
             "callbacks.ntk.probe_length=8", "callbacks.ntk.limit_tol=2e-3",
             "callbacks.ntk.image_every_n_steps=64", "callbacks.ntk.histogram_every_n_steps=64",
             "callbacks.checkpoint.every_n_steps=64"]

SCALARS = ["ntk/drift_from_init", "ntk/distance_to_limit", "ntk/kernel_distance",
           "ntk/kernel_distance_to_limit", "ntk/velocity", "ntk/target_alignment",
           "ntk/effective_rank", "ntk/eig_1", "ntk/eig_5", "ntk/drift_c", "ntk/drift_w",
           "ntk/drift_b", "params/displacement_c", "params/displacement_w",
           "params/displacement_b", "train/loss", "train/running_mse", "train/steps_per_s",
           "ntk/limit_error_estimate", "ntk/initial_distance_to_limit"]
TRUNCATED = ["ntk/train_kernel_drift_from_init", "ntk/train_kernel_asymmetry",
             "ntk/train_kernel_distance_to_ntk"]


def events(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0,
                                                       "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def ntk_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ntk_run")
    metrics = train(make_cfg(*NTK_SMALL, "dtype=float64"), d)
    return d, metrics


def test_every_documented_tag_is_logged_finite(ntk_run):
    d, _ = ntk_run
    ea = events(d)
    tags = ea.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
        vals = [e.value for e in ea.Scalars(tag)]
        assert vals and all(math.isfinite(v) for v in vals), tag
    steps = [e.step for e in ea.Scalars("ntk/drift_from_init")]
    assert steps == list(range(0, 129, 16))
    assert [e.step for e in ea.Scalars("ntk/velocity")] == list(range(16, 129, 16))
    for img in ("ntk_images/K_t", "ntk_images/K_inf", "ntk_images/K_t_minus_K_0",
                "ntk_images/spectrum"):
        assert img in tags["images"], img
    assert [e.step for e in ea.Images("ntk_images/K_t")] == [0, 64, 128]
    assert "params/abs_displacement_w" in tags["histograms"]


def test_hparams_entry_is_in_the_run_directory(ntk_run):
    d, _ = ntk_run
    assert not [p for p in d.iterdir() if p.is_dir() and list(p.glob("events.out.*"))]
    ea = events(d)
    plugins = ea.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    assert "final/ntk_drift_from_init" in ea.Tags()["scalars"]


def test_drift_matches_recomputation_from_checkpoints(ntk_run):
    d, metrics = ntk_run
    init, final = (load_checkpoint(d / f"checkpoints/{n}.pt") for n in ("init", "final"))
    probes = final["callbacks"]["ntk"]["probes"]
    kernels = []
    for ck in (init, final):
        m = MeanFieldRNN(1, 64, dtype=torch.float64)
        m.load_state_dict(ck["model"])
        kernels.append(empirical_ntk(m, probes, method="jacobian"))
    drift = relative_frobenius(kernels[1], kernels[0])
    assert math.isclose(drift, metrics["ntk_drift_from_init"], rel_tol=1e-9)
    last = events(d).Scalars("ntk/drift_from_init")[-1]
    assert math.isclose(last.value, drift, rel_tol=1e-6)


def test_checkpoints_keep_last_k(ntk_run):
    d, _ = ntk_run
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*.pt")) == [
        "step_000000064.pt", "step_000000128.pt"]
    assert not list((d / "checkpoints").glob("*.tmp"))


def test_every_step_and_truncated_kernel(tmp_path):
    cfg = make_cfg("model.width=16", "train.steps=20", "callbacks=[ntk]", "train=truncated",
                   "callbacks.ntk.every_n_steps=1", "callbacks.ntk.n_probes=4",
                   "callbacks.ntk.probe_length=4", "callbacks.ntk.limit=false",
                   "callbacks.ntk.top_k=3")
    train(cfg, tmp_path)
    ea = events(tmp_path)
    assert [e.step for e in ea.Scalars("ntk/drift_from_init")] == list(range(21))
    for tag in TRUNCATED:
        vals = [e.value for e in ea.Scalars(tag)]
        assert len(vals) == 21 and all(math.isfinite(v) for v in vals)
    assert ea.Scalars("ntk/train_kernel_asymmetry")[-1].value > 0


def test_bad_callback_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks\.ntk\.every_n_steps=0"):
        Trainer(make_cfg("callbacks=[ntk]", "callbacks.ntk.every_n_steps=0"), tmp_path / "a")
    csv = tmp_path / "short.csv"
    csv.write_text("x\n" + "\n".join(str(0.1 * i % 1) for i in range(40)))
    with pytest.raises(ConfigError, match=r"callbacks\.ntk\.n_probes=64 exceeds"):
        Trainer(make_cfg("data=csv", f"data.path={csv}", "train.steps=10", "callbacks=[ntk]"),
                tmp_path / "b")
    with pytest.raises(ConfigError, match="limit_method=mc"):
        Trainer(make_cfg("callbacks=[ntk]", "+model.init.sampler._target_=tests.test_callbacks"
                         ".custom_sampler", "+model.init.sampler._partial_=true"),
                tmp_path / "c")
    assert not list(tmp_path.glob("*/events.out.*"))


def custom_sampler(width, input_dim, generator, dtype):
    c = torch.randn(width, generator=generator, dtype=dtype)
    w = torch.randn(width, input_dim, generator=generator, dtype=dtype)
    b = 0.4 * torch.rand(width, generator=generator, dtype=dtype)
    return c, w, b


def test_custom_law_with_monte_carlo_limit_runs(tmp_path):
    cfg = make_cfg("callbacks=[ntk]", "model.width=32", "train.steps=32",
                   "+model.init.sampler._target_=tests.test_callbacks.custom_sampler",
                   "+model.init.sampler._partial_=true", "callbacks.ntk.limit_method=mc",
                   "callbacks.ntk.n_probes=4", "callbacks.ntk.probe_length=4",
                   "callbacks.ntk.limit_tol=5e-2", "callbacks.ntk.top_k=2")
    m = train(cfg, tmp_path)
    assert math.isfinite(m["ntk_distance_to_limit"])


def _free_port():
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_tensorboard_server_serves_the_scalars(ntk_run):
    d, _ = ntk_run
    port = _free_port()
    if port is None:
        pytest.skip("no loopback port can be bound")
    tb = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen([str(tb), "--logdir", str(d), "--port", str(port), "--host",
                             "127.0.0.1", "--load_fast=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        body = None
        for _ in range(120):
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=2).read())
                if body:
                    break
            except OSError:
                time.sleep(0.5)
        assert body, "tensorboard did not answer"
        tags = set().union(*(set(v) for v in body.values()))
        assert {"ntk/drift_from_init", "ntk/distance_to_limit", "train/loss"} <= tags
    finally:
        proc.terminate()
        proc.wait(timeout=10)
