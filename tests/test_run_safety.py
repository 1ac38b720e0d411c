"""A finished run is never damaged by a later command, one writer per run directory, atomic
files, only allowed ``_target_``s run, resources checked before allocating, a safe kernel cache,
and every bad input as one ``ntk_rnn: ...`` line (issue 23; issue 21 points 1, 3, 5, 6)."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ntk_rnn import train as cli
from ntk_rnn.callbacks import Callback, CheckpointCallback
from ntk_rnn.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from ntk_rnn.csrc import loader
from ntk_rnn.errors import ConfigError
from ntk_rnn.run import Trainer
from ntk_rnn.run import lock as lockmod
from ntk_rnn.run.lock import RunDirLocked, RunLock
from ntk_rnn.run.resume import find_checkpoint
from ntk_rnn.run.trainer import TIMING_KEYS

from .conftest import BARE, CALLBACKS_OFF, ROOT, make_cfg, run_cli

TINY = [*BARE, "train.steps=20"]
# a short run with NTK metrics and a checkpoint at its last step (shorter than the interval)
NTK = ["model.width=8", "train.steps=30", "dtype=float64", "callbacks=[ntk,checkpoint]",
       "callbacks.ntk.every_n_steps=10", "callbacks.ntk.n_probes=4",
       "callbacks.ntk.probe_length=4", "callbacks.ntk.top_k=2",
       "callbacks.ntk.image_every_n_steps=0",
       "callbacks.ntk.histogram_every_n_steps=0", "callbacks.checkpoint.every_n_steps=1000"]
CUSTOM = ["train.steps=20", CALLBACKS_OFF, "model=custom"]
TIMING = {*TIMING_KEYS, "resumed_from_step"}


def tree(d: Path) -> dict:
    """Every file under d with its bytes and mtime: 'nothing changed' is equality."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("finished") / "run"
    return d, Trainer.from_config(make_cfg(*TINY), d).fit()


# --- a finished run is never damaged ------------------------------------------------------------
def test_resume_of_a_completed_run_is_a_noop_that_keeps_its_files(finished, tmp_path):
    d, metrics = finished
    before = tree(d)
    for mode in ("true", "auto"):
        tr = Trainer.from_config(make_cfg(*TINY, f"train.resume={mode}"), d)
        assert tr.fit() == metrics
    assert tree(d) == before  # metrics.json, config, checkpoints: untouched


def test_a_completed_run_is_completed_by_its_own_record(finished, tmp_path):
    """metrics.json lost or overwritten (a crash, an old bug): final.pt's record brings it back;
    final.pt unreadable: metrics.json says it, and the resume is still a no-op."""
    src, metrics = finished
    d = tmp_path / "run"
    os.system(f"cp -a {src} {d}")
    (d / "metrics.json").write_text('{"status": "failed", "error": "x"}')
    assert Trainer.from_config(make_cfg(*TINY, "train.resume=true"), d).fit() == metrics
    assert json.loads((d / "metrics.json").read_text()) == metrics
    final = d / "checkpoints" / "final.pt"
    final.write_bytes(final.read_bytes()[:-50])  # corrupt
    before = tree(d)
    assert Trainer.from_config(make_cfg(*TINY, "train.resume=true"), d).fit() == metrics
    assert tree(d) == before
    with pytest.raises(ConfigError, match=r"different config \(model\.beta"):
        Trainer.from_config(make_cfg(*TINY, "train.resume=true", "model.beta=0.9"), d)
    assert tree(d) == before


def test_a_fresh_run_into_a_completed_run_is_refused(finished):
    d, _ = finished
    before = tree(d)
    with pytest.raises(ConfigError, match=r"holds a completed run; a new run needs a new dir"):
        Trainer.from_config(make_cfg(*TINY), d)
    assert tree(d) == before


def test_the_end_of_a_run_can_be_redone(tmp_path):
    """Killed while final.pt was written (no step checkpoint before the last step): the resume
    from the last step's checkpoint reports the same metrics, NTK values and backend included."""
    ref = Trainer.from_config(make_cfg(*NTK), tmp_path / "ref").fit()
    d = tmp_path / "run"
    Trainer.from_config(make_cfg(*NTK), d).fit()
    (d / "checkpoints" / "final.pt").unlink()
    (d / "metrics.json").unlink()
    assert [p.name for p in (d / "checkpoints").glob("step_*.pt")] == ["step_000000030.pt"]
    got = Trainer.from_config(make_cfg(*NTK, "train.resume=true"), d).fit()
    assert "ntk_drift_from_init" in ref and got["backend"] == ref["backend"]
    assert {k: v for k, v in got.items() if k not in TIMING} == \
        {k: v for k, v in ref.items() if k not in TIMING}


