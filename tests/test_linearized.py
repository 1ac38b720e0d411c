"""LinearizedCallback (linearized shadow model), driven directly with the reference stepper:
against an independent float64 computation (torch.func Jacobians through whole windows and a
naive linear-model loop), the second-order law of the gap in the learning rate, exact resume."""

import io

import pytest
import torch
from torch.func import functional_call, jacrev

from ntk_rnn.callbacks import LinearizedCallback
from ntk_rnn.callbacks.base import TrainState
from ntk_rnn.data.chains import VAR1
from ntk_rnn.errors import ConfigError
from ntk_rnn.models.mean_field import MeanFieldRNN
from ntk_rnn.models.recurrence import OnlineState
from ntk_rnn.online.rtrl import ReferenceStepper

F64 = torch.float64
CASES = [("diagonal", "rtrl"), ("diagonal", "one_step"), ("feedback", "rtrl"),
         ("feedback", "one_step")]


class Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def make_model(recurrence, N=6, d=2, seed=3):
    """Model D or F with its usual μ0 (Model F: b ~ N(0, 1))."""
    return MeanFieldRNN(d, N, beta=0.75, recurrence=recurrence, seed=seed, dtype=F64)


def make_stream(T, d=2, seed=0):
    src = VAR1(dim=d, A=0.6)
    g = torch.Generator().manual_seed(seed)
    X, Y = next(src.stream(g, T))
    return src, X.to(F64), Y.to(F64)


def make_state(model, src, gradient, lr, n_steps, probe_seed=7):
    return TrainState(model=model, online=OnlineState.zeros(model), source=src,
                      run_dir=None, n_steps=n_steps, lr=lr, writer=Writer(),
                      generators={"probe": torch.Generator().manual_seed(probe_seed)},
                      gradient=gradient)


def drive(cb, state, X, Y, segments, start=0, events_first=False):
    """Train the real network (ReferenceStepper) segment by segment, feeding the callback as the
    trainer does; returns Ŷ^lin of every element."""
    stepper = ReferenceStepper(state.model, state.online, state.lr, state.gradient)
    k, out = start, []
    for L in segments:
        y_hat = stepper.run_chunk(X[k:k + L], Y[k:k + L])
        k += L
        state.step = k
        due = cb.due(k)
        if due and events_first:  # an event before its segment arrives: logged on arrival
            cb.on_step_end(k, state)
        cb.on_segment(X[k - L:k], Y[k - L:k], y_hat, state)
        out.append(cb.y_lin.clone())
        if due and not events_first:
            cb.on_step_end(k, state)
    return torch.cat(out)


def start(model, src, gradient, lr, n_steps, **kw):
    cb = LinearizedCallback(**{"every_n_steps": 8, "n_probes": 5, "probe_length": 9, **kw})
    state = make_state(model, src, gradient, lr, n_steps)
    cb.setup(state)
    cb.on_train_start(state)
    return cb, state


# --- the independent computation: autograd at θ_0 through whole windows ------------------------
def unflat(theta, N, d):
    return {"c": theta[:N], "w": theta[N:N + N * d].view(N, d), "b": theta[N + N * d:]}


def flat(model):
    return torch.cat([model.c.detach(), model.w.detach().reshape(-1), model.b.detach()])


def truncated_output(model, p, x):
    """Ŷ at the last step of window x with the memory detached (its autograd gradient is the
    truncated gradient of theory §3 / Model F's D_k)."""
    c, w, b = p["c"], p["w"], p["b"]
    act, scale = model.act, model.output_scale
    if model.recurrence == "feedback":
        m = x.new_zeros(())
        for k in range(x.shape[0]):
            m = act(w @ x[k] + b * m.detach()) @ c * scale
        return m
    S = x.new_zeros(model.width)
    for k in range(x.shape[0]):
        S = act(w @ x[k] + b * S.detach())
    return S @ c * scale


