"""Ensembles from the CLI (``train.ensemble_size``): member e is exactly the single run with
seed + e (own data streams, or one shared stream), each logged as its own run; ensemble.json;
a diverging member is dropped alone; signals and resume; config errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ntk_rnn.checkpoint import load_checkpoint, save_checkpoint
from ntk_rnn.errors import ConfigError
from ntk_rnn.run import Trainer, TrainingInterrupted
from ntk_rnn.run.build import member_config, run_seeds
from ntk_rnn.run.trainer import TIMING_KEYS, EnsembleIncomplete

from .conftest import CALLBACKS_OFF, ROOT, SignalAt, make_cfg, run_cli

# float64, a cheap NTK callback (no limit kernel) whose events do not line up with the chunks
RUN = ["model.width=16", "train.steps=300", "dtype=float64", "train.chunk_size=64",
       "train.log_every=10"]
NO_CALLBACKS = [*RUN, CALLBACKS_OFF]
BASE = [*RUN, "callbacks=[ntk,checkpoint]", "callbacks.ntk.every_n_steps=7",
        "callbacks.ntk.n_probes=4", "callbacks.ntk.probe_length=4", "callbacks.ntk.top_k=2",
        "callbacks.ntk.limit=false", "callbacks.ntk.image_every_n_steps=0",
        "callbacks.ntk.histogram_every_n_steps=21", "callbacks.checkpoint.every_n_steps=50",
        "callbacks.checkpoint.keep_last=3"]
TIMING = {*TIMING_KEYS, "resumed_from_step"}
TIMING_TAGS = {"train/steps_per_s", *(f"final/{k}" for k in TIMING)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def scalars(d: Path) -> dict:
    ea = EventAccumulator(str(d), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def assert_same_run(member: Path, solo: Path, logs: bool = True) -> None:
    """Final parameters, RTRL state and errors ≤ 1e-12 relative; metrics.json and every logged
    scalar (the NTK drift included) the same, timings aside."""
    a, b = load_checkpoint(member / "checkpoints/final.pt"), load_checkpoint(
        solo / "checkpoints/final.pt")
    assert a["step"] == b["step"]
    for part in ("model", "online"):
        for k in b[part]:
            assert a[part][k].dtype == torch.float64
            assert rel(a[part][k], b[part][k]) <= 1e-12, (part, k)
    assert rel(a["sq_err"], b["sq_err"]) <= 1e-12
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (member, solo))
    assert ma.keys() - TIMING == mb.keys() - TIMING and ma["status"] == "completed"
    for k in mb:
        if k in TIMING:
            continue
        if isinstance(mb[k], float):
            assert math.isclose(ma[k], mb[k], rel_tol=1e-12, abs_tol=1e-300), k
        else:
            assert ma[k] == mb[k], k
    if not logs:
        return
    sa, sb = scalars(member), scalars(solo)
    assert sa.keys() == sb.keys() and "ntk/drift_from_init" in sa
    for tag in sb:
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        if tag not in TIMING_TAGS:
            for (_, x), (_, y) in zip(sa[tag], sb[tag], strict=True):
                assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), tag  # (float32 events)


def solo(d: Path, *overrides: str, base=BASE) -> Path:
    Trainer.from_config(make_cfg(*base, *overrides), d).fit()
    return d


def test_member_equals_solo_run_own_streams(tmp_path):
    ens = tmp_path / "ens"
    summary = Trainer.from_config(make_cfg(*BASE, "seed=5", "train.ensemble_size=3"), ens).fit()
    for e in range(3):
        assert_same_run(ens / f"member_{e:03d}", solo(tmp_path / f"solo{e}", f"seed={5 + e}"))
        cfg = (ens / f"member_{e:03d}/config.yaml").read_text()
        assert f"seed: {5 + e}\n" in cfg and "ensemble_size: 1\n" in cfg
    # ensemble.json
    s = json.loads((ens / "ensemble.json").read_text())
    assert s == json.loads(json.dumps(summary, default=float))
    assert s["status"] == "completed" and s["ensemble_size"] == 3 and s["seeds"] == [5, 6, 7]
    assert s["shared_stream"] is False and s["data_seeds"] == [None, None, None]
    assert s["network_steps"] == 3 * 300 and s["steps"] == 300
    assert s["wall_s"] > 0 and s["network_steps_per_s"] > 0 and s["backend"] in (
        "kernel", "eager")
    assert [(m["dir"], m["status"], m["steps"]) for m in s["members"]] == [
        (f"member_{e:03d}", "completed", 300) for e in range(3)]
    assert s["counts"] == {"completed": 3}
    assert math.isclose(s["running_mse"], sum(m["running_mse"] for m in s["members"]) / 3)


def test_shared_stream_members_read_the_stream_of_the_base_seed(tmp_path):
    """Shared stream: member e = the single run with seed + e and data_seed = seed (the data
    stream of run seed ``seed``); its model and probes still come from seed + e."""
    ens = tmp_path / "ens"
    over = ["train.steps=200"]
    Trainer.from_config(make_cfg(*NO_CALLBACKS, *over, "seed=2", "train.ensemble_size=3",
                   "train.shared_stream=true"), ens).fit()
    for e in (0, 2):
        assert_same_run(ens / f"member_{e:03d}",
                        solo(tmp_path / f"solo{e}", *over, f"seed={2 + e}", "data_seed=2",
                             base=NO_CALLBACKS),
                        logs=False)
    # the stream is that of run seed 2: member 0 is exactly the plain seed=2 run
    plain = solo(tmp_path / "plain", *over, "seed=2", base=NO_CALLBACKS)
    assert_same_run(ens / "member_000", plain, logs=False)
    finals = [load_checkpoint(ens / f"member_{e:03d}/checkpoints/final.pt")["model"]["c"]
              for e in range(3)]
    assert not torch.equal(finals[0], finals[1])  # different networks, one stream
    s = json.loads((ens / "ensemble.json").read_text())
    assert s["shared_stream"] is True and s["data_seeds"] == [2, 2, 2]


def test_member_config_seeds():
    cfg = make_cfg("seed=3", "train.ensemble_size=4")
    assert [member_config(cfg, e).seed for e in range(4)] == [3, 4, 5, 6]
    assert member_config(cfg, 2).data_seed is None
    assert member_config(cfg, 2).train.ensemble_size == 1
    assert run_seeds(member_config(cfg, 2)) == run_seeds(make_cfg("seed=5"))
    shared = make_cfg("seed=3", "train.ensemble_size=4", "train.shared_stream=true")
    seeds = [run_seeds(member_config(shared, e)) for e in range(4)]
    assert len({s["data"] for s in seeds}) == 1 and len({s["model"] for s in seeds}) == 4
    assert seeds[0] == run_seeds(make_cfg("seed=3"))
    assert member_config(make_cfg("data_seed=10", "train.ensemble_size=2"), 1).data_seed == 11


def test_a_diverging_member_is_dropped_and_the_others_go_on(tmp_path):
    over = ["train.divergence_threshold=1e3"]
    tr = Trainer.from_config(make_cfg(*NO_CALLBACKS, *over, "train.ensemble_size=3"),
                             tmp_path / "ens")
    with torch.no_grad():
        tr.members[1].model.c.mul_(1e6)  # member 1 blows up at once
    with pytest.raises(EnsembleIncomplete, match="1 of 3 members did not complete.*diverged"):
        tr.fit()
    bad = tmp_path / "ens/member_001"
    assert json.loads((bad / "metrics.json").read_text())["status"] == "diverged"
    assert (bad / "checkpoints/last_good.pt").exists() and not (bad / "checkpoints/final.pt"
                                                                ).exists()
    for e in (0, 2):
        assert_same_run(tmp_path / f"ens/member_{e:03d}",
                        solo(tmp_path / f"solo{e}", *over, f"seed={e}", base=NO_CALLBACKS),
                        logs=False)
    s = json.loads((tmp_path / "ens/ensemble.json").read_text())
    assert s["status"] == "incomplete" and s["counts"] == {"completed": 2, "diverged": 1}
    assert "lower train.alpha" in s["members"][1]["error"]


def test_sigterm_then_resume_as_ensemble_and_as_single_run(tmp_path):
    over = ["callbacks.ntk.histogram_every_n_steps=0"]
    ref = tmp_path / "ref"
    Trainer.from_config(make_cfg(*BASE, *over, "train.ensemble_size=3"), ref).fit()
    d = tmp_path / "ens"
    tr = Trainer.from_config(make_cfg(*BASE, *over, "train.ensemble_size=3"), d)
    tr.members[1].callbacks.append(SignalAt(137))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="train.resume=true") as info:
        tr.fit()
    assert info.value.step == 137 and signal.getsignal(signal.SIGTERM) is before
    for e in range(3):  # every member stopped at the same step, with its checkpoint
        m = json.loads((d / f"member_{e:03d}/metrics.json").read_text())
        assert m["status"] == "interrupted" and m["steps"] == 137
        assert (d / f"member_{e:03d}/checkpoints/step_000000137.pt").exists()
    assert json.loads((d / "ensemble.json").read_text())["status"] == "interrupted"
    # a member directory is a single run: resume member 1 alone ...
    with pytest.raises(ConfigError, match="holds an ensemble"):
        Trainer.from_config(make_cfg(*BASE, *over, "train.resume=true"), d)
    one = Trainer.from_config(make_cfg(*BASE, *over, "seed=1", "train.resume=true"),
                              d / "member_001")
    assert one.step == 137
    one.fit()
    # ... and the rest as the ensemble (member 1 is done and skipped)
    s = Trainer.from_config(make_cfg(*BASE, *over, "train.ensemble_size=3", "train.resume=true"),
                            d).fit()
    assert s["status"] == "completed" and s["network_steps"] == 2 * (300 - 137)
    for e in range(3):
        assert_same_run(d / f"member_{e:03d}", ref / f"member_{e:03d}")
        m = json.loads((d / f"member_{e:03d}/metrics.json").read_text())
        assert m["resumed_from_step"] == 137
    with pytest.raises(ConfigError, match="holds a single run"):
        Trainer.from_config(make_cfg(*BASE, "train.ensemble_size=2", "train.resume=auto"),
                        d / "member_000")


def test_checkpoints_from_before_the_ensemble_keys_still_resume(tmp_path):
    cfg = ["model.width=8", "train.steps=100", "dtype=float64", "callbacks=[checkpoint]",
           "callbacks.checkpoint.every_n_steps=40"]
    Trainer.from_config(make_cfg(*cfg), tmp_path).fit()
    ck = tmp_path / "checkpoints/step_000000080.pt"
    payload = load_checkpoint(ck)
    old = "\n".join(ln for ln in payload["config"].splitlines()
                    if not ln.strip().startswith(("ensemble_size:", "shared_stream:",
                                                  "data_seed:")))
    assert old != payload["config"]
    save_checkpoint(ck, {**payload, "config": old + "\n"})
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "checkpoints/final.pt").unlink()
    assert Trainer.from_config(make_cfg(*cfg, "train.resume=true"), tmp_path).step == 80
    with pytest.raises(ConfigError, match="data_seed: '<absent>' -> 5"):  # not the default
        Trainer.from_config(make_cfg(*cfg, "train.resume=true", "data_seed=5"), tmp_path)


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_invalid_ensemble_size_is_one_clear_error(tmp_path, bad):
    with pytest.raises(ConfigError, match=rf"train\.ensemble_size={bad} must be an integer >= 1"):
        Trainer.from_config(make_cfg(*BASE, f"train.ensemble_size={bad}"), tmp_path / "run").fit()
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"data_seed=-1 must be >= 0"):
        Trainer.from_config(make_cfg(*BASE, "data_seed=-1"), tmp_path / "run")


@pytest.mark.e2e
def test_cli_ensemble_with_default_callbacks(tmp_path):
    r = run_cli("model.width=16", "train.steps=200", "train.ensemble_size=3",
                "callbacks.ntk.n_probes=8", "callbacks.ntk.probe_length=6",
                "callbacks.ntk.every_n_steps=50", "callbacks.checkpoint.every_n_steps=100",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ensemble.json").read_text())
    assert s["status"] == "completed" and s["seeds"] == [0, 1, 2]
    for e in range(3):
        d = tmp_path / f"member_{e:03d}"
        m = json.loads((d / "metrics.json").read_text())
        assert m["status"] == "completed" and m["steps"] == 200
        assert "ntk_drift_from_init" in m and "ntk_distance_to_limit" in m
        assert (d / "config.yaml").exists() and list(d.glob("events.out.tfevents.*"))
        assert (d / "checkpoints/final.pt").exists() and (d / "checkpoints/init.pt").exists()
    assert len({json.loads((tmp_path / f"member_{e:03d}/metrics.json").read_text())[
        "running_mse"] for e in range(3)}) == 3
    bad = run_cli("model.width=16", "train.steps=20", CALLBACKS_OFF, "train.ensemble_size=0",
                  f"hydra.run.dir={tmp_path}/bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("ntk_rnn:")]
    assert lines == ["ntk_rnn: config error: train.ensemble_size=0 must be an integer >= 1 (the "
                     "number of networks trained together; 1 = a single run)"]


@pytest.mark.e2e
def test_cli_sigterm_stops_every_member_with_one_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntk_rnn.train", "model.width=8", "train.steps=10000000",
         "train.ensemble_size=2", "callbacks=[checkpoint]",
         "callbacks.checkpoint.every_n_steps=500", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list((tmp_path / "member_001/checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ntk_rnn:")]
    assert len(lines) == 1 and lines[0].startswith("ntk_rnn: interrupted: stopped by SIGTERM")
    assert "Traceback" not in err
    steps = {json.loads((tmp_path / f"member_{e:03d}/metrics.json").read_text())["steps"]
             for e in range(2)}
    assert len(steps) == 1  # both members stopped at one step, each with its checkpoint
    k = steps.pop()
    assert all((tmp_path / f"member_{e:03d}/checkpoints/step_{k:09d}.pt").exists()
               for e in range(2))


def test_resuming_a_completed_ensemble_redoes_nothing(tmp_path):
    cfg = [*NO_CALLBACKS, "train.steps=50", "train.ensemble_size=2"]
    first = Trainer.from_config(make_cfg(*cfg), tmp_path).fit()
    again = Trainer.from_config(make_cfg(*cfg, "train.resume=auto"), tmp_path).fit()
    assert again == json.loads(json.dumps(first, default=float))
