"""Fast online training (ntk_rnn.fast, ntk_rnn.ensemble) against the reference ``rtrl_step``:
every backend, both models and gradients, to round-off after 1000 float64 steps; ensembles
member by member against solo runs; shared and own data streams; CUDA when present."""

import pytest
import torch

from ntk_rnn import ConfigError, MeanFieldRNN, OnlineState, rtrl_step
from ntk_rnn.online.ensemble import EnsembleStepper
from ntk_rnn.online.fast import KERNEL, FastStepper

f64 = torch.float64
D = 3
HAS_KERNEL = KERNEL.library(D, "tanh") is not None
CPU_BACKENDS = ["eager", "graphs"] + (["kernel"] if HAS_KERNEL else [])
CHUNKS = ((0, 1), (1, 300), (300, 301), (301, 777), (777, 1000))  # odd sizes, single steps
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def model(recurrence="diagonal", act="tanh", seed=1, beta=0.75, N=48, dtype=f64, device="cpu"):
    """Model D or F with its usual μ0 (Model F: b ~ N(0, 1))."""
    return MeanFieldRNN(D, N, beta=beta, activation=act, recurrence=recurrence, seed=seed,
                        dtype=dtype, device=device)


def data(T=1000, E=None, seed=0, dtype=f64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (T, D) if E is None else (E, T, D)
    X = torch.randn(*shape, generator=g, dtype=f64)
    Y = torch.tanh(X[..., 0] - 0.5 * X[..., 1]) + 0.1 * torch.randn(X.shape[:-1], generator=g,
                                                                      dtype=f64)
    return X.to(device, dtype), Y.to(device, dtype)


def reference(m, X, Y, lr, gradient="rtrl"):
    st = OnlineState.zeros(m)
    out = torch.empty_like(Y)
    for k in range(X.shape[0]):
        out[k] = rtrl_step(m, st, X[k], Y[k], lr, gradient)
    return out, st


def assert_same(m_fast, st_fast, out_fast, m_ref, st_ref, out_ref, tol=1e-12):
    errs = {"y_hat": rel(out_fast, out_ref)}
    for k in ("c", "w", "b"):
        errs[k] = rel(getattr(m_fast, k), getattr(m_ref, k))
    for k, v in st_ref.state_dict().items():
        errs[k] = rel(st_fast.state_dict()[k], v) if v.abs().max() > 0 else \
            float(st_fast.state_dict()[k].abs().max())
    assert max(errs.values()) <= tol, errs


# --- one model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_fast_matches_reference(backend, gradient, recurrence):
    X, Y = data()
    m_ref, m = model(recurrence), model(recurrence)
    lr = m.learning_rate(4.0)
    out_ref, st_ref = reference(m_ref, X, Y, lr, gradient)
    stepper = FastStepper(m, lr, gradient, backend=backend, max_block=16)
    assert stepper.backend == backend
    out = torch.full_like(Y, float("nan"))
    for j0, j1 in CHUNKS:  # stops mid-stream, as the trainer does at event steps
        r = stepper.run_chunk(X[j0:j1], Y[j0:j1], out=out[j0:j1])
        assert r.data_ptr() == out[j0:j1].data_ptr()
    assert_same(m, stepper.state, out, m_ref, st_ref, out_ref)
    assert rel(m.w, model(recurrence).w) > 1e-2  # it trained: the comparison is not vacuous


@pytest.mark.skipif(not HAS_KERNEL, reason=f"no compiled kernel: {KERNEL.status(D)}")
@pytest.mark.parametrize("act", ["sigmoid", "erf"])
@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_kernel_other_activations(act, recurrence):
    X, Y = data(400)
    m_ref, m = model(recurrence, act), model(recurrence, act)
    lr = m.learning_rate(4.0)
    out_ref, st_ref = reference(m_ref, X, Y, lr)
    stepper = FastStepper(m, lr, backend="auto")
    assert stepper.backend == "kernel" or KERNEL.library(D, act) is None
    out = stepper.run_chunk(X, Y)
    assert_same(m, stepper.state, out, m_ref, st_ref, out_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_close_to_reference(backend):
    X, Y = data(500, dtype=torch.float32)
    m_ref, m = model(dtype=torch.float32, N=256), model(dtype=torch.float32, N=256)
    lr = m.learning_rate(2.0)
    out_ref, _ = reference(m_ref, X, Y, lr)
    out = FastStepper(m, lr, backend=backend).run_chunk(X, Y)
    assert rel(out, out_ref) < 1e-4 and rel(m.w, m_ref.w) < 1e-5


def test_fast_step_is_a_drop_in_for_rtrl_step():
    X, Y = data(300)
    m_ref, m = model(), model()
    lr = m.learning_rate(4.0)
    out_ref, st_ref = reference(m_ref, X, Y, lr)
    st = OnlineState.zeros(m)
    fast = FastStepper(m, lr, "rtrl", st)  # steps on the state ``st`` given, like rtrl_step
    out = torch.empty_like(Y)
    for k in range(100):
        y_hat = fast.step(X[k], Y[k])
        assert y_hat.dim() == 0
        out[k] = y_hat
    out[100:] = fast.run_chunk(X[100:], Y[100:])  # a chunk at once
    assert_same(m, st, out, m_ref, st_ref, out_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_written_from_outside_is_picked_up(backend):
    """Resume: load_state_dict into the model and the state between chunks (same tensors), or
    replace a parameter tensor outright: the stepper continues from what is there."""
    X, Y = data(400)
    m_ref = model()
    lr = m_ref.learning_rate(4.0)
    out_ref, st_ref = reference(m_ref, X, Y, lr)
    m_half = model()
    _, st_half = reference(m_half, X[:200], Y[:200], lr)
    m = model(seed=7)  # other parameters: everything must come from the loaded state
    stepper = FastStepper(m, lr, backend=backend)
    stepper.run_chunk(X[:50], Y[:50])  # scribble on it first
    m.load_state_dict(m_half.state_dict())
    stepper.state.load_state_dict(st_half.state_dict())
    m.c.data = m.c.detach().clone()  # a replaced tensor: the engine must follow it
    out = stepper.run_chunk(X[200:], Y[200:])
    assert_same(m, stepper.state, out, m_ref, st_ref, out_ref[200:])


def test_kernel_status_and_backend_choice(monkeypatch):
    assert isinstance(KERNEL.status(D), str)
    m = model()
    assert FastStepper(m, 0.1).backend == ("kernel" if HAS_KERNEL else "eager")
    monkeypatch.setenv("NTK_RNN_FAST_BACKEND", "eager")
    assert FastStepper(m, 0.1).backend == "eager"


def test_bad_inputs_are_clear_errors():
    m = model()
    st = FastStepper(m, 0.1)
    with pytest.raises(ConfigError, match="X has shape"):
        st.run_chunk(torch.zeros(5, D + 1, dtype=f64), torch.zeros(5, dtype=f64))
    with pytest.raises(ConfigError, match="Y has shape"):
        st.run_chunk(torch.zeros(5, D, dtype=f64), torch.zeros(4, dtype=f64))
    with pytest.raises(ConfigError, match="out has shape"):
        st.run_chunk(torch.zeros(5, D, dtype=f64), torch.zeros(5, dtype=f64),
                     out=torch.zeros(4, dtype=f64))
    with pytest.raises(ConfigError, match="gradient"):
        FastStepper(m, 0.1, "bptt")
    with pytest.raises(ConfigError, match="backend"):
        FastStepper(m, 0.1, backend="magic")
    with pytest.raises(ConfigError, match="FeedbackState"):
        FastStepper(model("feedback"), 0.1, state=OnlineState.zeros(m))
    assert st.run_chunk(torch.zeros(0, D, dtype=f64), torch.zeros(0, dtype=f64)).shape == (0,)


# --- ensembles ----------------------------------------------------------------------------------
SEEDS, BETAS, ALPHAS = [0, 1, 2], [0.6, 0.75, 0.9], [1.0, 4.0, 2.0]


def members(recurrence="diagonal", dtype=f64, device="cpu"):
    return [model(recurrence, seed=s, beta=b, dtype=dtype, device=device)
            for s, b in zip(SEEDS, BETAS, strict=True)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_ensemble_member_equals_solo_run(backend, recurrence):
    """Member e (own seed, α, β, own data stream) = the same model trained alone."""
    E = len(SEEDS)
    X, Y = data(E=E)
    ens = EnsembleStepper(members(recurrence), alpha=ALPHAS, backend=backend, max_block=16)
    out = torch.full((E, 1000), float("nan"), dtype=f64)
    for j0, j1 in CHUNKS:
        ens.run_chunk(X[:, j0:j1], Y[:, j0:j1], out=out[:, j0:j1])
    for e in range(E):
        m_ref = model(recurrence, seed=SEEDS[e], beta=BETAS[e])
        out_ref, st_ref = reference(m_ref, X[e], Y[e], m_ref.learning_rate(ALPHAS[e]))
        m_e, st_e = ens.member(e)
        assert_same(m_e, st_e, out[e], m_ref, st_ref, out_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_stream_equals_repeated_own_streams(backend):
    E = len(SEEDS)
    X, Y = data(300)
    shared = EnsembleStepper(members(), alpha=2.0, backend=backend, shared_stream=True)
    own = EnsembleStepper(members(), alpha=2.0, backend=backend, shared_stream=False)
    out_s = shared.run_chunk(X, Y)
    out_o = own.run_chunk(X.expand(E, -1, -1).clone(), Y.expand(E, -1).clone())
    assert out_s.shape == (E, 300)
    assert rel(out_s, out_o) < 1e-14
    assert not torch.allclose(out_s[0], out_s[1])  # members differ (seeds)
    # shared inputs with a target per member is allowed too
    mixed = EnsembleStepper(members(), alpha=2.0, backend=backend).run_chunk(
        X, Y.expand(E, -1))
    assert rel(mixed, out_s) < 1e-14
    with pytest.raises(ConfigError, match="shared_stream"):
        shared.run_chunk(X.expand(E, -1, -1), Y.expand(E, -1))
    with pytest.raises(ConfigError, match="shared_stream"):
        own.run_chunk(X, Y)


@pytest.mark.skipif(not HAS_KERNEL, reason="no compiled kernel")
def test_ensemble_kernel_threads_equal_one_thread():
    X, Y = data(200, E=4)
    a, b = (EnsembleStepper([MeanFieldRNN(D, 48, seed=s, dtype=f64) for s in range(4)],
                            alpha=2.0, threads=threads) for threads in (1, 3))
    assert rel(b.run_chunk(X, Y), a.run_chunk(X, Y)) < 1e-15
    assert rel(b.params["w"], a.params["w"]) < 1e-15


def test_ensemble_models_are_live_and_writable():
    X, Y = data(100, E=3)
    ms = members()
    ens = EnsembleStepper(ms, alpha=2.0)
    before = ms[1].w.detach().clone()
    ens.run_chunk(X, Y)
    assert ens.models[1] is ms[1] and not torch.equal(ms[1].w, before)  # bound: always current
    assert ms[1].w.data_ptr() == ens.params["w"][1].data_ptr()
    assert ens.to_models() is ens.models
    # a member restored from a checkpoint (load_state_dict copies into the bound tensors) ...
    fresh = model(seed=SEEDS[1], beta=BETAS[1])
    ms[1].load_state_dict(fresh.state_dict())
    assert torch.equal(ens.params["c"][1], fresh.c.detach())
    # ... or given new tensors outright: pulled back in before the next chunk
    ms[2].w.data = torch.zeros_like(ms[2].w)
    ens.run_chunk(X[:, :1], Y[:, :1])
    assert ms[2].w.data_ptr() == ens.params["w"][2].data_ptr()
    # bind=False: models untouched until to_models()
    ms2 = members()
    w0 = ms2[0].w.detach().clone()
    ens2 = EnsembleStepper(ms2, lr=0.05, bind=False)
    ens2.run_chunk(X, Y)
    assert torch.equal(ms2[0].w, w0)
    ens2.to_models()
    assert torch.equal(ms2[0].w.detach(), ens2.params["w"][0])


def test_ensemble_rejects_mismatched_members():
    with pytest.raises(ConfigError, match="differs from member 0"):
        EnsembleStepper([model(N=48), model(N=40)], alpha=1.0)
    with pytest.raises(ConfigError, match="exactly one of lr"):
        EnsembleStepper(members())
    with pytest.raises(ConfigError, match="3 values"):
        EnsembleStepper(members()[:2], alpha=[1.0, 2.0, 3.0])


# --- CUDA ---------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["graphs", "eager"])
@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_cuda_matches_reference(backend, recurrence):
    X, Y = data(device="cuda")
    m_ref, m = model(recurrence, device="cuda"), model(recurrence, device="cuda")
    lr = m.learning_rate(4.0)
    out_ref, st_ref = reference(m_ref, X, Y, lr)
    stepper = FastStepper(m, lr, backend=backend)
    out = torch.empty_like(Y)
    for j0, j1 in CHUNKS:
        stepper.run_chunk(X[j0:j1], Y[j0:j1], out=out[j0:j1])
    assert stepper.backend == backend
    assert_same(m, stepper.state, out, m_ref, st_ref, out_ref, tol=1e-12)


@needs_cuda
@pytest.mark.gpu
def test_cuda_default_is_graphs_and_ensemble_matches_solo():
    E = len(SEEDS)
    X, Y = data(E=E, device="cuda")
    ens = EnsembleStepper(members(device="cuda"), alpha=ALPHAS)
    assert ens.backend == "graphs"
    out = torch.empty(E, 1000, dtype=f64, device="cuda")
    for j0, j1 in CHUNKS:
        ens.run_chunk(X[:, j0:j1], Y[:, j0:j1], out=out[:, j0:j1])
    for e in range(E):
        m_ref = model(seed=SEEDS[e], beta=BETAS[e], device="cuda")
        out_ref, st_ref = reference(m_ref, X[e], Y[e], m_ref.learning_rate(ALPHAS[e]))
        m_e, st_e = ens.member(e)
        assert_same(m_e, st_e, out[e], m_ref, st_ref, out_ref, tol=1e-12)


def test_ensemble_binds_given_states():
    """States handed in (e.g. a trainer's OnlineState objects) stay the live state objects."""
    ms = members()
    states = [OnlineState.zeros(m) for m in ms]
    ens = EnsembleStepper(ms, alpha=2.0, states=states)
    X, Y = data(50, E=3)
    ens.run_chunk(X, Y)
    assert all(a is b for a, b in zip(ens.states, states, strict=True))
    assert states[0].S.abs().max() > 0
    assert states[2].P.data_ptr() == ens.buf.t["P"][2].data_ptr()


@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
@pytest.mark.parametrize("gradient", ["rtrl", "one_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [16, 203])
def test_result_does_not_depend_on_where_the_calls_cut_the_stream(recurrence, gradient, dtype, N):
    """Bit-identical resume needs this: the trainer stops the stepper at every event, and a resumed
    run cuts the stream elsewhere; the parameters after T steps must not depend on the cuts."""
    from ntk_rnn.online import FastStepper

    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(300, 2, generator=g, dtype=dtype), torch.randn(300, generator=g, dtype=dtype)
    finals = []
    for seg in (300, 1, 7, 64):
        m = MeanFieldRNN(2, N, recurrence=recurrence, dtype=dtype, seed=1)
        st = FastStepper(m, m.learning_rate(4.0), gradient)
        assert st.backend == "kernel"
        for j in range(0, 300, seg):
            st.run_chunk(X[j:j + seg], Y[j:j + seg])
        state = st.state.state_dict().values()
        finals.append([t.detach().clone() for t in (m.c, m.w, m.b, *state)])
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))