def naive_shadow(model, X, Y, lr, gradient):
    """θ^lin − θ_0 and Ŷ^lin along the stream, one element at a time, from jacrev at θ_0."""
    N, d = model.width, model.input_dim
    theta0 = flat(model)

    def out(theta, k):
        return functional_call(model, unflat(theta, N, d), (X[:k + 1],))[-1]

    delta, y_lin = torch.zeros_like(theta0), []
    for k in range(X.shape[0]):
        G = jacrev(out)(theta0, k)
        U = G if gradient == "rtrl" else jacrev(
            lambda th, x: truncated_output(model, unflat(th, N, d), x))(theta0, X[:k + 1])
        yl = out(theta0, k).detach() + G @ delta
        delta = delta + lr * (Y[k] - yl) * U
        y_lin.append(yl)
    return delta, torch.stack(y_lin)


def probe_linear(model0, probes, delta):
    """f_{θ_0} + ∇f_{θ_0}·δ on windows: jacrev of the window output at its last step."""
    N, d = model0.width, model0.input_dim
    theta0 = flat(model0)

    def f(theta):
        return functional_call(model0, unflat(theta, N, d), (probes,))[:, -1]

    J = jacrev(f)(theta0)  # (n, P)
    return f(theta0).detach() + J @ delta


# --- (a) exact against the independent computation -------------------------------------------
@pytest.mark.parametrize("recurrence,gradient", CASES)
def test_matches_autograd_linear_model(recurrence, gradient):
    T = 30
    model = make_model(recurrence)
    model0 = make_model(recurrence)
    src, X, Y = make_stream(T)
    lr = model.learning_rate(2.0)
    cb, state = start(model, src, gradient, lr, T, block_size=4)
    y_lin = drive(cb, state, X, Y, [7, 1, 13, 3, 6])

    delta, y_ref = naive_shadow(model0, X, Y, lr, gradient)
    assert torch.allclose(cb.delta, delta, rtol=1e-10, atol=1e-13)
    assert torch.allclose(y_lin, y_ref, rtol=1e-10, atol=1e-13)

    f_t, f_lin, f0 = cb.probe_outputs(state.model)
    ref = probe_linear(model0, cb.probes, delta)
    assert torch.allclose(f_lin, ref, rtol=1e-10, atol=1e-13)
    cb.on_train_end(state)  # logs the final step, 30
    with torch.no_grad():
        gap = float((model(cb.probes)[:, -1] - ref).square().mean().sqrt())
    assert dict(state.writer.scalars["lazy/output_gap"])[T] == pytest.approx(gap, rel=1e-9)
    assert state.metrics["lazy_output_gap"] == pytest.approx(gap, rel=1e-9)
    assert gap > 1e-6  # the network has left its linearization: a real comparison
    disp = flat(model) - flat(model0)
    pg = float((disp - delta).norm() / disp.norm())
    assert dict(state.writer.scalars["lazy/param_gap"])[T] == pytest.approx(pg, rel=1e-9)
    assert set(state.metrics) >= {"lazy_output_gap", "lazy_param_gap", "lazy_output_change",
                                  "lazy_stream_gap"}
    assert [s for s, _ in state.writer.scalars["lazy/output_gap"]] == [0, 8, 24, 30]


def test_block_sizes_agree_and_events_before_segments():
    """The blocked triangular solve equals one element at a time; an event asked for before its
    segment is logged when the segment arrives, with the same values."""
    T = 40
    src, X, Y = make_stream(T, seed=1)
    res = []
    for bs, first in ((1, False), (64, False), (5, True)):
        model = make_model("diagonal", N=5)
        cb, state = start(model, src, "rtrl", model.learning_rate(3.0), T, block_size=bs)
        drive(cb, state, X, Y, [8, 8, 3, 5, 16], events_first=first)
        res.append((cb.delta, state.writer.scalars))
    for delta, sc in res[1:]:
        assert torch.allclose(delta, res[0][0], rtol=1e-12, atol=1e-15)
        assert [s for s, _ in sc["lazy/output_gap"]] == [s for s, _ in res[0][1]["lazy/output_gap"]]
        for (_, a), (_, b) in zip(sc["lazy/output_gap"], res[0][1]["lazy/output_gap"]):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-15)


