"""NTK/checkpoint/progress callbacks: event files read back with TensorBoard's own reader."""

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from ntk_rnn import MeanFieldRNN
from ntk_rnn.checkpoint import load_checkpoint
from ntk_rnn.errors import ConfigError
from ntk_rnn.ntk import empirical_ntk, relative_frobenius
from ntk_rnn.run import Trainer, TrainingInterrupted

from .conftest import SignalAt, make_cfg

NTK_SMALL = ["model.width=64", "train.horizon=2", "callbacks=[ntk,checkpoint]",
             "callbacks.ntk.every_n_steps=16", "callbacks.ntk.n_probes=12",
             "callbacks.ntk.probe_length=8", "callbacks.ntk.limit_tol=2e-3",
             "callbacks.ntk.image_every_n_steps=64", "callbacks.ntk.histogram_every_n_steps=64",
             "callbacks.checkpoint.every_n_steps=64"]

SCALARS = ["ntk/drift_from_init", "ntk/distance_to_limit", "ntk/log10_kernel_distance",
           "ntk/log10_kernel_distance_to_limit", "ntk/velocity", "ntk/target_alignment",
           "ntk/effective_rank", "ntk/spectrum/log10_eig_1", "ntk/spectrum/log10_eig_5",
           "ntk/per_block/drift_c", "ntk/per_block/drift_w", "ntk/per_block/drift_b",
           "params/displacement_c", "params/displacement_w", "params/displacement_b",
           "train/loss", "train/running_mse", "train/steps_per_s"]
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
    metrics = Trainer.from_config(make_cfg(*NTK_SMALL, "dtype=float64"), d).fit()
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


def hparams_of(ea: EventAccumulator):
    """(experiment, session start info) protos of a run's HParams entry."""
    content = ea.PluginTagToContent("hparams")
    parse = plugin_data_pb2.HParamsPluginData.FromString
    return (parse(content["_hparams_/experiment"]).experiment,
            parse(content["_hparams_/session_start_info"]).session_start_info)


def test_hparams_entry_is_in_the_run_directory(ntk_run):
    d, metrics = ntk_run
    assert not [p for p in d.iterdir() if p.is_dir() and list(p.glob("events.out.*"))]
    ea = events(d)
    exp, ssi = hparams_of(ea)
    scalars = ea.Tags()["scalars"]
    # no one-point duplicates: HParams' metrics are the live tags (it shows their last value)
    assert not [t for t in scalars if t.startswith("final/") or len(ea.Scalars(t)) < 2]
    assert [m.name.tag for m in exp.metric_infos] == [
        "ntk/drift_from_init", "ntk/distance_to_limit", "ntk/log10_kernel_distance_to_limit",
        "train/running_mse"]
    assert all(m.name.tag in scalars for m in exp.metric_infos)
    assert math.isclose(ea.Scalars("ntk/drift_from_init")[-1].value,
                        metrics["ntk_drift_from_init"], rel_tol=1e-6)
    # a single run: width, β, α, gradient, seed, horizon; the first five are shown by default
    assert [h.display_name for h in exp.hparam_infos] == [
        "beta", "width", "seed", "alpha", "gradient", "horizon"]
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
          for k, v in ssi.hparams.items()}
    assert hp["model.width"].strip() == "64" and hp["seed"].strip() == "0"  # not 64.000
    assert hp["train.horizon"] == 2.0 and hp["train.gradient"] == "rtrl"


