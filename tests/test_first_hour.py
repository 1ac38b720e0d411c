"""A newcomer's first hour (issue 21): the NTK cadence in limit time, progress and timing of the
slow start, no TqdmWarning in Jupyter, a warned-about θ_0 that no seed determines."""

import io
import sys
import types

import pytest

from ntk_rnn import MeanFieldRNN, NTKCallback, Trainer
from ntk_rnn.callbacks import Callback
from ntk_rnn.callbacks.linearized import LinearizedCallback
from ntk_rnn.callbacks.output import OutputTrackingCallback
from ntk_rnn.data import VAR1
from ntk_rnn.run.build import build_callbacks

from .conftest import ROOT, make_cfg


def _steps(cb: Callback, width: int) -> int:
    Callback.setup(cb, types.SimpleNamespace(model=types.SimpleNamespace(width=width)))
    return cb.every_n_steps


@pytest.mark.parametrize("width", [32, 64, 4096])
def test_default_ntk_cadence_gives_32_points_over_t_4_at_any_width(width):
    n_steps = 4 * width  # t in [0, 4]
    for cb in (NTKCallback(), LinearizedCallback()):
        assert n_steps // _steps(cb, width) == 32
    assert n_steps // _steps(OutputTrackingCallback(), width) == 64
    cli = build_callbacks(make_cfg())  # the CLI's presets: the same cadence
    ntk = next(cb for cb in cli if isinstance(cb, NTKCallback))
    assert n_steps // _steps(ntk, width) == 32


def test_a_set_every_n_steps_wins_over_the_default_every_t():
    assert _steps(NTKCallback(every_n_steps=64), 32) == 64
    assert _steps(NTKCallback(every_t=0.5), 32) == 16
    cli = build_callbacks(make_cfg("callbacks.ntk.every_n_steps=64"))
    ntk = next(cb for cb in cli if isinstance(cb, NTKCallback))
    assert _steps(ntk, 32) == 64
    assert _steps(Callback(), 32) == 1 and _steps(Callback(every_t=0.25), 32) == 8
    e1 = NTKCallback()
    _steps(e1, 32)
    assert _steps(e1, 64) == 8  # a copy made after setup (ensembles) follows its own width


def _tiny(limit: bool = False, **kw):
    cb = NTKCallback(n_probes=4, probe_length=3, top_k=2, limit_tol=1e-2, limit=limit)
    return Trainer(model=MeanFieldRNN(input_dim=1, width=8), data=VAR1(), horizon=2.0,
                   callbacks=[cb], seed=0, **kw)


def test_limit_phase_is_announced_timed_and_counted_in_wall_s(capsys):
    metrics = _tiny(limit=True, progress=True).fit()
    err = capsys.readouterr().err
    first = err.index("computing the limit kernel K_∞ on 4 probe windows")
    assert first < err.index("done in") < err.index("step/s")  # the note, its time, then the bar
    for key in ("wall_s", "build_s", "setup_s", "limit_s", "train_s"):
        assert metrics[key] >= 0
    assert metrics["limit_s"] > 0
    assert metrics["setup_s"] >= metrics["limit_s"]
    assert metrics["wall_s"] >= metrics["setup_s"] + metrics["train_s"]


def test_progress_false_is_silent_and_progress_true_draws_a_bar(capsys):
    _tiny(progress=False).fit()
    assert capsys.readouterr().err == ""
    _tiny(progress=True).fit()
    err = capsys.readouterr().err
    assert "16/16" in err and "t=2.000" in err


def test_progress_defaults_off_without_a_terminal(capsys):
    _tiny().fit()  # pytest captures stderr: not a terminal, not a notebook
    assert capsys.readouterr().err == ""


def test_import_in_a_jupyter_kernel_without_ipywidgets_does_not_warn(monkeypatch):
    import importlib
    import warnings

    import IPython

    import ntk_rnn.callbacks.progress as progress

    class ZMQInteractiveShell:
        pass

    for name in ("ipykernel", "ipykernel.zmqshell"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # not installed
    for name in ("tqdm.auto", "tqdm.autonotebook"):  # imported afresh, as in a new kernel
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell(), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(progress)  # what `import ntk_rnn` runs
        assert progress.in_notebook()
        bar = progress.progress_bar(total=3, file=io.StringIO())
        bar.update(3)
        bar.close()
    assert type(bar).__module__ == "tqdm.std"  # the text bar


def _readme_module() -> types.ModuleType:
    """The README's own custom model (its `class MyRNN` code block), as my_module.py."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "class MyRNN" in b).split("```")[0]
    mod = types.ModuleType("my_module")
    exec(compile(block, "README.md:MyRNN", "exec"), mod.__dict__)
    return mod


def test_readme_custom_model_runs_under_vmap_without_the_fallback_warning():
    import warnings

    import torch

    from ntk_rnn.ntk import empirical_ntk

    model = _readme_module().MyRNN(input_dim=2, width=16)
    x = torch.randn(5, 7, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "fails under torch.func.vmap ... falling back"
        K = empirical_ntk(model, x, method="jacobian")
    assert K.shape == (5, 5)


def test_python_model_without_reset_parameters_warns_that_the_seed_does_not_fix_theta0(
        tiny_model):
    from .custom_models import TinyRNN

    with pytest.warns(UserWarning, match=r"no reset_parameters\(generator\).*seed=3"):
        Trainer(model=TinyRNN(input_dim=1), data=VAR1(), seed=3, progress=False, steps=4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with reset_parameters: no warning
        Trainer(model=tiny_model, data=VAR1(), progress=False, steps=4)


def test_cli_run_announces_the_limit_and_wall_s_covers_it(tiny_cfg, capsys):
    cfg = tiny_cfg("callbacks.ntk.limit=true", "callbacks.ntk.limit_tol=1e-2")
    metrics = Trainer.from_config(cfg, None).fit()  # what the CLI runs: notes always on
    err = capsys.readouterr().err
    assert "computing the limit kernel K_∞" in err and "done in" in err
    assert metrics["wall_s"] >= metrics["limit_s"] + metrics["train_s"] > metrics["limit_s"] > 0