# --- (b) the gap is second order in the learning rate ----------------------------------------
@pytest.mark.parametrize("recurrence,gradient", CASES)
def test_gap_is_second_order_in_lr(recurrence, gradient):
    T = 60
    src, X, Y = make_stream(T, seed=2)
    out = {}
    for lr in (4e-3, 2e-3, 1e-3):
        model = make_model(recurrence, N=8)
        cb, state = start(model, src, gradient, lr, T)
        drive(cb, state, X, Y, [T])
        cb.on_train_end(state)
        out[lr] = (state.metrics["lazy_output_gap"], state.metrics["lazy_param_gap"],
                   state.metrics["lazy_output_change"])
    for a, b in ((4e-3, 2e-3), (2e-3, 1e-3)):
        assert out[a][0] / out[b][0] == pytest.approx(4.0, rel=0.03)  # gap ∝ lr²
        assert out[a][1] / out[b][1] == pytest.approx(2.0, rel=0.06)  # param gap ∝ lr
        assert out[a][2] / out[b][2] == pytest.approx(2.0, rel=0.06)  # output change ∝ lr
    assert out[1e-3][0] < 0.01 * out[1e-3][2]  # and small beside the output's own change


# --- (c) exact resume -------------------------------------------------------------------------
@pytest.mark.parametrize("recurrence,gradient", [("diagonal", "rtrl"), ("feedback", "one_step")])
def test_resume_is_exact(recurrence, gradient):
    T, segs, cut = 48, [5, 11, 16, 9, 7], 3
    src, X, Y = make_stream(T, seed=4)
    model = make_model(recurrence)
    lr = model.learning_rate(2.0)
    cb, state = start(model, src, gradient, lr, T)
    drive(cb, state, X, Y, segs)
    cb.on_train_end(state)

    model1 = make_model(recurrence)
    cb1, s1 = start(model1, src, gradient, lr, T)
    k = sum(segs[:cut])
    drive(cb1, s1, X, Y, segs[:cut])
    buf = io.BytesIO()
    torch.save({"model": model1.state_dict(), "online": s1.online.state_dict(),
                "cb": cb1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)

    model2 = make_model(recurrence, seed=99)  # other parameters until restored
    model2.load_state_dict(ck["model"])
    cb2 = LinearizedCallback(every_n_steps=8, n_probes=5, probe_length=9)
    s2 = make_state(model2, src, gradient, lr, T, probe_seed=1234)  # other probes until loaded
    s2.online.load_state_dict(ck["online"])
    cb2.setup(s2)
    s2.step = k
    cb2.load_state_dict(ck["cb"])
    cb2.on_train_start(s2)
    drive(cb2, s2, X, Y, segs[cut:], start=k)
    cb2.on_train_end(s2)

    assert torch.equal(cb2.delta, cb.delta)
    for key, v in cb.feat.items():
        assert torch.equal(cb2.feat[key], v)
    assert s2.metrics == state.metrics
    for tag, vals in state.writer.scalars.items():
        assert [p for p in vals if p[0] > k] == s2.writer.scalars[tag], tag


# --- settings and misuse ---------------------------------------------------------------------
def test_errors():
    src, X, Y = make_stream(16)
    model = make_model("diagonal")
    state = make_state(model, src, "rtrl", 0.1, 16)
    state.model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="callbacks.linearized"):
        LinearizedCallback().setup(state)
    with pytest.raises(ConfigError, match="n_probes"):
        LinearizedCallback(n_probes=0).setup(make_state(model, src, "rtrl", 0.1, 16))
    with pytest.raises(ConfigError, match="gradient"):
        LinearizedCallback().setup(make_state(model, src, "bptt", 0.1, 16))
    cb, state = start(model, src, "rtrl", 0.1, 16)
    state.step = 5
    with pytest.raises(RuntimeError, match="in order"):
        cb.on_segment(X[1:5], Y[1:5], Y[1:5], state)
    cb2 = LinearizedCallback()
    s2 = make_state(make_model("diagonal"), src, "rtrl", 0.1, 16)
    cb2.setup(s2)
    s2.step = 8
    with pytest.raises(ConfigError, match="resumes at step 8"):
        cb2.on_train_start(s2)


def test_hydra_config_composes():
    from hydra.utils import instantiate

    from .conftest import make_cfg

    for overrides in (["callbacks=[default,linearized]"], ["callbacks=linearized"]):
        cfg = make_cfg(*overrides)
        node = cfg.callbacks.linearized
        cb = instantiate(node)
        assert isinstance(cb, LinearizedCallback)
        assert (cb.every_n_steps, cb.every_t) == (node.every_n_steps, node.every_t)
    assert "ntk" in make_cfg("callbacks=[default,linearized]").callbacks
