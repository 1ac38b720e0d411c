"""The sweep tool's plot against t = step/N, and the HParams entry of a CLI sweep."""

import json
import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from ntk_rnn import sweep

from .conftest import run_cli


def fake_sweep(root: Path, widths=(32, 64), seeds=(0, 1), horizon=2.0) -> Path:
    """Job directories as a sweep leaves them, with NTK curves drift = t/√N (+ seed noise)."""
    num = 0
    for N in widths:
        for seed in seeds:
            d = root / f"{num}_width={N},seed={seed}"
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump([f"model.width={N}", f"seed={seed}"]))
            (d / "config.yaml").write_text(yaml.safe_dump({"model": {"width": N},
                                                           "seed": seed}))
            (d / "metrics.json").write_text(json.dumps({"status": "completed",
                                                        "steps": int(horizon * N)}))
            with SummaryWriter(str(d)) as w:
                for step in range(0, int(horizon * N) + 1, N // 8):
                    t = step / N
                    w.add_scalar("ntk/drift_from_init", t / N ** 0.5 * (1 + 0.1 * seed), step)
                    w.add_scalar("ntk/distance_to_limit", 1 / N ** 0.5 + 0.01 * t, step)
            num += 1
    return root


def test_plot_sweep_on_the_t_axis(tmp_path):
    d = fake_sweep(tmp_path / "sw")
    curves = sweep.sweep_curves(d)
    assert set(curves) == {"ntk/drift_from_init", "ntk/distance_to_limit"}
    for N in (32, 64):
        runs = curves["ntk/drift_from_init"][("", N)]
        assert len(runs) == 2 and all(math.isclose(t[-1], 2.0) for t, _ in runs)
    t, mean, lo, hi = sweep._band(curves["ntk/drift_from_init"][("", 64)])
    assert (lo <= mean).all() and (mean <= hi).all() and (hi > lo)[1:].all()

    png = sweep.plot_sweep(d)
    assert png == d / sweep.PLOT_PNG and png.stat().st_size > 10_000
    sweep.plot_sweep(d)  # again: the root's plot event file is replaced, not added to
    assert len(list(d.glob(f"events.out.tfevents.*{sweep.PLOT_SUFFIX}"))) == 1
    ea = EventAccumulator(str(d))
    ea.Reload()
    (img,) = ea.Images(sweep.PLOT_TAG)
    assert img.width >= 2 * 480 and img.height >= 400

    assert sweep.main([str(d), "--plot", "--no-write"]) == 0


def test_plot_sweep_without_curves_says_why(tmp_path, capsys):
    d = tmp_path / "sw"
    (d / "0_a").mkdir(parents=True)
    (d / "0_a" / "metrics.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ValueError, match="logged any of"):
        sweep.plot_sweep(d)
    assert sweep.main([str(d), "--plot", "--no-write"]) == 0
    assert "no plot" in capsys.readouterr().err


def test_hydra_callback_plots_at_the_end_of_a_multirun(tmp_path):
    d = fake_sweep(tmp_path / "sw", widths=(16,), seeds=(0,))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(d)}}})
    sweep.PlotSweepCallback().on_multirun_end(cfg)
    assert (d / sweep.PLOT_PNG).exists() and (d / "summary.csv").exists()


SUBDIR = "${hydra.job.num}_${ntk_trial:${hydra.sweep.dir},${hydra.job.override_dirname}}"


@pytest.mark.e2e
def test_cli_sweep_hparams_mark_what_varies(tmp_path):
    d = tmp_path / "sw"
    r = run_cli("-m", "model.width=8,16", "train.steps=16", "callbacks=[ntk]",
                "callbacks.ntk.every_n_steps=8", "callbacks.ntk.n_probes=4",
                "callbacks.ntk.probe_length=4", "callbacks.ntk.limit=false",
                "callbacks.ntk.top_k=2", "seed=3", f"hydra.sweep.dir={d}",
                f"hydra.sweep.subdir='{SUBDIR}'")  # short trial names: the swept values only
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sweep.collect(d)
    assert [j.status for j in jobs] == ["completed", "completed"]
    assert [Path(j.dir).name for j in jobs] == ["0_width=8", "1_width=16"]
    ea = EventAccumulator(jobs[1].dir)
    ea.Reload()
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    infos = [(h.display_name, h.differs) for h in exp.hparam_infos]
    # swept first (differs), then the other overrides and width, β, α, gradient, seed, horizon
    assert infos[0] == ("width", True)
    assert ("seed", False) in infos and "steps" not in dict(infos)  # a shared override
    assert [m.name.tag for m in exp.metric_infos] == ["ntk/drift_from_init", "train/running_mse"]
    assert sweep.plot_sweep(d).exists()
