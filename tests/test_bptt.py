"""Truncated-BPTT online SGD: against an independent naive implementation (autograd through a
window rebuilt from scratch at every step), ensembles against separate steppers, resume."""

import os

import pytest
import torch
from torch import nn

from ntk_rnn.csrc import loader
from ntk_rnn.errors import ConfigError
from ntk_rnn.models import GRURNN, ElmanRNN
from ntk_rnn.online import bptt
from ntk_rnn.online.bptt import BPTTEnsembleStepper, BPTTStepper

F64 = torch.float64
KERNEL = bptt.KERNEL.library(act="tanh") is not None
ELMAN_ENGINES = ["eager", "autograd"] + (["kernel"] if KERNEL else [])


class TinyRNN(nn.Module):
    """A custom module without the memory interface: every window starts from zero."""

    def __init__(self, input_dim: int, hidden: int = 6, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.input_dim = input_dim
        self.U = nn.Parameter(torch.randn(hidden, input_dim, generator=g, dtype=dtype))
        self.V = nn.Parameter(torch.randn(hidden, hidden, generator=g, dtype=dtype) / hidden)
        self.a = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) / hidden)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.V.shape[0], dtype=x.dtype)
        ys = []
        for k in range(x.shape[1]):
            h = torch.tanh(x[:, k] @ self.U.T + h @ self.V.T)
            ys.append(h @ self.a)
        return torch.stack(ys, 1)


def naive_bptt(model: nn.Module, lr: float, window: int, X, Y):
    """Per step k: the window X_{k-n+1..k} as a new tensor, the model run on it from the kept
    memory (zero without one), torch.autograd.grad of ½(Y_k - Ŷ_k)², θ ← θ - lr ∇; when the
    window is full, the memory moves to the state after its first input. Returns Ŷ and the
    gradients of every step."""
    params = list(model.parameters())
    mem = torch.zeros(1, model.memory_dim, dtype=X.dtype) if hasattr(model, "memory_dim") else None
    buf, outs, grads = [], [], []
    for k in range(X.shape[0]):
        buf.append(X[k])
        xw = torch.stack(buf).unsqueeze(0)
        if mem is not None:
            y, H = model(xw, h0=mem, return_states=True)
        else:
            y, H = model(xw), None
        yh = y[0, -1]
        g = torch.autograd.grad(0.5 * (Y[k] - yh) ** 2, params)
        with torch.no_grad():
            for p, gp in zip(params, g):
                p.sub_(lr * gp)
        outs.append(yh.detach())
        grads.append([gp.clone() for gp in g])
        if len(buf) == window:
            if mem is not None:
                mem = H[:, 0].detach()
            buf.pop(0)
    return torch.stack(outs), grads


def stream(T, d=2, seed=0, E=None):
    g = torch.Generator().manual_seed(seed)
    shape = (T,) if E is None else (E, T)
    return torch.randn(*shape, d, generator=g, dtype=F64), torch.randn(*shape, generator=g,
                                                                       dtype=F64)


def make(kind, seed=3, dtype=F64):
    if kind == "elman_mf":
        return ElmanRNN(2, 10, beta=0.6, A_mean=0.8, seed=seed, dtype=dtype)
    if kind == "elman_ntk":
        return ElmanRNN(2, 10, recurrent_scaling="ntk", activation="erf", seed=seed, dtype=dtype)
    if kind == "elman_sigmoid":
        return ElmanRNN(2, 10, activation="sigmoid", A_std=3.0, seed=seed, dtype=dtype)
    if kind == "gru":
        return GRURNN(2, 8, bias_std=0.3, seed=seed, dtype=dtype)
    if kind == "gru_nobias":
        return GRURNN(2, 7, recurrent_scaling="mean_field", hh_std=3.0, bias=False, seed=seed,
                      dtype=dtype)
    return TinyRNN(2)


