"""The training loop's one stepper protocol (ntk_rnn.online.stepper): every stepper that
make_stepper picks from the model family moves E networks on stacked or shared streams exactly as
each network's own one-step reference loop does."""

import copy

import pytest
import torch

from ntk_rnn import ConfigError, MeanFieldRNN, rtrl_step
from ntk_rnn.models import ElmanRNN
from ntk_rnn.online.bptt import BPTTStepper
from ntk_rnn.online.ensemble import EnsembleStepper
from ntk_rnn.online.fast import FastStepper
from ntk_rnn.online.rtrl import ReferenceStepper
from ntk_rnn.online.stepper import (
    PerNetwork,
    make_stepper,
    online_state,
    resolve_gradient,
    stack_segments,
)

F64 = torch.float64
D, N, T = 2, 24, 300


def nets(kind, E):
    if kind == "elman":
        return [ElmanRNN(D, N, seed=e, dtype=F64) for e in range(E)]
    return [MeanFieldRNN(D, N, beta=0.75, recurrence=kind, seed=e, dtype=F64) for e in range(E)]


def streams(E, shared):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(E, T, D, generator=g, dtype=F64)
    Y = torch.randn(E, T, generator=g, dtype=F64)
    return (X[0], Y[0]) if shared else (X, Y)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("backend", ["auto", "eager", "reference"])
@pytest.mark.parametrize("kind", ["diagonal", "feedback"])
def test_every_stepper_equals_each_network_stepped_alone(kind, backend, E, shared):
    """Models D and F: the factory's stepper (FastStepper, EnsembleStepper, reference), on
    stacked or shared streams cut into segments, ends where rtrl_step one element at a time ends
    for each network, with the same predictions."""
    models = nets(kind, E)
    alone = copy.deepcopy(models)
    lrs = [m.learning_rate(2.0) for m in models]
    gradient = resolve_gradient("auto", models[0])
    states = [online_state(m, lr, gradient, 32) for m, lr in zip(models, lrs)]
    stepper = make_stepper(models, lrs, states, gradient, backend)
    want = {"reference": ReferenceStepper, "auto": FastStepper, "eager": FastStepper}[backend]
    if E > 1 and backend != "reference":
        assert isinstance(stepper, EnsembleStepper)
    else:
        assert isinstance(stepper, PerNetwork) and isinstance(stepper.steppers[0], want)
    assert stepper.backend in ("reference", "kernel", "eager", "graphs")
    X, Y = streams(E, shared)
    out = torch.empty(E, T, dtype=F64)
    for j0, j1 in ((0, 1), (1, 77), (77, 200), (200, T)):  # cuts anywhere: the same run
        stepper.run_chunk(X[..., j0:j1, :], Y[..., j0:j1], out[:, j0:j1])
    for e, m in enumerate(alone):
        st = online_state(m, lrs[e], gradient, 32)
        Xe, Ye = (X, Y) if shared else (X[e], Y[e])
        ref = torch.stack([rtrl_step(m, st, Xe[k], Ye[k], lrs[e], gradient) for k in range(T)])
        assert torch.allclose(out[e], ref, rtol=0, atol=1e-12)
        for k in ("c", "w", "b"):
            assert torch.allclose(getattr(models[e], k), getattr(m, k), rtol=0, atol=1e-12)
        for k, v in st.state_dict().items():
            assert torch.allclose(states[e].state_dict()[k], v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_bptt_family_runs_each_network_on_its_own_window(shared):
    """Any other model: the factory runs each network's own BPTTStepper (its online state),
    and network e ends exactly where the same stepper run alone ends."""
    E = 2
    models = nets("elman", E)
    alone = copy.deepcopy(models)
    gradient = resolve_gradient("auto", models[0])
    assert gradient == "bptt"
    lrs = [0.05, 0.02]
    states = [online_state(m, lr, gradient, 8) for m, lr in zip(models, lrs)]
    assert all(isinstance(s, BPTTStepper) for s in states)
    stepper = make_stepper(models, lrs, states, gradient, "auto")
    assert stepper.backend == f"bptt-{states[0].engine}"
    X, Y = streams(E, shared)
    out = torch.empty(E, T, dtype=F64)
    stepper.run_chunk(X[..., :100, :], Y[..., :100], out[:, :100])
    stepper.run_chunk(X[..., 100:, :], Y[..., 100:], out[:, 100:])
    for e, m in enumerate(alone):
        Xe, Ye = (X, Y) if shared else (X[e], Y[e])
        ref = BPTTStepper(m, lrs[e], window=8).run_chunk(Xe, Ye)
        assert torch.equal(out[e], ref)
        for (k, p), q in zip(m.named_parameters(), models[e].parameters()):
            assert torch.equal(p, q), k


def test_resolve_gradient_follows_the_family():
    assert resolve_gradient("auto", nets("diagonal", 1)[0]) == "rtrl"
    assert resolve_gradient("one_step", nets("feedback", 1)[0]) == "one_step"
    assert resolve_gradient("bptt", nets("diagonal", 1)[0]) == "bptt"
    with pytest.raises(ConfigError, match="train.gradient=rtrl"):
        resolve_gradient("rtrl", nets("elman", 1)[0])


def test_stack_segments_shares_one_stream_read_at_one_place():
    X, Y = torch.randn(10, D), torch.randn(10)
    outs = [torch.empty(10) for _ in range(3)]
    # one network: its own prediction buffer, written in place
    Xs, Ys, out = stack_segments([(X[2:6], Y[2:6], outs[0][2:6])])
    assert out.shape == (1, 4) and out.data_ptr() == outs[0][2:6].data_ptr()
    # the same stream at the same place: (L, d); elsewhere: stacked (E, L, d)
    Xs, Ys, out = stack_segments([(X[2:6], Y[2:6], o[2:6]) for o in outs])
    assert Xs.shape == (4, D) and Ys.shape == (4,) and out.shape == (3, 4)
    Xs, Ys, out = stack_segments([(X[2:6], Y[2:6], outs[0][2:6]), (X[3:7], Y[3:7], outs[1][3:7])])
    assert Xs.shape == (2, 4, D) and torch.equal(Xs[1], X[3:7]) and torch.equal(Ys[1], Y[3:7])