def test_hparams_put_the_swept_keys_first(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from ntk_rnn.logging import trial_name, write_hparams

    cfg = make_cfg("model.width=32", "seed=1", "callbacks.ntk.top_k=3", "data=markov")
    with SummaryWriter(str(tmp_path)) as w:
        write_hparams(w, cfg, {"t": 0.5, "running_mse": 0.3, "output_rmse_final": 0.1},
                      swept=["model.width=32", "seed=1", "callbacks.ntk.top_k=3", "data=markov",
                             "hydra.sweep.dir=x", "train.resume=auto"])
    exp, ssi = hparams_of(events(tmp_path))
    assert [(h.name, h.differs) for h in exp.hparam_infos] == [
        ("callbacks.ntk.top_k", True), ("data", True), ("model.width", True), ("seed", True),
        ("model.beta", False), ("train.alpha", False), ("train.gradient", False),
        ("train.horizon", False)]
    assert ssi.hparams["data"].string_value == "markov"
    assert ssi.hparams["callbacks.ntk.top_k"].string_value.strip() == "3"
    assert ssi.hparams["train.horizon"].number_value == 0.5
    assert [m.name.tag for m in exp.metric_infos] == ["output/rmse_to_limit",
                                                      "train/running_mse"]
    assert trial_name("model.width=32,seed=0,+train.horizon=1") == "width=32,seed=0,horizon=1"


def _tb_order(a: str, b: str) -> int:
    """TensorBoard's tag comparison (Time Series): numbers compare as numbers, '/' and digits
    sort before any other character, a prefix before its extensions."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i0, j0 = i, j
            while i < len(a) and a[i].isdigit():
                i += 1
            while j < len(b) and b[j].isdigit():
                j += 1
            x, y = int(a[i0:i]), int(b[j0:j])
            if x != y:
                return -1 if x < y else 1
            continue
        sa, sb = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if sa != sb:
            return -1 if sa else 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def test_time_series_opens_on_the_ntk_group(ntk_run):
    import functools

    d, _ = ntk_run
    tags = events(d).Tags()
    cards = sorted(tags["scalars"] + tags["images"] + tags["histograms"],
                   key=functools.cmp_to_key(_tb_order))
    groups = list(dict.fromkeys(t.split("/", 1)[0] for t in cards))
    assert groups[0] == "ntk"  # (the first two groups are expanded)
    assert [t for t in cards if t.startswith("ntk/")][:2] == ["ntk/distance_to_limit",
                                                             "ntk/drift_from_init"]


def test_custom_scalars_one_quantity_per_chart(ntk_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    d, _ = ntk_run
    ea = events(d)
    layout = layout_pb2.Layout.FromString(
        ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    scalars = ea.Tags()["scalars"]
    charts = [c for cat in layout.category for c in cat.chart]
    assert len(charts) >= 15
    for c in charts:
        (regex,) = c.multiline.tag  # one tag per chart: its lines are the runs
        assert sum(bool(re.fullmatch(regex, t)) for t in scalars) == 1, (c.title, regex)
    assert "output/rmse_to_limit" not in str(layout)  # no output callback in this run


def test_images_are_readable(ntk_run):
    d, _ = ntk_run
    ea = events(d)
    for tag in ("ntk_images/K_t", "ntk_images/K_inf", "ntk_images/spectrum"):
        assert all(min(e.width, e.height) >= 480 for e in ea.Images(tag)), tag
    # no blank step-0 difference image
    assert [e.step for e in ea.Images("ntk_images/K_t_minus_K_0")] == [64, 128]
    assert ea.Tags()["tensors"].count("ntk/limit_kernel/text_summary") == 1


def test_kernel_images_share_a_colour_scale_and_drop_the_floor():
    from ntk_rnn.callbacks.figures import KernelImages, spectrum

    K0 = torch.eye(6, dtype=torch.float64) + 0.1
    Kinf = 2.0 * K0
    img = KernelImages()
    lo, hi = img.set_scale(K0, Kinf)
    assert lo < 0.1 and hi > 2.2
    img.heatmap("K_t", K0, "K_t")
    img.heatmap("K_inf", Kinf, "K_inf")
    img.heatmap("dK", Kinf - K0, "dK", diverging=True)
    clims = {k[0]: f.im.get_clim() for k, f in img._figs.items()}
    assert clims["K_t"] == clims["K_inf"] == (lo, hi)
    assert clims["dK"][0] == -clims["dK"][1]
    ev = spectrum(torch.diag(torch.tensor([2.0, 1.0, 1e-14, 0.0, -1e-17], dtype=torch.float64)))
    assert ev.tolist() == [2.0, 1.0]
    arr = img.spectrum_image("spectrum", {"K_t": ev}, "spectrum")
    assert arr.shape[0] >= 480 and arr.shape[1] >= 480


def test_log10_tags_skip_zero_and_step_zero():
    from ntk_rnn.callbacks.ntk import scalar_tags

    s = {"drift_from_init": 0.0, "kernel_distance": 1e-16, "kernel_distance_to_limit": 1e-4,
         "eig_1": 100.0, "eig_2": 0.0, "drift_c": 0.5, "velocity": 0.1}
    assert scalar_tags(s, 0) == {"ntk/drift_from_init": 0.0,
                                 "ntk/log10_kernel_distance_to_limit": pytest.approx(-4),
                                 "ntk/spectrum/log10_eig_1": 2.0, "ntk/per_block/drift_c": 0.5,
                                 "ntk/velocity": 0.1}
    assert scalar_tags(s, 5)["ntk/log10_kernel_distance"] == pytest.approx(-16)


def test_resume_logs_each_step_once_per_tag(tmp_path, ntk_run):
    ref, _ = ntk_run
    d = tmp_path / "run"
    tr = Trainer.from_config(make_cfg(*NTK_SMALL, "dtype=float64"), d)
    tr.callbacks.append(SignalAt(80))
    with pytest.raises(TrainingInterrupted):
        tr.fit()
    Trainer.from_config(make_cfg(*NTK_SMALL, "dtype=float64", "train.resume=true"), d).fit()
    ea, eb = events(ref), events(d)
    for kind, get in (("scalars", "Scalars"), ("images", "Images"), ("tensors", "Tensors"),
                      ("histograms", "Histograms")):
        tags = [t for t in ea.Tags()[kind] if t != "train/steps_per_s"]
        assert set(tags) <= set(eb.Tags()[kind]), kind
        for tag in tags:
            sa = [e.step for e in getattr(ea, get)(tag)]
            sb = [e.step for e in getattr(eb, get)(tag)]
            assert sb == sa, (kind, tag, sa, sb)


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
    cfg = make_cfg("model.width=16", "train.steps=20", "callbacks=[ntk]", "train=one_step",
                   "callbacks.ntk.every_n_steps=1", "callbacks.ntk.n_probes=4",
                   "callbacks.ntk.probe_length=4", "callbacks.ntk.limit=false",
                   "callbacks.ntk.top_k=3")
    Trainer.from_config(cfg, tmp_path).fit()
    ea = events(tmp_path)
    assert [e.step for e in ea.Scalars("ntk/drift_from_init")] == list(range(21))
    for tag in TRUNCATED:
        vals = [e.value for e in ea.Scalars(tag)]
        assert len(vals) == 21 and all(math.isfinite(v) for v in vals)
    assert ea.Scalars("ntk/train_kernel_asymmetry")[-1].value > 0


def test_bad_callback_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks\.ntk\.every_n_steps=0"):
        Trainer.from_config(make_cfg("callbacks=[ntk]", "callbacks.ntk.every_n_steps=0"),
                            tmp_path / "a")
    csv = tmp_path / "short.csv"
    csv.write_text("x\n" + "\n".join(str(0.1 * i % 1) for i in range(40)))
    with pytest.raises(ConfigError, match=r"callbacks\.ntk\.n_probes=64 exceeds"):
        Trainer.from_config(make_cfg("data=csv", f"data.path={csv}", "train.steps=10",
                                     "callbacks=[ntk]"), tmp_path / "b")
    with pytest.raises(ConfigError, match="limit_method=iid"):
        Trainer.from_config(make_cfg("callbacks=[ntk]", "+model.init.sampler._target_=tests."
                                     "test_callbacks.custom_sampler",
                                     "+model.init.sampler._partial_=true"), tmp_path / "c")
    assert not list(tmp_path.glob("*/events.out.*"))


def custom_sampler(width, input_dim, generator, dtype):
    c = torch.randn(width, generator=generator, dtype=dtype)
    w = torch.randn(width, input_dim, generator=generator, dtype=dtype)
    b = 0.4 * torch.rand(width, generator=generator, dtype=dtype)
    return c, w, b


def test_custom_law_with_monte_carlo_limit_runs(tmp_path):
    cfg = make_cfg("callbacks=[ntk]", "model.width=32", "train.steps=32",
                   "+model.init.sampler._target_=tests.test_callbacks.custom_sampler",
                   "+model.init.sampler._partial_=true", "callbacks.ntk.limit_method=iid",
                   "callbacks.ntk.n_probes=4", "callbacks.ntk.probe_length=4",
                   "callbacks.ntk.limit_tol=5e-2", "callbacks.ntk.top_k=2")
    m = Trainer.from_config(cfg, tmp_path).fit()
    assert math.isfinite(m["ntk_distance_to_limit"])


def _free_port():
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


@pytest.mark.e2e
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


def test_layout_names_the_callbacks_as_they_are():
    """logging's custom-scalars layout finds the callbacks by the (config name, class) pairs of
    ntk_rnn.tags: they are the callbacks' own."""
    from ntk_rnn import NTKCallback, OutputTrackingCallback, tags

    for pair, cls in ((tags.NTK_CALLBACK, NTKCallback),
                      (tags.OUTPUT_CALLBACK, OutputTrackingCallback)):
        assert pair == (cls.name, cls.__name__)