GRU_ENGINES = ["autograd"] + (["kernel"] if KERNEL else [])
CASES = ([(k, e) for k in ("elman_mf", "elman_ntk", "elman_sigmoid") for e in ELMAN_ENGINES]
         + [(k, e) for k in ("gru", "gru_nobias") for e in GRU_ENGINES] + [("tiny", "autograd")])


@pytest.mark.parametrize("kind,engine", CASES)
@pytest.mark.parametrize("window", [1, 4])
def test_online_gradients_match_autograd_through_the_window(kind, engine, window):
    """Every step's gradient (recovered as (θ_k − θ_{k+1})/lr) and Ŷ_k equal the naive
    implementation's to ≤ 1e-10 in float64, over 3 windows and more (the buffer wraps)."""
    X, Y = stream(3 * window + 5)
    lr = 0.7
    ref = make(kind)
    y_ref, g_ref = naive_bptt(ref, lr, window, X, Y)
    m = make(kind)
    st = BPTTStepper(m, lr, window, engine=engine)
    assert st.backend == "bptt" and st.engine == engine
    for k in range(X.shape[0]):
        before = [p.detach().clone() for p in m.parameters()]
        yk = st.run_chunk(X[k:k + 1], Y[k:k + 1])
        assert abs(float(yk[0] - y_ref[k])) <= 1e-10
        for p0, p, gr in zip(before, m.parameters(), g_ref[k]):
            assert float(((p0 - p.detach()) / lr - gr).abs().max()) <= 1e-10
    for p, q in zip(m.parameters(), ref.parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-10


@pytest.mark.parametrize("engine", ELMAN_ENGINES)
def test_chunks_and_out_argument(engine):
    """One chunk or several, with out=: the same numbers bit for bit; window longer than T."""
    X, Y = stream(23)
    m1, m2 = make("elman_mf"), make("elman_mf")
    o1 = BPTTStepper(m1, 0.3, window=6, engine=engine).run_chunk(X, Y)
    st = BPTTStepper(m2, 0.3, window=6, engine=engine)
    o2 = torch.full((23,), float("nan"), dtype=F64)
    for j0, j1 in ((0, 1), (1, 9), (9, 9), (9, 23)):
        res = st.run_chunk(X[j0:j1], Y[j0:j1], out=o2[j0:j1])
        assert res.data_ptr() == o2[j0:j1].data_ptr() or j0 == j1
    assert torch.equal(o1, o2)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert st.steps == 23 and st.count == 5
    long = BPTTStepper(make("elman_mf"), 0.3, window=64, engine=engine)
    y_ref, _ = naive_bptt(make("elman_mf"), 0.3, 64, X, Y)
    torch.testing.assert_close(long.run_chunk(X, Y), y_ref, rtol=0, atol=1e-12)


@pytest.mark.skipif(not KERNEL, reason="no compiled BPTT kernel here")
@pytest.mark.parametrize("kind,other", [("elman_mf", "eager"), ("gru", "autograd")])
def test_kernel_float32_matches_torch(kind, other):
    X, Y = stream(40)
    m1, m2 = make(kind, dtype=torch.float32), make(kind, dtype=torch.float32)
    o1 = BPTTStepper(m1, 0.5, 8, engine="kernel").run_chunk(X.float(), Y.float())
    o2 = BPTTStepper(m2, 0.5, 8, engine=other).run_chunk(X.float(), Y.float())
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _resume_equal(build, X, Y, T):
    """2T steps in one go vs T steps, state_dicts (model and stepper) into fresh objects, T more."""
    models_a, st_a = build()
    out_a = st_a.run_chunk(X, Y)
    models_b, st_b = build()
    sl = (slice(None), slice(0, T)) if X.dim() == 3 else (slice(0, T),)
    sl2 = (slice(None), slice(T, None)) if X.dim() == 3 else (slice(T, None),)
    out_b1 = st_b.run_chunk(X[sl], Y[sl])
    saved_models = [{k: v.clone() for k, v in m.state_dict().items()} for m in models_b]
    saved = {k: v.clone() for k, v in st_b.state_dict().items()}
    models_c, st_c = build(seed_offset=100)  # different θ_0: everything must come from the save
    for m, sd in zip(models_c, saved_models):
        m.load_state_dict(sd)
    st_c.load_state_dict(saved)
    out_c2 = st_c.run_chunk(X[sl2], Y[sl2])
    assert torch.equal(out_a, torch.cat([out_b1, out_c2], dim=-1))
    for ma, mc in zip(models_a, models_c):
        for (k, p), q in zip(ma.named_parameters(), mc.parameters()):
            assert torch.equal(p, q), k
    for k, v in st_a.state_dict().items():
        assert torch.equal(v, st_c.state_dict()[k]), k


@pytest.mark.parametrize("kind,engine", [("elman_mf", e) for e in ELMAN_ENGINES]
                         + [("gru", e) for e in GRU_ENGINES] + [("tiny", "autograd")])
def test_resume_is_bit_identical(kind, engine):
    X, Y = stream(2 * 9)

    def build(seed_offset=0):
        m = make(kind, seed=3 + seed_offset)
        return [m], BPTTStepper(m, 0.4, window=5, engine=engine)

    _resume_equal(build, X, Y, 9)


@pytest.mark.parametrize("kind,engine", [("elman_ntk", e) for e in ELMAN_ENGINES]
                         + [("gru", e) for e in GRU_ENGINES] + [("tiny", "autograd")])
def test_ensemble_equals_separate_steppers(kind, engine):
    E, lrs = 3, [0.2, 0.6, 0.4]
    X, Y = stream(17, E=E, seed=5)
    models = [make(kind, seed=s) for s in range(E)]
    ens = BPTTEnsembleStepper(models, lrs, window=4, engine=engine)
    out = torch.cat([ens.run_chunk(X[:, :7], Y[:, :7]), ens.run_chunk(X[:, 7:], Y[:, 7:])], 1)
    assert out.shape == (E, 17) and ens.backend == "bptt"
    for e in range(E):
        m = make(kind, seed=e)
        o = BPTTStepper(m, lrs[e], window=4, engine="autograd").run_chunk(X[e], Y[e])
        torch.testing.assert_close(out[e], o, rtol=1e-10, atol=1e-12)
        for p, q in zip(models[e].parameters(), m.parameters()):  # models[e] is bound: live
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # one shared stream
    models = [make(kind, seed=s) for s in range(E)]
    shared = BPTTEnsembleStepper(models, 0.5, window=4, engine=engine).run_chunk(X[1], Y[1])
    o = BPTTStepper(make(kind, seed=2), 0.5, window=4, engine="autograd").run_chunk(X[1], Y[1])
    torch.testing.assert_close(shared[2], o, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ELMAN_ENGINES)
def test_ensemble_resume_and_rebinding(engine):
    E = 2
    X, Y = stream(12, E=E, seed=9)

    def build(seed_offset=0):
        ms = [make("elman_mf", seed=s + seed_offset) for s in range(E)]
        return ms, BPTTEnsembleStepper(ms, [0.3, 0.5], window=4, engine=engine)

    _resume_equal(build, X, Y, 5)
    # a member's parameter replaced from outside is picked up by the next chunk
    ms, ens = build()
    ens.run_chunk(X[:, :3], Y[:, :3])
    new_c = torch.zeros_like(ms[1].c)
    ms[1].c.data = new_c
    ens.run_chunk(X[:, 3:4], Y[:, 3:4])
    assert ms[1].c.data_ptr() == ens.params["c"][1].data_ptr()
    assert ens.params["c"][1].abs().max() > 0  # zero c: the step moved it from the new value


@pytest.mark.skipif(loader.compiler() is None or bool(os.environ.get("NTK_RNN_NO_KERNEL")),
                    reason="no C compiler, or kernels disabled")
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_kernel_builds_and_passes_its_self_check(act):
    """With a compiler the kernel must be in use: a failed self-check would otherwise only
    show up as skipped kernel tests."""
    assert bptt.KERNEL.status(act=act).startswith("ok"), bptt.KERNEL.status(act=act)


def test_errors():
    m = make("elman_mf")
    with pytest.raises(ConfigError, match=r"train\.bptt_window=0"):
        BPTTStepper(m, 0.1, window=0)
    with pytest.raises(ConfigError, match=r"engine='kernel' needs an ElmanRNN .* or a GRURNN"):
        BPTTStepper(TinyRNN(2), 0.1, engine="kernel")
    with pytest.raises(ConfigError, match=r"engine='eager' needs an ElmanRNN"):
        BPTTStepper(make("gru"), 0.1, engine="eager")
    with pytest.raises(ConfigError, match=r"engine="):
        BPTTStepper(m, 0.1, engine="jit")
    with pytest.raises(ConfigError, match=r"lr="):
        BPTTStepper(m, float("nan"))
    st = BPTTStepper(m, 0.1, window=3)
    with pytest.raises(ConfigError, match=r"X has shape"):
        st.run_chunk(torch.zeros(5, 3, dtype=F64), torch.zeros(5, dtype=F64))
    with pytest.raises(ConfigError, match=r"Y has shape"):
        st.run_chunk(torch.zeros(5, 2, dtype=F64), torch.zeros(4, dtype=F64))
    with pytest.raises(ConfigError, match=r"out has shape"):
        st.run_chunk(torch.zeros(5, 2, dtype=F64), torch.zeros(5, dtype=F64),
                     out=torch.zeros(4, dtype=F64))
    with pytest.raises(ConfigError, match=r"do not fit window"):
        st.load_state_dict(BPTTStepper(make("elman_mf"), 0.1, window=5).state_dict())

    class Wrong(TinyRNN):
        def forward(self, x):
            return super().forward(x)[:, :1]

    with pytest.raises(ConfigError, match=r"Wrong\.forward gave an output of shape"):
        BPTTStepper(Wrong(2), 0.1, window=3).run_chunk(torch.zeros(4, 2, dtype=F64),
                                                       torch.zeros(4, dtype=F64))
    with pytest.raises(ConfigError, match=r"differs from member 0"):
        BPTTEnsembleStepper([make("elman_mf"), make("elman_ntk")], 0.1)


def test_state_dict_contents():
    st = BPTTStepper(make("gru"), 0.1, window=4)
    X, Y = stream(6)
    st.run_chunk(X, Y)
    sd = st.state_dict()
    assert set(sd) == {"inputs", "count", "steps", "memory"}
    assert sd["inputs"].shape == (4, 2) and sd["memory"].shape == (8,)
    assert int(sd["count"]) == 3 and int(sd["steps"]) == 6
    torch.testing.assert_close(sd["inputs"][:3], X[3:6])
    assert "memory" not in BPTTStepper(TinyRNN(2), 0.1).state_dict()
    # a module without an input_dim attribute: given to the stepper
    bare = TinyRNN(2)
    del bare.input_dim
    with pytest.raises(ConfigError, match=r"pass input_dim"):
        BPTTStepper(bare, 0.1)
    assert BPTTStepper(bare, 0.1, window=3, input_dim=2).run_chunk(X, Y).shape == (6,)


def test_steps_flush_subnormals_and_restore_the_setting(monkeypatch):
    """Mean-field Elman's window δ_k underflow in float32 (tests/test_ntk_recurrent.py shows
    it); the stepper runs with subnormals flushed, its numbers equal the unflushed run's, and
    the caller's setting comes back."""
    from contextlib import nullcontext

    from ntk_rnn.subnormals import flushing

    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(60, 1, generator=g), torch.randn(60, generator=g)
    seen = []

    def run(engine, flush):
        model = ElmanRNN(1, 256, recurrent_scaling="mean_field", seed=0)
        st = BPTTStepper(model, 0.5, window=40, engine=engine)
        if engine == "eager":
            step = st._eager_step
            st._eager_step = lambda x, y: (seen.append(flushing()), step(x, y))[1]
        if not flush:
            monkeypatch.setattr(bptt, "without_subnormals", lambda device: nullcontext())
        y = st.run_chunk(X, Y)
        monkeypatch.undo()
        return y, {k: p.detach().clone() for k, p in model.named_parameters()}

    for engine in ["eager"] + (["kernel"] if KERNEL else []):
        (y1, p1), (y0, p0) = run(engine, True), run(engine, False)
        assert not flushing()
        assert torch.allclose(y1, y0, rtol=1e-6, atol=0), engine
        for k in p1:
            assert torch.allclose(p1[k], p0[k], rtol=1e-6, atol=1e-30), (engine, k)
    assert seen and all(seen[:60]) and not any(seen[60:])  # flushed inside run_chunk only


@pytest.mark.skipif(not KERNEL, reason="no C compiler: the kernel engine is not built")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("model,N,threads", [("elman_mf", 200, 2), ("elman_ntk", 320, 3),
                                             ("elman_mf", 1024, 2), ("gru", 200, 2),
                                             ("gru_nobias", 330, 3)])
def test_kernel_threads_give_the_same_bits(monkeypatch, dtype, model, N, threads):
    """The kernel splits each member's units over a team of threads (Elman: rows of A for the
    forward and the update, entries of A^T δ for the backward; GRU: the units' three gate rows,
    entries of DH). Cut on multiples of 64 units, every unit takes the same code path as on one
    thread: outputs, parameters and the stepper's state are bit-identical for any team, over
    window fill-up, two chunks and an ensemble."""
    if dtype == F64 and N == 1024:
        pytest.skip("one large case is enough (float32)")
    X, Y = stream(45, E=2)
    X, Y = X.to(dtype), Y.to(dtype)

    def build(s):
        if model == "gru":
            return GRURNN(2, N, bias_std=0.3, seed=s, dtype=dtype)
        if model == "gru_nobias":
            return GRURNN(2, N, recurrent_scaling="mean_field", bias=False, seed=s, dtype=dtype)
        scaling = "ntk" if model == "elman_ntk" else "mean_field"
        return ElmanRNN(2, N, recurrent_scaling=scaling, beta=0.6, A_mean=0.8, seed=s,
                        dtype=dtype)

    def run(nth):
        monkeypatch.setattr(BPTTEnsembleStepper, "kernel_threads", lambda self: nth)
        st = BPTTEnsembleStepper([build(1), build(2)], [0.3, 0.2], window=8, engine="kernel")
        out = torch.cat([st.run_chunk(X[:, :13], Y[:, :13]), st.run_chunk(X[:, 13:], Y[:, 13:])],
                        1)
        assert st.last_kernel_threads == nth  # the team really ran
        return out, [p.detach().clone() for p in st.params.values()], st.state_dict()

    one, team = run(1), run(threads)
    assert torch.equal(one[0], team[0])
    for p, q in zip(one[1], team[1]):
        assert torch.equal(p, q)
    for k, v in one[2].items():
        assert torch.equal(v, team[2][k]), k
    assert torch.isfinite(one[0]).all() and one[0].abs().max() > 0


def test_kernel_team_is_capped_by_the_usable_cpus_and_the_width(monkeypatch):
    """The kernel's barrier spins, so its team never exceeds the CPUs this process may run on
    (its affinity mask, not the machine's count) nor one thread per MIN_UNITS_PER_THREAD units."""
    st = BPTTStepper(ElmanRNN(1, 4 * bptt.MIN_UNITS_PER_THREAD, seed=0), 0.1, 4, engine="eager")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert st.kernel_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert st.kernel_threads() == 4  # the width allows 4
    small = BPTTStepper(ElmanRNN(1, bptt.MIN_UNITS_PER_THREAD + 63, seed=0), 0.1, 4,
                        engine="eager")
    assert small.kernel_threads() == 1
