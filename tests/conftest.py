import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ntk_rnn.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def make_cfg(*overrides: str):
    """Compose the real conf/ tree with overrides, as the CLI would."""
    from ntk_rnn.run.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_cli(*args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "ntk_rnn.train", *args], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cfg_factory():
    return make_cfg


# overrides many tests share: a run without callbacks, and a width-8 one (more overrides after)
CALLBACKS_OFF = "callbacks=none"
BARE = ["model.width=8", CALLBACKS_OFF]

# a run that takes a second: width 8, 32 steps, a small NTK callback without K_∞, no event files
TINY = ["model.width=8", "train.steps=32", "callbacks=[ntk]", "callbacks.ntk.n_probes=4",
        "callbacks.ntk.probe_length=3", "callbacks.ntk.top_k=2", "callbacks.ntk.limit=false",
        "callbacks.ntk.image_every_n_steps=0", "callbacks.ntk.histogram_every_n_steps=0",
        "logger.tensorboard=false"]


@pytest.fixture
def tiny_cfg():
    """The config of a tiny run, composed from conf/ as the CLI would (``TINY``); more
    overrides as arguments, later ones winning: ``tiny_cfg("seed=3", "callbacks.ntk.limit=true")``.
    """
    return lambda *overrides: make_cfg(*TINY, *overrides)


def assert_forward_is_loop(model, x, loop) -> None:
    """``model(x)`` (B, L) equals ``loop(model, window)`` (an independent per-unit loop) on
    every window of x, and ``model(x[0])`` (one (L, d) window) its first row."""
    import torch

    y = model(x)
    assert y.shape == x.shape[:2]
    for n in range(x.shape[0]):
        torch.testing.assert_close(y[n], loop(model, x[n]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model(x[0]), y[0])


@pytest.fixture
def tiny_model():
    """A tiny Model D network (d = 1, N = 8) for Python-API runs."""
    from ntk_rnn import MeanFieldRNN

    return MeanFieldRNN(input_dim=1, width=8)


class SignalAt(Callback):
    """Sends ``sig`` to this process at the end of step ``at`` (as a scheduler would)."""

    name = "signal_at"

    def __init__(self, at: int, sig: int = signal.SIGTERM) -> None:
        super().__init__(1)
        self.at, self.sig = at, sig
        self.handler_during_fit = None

    def on_step_end(self, step, state):
        if step == self.at:
            self.handler_during_fit = signal.getsignal(self.sig)
            os.kill(os.getpid(), self.sig)
