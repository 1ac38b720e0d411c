"""Empirical NTK engine (theory §4): methods agree, match finite differences, blocks, truncation."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from ntk_rnn import ConfigError, MeanFieldRNN
from ntk_rnn.ntk import (
    choose_method,
    empirical_ntk,
    ntk_blocks,
    structured_ntk,
    training_kernel,
    unit_feature_matrix,
)
from ntk_rnn.ntk import empirical as emp

F64 = torch.float64
METHODS = ("structured", "jacobian", "ntk_vp")
GENERIC = ("jacobian", "ntk_vp")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def windows(n, L, d, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, d, generator=g, dtype=dtype)


def last_output(model, x):
    out = model(x)
    return emp._last_step(out, x.shape[0])


@torch.no_grad()
def fd_jacobians(model, x, h=1e-6):
    """Central differences of the last-step output w.r.t. every entry of every parameter."""
    J = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.data.view(-1)
        cols = []
        for j in range(flat.numel()):
            old = flat[j].item()
            flat[j] = old + h
            fp = last_output(model, x)
            flat[j] = old - h
            fm = last_output(model, x)
            flat[j] = old
            cols.append((fp - fm) / (2 * h))
        J[name] = torch.stack(cols, dim=1)
    return J


def fd_blocks(model, x, x2):
    s = float(getattr(model, "ntk_scale", 1.0))
    J1, J2 = fd_jacobians(model, x), fd_jacobians(model, x2)
    return {k: s * J1[k] @ J2[k].T for k in J1}


class Elman(nn.Module):
    """Hand-written Elman RNN: h_k = tanh(W h_{k−1} + U x_k), outputs v·h_k at every step."""

    def __init__(self, d: int, H: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.5 * torch.randn(H, H, generator=g, dtype=F64) / math.sqrt(H))
        self.U = nn.Parameter(torch.randn(H, d, generator=g, dtype=F64))
        self.v = nn.Parameter(torch.randn(H, generator=g, dtype=F64) / math.sqrt(H))

    def forward(self, x):  # (B, L, d) -> (B, L)
        h = x.new_zeros(x.shape[0], self.W.shape[0])
        outs = []
        for k in range(x.shape[1]):
            h = torch.tanh(h @ self.W.T + x[:, k] @ self.U.T)
            outs.append(h @ self.v)
        return torch.stack(outs, dim=-1)


class MLP(nn.Module):
    """MLP on the flattened window, one output (B, 1); a buffer exercises functional_call."""

    def __init__(self, L: int, d: int, H: int = 7):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Flatten(), nn.Linear(L * d, H), nn.Tanh(), nn.Linear(H, 1)]
        self.net = nn.Sequential(*layers).double()
        self.register_buffer("gain", torch.tensor(1.5, dtype=F64))

    def forward(self, x):
        return self.gain * self.net(x)


def rnn(N=6, d=3, act="tanh", dtype=F64, seed=1, beta=0.75):
    return MeanFieldRNN(d, N, beta=beta, activation=act, dtype=dtype, seed=seed)


# --- agreement of the three methods ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_methods_agree(act, dtype):
    model = rnn(N=48, d=3, act=act, dtype=dtype)
    x, x2 = windows(5, 7, 3, 0, dtype), windows(4, 9, 3, 1, dtype)  # different L is allowed
    for args in [(x, x2), (x, None)]:
        Ks = {m: empirical_ntk(model, *args, method=m) for m in METHODS}
        for m in GENERIC:
            assert rel(Ks["structured"], Ks[m]) <= TOL[dtype], (m, args[1] is None)
        assert Ks["structured"].dtype == dtype
    assert torch.equal(empirical_ntk(model, x, x2),  # auto = structured
                       empirical_ntk(model, x, x2, method="structured"))


# --- finite differences ------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_finite_differences(method, act):
    model = rnn(N=6, d=3, act=act)
    x, x2 = windows(4, 5, 3, 2), windows(3, 4, 3, 3)
    K_fd = sum(fd_blocks(model, x, x2).values())
    assert rel(empirical_ntk(model, x, x2, method=method), K_fd) < 1e-7
    assert model.ntk_scale == 6 ** 0.5  # N^{2β−1}, β = 0.75


@pytest.mark.parametrize("method", METHODS)
def test_blocks_sum_to_total_and_match_finite_differences(method):
    model = rnn(N=5, d=2)
    x, x2 = windows(3, 6, 2, 4), windows(4, 6, 2, 5)
    B = ntk_blocks(model, x, x2, method=method)
    assert set(B) == {"c", "w", "b"}
    assert rel(sum(B.values()), empirical_ntk(model, x, x2, method=method)) < 1e-12
    B_fd = fd_blocks(model, x, x2)
    for k in B:
        assert rel(B[k], B_fd[k]) < 1e-7, k


# --- generic modules ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", *GENERIC])
def test_generic_mlp(method):
    L, d = 4, 3
    model = MLP(L, d)
    x, x2 = windows(5, L, d, 6), windows(3, L, d, 7)
    K_fd = fd_blocks(model, x, x2)
    assert rel(empirical_ntk(model, x, x2, method=method), sum(K_fd.values())) < 1e-7
    B = ntk_blocks(model, x, x2, method=method)
    assert set(B) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    for k in B:
        assert rel(B[k], K_fd[k]) < 1e-7, k
    K = empirical_ntk(model, x, method=method)
    assert torch.allclose(K, K.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", GENERIC)
def test_generic_elman_vs_autograd_jacobian(method):
    model = Elman(d=2, H=5)
    x, x2 = windows(4, 6, 2, 8), windows(3, 5, 2, 9)
    params = dict(model.named_parameters())

    def jac(xs):  # direct autograd Jacobian of the last-step outputs, flattened over parameters
        rows = []
        for i in range(xs.shape[0]):
            g = torch.autograd.grad(model(xs[i:i + 1])[0, -1], list(params.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    K_ad = jac(x) @ jac(x2).T
    assert rel(empirical_ntk(model, x, x2, method=method), K_ad) < 1e-12
    K_fd = sum(fd_blocks(model, x, x2).values())
    assert rel(empirical_ntk(model, x, x2, method=method), K_fd) < 1e-7
    B = ntk_blocks(model, x, x2, method=method)
    assert set(B) == {"W", "U", "v"}
    assert rel(sum(B.values()), K_ad) < 1e-12


def test_frozen_parameters_are_excluded():
    model = Elman(d=2, H=4)
    model.W.requires_grad_(False)
    x = windows(3, 5, 2, 10)
    B = ntk_blocks(model, x, method="jacobian")
    assert set(B) == {"U", "v"}
    K_fd = sum(fd_blocks(model, x, x).values())
    assert rel(empirical_ntk(model, x, method="ntk_vp"), K_fd) < 1e-7
    rnn_ = rnn(N=5, d=2)
    rnn_.b.requires_grad_(False)
    x, x2 = windows(3, 4, 2, 10), windows(2, 4, 2, 11)
    K_fd = sum(fd_blocks(rnn_, x, x2).values())
    for method in METHODS:
        assert set(ntk_blocks(rnn_, x, x2, method=method)) == {"c", "w"}
        assert rel(empirical_ntk(rnn_, x, x2, method=method), K_fd) < 1e-7


# --- every method on every kind of model: vs finite differences and vs each other -------------
class TorchRNN(nn.Module):
    """nn.RNN / nn.GRU with a linear read-out, (B, L, d) → (B, L, 1), as a user would write it
    (no initial state: nn.RNN's own zero state does not batch under vmap — the engine falls back
    to a loop, with a warning; ``h0_from_input`` is the vmap-friendly way)."""

    def __init__(self, cell, d: int, H: int, h0_from_input: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.rnn = cell(d, H, batch_first=True, dtype=F64)
        self.out = nn.Linear(H, 1, dtype=F64)
        self.h0_from_input = h0_from_input

    def forward(self, x):
        h0 = None
        if self.h0_from_input:
            h0 = torch.zeros_like(x[:, :1, :1]).expand(-1, -1, self.rnn.hidden_size)
            h0 = h0.transpose(0, 1).contiguous()
        return self.out(self.rnn(x, h0)[0])


def model_zoo():
    """name → (model, d, L): MeanFieldRNN D and F, an MLP, nn.RNN, nn.GRU, a user Elman loop."""
    return {
        "mean_field_D": (rnn(N=6, d=3), 3, 5),
        "mean_field_F": (MeanFieldRNN(3, 6, beta=0.7, recurrence="feedback", dtype=F64,
                                      seed=2), 3, 5),
        "mlp": (MLP(5, 2), 2, 5),
        "nn_rnn": (TorchRNN(nn.RNN, 2, 4), 2, 5),
        "nn_gru": (TorchRNN(nn.GRU, 2, 3, h0_from_input=True), 2, 5),
        "elman": (Elman(d=2, H=4), 2, 5),
    }


ZOO = list(model_zoo())


@pytest.mark.filterwarnings("ignore:empirical NTK.*fails under torch.func.vmap")
@pytest.mark.parametrize("name", ZOO)
def test_every_method_vs_finite_differences_and_each_other(name):
    model, d, L = model_zoo()[name]
    x, x2 = windows(4, L, d, 40), windows(3, L, d, 41)
    methods = METHODS if emp.st.supports_structured(model) else GENERIC
    K_fd = sum(fd_blocks(model, x, x2).values())
    Ks = {m: empirical_ntk(model, x, x2, method=m) for m in (*methods, "auto")}
    Kxx = {m: empirical_ntk(model, x, method=m) for m in methods}
    for m in methods:
        assert rel(Ks[m], K_fd) < 1e-7, m  # central differences, h = 1e-6: O(h²) + round-off
        assert rel(Ks[m], Ks[methods[0]]) <= 1e-10, m
        assert rel(Kxx[m], Kxx[methods[0]]) <= 1e-10, m
        assert torch.allclose(Kxx[m], Kxx[m].T, rtol=0, atol=1e-12), m
        assert rel(Kxx[m][:, :3], empirical_ntk(model, x, x[:3], method=m)) <= 1e-10, m
    assert rel(Ks["auto"], Ks[methods[0]]) <= 1e-10
    B = ntk_blocks(model, x, x2, method=methods[-1])
    assert rel(sum(B.values()), Ks[methods[0]]) <= 1e-10


def test_nn_rnn_without_vmap_support_falls_back_with_a_warning():
    model = TorchRNN(nn.RNN, 2, 3)
    x = windows(3, 4, 2, 42)
    with pytest.warns(RuntimeWarning, match="loop over windows"):
        K = empirical_ntk(model, x, method="jacobian")
    ok = TorchRNN(nn.RNN, 2, 3, h0_from_input=True)  # same weights (seeded), vmap-friendly
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel(empirical_ntk(ok, x, method="jacobian"), K) <= 1e-12


@pytest.mark.parametrize("recurrence", ["diagonal", "feedback"])
def test_forward_last_only(recurrence):
    model = MeanFieldRNN(3, 7, recurrence=recurrence, dtype=F64, seed=3)
    x = windows(4, 6, 3, 43)
    y = model(x)
    assert y.shape == (4, 6)
    assert torch.equal(model(x, last_only=True), y[:, -1])
    assert model(x[0], last_only=True).shape == ()
    torch.testing.assert_close(model(x[0]), y[0], rtol=1e-14, atol=1e-15)  # (L, d): one window
    torch.testing.assert_close(model(x[0], last_only=True), y[0, -1], rtol=1e-14, atol=1e-15)
    # the torch.func path: no per-step indexing of a (B, L, N) tensor in the graph (each
    # SelectBackward of it built a zero gradient of the whole tensor: O(L²) under vmap(jacrev))
    names, stack, seen = [], [model(x, last_only=True).sum().grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.append(fn.name())
            stack.extend(g for g, _ in fn.next_functions)
    assert not [n for n in names if n.startswith("SelectBackward")], names


@pytest.mark.parametrize("name", ["mean_field_F", "elman", "nn_gru"])
def test_ntk_vp_chunks_of_rows_and_columns(monkeypatch, name):
    """A budget small enough that ntk_vp works on 1-2 windows at a time gives the same K."""
    model, d, L = model_zoo()[name]
    x, x2 = windows(7, L, d, 44), windows(5, L, d, 45)
    K, Kxx = (empirical_ntk(model, x, x2, method="ntk_vp"),
              empirical_ntk(model, x, method="ntk_vp"))
    fp = emp.footprint(model, x)
    monkeypatch.setattr(emp, "MEMORY_BUDGET", 3 * (fp.param_bytes + fp.act_bytes))
    assert emp._vp_chunks(fp, 7, 5, None)[1] <= 2
    assert rel(empirical_ntk(model, x, x2, method="ntk_vp"), K) <= 1e-12
    assert rel(empirical_ntk(model, x, method="ntk_vp"), Kxx) <= 1e-12
    assert emp._jacobian_chunk(fp, None) == 1
    assert rel(empirical_ntk(model, x, x2, method="jacobian"), K) <= 1e-10


def test_footprint():
    mlp = MLP(4, 3)  # Linear(12, 7), tanh, Linear(7, 1)
    x = windows(2, 4, 3, 46)
    fp = emp.footprint(mlp, x)
    assert fp.params == 12 * 7 + 7 + 7 + 1 and fp.param_bytes == 8 * fp.params
    matmul = 2 * 12 * 7 + 2 * 7  # the two layers' multiply-adds for one window
    assert matmul < fp.flops <= matmul + fp.act_bytes / 8
    assert 0 < fp.act_bytes < 1000
    assert emp.footprint(mlp, x) is fp  # cached
    model = rnn(N=50, d=3)
    fp = emp.footprint(model, windows(2, 10, 3, 47))
    assert fp.params == 50 * 5
    assert fp.flops >= 2 * 10 * 50 * 3  # w·X_k for the 10 steps
    assert 10 * 50 * 8 <= fp.act_bytes <= 4 * 10 * 50 * 8  # a few (N,) vectors per step


# --- truncated training kernel -----------------------------------------------------------------
def detached_memory_grads(model: MeanFieldRNN, xs: torch.Tensor) -> torch.Tensor:
    """Autograd through the window with S_{k−1} detached at every step: the truncated gradient."""
    rows = []
    for x in xs:
        S = x.new_zeros(model.width)
        for k in range(x.shape[0]):
            S = model.act(model.w @ x[k] + model.b * S.detach())
        f = model.output_scale * (model.c @ S)
        g = torch.autograd.grad(f, [model.c, model.w, model.b])
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def full_grads(model: MeanFieldRNN, xs: torch.Tensor) -> torch.Tensor:
    rows = []
    for x in xs:
        g = torch.autograd.grad(model(x)[-1], [model.c, model.w, model.b])
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("act", ["tanh", "erf"])
def test_truncated_training_kernel(act):
    model = rnn(N=9, d=3, act=act)
    x, x2 = windows(4, 6, 3, 11), windows(5, 7, 3, 12)
    # the claim behind the reference: detaching the memory gives exactly the truncated (S, P, Q)
    S, P, Q = model.unit_features(x2, truncated=True)
    c = model.c.detach()
    g_ref = model.output_scale * torch.cat([S, (c[:, None] * P).flatten(1), c * Q], dim=1)
    g = detached_memory_grads(model, x2)
    assert rel(g, g_ref) < 1e-13
    K_ref = model.ntk_scale * full_grads(model, x) @ g.T
    K_tr = training_kernel(model, x, x2, gradient="one_step")
    assert rel(K_tr, K_ref) < 1e-12
    K = empirical_ntk(model, x, x2)
    assert rel(K_tr, K) > 1e-3  # truncation matters
    assert torch.equal(training_kernel(model, x, x2, gradient="rtrl"), K)
    # x2 = None: K_tr(x, x), asymmetric
    K_xx = training_kernel(model, x)
    K_xx_ref = model.ntk_scale * full_grads(model, x) @ detached_memory_grads(model, x).T
    assert rel(K_xx, K_xx_ref) < 1e-12
    assert not torch.allclose(K_xx, K_xx.T)


# --- chunking, factorisation, features --------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_chunk_size_invariance(method):
    model = rnn(N=11, d=2)
    x, x2 = windows(7, 5, 2, 13), windows(5, 4, 2, 14)
    for args in [(x, x2), (x, None)]:
        K = empirical_ntk(model, *args, method=method)
        for cs in (1, 2, 3, 4, 100):
            assert rel(empirical_ntk(model, *args, method=method, chunk_size=cs), K) < 1e-13, cs
        B = ntk_blocks(model, *args, method=method, chunk_size=3)
        assert rel(sum(B.values()), K) < 1e-13


def test_structured_window_chunks(monkeypatch):
    model = rnn(N=10, d=2)
    x, x2 = windows(9, 5, 2, 15), windows(6, 5, 2, 16)
    K = empirical_ntk(model, x, x2)
    K_tr = training_kernel(model, x, x2)
    from ntk_rnn.ntk import structured as st
    monkeypatch.setattr(st, "BLOCK_ELEMENTS", 13)  # several window chunks and unit blocks
    assert rel(empirical_ntk(model, x, x2), K) < 1e-13
    assert rel(training_kernel(model, x, x2), K_tr) < 1e-13


def test_factorised_pp_term():
    model = rnn(N=20, d=10, seed=3)
    x, x2 = windows(5, 3, 10, 17), windows(4, 2, 10, 18)  # L·L' < d: factorised by default
    K_j = empirical_ntk(model, x, x2, method="jacobian")
    for fac in (True, False):
        assert rel(structured_ntk(model, x, x2, factorise=fac), K_j) < 1e-12
        assert rel(structured_ntk(model, x, factorise=fac),
                   empirical_ntk(model, x, method="jacobian")) < 1e-12
    Bf = structured_ntk(model, x, x2, factorise=True, blocks=True)
    Bn = structured_ntk(model, x, x2, factorise=False, blocks=True)
    assert all(rel(Bf[k], Bn[k]) < 1e-12 for k in Bn)
    assert rel(structured_ntk(model, x, x2, truncated2=True, factorise=True),
               structured_ntk(model, x, x2, truncated2=True, factorise=False)) < 1e-12


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_unit_feature_matrix_matches_model_features(act):
    model = rnn(N=13, d=3, act=act)
    x = windows(4, 6, 3, 19)
    c = model.c.detach()
    for truncated in (False, True):
        S, P, Q = model.unit_features(x, truncated=truncated)
        Phi = unit_feature_matrix(model, x, truncated=truncated)
        ref = torch.cat([S, c * Q, (c[:, None] * P).transpose(1, 2).flatten(1)], dim=1)
        assert rel(Phi, ref) < 1e-13
    assert rel(unit_feature_matrix(model, x) @ unit_feature_matrix(model, x).T / model.width,
               empirical_ntk(model, x)) < 1e-13
    K = empirical_ntk(model, x)  # a normal tensor: usable with autograd and in-place afterwards
    assert not K.is_inference() and not unit_feature_matrix(model, x).is_inference()
    K.add_(1.0)


def test_single_window_dtype_cast_and_empty():
    model = rnn(N=7, d=2, dtype=torch.float32)
    x = windows(3, 4, 2, 20)  # float64 windows, float32 model: computed in float32
    K = empirical_ntk(model, x)
    assert K.dtype == torch.float32 and K.shape == (3, 3)
    assert rel(empirical_ntk(model, x[0], x), K[:1]) < 1e-6  # (L, d) = one window
    assert empirical_ntk(model, x[:0], x).shape == (0, 3)
    assert ntk_blocks(model, x, x[:0])["w"].shape == (3, 0)


def test_auto_choice(monkeypatch):
    assert choose_method(rnn(), 10) == "structured"
    mlp = MLP(4, 3)
    x = windows(3, 4, 3, 21)
    assert choose_method(mlp, 10, 5) == "jacobian"
    assert choose_method(mlp, 10, 5, x=x) == "jacobian"
    assert choose_method(MeanFieldRNN(3, 8, recurrence="feedback", dtype=F64), 10, x=x) \
        == "jacobian"
    costs = emp.method_costs(mlp, 10, 5, x=x)
    assert costs["jacobian"][0] < costs["ntk_vp"][0]
    monkeypatch.setattr(emp, "MEMORY_BUDGET", 100)  # the Jacobians do not fit: recomputed
    costs_small = emp.method_costs(mlp, 10, 5, x=x)
    assert costs_small["jacobian"][0] > costs["jacobian"][0]
    assert choose_method(mlp, 10, 5) == "ntk_vp"
    assert choose_method(mlp, 10, 5, x=x) == "ntk_vp"
    K_chunked = empirical_ntk(mlp, x, method="jacobian", chunk_size=3)
    assert rel(empirical_ntk(mlp, x), K_chunked) < 1e-12
    # a model that uses each parameter less than once per window: ntk_vp is cheaper in FLOPs
    big = emp.Footprint(params=10**6, param_bytes=8 * 10**6, act_bytes=800, flops=1e3)
    monkeypatch.setattr(emp, "MEMORY_BUDGET", 2**40)
    assert choose_method(mlp, 100, 100, fp=big) == "ntk_vp"


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_messages():
    model = rnn(N=4, d=3)
    x = windows(2, 5, 3, 22)
    cases = [
        (lambda: empirical_ntk(model, torch.randn(2, 5, 3, 1, dtype=F64)), "expected windows"),
        (lambda: empirical_ntk(model, windows(2, 5, 2, 0)), "expected windows"),
        (lambda: empirical_ntk(model, x, windows(2, 5, 2, 0)), "x2 has shape"),
        (lambda: empirical_ntk(model, x, x.float()), "x: torch.float64 on cpu, x2: torch.float32"),
        (lambda: empirical_ntk(model, x, x.to("meta")), "x2: torch.float64 on meta"),
        (lambda: empirical_ntk(model, x.to("meta")), "model is on cpu"),
        (lambda: empirical_ntk(model, x, method="magic"), "choose one of"),
        (lambda: empirical_ntk(MLP(5, 3), x, method="structured"),
         "'jacobian', 'ntk_vp' or 'auto'"),
        (lambda: empirical_ntk(MLP(5, 3), x[0]), "expected windows (n, L, d)"),
        (lambda: empirical_ntk(MLP(5, 3), x, windows(2, 5, 4, 0)), "feature size"),
        (lambda: empirical_ntk(model, x, chunk_size=0), "chunk_size"),
        (lambda: empirical_ntk(model, [[1.0]]), "torch.Tensor"),
        (lambda: training_kernel(model, x, gradient="bptt"), "gradient='bptt'"),
        (lambda: training_kernel(Elman(3, 2), x), "no one-step gradient"),
        (lambda: training_kernel(model, x, method="jacobian"), "method='structured'"),
        (lambda: empirical_ntk(nn.Linear(3, 2).double(), x, method="jacobian"),
         "one output per window"),
    ]
    for fn, msg in cases:
        with pytest.raises(ConfigError) as e:
            fn()
        assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    model = rnn(N=64, d=3, dtype=dtype)
    x, x2 = windows(6, 8, 3, 23, dtype), windows(5, 8, 3, 24, dtype)
    K_cpu = empirical_ntk(model, x, x2)
    model_gpu = copy.deepcopy(model).to("cuda")
    for method in METHODS:
        K = empirical_ntk(model_gpu, x.cuda(), x2.cuda(), method=method)
        assert K.device.type == "cuda" and rel(K.cpu(), K_cpu) <= 10 * TOL[dtype], method
    assert rel(training_kernel(model_gpu, x.cuda(), x2.cuda()).cpu(),
               training_kernel(model, x, x2)) <= 10 * TOL[dtype]


# --- compiled per-unit features (ntk/_features_c.py) -------------------------------------------
from ntk_rnn.ntk import _features_c  # noqa: E402
from ntk_rnn.ntk import structured as st  # noqa: E402

needs_c = pytest.mark.skipif(_features_c.KERNEL.library(3, "tanh") is None,
                             reason=f"compiled features: {_features_c.KERNEL.status(3, 'tanh')}")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_c_features_match_torch_path(act, dtype):
    """Both paths called explicitly: [S, cQ, cP] and the coefficients c a_k, truncated or not,
    odd unit counts (36, 69: a partial SIMD chunk; 32: none), L = 1 and 7, d = 1 and 3."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for N, n, L, d in ((37, 3, 7, 3), (5, 3, 1, 1), (70, 4, 7, 1), (33, 2, 1, 3), (33, 3, 7, 3)):
        model = MeanFieldRNN(d, N, activation=act, dtype=dtype, seed=N + L,
                             init={"b": "uniform", "rho": 0.8})
        x = windows(n, L, d, N + L, dtype)
        xT, units = x.transpose(1, 2).contiguous(), slice(1, N)
        assert _features_c.usable(model, x), _features_c.KERNEL.status(d, act)
        for truncated in (False, True):
            for fac in (False, True):
                ws = st._Workspace()
                F0, A0 = st._block_features(model, x, xT, units, truncated, fac, ws, "1",
                                            use_c=False)
                F1, A1 = st._block_features(model, x, xT, units, truncated, fac, ws, "2",
                                            use_c=True)
                rows = 2 if fac else d + 2  # with coefficients the cP rows are not written
                assert rel(F1[:, :rows], F0[:, :rows]) <= tol, (N, L, d, truncated, fac)
                if fac:
                    assert rel(A1, A0) <= tol, (N, L, d, truncated)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_c_structured_matches_jacobian_and_torch_path(monkeypatch, dtype):
    model = rnn(N=45, d=3, act="erf", dtype=dtype)
    x, x2 = windows(5, 6, 3, 31, dtype), windows(4, 7, 3, 32, dtype)
    assert _features_c.usable(model, x)
    monkeypatch.setenv("NTK_RNN_FEATURES", "c")  # (not the measured choice: this tests the C path)
    calls = []
    real = _features_c.block_features
    monkeypatch.setattr(_features_c, "block_features", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    K = empirical_ntk(model, x, x2, method="structured")
    B = ntk_blocks(model, x, x2, method="structured")
    K_tr = training_kernel(model, x, x2, gradient="one_step")
    Phi = unit_feature_matrix(model, x)
    assert calls  # the C path ran
    assert rel(K, empirical_ntk(model, x, x2, method="jacobian")) <= TOL[dtype]
    monkeypatch.setattr(st, "USE_C", False)  # the torch path, with window chunks and unit blocks
    monkeypatch.setattr(st, "BLOCK_ELEMENTS", 13)
    n_calls = len(calls)
    assert rel(K, empirical_ntk(model, x, x2)) <= TOL[dtype]
    assert all(rel(B[k], v) <= TOL[dtype] for k, v in ntk_blocks(model, x, x2).items())
    assert rel(K_tr, training_kernel(model, x, x2, gradient="one_step")) <= TOL[dtype]
    assert rel(Phi, unit_feature_matrix(model, x)) <= TOL[dtype]
    assert len(calls) == n_calls  # USE_C = False: not used


@needs_c
def test_c_features_threads():
    """Windows split over threads give the same features as one thread."""
    model = rnn(N=600, d=2, dtype=torch.float32)
    x = windows(9, 32, 2, 33, torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        F1 = unit_feature_matrix(model, x)
        torch.set_num_threads(2)
        F2 = unit_feature_matrix(model, x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(F1, F2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the loader's KernelFallbackWarning
def test_c_features_fallback_without_compiler(monkeypatch):
    from ntk_rnn.csrc import loader
    monkeypatch.setattr(_features_c.KERNEL, "table", {})
    monkeypatch.setattr(loader, "compiler", lambda: None)
    monkeypatch.setattr(loader, "_WARNED", set())
    monkeypatch.delenv("NTK_RNN_NO_KERNEL", raising=False)
    model = rnn(N=8, d=2)
    x = windows(3, 4, 2, 34)
    assert _features_c.KERNEL.library(2, "tanh") is None
    assert "no C compiler" in _features_c.KERNEL.status(2)
    assert not _features_c.usable(model, x)
    assert rel(empirical_ntk(model, x), empirical_ntk(model, x, method="jacobian")) < 1e-12


def test_jacobian_float32_as_accurate_as_one_product_per_block():
    """The jacobian path's float32 kernel against float64 truth: its per-parameter Gram blocks
    are summed after each product, as the tutorial's einsum does. Accumulating them with addmm_
    into one tensor let BLAS add the partial sums of W_hh's 786k-long inner dimension into the
    larger values already there: 8.1e-7 (MKL, this size), against 1.5e-7 now."""
    from ntk_rnn import GRURNN

    model = GRURNN(1, 512, seed=0)
    x1, x2 = windows(16, 16, 1, 0, torch.float32), windows(16, 16, 1, 1, torch.float32)
    K32 = empirical_ntk(model, x1, x2, method="jacobian")
    K64 = empirical_ntk(copy.deepcopy(model).double(), x1.double(), x2.double(),
                        method="jacobian")
    blocks = ntk_blocks(model, x1, x2, method="jacobian")  # one product per block, then summed
    assert rel(K32.double(), K64) <= 3e-7
    assert rel(sum(blocks.values()).double(), K64) <= 3e-7


def test_model_d_torch_path_runs_flushed_and_flushing_changes_nothing(monkeypatch):
    """Model D's torch path recurses the coefficients a_{k−1} = b D_{k−1} a_k backwards, so for
    units with small |b| they pass through float32's subnormal range over a window (an assist
    per operation on Intel CPUs: 299 against 117 ms at N = 4096, n = m = 128, L = 32). Every
    block of the structured kernel runs with subnormals flushed, on 1 and on 2 threads (each
    its own unit range, torch single-threaded); the kernel equals the unflushed one; the
    caller's FTZ and thread settings come back."""
    import threading

    from ntk_rnn.subnormals import flushing

    model = rnn(N=300, d=2, dtype=torch.float32, seed=2)
    x, x2 = windows(6, 40, 2, 35, torch.float32), windows(5, 40, 2, 36, torch.float32)
    coef = _features_c._reference(model, x, slice(0, 300), False)[1]
    assert ((coef != 0) & (coef.abs() < torch.finfo(torch.float32).tiny)).any()  # they occur
    monkeypatch.setattr(st, "USE_C", False)
    seen = []
    real = st._block_features
    monkeypatch.setattr(st, "_block_features", lambda *a, **k: seen.append(
        (threading.get_ident(), flushing(), torch.get_num_threads())) or real(*a, **k))
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seen.clear()
            K = structured_ntk(model, x, x2)
            assert seen and all(f for _, f, _ in seen), threads  # every block flushed
            if threads == 2:
                assert len({t for t, _, _ in seen}) == 2 and all(k == 1 for _, _, k in seen)
            assert not flushing() and torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(_features_c, "without_subnormals", lambda *a: contextlib.nullcontext())
    seen.clear()
    try:  # on this thread (a pool thread started while its creator flushed inherits the flush)
        torch.set_num_threads(1)
        plain = structured_ntk(model, x, x2)
    finally:
        torch.set_num_threads(old)
    assert seen and not any(f for _, f, _ in seen)  # the patch really turned the flush off
    assert rel(K, plain) <= 1e-6
    assert rel(K, empirical_ntk(model.double(), x.double(), x2.double(),
                                method="jacobian").float()) <= 1e-5
