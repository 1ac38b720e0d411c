"""Reliability: sweeps on every launcher (a failing job fails alone), resume after SIGKILL/SIGTERM
ends bit-identical to an uninterrupted run with each logged step once, checksummed checkpoints.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ntk_rnn import sweep
from ntk_rnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ntk_rnn.errors import ConfigError
from ntk_rnn.run import Trainer, TrainingInterrupted
from ntk_rnn.run.trainer import TIMING_KEYS

from .conftest import BARE, ROOT, SignalAt, make_cfg, run_cli

TINY = [*BARE, "train.steps=20"]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
}
# time-based numbers, and the resume marker, are the only fields a resumed run may differ in
TIMING = {*TIMING_KEYS, "resumed_from_step"}
TIMING_TAGS = {"train/steps_per_s", *(f"final/{k}" for k in TIMING)}


# --- sweeps ------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_completes_four_jobs(tmp_path, launcher):
    d = tmp_path / "sweep"
    r = run_cli("-m", *LAUNCHERS[launcher], *TINY, "seed=0,1,2,3", f"hydra.sweep.dir={d}")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sweep.collect(d)
    assert [j.num for j in jobs] == [0, 1, 2, 3]
    assert all(j.status == "completed" and j.metrics["steps"] == 20 for j in jobs)
    assert sorted(j.overrides["seed"] for j in jobs) == ["0", "1", "2", "3"]
    assert len({j.metrics["running_mse"] for j in jobs}) == 4  # four different runs
    assert sweep.main([str(d)]) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_invalid_job_fails_alone_and_summary_reports_it(tmp_path, capsys, launcher):
    d = tmp_path / "sweep"
    r = run_cli("-m", *LAUNCHERS[launcher], *TINY, "model.beta=0.6,0.75,1.5,0.9",
                f"hydra.sweep.dir={d}")
    assert r.returncode != 0  # Hydra re-raises the first failure once every job has run
    assert "model.beta=1.5 is outside [0.5, 1]" in r.stderr
    jobs = sweep.collect(d)
    assert [(j.overrides["model.beta"], j.status) for j in jobs] == [
        ("0.6", "completed"), ("0.75", "completed"), ("1.5", "failed"), ("0.9", "completed")]
    assert all(j.metrics["steps"] == 20 for j in jobs if j.ok)
    assert "model.beta=1.5" in jobs[2].error
    assert not list(Path(jobs[2].dir).glob("events.out.*"))  # failed before any output
    assert not (Path(jobs[2].dir) / "checkpoints").exists()
    capsys.readouterr()
    assert sweep.main([str(d)]) == 1
    out = capsys.readouterr().out
    assert "3 completed, 1 failed" in out and "job 2" in out and "model.beta=1.5" in out
    summary = json.loads((d / "summary.json").read_text())
    assert summary["counts"] == {"completed": 3, "failed": 1}
    rows = (d / "summary.csv").read_text().splitlines()
    assert len(rows) == 5 and "model.beta=1.5 is outside" in rows[3]


def test_summary_reports_a_killed_job(tmp_path, capsys):
    """A job directory without metrics.json (killed, crashed, or still running) is reported with
    its newest checkpoint; a diverged job with its message."""
    (tmp_path / "0_seed=0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0_seed=0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (tmp_path / "0_seed=0" / "checkpoints").mkdir()
    (tmp_path / "0_seed=0" / "checkpoints" / "step_000000300.pt").write_bytes(b"")
    (tmp_path / "1_seed=1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1_seed=1" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (tmp_path / "1_seed=1" / "metrics.json").write_text(json.dumps(
        {"status": "diverged", "steps": 17, "error": "training diverged at step 17"}))
    assert sweep.main([str(tmp_path), "--no-write"]) == 1
    out = capsys.readouterr().out
    assert "crashed" in out and "newest checkpoint at step 300" in out
    assert "diverged: training diverged at step 17" in out
    assert not (tmp_path / "summary.csv").exists()
    assert sweep.main([str(tmp_path / "nothing")]) == 2


@pytest.mark.e2e
def test_summary_lists_ensemble_members(tmp_path, capsys):
    """A sweep of ensemble jobs: one row per member (with the job's overrides), none for the
    ensemble directory itself."""
    d = tmp_path / "sweep"
    r = run_cli("-m", *TINY, "train.ensemble_size=3", "seed=0,5", f"hydra.sweep.dir={d}")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sweep.collect(d)
    assert [(j.num, j.overrides["seed"], j.overrides["member"]) for j in jobs] == [
        (0, "0", "0"), (0, "1", "1"), (0, "2", "2"), (1, "5", "0"), (1, "6", "1"), (1, "7", "2")]
    assert all(j.ok and j.metrics["steps"] == 20 for j in jobs)
    assert len({j.metrics["running_mse"] for j in jobs}) == 6
    assert sweep.main([str(d)]) == 0
    assert "6 completed" in capsys.readouterr().out
    # a member that never wrote metrics.json (killed) is still listed, as crashed
    member = Path(jobs[4].dir)
    (member / "metrics.json").unlink()
    jobs = sweep.collect(d)
    assert len(jobs) == 6 and jobs[4].status == "crashed" and jobs[4].overrides["seed"] == "6"


@pytest.mark.e2e
@pytest.mark.slow
def test_ray_launcher_local_instance(tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    d = tmp_path / "sweep"
    r = run_cli("-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                "+hydra.launcher.ray.init.include_dashboard=false", *TINY,
                "model.beta=0.6,0.9,1.5", f"hydra.sweep.dir={d}", timeout=600)
    assert r.returncode != 0 and "model.beta=1.5 is outside" in r.stderr  # the third job
    jobs = sweep.collect(d)
    assert [(j.num, j.status) for j in jobs] == [(0, "completed"), (1, "completed"),
                                                 (2, "failed")]
    assert all(j.metrics["steps"] == 20 for j in jobs[:2])


# --- resume: in-process, deterministic interruption ---------------------------------------------

RUN = ["model.width=8", "train.steps=600", "dtype=float64", "callbacks=[ntk,checkpoint]",
       "callbacks.ntk.every_n_steps=7", "callbacks.ntk.n_probes=4",
       "callbacks.ntk.probe_length=4", "callbacks.ntk.top_k=2",
       "callbacks.ntk.image_every_n_steps=0", "callbacks.ntk.histogram_every_n_steps=21",
       "callbacks.checkpoint.every_n_steps=50", "callbacks.checkpoint.keep_last=3",
       "train.log_every=10", "train.chunk_size=64"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    return d, Trainer.from_config(make_cfg(*RUN), d).fit()


def interrupted_run(d: Path, at: int, sig=signal.SIGTERM) -> TrainingInterrupted:
    tr = Trainer.from_config(make_cfg(*RUN), d)
    cb = SignalAt(at, sig)
    tr.callbacks.append(cb)
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as info:
        tr.fit()
    assert cb.handler_during_fit is not before  # ours during fit ...
    assert signal.getsignal(sig) is before  # ... and the previous one back afterwards
    return info.value


def events(d: Path) -> EventAccumulator:
    ea = EventAccumulator(str(d), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def assert_same_run(ref: Path, ref_metrics: dict, d: Path, metrics: dict) -> None:
    """Bit-identical final state, metrics and logs; each logged step once per tag."""
    a, b = (load_checkpoint(x / "checkpoints" / "final.pt") for x in (ref, d))
    for part in ("model", "online"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert a[part][k].dtype == torch.float64
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["step"] == b["step"] and torch.equal(a["sq_err"], b["sq_err"])
    assert torch.equal(a["probe_rng"], b["probe_rng"])
    assert a["callbacks"].keys() == b["callbacks"].keys()
    for name in a["callbacks"]:
        for k, v in a["callbacks"][name].items():
            w = b["callbacks"][name][k]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), (name, k)
            elif isinstance(v, dict):
                assert v.keys() == w.keys() and all(
                    torch.equal(v[i], w[i]) if isinstance(v[i], torch.Tensor) else v[i] == w[i]
                    for i in v), k
            else:
                assert v == w, (name, k)
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert strip(metrics) == strip(ref_metrics)
    assert strip(json.loads((d / "metrics.json").read_text())) == strip(
        json.loads((ref / "metrics.json").read_text()))
    ea, eb = events(ref), events(d)
    assert ea.Tags()["scalars"] and set(ea.Tags()["scalars"]) == set(eb.Tags()["scalars"])
    for tag in ea.Tags()["scalars"]:
        sa = [(e.step, e.value) for e in ea.Scalars(tag)]
        sb = [(e.step, e.value) for e in eb.Scalars(tag)]
        steps = [s for s, _ in sb]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        assert steps == [s for s, _ in sa], f"{tag}: steps missing or extra"
        if tag not in TIMING_TAGS:
            assert sb == sa, tag
    for kind, get in (("histograms", "Histograms"), ("tensors", "Tensors")):
        assert set(ea.Tags()[kind]) == set(eb.Tags()[kind])
        for tag in eb.Tags()[kind]:
            sa = [e.step for e in getattr(ea, get)(tag)]
            sb = [e.step for e in getattr(eb, get)(tag)]
            assert sb == sa and len(set(sb)) == len(sb), (kind, tag)


def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path, reference):
    ref, ref_metrics = reference
    d = tmp_path / "run"
    exc = interrupted_run(d, at=237)  # not a checkpoint, NTK or log step
    assert exc.step == 237 and exc.checkpoint == d / "checkpoints" / "step_000000237.pt"
    assert load_checkpoint(exc.checkpoint)["step"] == 237
    m = json.loads((d / "metrics.json").read_text())
    assert m["status"] == "interrupted" and "train.resume=true" in m["error"]
    assert not (d / "checkpoints" / "final.pt").exists()
    tr = Trainer.from_config(make_cfg(*RUN, "train.resume=true"), d)
    assert tr.step == 237 and tr.members[0].resumed_from == exc.checkpoint
    metrics = tr.fit()
    assert metrics["resumed_from_step"] == 237
    assert_same_run(ref, ref_metrics, d, metrics)


def test_sigint_is_handled_like_sigterm(tmp_path, reference):
    exc = interrupted_run(tmp_path, at=100, sig=signal.SIGINT)
    assert isinstance(exc, KeyboardInterrupt) and exc.step == 100
    metrics = Trainer.from_config(make_cfg(*RUN, "train.resume=auto"), tmp_path).fit()
    assert_same_run(*reference, tmp_path, metrics)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference, capsys):
    d = tmp_path / "run"
    interrupted_run(d, at=237)
    ckpts = sorted((d / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts][-2:] == ["step_000000200.pt", "step_000000237.pt"]
    latest = ckpts[-1]
    latest.write_bytes(latest.read_bytes()[:-100])  # truncated by a full disk, say
    stale = d / "checkpoints" / ".step_000000250.pt.x1y2.tmp"  # a write cut short
    stale.write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(latest)
    tr = Trainer.from_config(make_cfg(*RUN, "train.resume=true"), d)
    assert tr.step == 200 and tr.members[0].resumed_from.name == "step_000000200.pt"
    assert "step_000000237.pt is truncated" in capsys.readouterr().err
    assert stale.exists()  # building the run writes nothing (another process may hold it) ...
    assert_same_run(*reference, d, tr.fit())
    assert not stale.exists()  # ... fit, holding the run directory's lock, tidies it


def test_resume_modes_and_mismatched_config(tmp_path, reference):
    with pytest.raises(ConfigError, match=r"train\.resume=true but .* holds no"):
        Trainer.from_config(make_cfg(*RUN, "train.resume=true"), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    fresh = Trainer.from_config(make_cfg(*RUN, "train.resume=auto"), tmp_path / "auto")
    assert fresh.step == 0 and fresh.members[0].resumed_from is None
    d = tmp_path / "run"
    interrupted_run(d, at=120)
    with pytest.raises(ConfigError, match=r"different config \(model\.beta: 0\.75 -> 0\.8"):
        Trainer.from_config(make_cfg(*RUN, "model.beta=0.8", "train.resume=true"), d)
    with pytest.raises(ConfigError, match="train.resume='yes': choose true, false or auto"):
        Trainer.from_config(make_cfg(*RUN, "train.resume=yes"), d)
    # a finished run asked to resume is not redone
    ref, ref_metrics = reference
    done = Trainer.from_config(make_cfg(*RUN, "train.resume=auto"), ref)
    assert done.members[0].completed is not None and done.fit() == json.loads(
        (ref / "metrics.json").read_text())


def test_a_second_signal_stops_at_once(tmp_path):
    class Twice(SignalAt):
        def on_step_end(self, step, state):
            if step == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    tr = Trainer.from_config(make_cfg(*RUN), tmp_path)
    tr.callbacks.append(Twice(60))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="second SIGTERM") as info:
        tr.fit()
    assert info.value.checkpoint is None
    assert signal.getsignal(signal.SIGTERM) is before


# --- resume: killed subprocesses (the CLI) ----------------------------------------------------

CLI_RUN = ["model.width=8", "train.steps=10000", "dtype=float64", "callbacks=[ntk,checkpoint]",
           "callbacks.ntk.every_n_steps=250", "callbacks.ntk.n_probes=4",
           "callbacks.ntk.probe_length=4", "callbacks.ntk.top_k=2",
           "callbacks.ntk.image_every_n_steps=0", "callbacks.ntk.histogram_every_n_steps=0",
           "callbacks.checkpoint.every_n_steps=500"]


def start_cli(run_dir: Path, *extra: str, run=CLI_RUN) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    return subprocess.Popen([sys.executable, "-m", "ntk_rnn.train", *run,
                             f"hydra.run.dir={run_dir}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not list((run_dir / "checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.005)


def signal_mid_run(run_dir: Path, sig: int) -> tuple[int, str]:
    """Start the CLI run, send ``sig`` once its first checkpoint is on disk; (returncode,
    stderr) when it has exited."""
    proc = start_cli(run_dir)
    wait_for_checkpoint(proc, run_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "reference"
    r = run_cli(*CLI_RUN, f"hydra.run.dir={d}")
    assert r.returncode == 0, r.stderr[-3000:]
    return d, json.loads((d / "metrics.json").read_text())


@pytest.mark.e2e
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, cli_reference):
    d = tmp_path / "killed"
    assert signal_mid_run(d, signal.SIGKILL)[0] == -signal.SIGKILL
    assert not (d / "metrics.json").exists() and not (d / "checkpoints" / "final.pt").exists()
    last = max(int(p.stem[5:]) for p in (d / "checkpoints").glob("step_*.pt"))
    assert 0 < last < 10000  # killed mid-way
    r = run_cli(*CLI_RUN, f"hydra.run.dir={d}", "train.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    metrics = json.loads((d / "metrics.json").read_text())
    assert 0 < metrics["resumed_from_step"] < 10000
    assert_same_run(*cli_reference, d, metrics)


@pytest.mark.e2e
def test_sigterm_cli_leaves_checkpoint_and_clear_message(tmp_path, cli_reference):
    d = tmp_path / "terminated"
    code, err = signal_mid_run(d, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ntk_rnn: interrupted")]
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0]
    assert "train.resume=true" in lines[0] and f"hydra.run.dir={d} " in lines[0]
    assert "Traceback" not in err
    m = json.loads((d / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["signal"] == "SIGTERM"
    assert load_checkpoint(m["checkpoint"])["step"] == m["steps"]
    r = run_cli(*CLI_RUN, f"hydra.run.dir={d}", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(*cli_reference, d, json.loads((d / "metrics.json").read_text()))


@pytest.mark.e2e
@pytest.mark.slow
def test_repeated_random_kills_lose_nothing(tmp_path):
    """SIGKILL/SIGTERM at random moments (start-up, training, checkpoint writes), again and
    again on the same run directory with train.resume=auto; the run still ends bit-identical."""
    run = [a.replace("train.steps=10000", "train.steps=100000") for a in CLI_RUN]
    ref = tmp_path / "reference"
    r = run_cli(*run, f"hydra.run.dir={ref}")
    assert r.returncode == 0, r.stderr[-3000:]
    rng = random.Random(int(os.environ.get("NTK_RNN_KILL_SEED", "0")))
    d, kills, mid_write = tmp_path / "run", {"SIGKILL": 0, "SIGTERM": 0}, 0
    for _ in range(int(os.environ.get("NTK_RNN_KILLS", "8"))):
        proc = start_cli(d, "train.resume=auto", run=run)
        time.sleep(rng.uniform(0.5, 4.5))
        if proc.poll() is not None:  # finished before the signal
            break
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        kills[sig.name] += 1
        mid_write += bool(list((d / "checkpoints").glob(".*.tmp")))
    r = run_cli(*run, f"hydra.run.dir={d}", "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nkills: {kills} ({mid_write} during a checkpoint write), run intact")
    assert_same_run(ref, json.loads((ref / "metrics.json").read_text()), d,
                    json.loads((d / "metrics.json").read_text()))


# --- checkpoint files --------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    payload = {"step": 3, "x": torch.arange(5.0, dtype=torch.float64), "name": "a"}
    p = save_checkpoint(tmp_path / "c.pt", payload)
    assert p.read_bytes().startswith(b"PK\x03\x04")  # a torch.save zip (v3) ...
    assert torch.load(p, weights_only=True)["step"] == 3  # ... that plain torch.load reads
    back = load_checkpoint(p)
    assert back["step"] == 3 and torch.equal(back["x"], payload["x"]) and back["name"] == "a"
    raw = p.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "corrupt: sha256": raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:]),
        "not an ntk_rnn checkpoint": b"hello, world\n",
        "bytes more than": raw + b"tail",
    }
    for i, (msg, data) in enumerate(cases.items()):
        (tmp_path / f"bad{i}.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(tmp_path / f"bad{i}.pt")
    torch.save({"step": 1}, tmp_path / "foreign.pt")  # a torch file, not ours
    with pytest.raises(CheckpointError, match="not an ntk_rnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "ntk_rnn-checkpoint-v1", "step": 2}, tmp_path / "v1.pt")  # old format
    assert load_checkpoint(tmp_path / "v1.pt")["step"] == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "c.pt", {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(p, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(p)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.e2e
def test_hydra_resume_of_a_sweep_finds_its_job_dirs(tmp_path):
    """train.resume is left out of the job directory names, so re-running a sweep with
    train.resume=auto (same hydra.sweep.dir) continues each job in its own directory."""
    d = tmp_path / "sweep"
    r = run_cli("-m", *TINY, "seed=0,1", f"hydra.sweep.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    first = sorted(p.name for p in d.iterdir() if p.is_dir())
    r = run_cli("-m", *TINY, "seed=0,1", "train.resume=auto", f"hydra.sweep.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == first
    assert r.stderr.count("nothing to resume") == 2
