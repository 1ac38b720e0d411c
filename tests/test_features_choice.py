"""The compiled per-unit features run only where measured faster than the torch path
(ntk/_features_c.choice): measured once, cached with the compiled object, forced or pinned."""

import json

import pytest
import torch

from ntk_rnn import MeanFieldRNN
from ntk_rnn.ntk import _features_c as fc
from ntk_rnn.ntk import empirical_ntk
from ntk_rnn.ntk import structured as st

F64 = torch.float64
needs_c = pytest.mark.skipif(fc.KERNEL.library(2, "tanh") is None,
                             reason=f"compiled features: {fc.KERNEL.status(2, 'tanh')}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No remembered choice, no forcing; the choice file in tmp_path; count C calls."""
    monkeypatch.setattr(fc, "_CHOICES", {})
    monkeypatch.setattr(fc, "_PINNED", {})
    monkeypatch.delenv("NTK_RNN_FEATURES", raising=False)
    monkeypatch.setattr(fc, "_cache_file", lambda lib, k: tmp_path / f"choice_{k[2]}.json")
    calls = []
    real = fc.block_features
    monkeypatch.setattr(fc, "block_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    return tmp_path, calls


def kernel(calls):
    model = MeanFieldRNN(2, 40, seed=0, dtype=F64)
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    del calls[:]
    return empirical_ntk(model, x, method="structured"), model


@needs_c
def test_measured_choice_is_cached_and_used(fresh, monkeypatch):
    tmp, calls = fresh
    monkeypatch.setattr(fc, "measure", lambda *a, **k: (5.0, 1.0))  # torch measured faster
    K_torch, model = kernel(calls)
    assert not calls
    c = fc.choice(2, "tanh", F64)
    assert c.backend == "torch" and "measured" in c.reason and c.isa
    saved = json.loads((tmp / "choice_float64.json").read_text())
    assert saved["backend"] == "torch" and saved["torch"] == torch.__version__
    monkeypatch.setattr(fc, "_CHOICES", {})  # a new process: the cached measurement, no timing
    monkeypatch.setattr(fc, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert fc.choice(2, "tanh", F64).reason.startswith("cached measurement")
    rec = fc.record(model)
    assert rec["backend"] == "torch" and rec["dtype"] == "float64" and rec["d"] == 2
    (tmp / "choice_float64.json").write_text(json.dumps({**saved, "backend": "c"}))
    monkeypatch.setattr(fc, "_CHOICES", {})
    K_c, _ = kernel(calls)
    assert calls  # the cached choice is C now
    assert float((K_c - K_torch).abs().max()) <= 1e-12 * float(K_torch.abs().max())


@needs_c
def test_forced_and_pinned(fresh, monkeypatch):
    tmp, calls = fresh
    monkeypatch.setattr(fc, "measure", lambda *a, **k: (1.0, 5.0))
    kernel(calls)
    assert calls and fc.choice(2, "tanh", F64).backend == "c"
    monkeypatch.setenv("NTK_RNN_FEATURES", "torch")
    kernel(calls)
    assert not calls and "NTK_RNN_FEATURES" in fc.choice(2, "tanh", F64).reason
    monkeypatch.delenv("NTK_RNN_FEATURES")
    fc.pin("torch", 2, "tanh", F64)  # a resumed run pins its recorded choice
    kernel(calls)
    assert not calls and fc.choice(2, "tanh", F64).reason.startswith("pinned")
    fc.pin(None)
    kernel(calls)
    assert calls
    with pytest.raises(ValueError, match="choose one of"):
        fc.pin("fortran")
    monkeypatch.setenv("NTK_RNN_FEATURES", "fortran")
    with pytest.raises(ValueError, match="NTK_RNN_FEATURES"):
        fc.choice(2, "tanh", F64)


def test_unavailable_kernel_means_torch(fresh, monkeypatch):
    _, calls = fresh
    monkeypatch.setattr(fc.KERNEL, "table", {(2, "tanh"): "no C compiler"})
    c = fc.choice(2, "tanh", F64)
    assert c.backend == "torch" and "no C compiler" in c.reason


@needs_c
def test_measure_times_both_paths():
    c_ms, t_ms = fc.measure(2, "tanh", torch.float32)
    assert 0 < c_ms < 1e4 and 0 < t_ms < 1e4
    assert fc.cpu_isa() in ("AVX-512", "AVX2", "SSE") or fc.cpu_isa()
    assert st.USE_C  # (the switch that turns both off stays)


def test_run_records_the_features_choice_and_a_resume_reuses_it(monkeypatch):
    """metrics.json names which unit features ran and why; the callback's checkpoint state keeps
    the choice, and loading it pins it (a resumed run does not measure again)."""
    from ntk_rnn import MeanFieldRNN, NTKCallback, Trainer
    from ntk_rnn.data import VAR1

    cb = NTKCallback(every_n_steps=8, n_probes=4, probe_length=4, top_k=2, limit=False)
    m = Trainer(model=MeanFieldRNN(1, 16), data=VAR1(), alpha=1.0, horizon=1.0, run_dir=None,
                callbacks=[cb], tensorboard=False, progress=False).fit()
    assert m["ntk_features_backend"] in ("c", "torch") and m["ntk_features_reason"]
    saved = cb.state_dict()["features"]
    pinned = []
    import ntk_rnn.callbacks.ntk as cbmod
    monkeypatch.setattr(cbmod, "pin_features", lambda backend, *a, **k: pinned.append(backend))
    cb2 = NTKCallback(every_n_steps=8, n_probes=4, probe_length=4, top_k=2, limit=False)
    t2 = Trainer(model=MeanFieldRNN(1, 16), data=VAR1(), alpha=1.0, horizon=1.0, run_dir=None,
                 callbacks=[cb2], tensorboard=False, progress=False)
    cb2.load_state_dict(cb.state_dict())
    cb2.on_train_start(t2.members[0].state)
    assert cb2.features == saved and pinned == [saved["backend"]]
