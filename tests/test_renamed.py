"""Renamed config values: the old spellings (``train.gradient=truncated``,
``callbacks.ntk.limit_method=mc``) still work, give the same numbers as the new names
(``one_step``, ``iid``), and warn exactly once (FutureWarning naming the key)."""

import warnings

import pytest
import torch

from ntk_rnn.checkpoint import load_checkpoint, save_checkpoint
from ntk_rnn.errors import ConfigError
from ntk_rnn.limit import limit_ntk
from ntk_rnn.models.mean_field import MeanFieldRNN
from ntk_rnn.models.recurrence import OnlineState
from ntk_rnn.ntk import training_kernel
from ntk_rnn.online.fast import FastStepper
from ntk_rnn.online.rtrl import rtrl_step
from ntk_rnn.run import Trainer
from ntk_rnn.run.config import validate

from .conftest import CALLBACKS_OFF, make_cfg


def renamed_warnings(fn, *args):
    """(fn(*args), the FutureWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [w for w in caught if issubclass(w.category, FutureWarning)]


def _one_warning(ws, key, new):
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert key in str(ws[0].message) and new in str(ws[0].message)


@pytest.mark.parametrize("overrides", [["train.gradient=truncated"], ["train=truncated"]])
def test_config_old_gradient_spelling_is_one_step_with_one_warning(overrides):
    cfg = make_cfg(CALLBACKS_OFF, *overrides)
    _, ws = renamed_warnings(lambda: validate(cfg))
    _one_warning(ws, "train.gradient=truncated", "one_step")
    assert cfg.train.gradient == "one_step"
    _, ws = renamed_warnings(lambda: validate(cfg))  # resolved once: no second warning
    assert not ws


def test_config_old_limit_method_spelling_is_iid_with_one_warning():
    cfg = make_cfg("callbacks=[ntk]", "callbacks.ntk.limit_method=mc")
    _, ws = renamed_warnings(lambda: validate(cfg))
    _one_warning(ws, "callbacks.ntk.limit_method=mc", "iid")
    assert cfg.callbacks.ntk.limit_method == "iid"


def test_unknown_values_are_still_refused():
    with pytest.raises(ConfigError, match="train.gradient='trunc'"):
        validate(make_cfg(CALLBACKS_OFF, "train.gradient=trunc"))
    with pytest.raises(ConfigError, match="method='mcc' is not known"):
        limit_ntk(MeanFieldRNN(1, 4), torch.randn(2, 3, 1), method="mcc")


def _final(tmp_path, name, *overrides):
    cfg = make_cfg(CALLBACKS_OFF, "model.width=16", "train.steps=60", "dtype=float64",
                   *overrides)
    (m, ws) = renamed_warnings(lambda: Trainer.from_config(cfg, tmp_path / name).fit())
    return m, ws, load_checkpoint(tmp_path / name / "checkpoints/final.pt")


@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_cli_config_old_gradient_trains_identically(tmp_path, recurrence):
    model = [] if recurrence == "diagonal" else ["model=feedback"]
    m_new, ws_new, new = _final(tmp_path, "new", *model, "train.gradient=one_step")
    m_old, ws_old, old = _final(tmp_path, "old", *model, "train=truncated")
    assert not ws_new
    _one_warning(ws_old, "train.gradient=truncated", "one_step")
    assert m_old["running_mse"] == m_new["running_mse"] and m_old["gradient"] == "one_step"
    assert all(torch.equal(old["model"][k], new["model"][k]) for k in new["model"])
    rtrl = _final(tmp_path, "rtrl", *model, "train.gradient=rtrl")[2]
    assert not torch.equal(rtrl["model"]["w"], new["model"]["w"])  # the setting mattered


def test_python_api_old_gradient_is_identical(tmp_path):
    from ntk_rnn.data import VAR1

    def fit(gradient):
        torch.manual_seed(0)
        tr = Trainer(MeanFieldRNN(1, 16), VAR1(), steps=50, gradient=gradient, seed=3,
                     tensorboard=False, progress=False)
        return tr.fit(), {k: v.clone() for k, v in tr.model.state_dict().items()}

    (m_new, p_new), ws_new = renamed_warnings(lambda: fit("one_step"))
    (m_old, p_old), ws_old = renamed_warnings(lambda: fit("truncated"))
    assert not ws_new
    _one_warning(ws_old, "train.gradient=truncated", "one_step")
    assert m_old["running_mse"] == m_new["running_mse"]
    assert all(torch.equal(p_old[k], p_new[k]) for k in p_new)


@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_steppers_and_kernels_accept_the_old_gradient(recurrence):
    torch.manual_seed(1)
    X, Y = torch.randn(30, 2, dtype=torch.float64), torch.randn(30, dtype=torch.float64)

    def run(kind, gradient):
        m = MeanFieldRNN(2, 12, recurrence=recurrence, dtype=torch.float64, seed=5)
        st = OnlineState.zeros(m)
        if kind == "fast":
            FastStepper(m, 0.1, gradient, state=st, backend="eager").run_chunk(X, Y)
        else:
            for k in range(X.shape[0]):
                rtrl_step(m, st, X[k], Y[k], 0.1, gradient)
        return m.w.detach().clone()

    for kind in ("fast", "reference"):
        new, ws = renamed_warnings(run, kind, "one_step")
        assert not ws
        old, ws = renamed_warnings(run, kind, "truncated")
        assert ws and all("gradient=truncated" in str(w.message) for w in ws)
        assert torch.equal(old, new)
    if recurrence == "diagonal":
        m = MeanFieldRNN(2, 12, dtype=torch.float64, seed=5)
        x = torch.randn(4, 3, 2, dtype=torch.float64)
        K_new = training_kernel(m, x, gradient="one_step")
        K_old, ws = renamed_warnings(lambda: training_kernel(m, x, gradient="truncated"))
        _one_warning(ws, "gradient=truncated", "one_step")
        assert torch.equal(K_old, K_new)


def test_limit_old_method_is_iid_with_the_same_numbers():
    m = MeanFieldRNN(1, 4, dtype=torch.float64)
    x = torch.randn(3, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    new = limit_ntk(m, x, tol=2e-2, method="iid", seed=7)
    old, ws = renamed_warnings(lambda: limit_ntk(m, x, tol=2e-2, method="mc", seed=7))
    _one_warning(ws, "method=mc", "iid")
    assert old.method == new.method == "iid" and torch.equal(old.value, new.value)


def test_resume_of_a_run_saved_with_the_old_gradient(tmp_path):
    """A checkpoint whose saved config says ``train.gradient: truncated`` (a run from before the
    rename) resumes, under ``one_step`` or ``truncated``, to exactly the uninterrupted run."""
    cfg = ["model.width=12", "callbacks=[checkpoint]", "callbacks.checkpoint.every_n_steps=40",
           "callbacks.checkpoint.keep_last=5", "train.steps=100", "dtype=float64",
           "train.gradient=one_step"]
    Trainer.from_config(make_cfg(*cfg), tmp_path / "a").fit()
    fa = load_checkpoint(tmp_path / "a" / "checkpoints/final.pt")
    for spelling in ("one_step", "truncated"):
        b = tmp_path / f"b_{spelling}"
        Trainer.from_config(make_cfg(*cfg), b).fit()
        for f in ("checkpoints/final.pt", "checkpoints/step_000000080.pt",
                  "checkpoints/step_000000100.pt", "metrics.json"):
            (b / f).unlink()
        ck = b / "checkpoints/step_000000040.pt"
        payload = load_checkpoint(ck)
        assert "gradient: one_step" in payload["config"]
        payload["config"] = payload["config"].replace("gradient: one_step", "gradient: truncated")
        save_checkpoint(ck, payload)
        resumed = make_cfg(*cfg[:-1], f"train.gradient={spelling}", "train.resume=true")
        tr, ws = renamed_warnings(Trainer.from_config, resumed, b)
        assert len(ws) == (spelling == "truncated")
        assert tr.step == 40
        tr.fit()
        fb = load_checkpoint(b / "checkpoints/final.pt")
        for part in ("model", "online"):
            assert all(torch.equal(fa[part][k], fb[part][k]) for k in fa[part]), part