# --- atomic files, OSError as one line ----------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    p = atomic_write_text(tmp_path / "metrics.json", '{"status": "completed"}')
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(p, '{"status": "failed"}')
    monkeypatch.setattr(os, "fsync", real)
    assert p.read_text() == '{"status": "completed"}' and list(tmp_path.iterdir()) == [p]
    assert info.value.errno == errno.ENOSPC


def test_oserror_during_a_run_is_one_line_naming_the_file_and_checkpoint(tmp_path, monkeypatch):
    import ntk_rnn.run.member as member

    real = member.atomic_write_text

    def full(path, text):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(member, "atomic_write_text", full)
    d = tmp_path / "run"
    cfg = make_cfg(*TINY, "callbacks=[checkpoint]", "callbacks.checkpoint.every_n_steps=10")
    with pytest.raises(OSError) as info:
        Trainer.from_config(cfg, d).fit()
    line = cli.write_error_message(info.value, d)
    assert line.startswith(f"cannot write {d / 'metrics.json'}: No space left on device; the "
                           f"last intact checkpoint is {d / 'checkpoints'}/step_000000020.pt")
    assert "\n" not in line
    assert not (d / lockmod.LOCK_NAME).exists()  # the lock went with the run


def test_a_directory_named_like_a_checkpoint_is_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step_000015000.pt").mkdir(parents=True)
    for k in (10, 20, 30):
        save_checkpoint(folder / f"step_{k:09d}.pt", {"step": k})
    CheckpointCallback(keep_last=2).prune(folder)  # no IsADirectoryError
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_000000020.pt", "step_000000030.pt", "step_000015000.pt"]
    path, payload = find_checkpoint(tmp_path, 100)
    assert path.name == "step_000000030.pt" and payload["step"] == 30


