"""Structured NTK of ElmanRNN and GRURNN (ntk/recurrent.py) against the jacobian method, float64."""

import contextlib

import pytest
import torch

from ntk_rnn import GRURNN, ElmanRNN
from ntk_rnn.errors import ConfigError
from ntk_rnn.ntk import choose_method, empirical_ntk, jacobian_blocks, ntk_blocks
from ntk_rnn.ntk import structured as st
from ntk_rnn.ntk.large import KernelOperator, blocked_ntk

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def windows(n, L, d, seed):
    return torch.randn(n, L, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def elman(scaling, act, d=3, N=11, **kw):
    return ElmanRNN(d, N, beta=0.8, recurrent_scaling=scaling, activation=act, A_mean=0.3,
                    seed=1, dtype=F64, **kw)


def gru(scaling, bias=True, d=3, N=13):
    return GRURNN(d, N, beta=0.7, recurrent_scaling=scaling, bias=bias, bias_std=0.5,
                  hh_std=1.3, seed=2, dtype=F64)


MODELS = [(f"elman-{s}-{a}", lambda s=s, a=a: elman(s, a))
          for s in ("mean_field", "ntk") for a in ("tanh", "sigmoid", "erf")]
MODELS += [(f"gru-{s}-bias{b}", lambda s=s, b=b: gru(s, b))
           for s in ("mean_field", "ntk") for b in (True, False)]


@pytest.mark.parametrize("name,make", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("same", [True, False], ids=["x2=None", "x2"])
def test_structured_equals_jacobian_per_block(name, make, same):
    model = make()
    x = windows(5, 7, 3, 0)
    x2 = None if same else windows(4, 4, 3, 1)  # another length L' ≠ L
    J = jacobian_blocks(model, x, x2)
    s = model.ntk_scale
    B = ntk_blocks(model, x, x2, method="structured")
    assert list(B) == [k for k, _ in model.named_parameters()]
    for k in J:
        assert rel(B[k], J[k] * s) <= 1e-10, k
    K = empirical_ntk(model, x, x2, method="structured")
    assert rel(K, empirical_ntk(model, x, x2, method="jacobian")) <= 1e-10
    assert rel(K, sum(B.values())) <= 1e-12
    if same:
        assert torch.equal(K, K.T)


@pytest.mark.parametrize("name,make", MODELS[::3], ids=[m[0] for m in MODELS[::3]])
def test_auto_picks_structured_and_row_blocks_agree(name, make):
    model = make()
    x, x2 = windows(6, 5, 3, 2), windows(3, 9, 3, 3)
    assert choose_method(model, 6, 3) == "structured"
    K = empirical_ntk(model, x, x2)
    assert rel(K, empirical_ntk(model, x, x2, method="jacobian")) <= 1e-10
    assert rel(empirical_ntk(model, x, x2, method="structured", chunk_size=1), K) <= 1e-13
    assert rel(empirical_ntk(model, x, x2, method="structured", chunk_size=4), K) <= 1e-13


def test_one_window_one_step_and_width_one():
    for model in (elman("ntk", "tanh", d=1, N=1), gru("mean_field", d=1, N=1)):
        x, x2 = windows(1, 1, 1, 4), windows(2, 3, 1, 5)
        for xx in (None, x2):
            assert rel(empirical_ntk(model, x, xx, method="structured"),
                       empirical_ntk(model, x, xx, method="jacobian")) <= 1e-10


def test_frozen_parameters_are_left_out():
    model = elman("mean_field", "tanh")
    model.A.requires_grad_(False)
    x = windows(4, 6, 3, 6)
    B = ntk_blocks(model, x, method="structured")
    assert set(B) == {"c", "w"}
    assert rel(sum(B.values()), empirical_ntk(model, x, method="jacobian")) <= 1e-10
    g = gru("ntk")
    g.cell.weight_hh.requires_grad_(False)
    g.c.requires_grad_(False)
    assert set(ntk_blocks(g, x, method="structured")) == {
        "cell.weight_ih", "cell.bias_ih", "cell.bias_hh"}
    assert rel(empirical_ntk(g, x, method="structured"),
               empirical_ntk(g, x, method="jacobian")) <= 1e-10


def test_dispatch_is_the_family_seam():
    class MyElman(ElmanRNN):  # a subclass may change forward: no structured kernel
        pass

    sub = MyElman(2, 5, seed=0, dtype=F64)
    assert st.structure_of(sub) is None and not st.supports_structured(sub)
    assert choose_method(sub, 4, x=windows(4, 3, 2, 7)) in ("jacobian", "ntk_vp")
    with pytest.raises(ConfigError, match="structured kernel"):
        empirical_ntk(sub, windows(2, 3, 2, 7), method="structured")
    assert st.structure_of(elman("ntk", "tanh")) == "elman"
    assert st.structure_of(gru("ntk")) == "gru"
    assert not st.supports_structured(elman("ntk", "tanh"))  # (per-unit features: Model D only)


def test_blocked_ntk_and_operator():
    model = gru("ntk")
    x, x2 = windows(7, 5, 3, 8), windows(5, 3, 3, 9)
    ref = empirical_ntk(model, x, x2, method="jacobian")
    per = 2 * 6 * 5 * 13 * 8  # a budget of a few windows: several blocks
    assert rel(blocked_ntk(model, x, x2, memory_budget=20 * per), ref) <= 1e-10
    Kxx = blocked_ntk(model, x, memory_budget=20 * per)
    assert rel(Kxx, empirical_ntk(model, x, method="jacobian")) <= 1e-10
    op = KernelOperator(model, x)  # matrix-free products: generic methods
    assert op.method in ("jacobian", "ntk_vp")
    with pytest.raises(ConfigError, match="per unit block"):
        KernelOperator(model, x, method="structured")


def test_float32_close_to_float64():
    m64 = elman("ntk", "tanh", d=1, N=64)
    m32 = elman("ntk", "tanh", d=1, N=64).float()
    x = windows(8, 16, 1, 10)
    K64 = empirical_ntk(m64, x)
    assert rel(empirical_ntk(m32, x.float()).double(), K64) < 1e-5


@pytest.mark.parametrize("name,make", MODELS[::2], ids=[m[0] for m in MODELS[::2]])
def test_equal_lengths_share_one_pass(name, make):
    model = make()
    x, x2 = windows(4, 6, 3, 11), windows(3, 6, 3, 12)  # same L: x and x2 in one batched pass
    B = ntk_blocks(model, x, x2, method="structured")
    J = jacobian_blocks(model, x, x2)
    for k in J:
        assert rel(B[k], J[k] * model.ntk_scale) <= 1e-10, k


def _subnormal_elman():
    """Mean-field Elman in float32 whose backward vectors fall below 1.2e-38 within a window."""
    model = ElmanRNN(1, 512, recurrent_scaling="mean_field", seed=0)
    x = torch.randn(4, 40, 1, generator=torch.Generator().manual_seed(0))
    return model, x


def test_backward_vectors_reach_subnormals_and_flushing_them_changes_nothing(monkeypatch):
    """The case the flush is for: float32 mean-field Elman's δ_k become subnormal over a window;
    the kernel computed with them (flushing disabled) equals the flushed one, and the caller's
    FTZ setting is restored either way."""
    from ntk_rnn.ntk import _features_c, recurrent
    from ntk_rnn.subnormals import flushing

    model, x = _subnormal_elman()
    x2 = x.flip(0)
    assert not flushing()
    with torch.inference_mode():
        d = recurrent.elman_passes(model, x)["d"]
    tiny = (d != 0) & (d.abs() < torch.finfo(torch.float32).tiny)
    assert tiny.any()  # subnormals occur without the flush
    flushed = empirical_ntk(model, x, x2, method="structured")
    assert not flushing()  # restored
    monkeypatch.setattr(_features_c, "without_subnormals", lambda *a: contextlib.nullcontext())
    plain = empirical_ntk(model, x, x2, method="structured")
    assert rel(flushed, plain) <= 1e-6
    # a caller who flushes already keeps flushing afterwards
    monkeypatch.undo()
    assert torch.set_flush_denormal(True)
    try:
        empirical_ntk(model, x, x2, method="structured")
        assert flushing()
    finally:
        torch.set_flush_denormal(False)
    assert not flushing()


@pytest.mark.parametrize("name,make", [MODELS[0], MODELS[-1]], ids=[MODELS[0][0], MODELS[-1][0]])
def test_passes_and_grams_split_over_threads_equal_one_thread_and_flush(name, make, monkeypatch):
    """With several threads the windows' passes and the Gram row blocks run on this thread and
    the features pool, each single-threaded with subnormals flushed; the kernel equals the
    one-thread kernel (float64), for x2 of another length and for x2 = None."""
    import threading

    from ntk_rnn.ntk import recurrent
    from ntk_rnn.subnormals import flushing

    model = make()
    x, x2 = windows(7, 5, 3, 0), windows(5, 4, 3, 1)
    threads = torch.get_num_threads()
    seen = set()
    for key in ("elman_passes", "gru_passes"):
        orig = getattr(recurrent, key)

        def spy(model, w, orig=orig):
            seen.add((threading.get_ident(), flushing(), torch.get_num_threads()))
            return orig(model, w)

        monkeypatch.setattr(recurrent, key, spy)
    for other in (x2, None):
        monkeypatch.setattr(recurrent, "_parts", lambda x: 1)
        one = ntk_blocks(model, x, other, method="structured")
        monkeypatch.setattr(recurrent, "_parts", lambda x: 3)
        seen.clear()
        three = ntk_blocks(model, x, other, method="structured")
        assert len({t for t, _, _ in seen}) >= 2  # really on several threads
        assert all(f and k == 1 for _, f, k in seen)  # each flushing, torch single-threaded
        for k in one:
            assert rel(three[k], one[k]) <= 1e-13, k
    assert not flushing() and torch.get_num_threads() == threads  # the caller's settings