# --- one writer per run directory ---------------------------------------------------------------
def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    a = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirLocked, match=rf"in use by another run: PID {os.getpid()} on host "
                       rf"{socket.gethostname()} \(since .*lock file .*\.ntk_rnn\.lock\)"):
        RunLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / lockmod.LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    path = tmp_path / lockmod.LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    path.write_text(json.dumps({"host": host, "pid": dead.pid, "start": "1", "since": 0}))
    RunLock(tmp_path).acquire().release()  # its PID is gone
    path.write_text(json.dumps({"host": host, "pid": os.getpid(), "start": "0", "since": 0}))
    RunLock(tmp_path).acquire().release()  # our PID, but another process's start time (reused)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(RunDirLocked, match="host elsewhere"):  # another host, fresh: held
        RunLock(tmp_path).acquire()
    old = time.time() - lockmod.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    RunLock(tmp_path).acquire().release()  # another host, not refreshed for long: stale
    path.write_text(json.dumps({"host": "node7", "pid": 1, "since": 0, "job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same Slurm job, requeued from node7
    RunLock(tmp_path).acquire().release()


def test_a_held_run_directory_is_left_untouched_by_fit(finished, tmp_path):
    d = tmp_path / "run"
    lk = RunLock(d).acquire()
    tr = Trainer.from_config(make_cfg(*TINY, "callbacks=[checkpoint]"), d)
    with pytest.raises(RunDirLocked):
        tr.fit()
    assert sorted(p.name for p in d.iterdir()) == [lockmod.LOCK_NAME]
    lk.release()
    ens = Trainer.from_config(make_cfg(*TINY, "train.ensemble_size=2"), tmp_path / "ens")
    lk = RunLock(tmp_path / "ens" / "member_001").acquire()  # a member's directory is held
    with pytest.raises(RunDirLocked, match="member_001"):
        ens.fit()
    lk.release()
    assert not (tmp_path / "ens" / "member_000" / "metrics.json").exists()


def test_default_run_directories_are_distinct_within_a_second(tmp_path, monkeypatch):
    base = str(tmp_path / "outputs" / "12-00-00")
    first = lockmod.fresh_dir(base)
    assert lockmod.fresh_dir(base) == first  # the same answer within a process
    monkeypatch.setattr(lockmod, "_FRESH", {})  # another process, the same second
    second = lockmod.fresh_dir(base)
    assert (first, second) == (base, base + "_1") and Path(second).is_dir()


class WaitFor(Callback):
    """At step ``at``, waits (up to a minute) until the file ``release`` exists."""

    def __init__(self, release: str, at: int = 10) -> None:
        super().__init__(at)
        self.release, self.at = release, at

    def on_step_end(self, step, state):
        deadline = time.time() + 60
        while step == self.at and not Path(self.release).exists() and time.time() < deadline:
            time.sleep(0.05)


@pytest.mark.e2e
def test_two_concurrent_runs_on_one_directory(tmp_path):
    """The second is refused with one line naming the holder; the first's results are its own."""
    d, release = tmp_path / "run", tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    first = subprocess.Popen([sys.executable, "-m", "ntk_rnn.train", *BARE,
                              "train.steps=300", "seed=0",
                              "+callbacks.wait._target_=tests.test_run_safety.WaitFor",
                              f"+callbacks.wait.release={release}", f"hydra.run.dir={d}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (d / "config.yaml").exists() and first.poll() is None:
            assert time.time() < deadline
            time.sleep(0.2)
        r = run_cli(*TINY, "seed=1", f"hydra.run.dir={d}")
        release.write_text("")
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(f"ntk_rnn: refused: {d} is in use by another run: "
                                         f"PID {first.pid} on host")
    assert first.returncode == 0, err[-2000:]
    m = json.loads((d / "metrics.json").read_text())
    assert m["status"] == "completed" and m["steps"] == 300
    assert "seed: 0" in (d / "config.yaml").read_text()
    assert len(list(d.glob("events.out.tfevents.*"))) == 1


# --- only what the user asked for runs ----------------------------------------------------------
VICTIM_TARGETS = ["builtins.open", "io.open", "torch.load", "os.system", "subprocess.Popen"]


@pytest.mark.parametrize("target", VICTIM_TARGETS)
@pytest.mark.parametrize("where", ["+model.init.sampler", "+data.target", "data",
                                   "+callbacks.evil"])
def test_targets_outside_the_allow_list_never_run(tmp_path, target, where):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    key = where.lstrip("+")
    if where == "data":
        over = [f"data._target_={target}"]
    else:
        over = [f"{where}={{_target_:{target},file:{victim},mode:w}}"]
    cfg = make_cfg(*TINY, *over)
    with pytest.raises(ConfigError, match=rf"{key}._target_='{target}' is not allowed"):
        Trainer.from_config(cfg, tmp_path / "run")
    assert victim.read_text() == "precious" and not (tmp_path / "run").exists()


def test_own_modules_and_ntk_rnn_classes_are_allowed(tmp_path):
    cfg = make_cfg(*CUSTOM, "model._target_=tests.custom_models.TinyRNN",
                   "+model.width=8")
    assert Trainer.from_config(cfg, None).fit()["status"] == "completed"


@pytest.mark.parametrize("override,message", [
    ("+train.alfa=1", "unknown key train.alfa; did you mean train.alpha?"),
    ("+foo=1", "unknown key foo; the top-level keys are"),
    ("+sede=1", "unknown key sede; did you mean seed?"),
    ("+logger.tensorbord=false", "did you mean logger.tensorboard?"),
])
def test_unknown_keys_are_refused_with_the_nearest(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        Trainer.from_config(make_cfg(*TINY, override), None)


class KeepsInputSize(nn.Module):
    """An nn.RNN-style module: takes input_dim, keeps it as input_size."""

    def __init__(self, input_dim: int, width: int = 8):
        super().__init__()
        self.width, self.input_size = width, input_dim
        self.rnn = nn.RNN(input_dim, width, batch_first=True)
        self.c = nn.Parameter(torch.rand(width) * 2 - 1)

    def forward(self, x):
        return self.rnn(x)[0] @ self.c * self.width ** -0.75


def test_a_module_that_does_not_store_input_dim_trains():
    cfg = make_cfg(*CUSTOM, "model._target_=tests.test_run_safety.KeepsInputSize")
    tr = Trainer.from_config(cfg, None)
    assert tr.model.input_dim == 1 and tr.fit()["status"] == "completed"


# --- resources ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key", [
    (["model.width=1000000000", CALLBACKS_OFF], "model.width"),
    (["callbacks.ntk.n_probes=1000000"], "callbacks.ntk.n_probes"),
    (["model=elman", "model.width=1000000", CALLBACKS_OFF], "model.width")])
def test_memory_is_checked_before_allocating(overrides, key):
    cfg = make_cfg("train.steps=10", *overrides)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"the run needs about .* of memory, mostly for {key}"
                       rf".* are available; lower .*{key}"):
        Trainer.from_config(cfg, None)
    assert time.perf_counter() - t < 5


def test_checkpoint_size_does_not_grow_with_the_step_count(tmp_path):
    sizes = []
    for steps in (200, 4000):
        d = tmp_path / str(steps)
        tr = Trainer.from_config(make_cfg(*BARE, f"train.steps={steps}",
                                          "train.mse_window=16"), d)
        m = tr.fit()
        payload = load_checkpoint(d / "checkpoints" / "final.pt")
        assert payload["sq_err"].numel() == 16 and tr.sq_err.numel() == 16
        assert m["running_mse"] == pytest.approx(float(tr.sq_err.mean()))
        sizes.append((d / "checkpoints" / "final.pt").stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 200, sizes


# --- CSV sources --------------------------------------------------------------------------------
def test_csv_target_must_be_named_and_the_run_says_which(tmp_path):
    p = tmp_path / "macro.csv"
    p.write_text("year,quarter,realgdp\n" + "".join(f"{1959 + k // 4},{k % 4 + 1},{k * 1.5}\n"
                                                    for k in range(60)))
    with pytest.raises(ConfigError, match=r"data.target_column is not set and .* has 3 input "
                       r"columns \['year', 'quarter', 'realgdp'\]"):
        Trainer.from_config(make_cfg(*TINY, "data=csv", f"data.path={p}"), None)
    tr = Trainer.from_config(make_cfg(*TINY, "data=csv", f"data.path={p}",
                                      "data.target_column=realgdp"), tmp_path / "run")
    m = tr.fit()
    assert m["input_columns"] == ["year", "quarter", "realgdp"]
    assert m["target_column"] == "realgdp"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["target_column"] == \
        "realgdp"
    assert "data: inputs year, quarter, realgdp -> target realgdp" in cli.run_summary(tr, m)


# --- the kernel cache ---------------------------------------------------------------------------
def test_a_symlinked_kernel_is_refused_before_it_is_loaded(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    outside = tmp_path / "elsewhere.so"
    outside.write_bytes(b"\x7fELF not really")
    (folder / "fast_d1_tanh_x.so").symlink_to(outside)
    with pytest.raises(loader.KernelUnavailable, match="symbolic link"):
        loader.load_private(folder, "fast_d1_tanh_x.so")
    with pytest.raises(loader.KernelUnavailable, match="symbolic link"):
        loader.check_private(folder / "fast_d1_tanh_x.so", "cached kernel")
    link = tmp_path / "linked_cache"
    link.symlink_to(folder)
    with pytest.raises(loader.KernelUnavailable, match="symbolic link"):
        loader.private_dir(link)


def test_root_fallback_is_named_and_an_unusable_cache_warned(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NTK_RNN_KERNEL_CACHE", str(blocker / "kernels"))  # cannot be created
    monkeypatch.setattr(loader.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(loader, "_uid", lambda: 0)
    monkeypatch.setattr(loader, "check_private_fd", lambda fd, path, what="": os.fstat(fd))
    monkeypatch.setattr(loader, "_WARNED_CACHE", set())
    with pytest.warns(loader.KernelFallbackWarning, match="NTK_RNN_KERNEL_CACHE=.* cannot be "
                      "used"):
        folders = loader._folders()
    assert folders == [tmp_path / "ntk_rnn_kernels_0"]


# --- the command line: one line per bad input, its own help --------------------------------------
def test_help_page_explains_the_main_keys_from_the_config_source():
    page = cli.help_page()
    rows = dict(cli.key_docs())
    assert all(rows.values()), [k for k, v in rows.items() if not v]
    import inspect

    from ntk_rnn.run.config import TrainConfig

    for key in ("train.mse_window", "train.alpha", "train.resume"):  # TrainConfig's own words
        src = " ".join((inspect.getsource(TrainConfig) + (TrainConfig.__doc__ or ""))
                       .replace("#", " ").split())
        assert rows[key] and rows[key] in src, (key, rows[key])
    assert rows["model.beta"] in (ROOT / "conf" / "model" / "diagonal.yaml").read_text()
    for text in ("ntk-rnn-train", "main keys", "--cfg job", "docs", "train.mse_window"):
        assert text in page
    assert "powered by Hydra" not in page


CLI_CASES = [
    (["model.widht=64"], "ntk_rnn: config error: unknown key model.widht=64; did you mean "
                         "model.width?"),
    (["train.alpha=fast"], "ntk_rnn: config error: train.alpha=fast: Value 'fast'"),
    (["model=lstm"], "ntk_rnn: config error: model=lstm is not a preset; choose one of custom, "
                     "diagonal"),
    (["model.width=${oc.env:NTK_RNN_UNSET_X}", "train.steps=5"],
     "ntk_rnn: config error: model.width: "),
    (["model.width=0", "hydra.run.dir=FINISHED"], "ntk_rnn: config error: model.width=0"),
    ([*TINY, "train.resume=true", "model.beta=0.9", "hydra.run.dir=FINISHED"],
     "ntk_rnn: config error: train.resume: the checkpoints in"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("args,start", CLI_CASES, ids=[" ".join(a[-1:]) for a, _ in CLI_CASES])
def test_cli_errors_are_one_line(tmp_path, finished, args, start):
    d, _ = finished
    before = tree(d)
    r = run_cli(*[a.replace("FINISHED", str(d)) for a in args], cwd=tmp_path)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert one_line(r.stderr).startswith(start), (args, r.stderr)
    assert tree(d) == before  # a refused command wrote nothing into the finished run


@pytest.mark.e2e
def test_console_script_finds_own_module_and_prints_its_help(tmp_path):
    (tmp_path / "my_module.py").write_text(
        "from torch import nn\nimport torch\n\n"
        "class MyRNN(nn.Module):\n"
        "    def __init__(self, input_dim, width=8):\n"
        "        super().__init__()\n"
        "        self.width = width\n"
        "        self.rnn = nn.RNN(input_dim, width, batch_first=True)\n"
        "        self.c = nn.Parameter(torch.rand(width) * 2 - 1)\n"
        "    def forward(self, x):\n"
        "        return self.rnn(x)[0] @ self.c * self.width ** -0.75\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    # -P: no current directory on sys.path, as in a console script
    script = "import sys; from ntk_rnn.train import main; sys.argv[0] = 'ntk-rnn-train'; main()"
    r = subprocess.run([sys.executable, "-P", "-c", script, "model=custom",
                        "model._target_=my_module.MyRNN", "+model.width=8", "train.steps=20",
                        CALLBACKS_OFF, f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    r = subprocess.run([sys.executable, "-P", "-c", script, "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "main keys" in r.stdout and "--cfg job" in r.stdout


@pytest.mark.e2e
def test_a_sweep_with_a_failed_job_exits_1_in_one_line(tmp_path):
    d = tmp_path / "sweep"
    r = run_cli("-m", *TINY, "model.width=8,abc", f"hydra.sweep.dir={d}")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert json.loads((d / "0_width=8" / "metrics.json").read_text())["status"] == "completed"
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("ntk_rnn:")][-1]
    assert last.startswith("ntk_rnn: the sweep finished with a failed job")
    warnings.filterwarnings("ignore")


def test_disk_full_while_logging_leaves_intact_files_and_one_line(tmp_path, monkeypatch):
    """TensorBoard's writer fails (ENOSPC, no file name): the run stops with an OSError that
    becomes one line naming the event file and the last checkpoint; no file is left half
    written (metrics.json, config.yaml)."""
    import ntk_rnn.run.member as member

    real = member.make_writer

    def failing(cfg, rd, purge_step=None):
        w = real(cfg, rd, purge_step=purge_step)
        add = w.add_scalar

        def add_scalar(tag, value, step=None, *a, **k):
            if step is not None and step >= 15:
                raise OSError(errno.ENOSPC, "No space left on device")
            return add(tag, value, step, *a, **k)

        w.add_scalar = add_scalar
        return w

    monkeypatch.setattr(member, "make_writer", failing)
    d = tmp_path / "run"
    cfg = make_cfg("model.width=8", "train.steps=40", "train.log_every=5",
                   "callbacks=[checkpoint]", "callbacks.checkpoint.every_n_steps=10")
    with pytest.raises(OSError) as info:
        Trainer.from_config(cfg, d).fit()
    line = cli.write_error_message(info.value, d)
    assert "\n" not in line and line.startswith(f"cannot write {d}/events.out.tfevents.")
    assert line.endswith(f"the last intact checkpoint is {d}/checkpoints/step_000000010.pt "
                         f"(continue with train.resume=true hydra.run.dir={d} once there is "
                         "room)")
    for name in ("config.yaml", "metrics.json"):
        if (d / name).exists():
            assert (d / name).stat().st_size > 0
    assert not list(d.rglob(".*.tmp")) and not (d / lockmod.LOCK_NAME).exists()
    load_checkpoint(d / "checkpoints" / "step_000000010.pt")


@pytest.mark.e2e
def test_an_unwritable_run_directory_is_one_line(tmp_path):
    r = run_cli(*TINY, "hydra.run.dir=/proc/ntk_rnn_no_such_dir", cwd=tmp_path)
    assert r.returncode == 1
    assert one_line(r.stderr) == ("ntk_rnn: cannot write /proc/ntk_rnn_no_such_dir: No such "
                                  "file or directory")


@pytest.mark.e2e
@pytest.mark.slow  # (about 90 s: three joblib start-ups)
def test_a_killed_sweep_driver_and_a_restart_do_not_interleave(tmp_path):
    """joblib's workers outlive a SIGKILLed driver and finish their jobs; a restarted sweep on
    the same directory is refused for the jobs they still hold, and nothing is written twice."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    d, release = tmp_path / "sweep", tmp_path / "release"
    sweep = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *BARE,
             "train.steps=100", "seed=0,1", f"hydra.sweep.dir={d}",
             "+callbacks.wait._target_=tests.test_run_safety.WaitFor",
             f"+callbacks.wait.release={release}", "+callbacks.wait.at=50"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    driver = subprocess.Popen([sys.executable, "-m", "ntk_rnn.train", *sweep], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = [d / "0_seed=0", d / "1_seed=1"]
    deadline = time.time() + 180
    while not all((j / "config.yaml").exists() for j in jobs):
        assert time.time() < deadline and driver.poll() is None
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    r = run_cli(*sweep, "train.resume=auto")  # the workers still hold both jobs
    release.write_text("")
    assert r.returncode == 1 and "is in use by another run" in r.stderr, r.stderr[-2000:]
    deadline = time.time() + 120
    while not all((j / "metrics.json").exists() for j in jobs) or \
            any((j / lockmod.LOCK_NAME).exists() for j in jobs):
        assert time.time() < deadline
        time.sleep(0.2)
    for j in jobs:
        m = json.loads((j / "metrics.json").read_text())
        assert m["status"] == "completed" and m["steps"] == 100
        assert len(list(j.glob("events.out.tfevents.*"))) == 1  # one writer, one event file


@pytest.mark.skipif(loader.compiler() is None, reason="no C compiler")
def test_a_planted_library_with_the_expected_name_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """A same-user file put where a cached kernel goes (its name is predictable) has no digest
    of ours: it is replaced by a fresh build, never loaded (its constructor would run)."""
    cache = tmp_path / "kernels"
    monkeypatch.setenv("NTK_RNN_KERNEL_CACHE", str(cache))
    loader.build("fast", 1, "tanh")
    (so,) = cache.glob("fast_d1_tanh_*.so")
    planted = tmp_path / "planted.so"
    planted.write_bytes(b"\x7fELF planted, not ours")
    os.replace(planted, so)
    os.chmod(so, 0o700)
    loaded = []
    monkeypatch.setattr(loader.ctypes, "CDLL", lambda p: loaded.append(
        open(p, "rb").read()) or SimpleNamespace())
    loader.build("fast", 1, "tanh")
    assert len(loaded) == 1 and b"planted" not in loaded[0] and loaded[0] == so.read_bytes()
