"""The coordinate-distribution limit (ntk_rnn.limit.coordinate, theory §10): against the Elman
closed form (an independent method, theory §9), against wide GRUs, and its dispatch."""

from __future__ import annotations

import pytest
import torch

from ntk_rnn.errors import ConfigError
from ntk_rnn.limit import elman_limit_ntk, is_exact, limit_kind, limit_ntk
from ntk_rnn.limit.coordinate import CoordinateLimitKernel, coordinate_limit_ntk
from ntk_rnn.models import GRURNN, ElmanRNN
from ntk_rnn.ntk import empirical_ntk

F64 = torch.float64


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _x(n, L, d, seed):
    return torch.randn(n, L, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kw", [dict(recurrent_scaling="ntk"),
                                dict(recurrent_scaling="ntk", activation="relu", A_std=0.8),
                                dict(recurrent_scaling="mean_field"),
                                dict(recurrent_scaling="mean_field", activation="sigmoid",
                                     A_mean=0.7)],
                         ids=["ntk-tanh", "ntk-relu", "mf-tanh", "mf-sigmoid-mean"])
def test_elman_matches_the_closed_form(kw):
    """The sampler on the Elman network (one gate, no direct path) against the closed form: the
    true error is within 3 stated standard errors, and the stated one is small."""
    x = _x(6, 5, 2, 0)
    model = ElmanRNN(2, 8, **kw)
    lim = coordinate_limit_ntk(model, x, samples=4096, replicates=8, seed=1)
    truth = elman_limit_ntk(model, x).value
    assert lim.relative_error < 0.02
    assert _rel(lim.value, truth) <= 3 * lim.relative_error
    assert lim.value.shape == (6, 6) and torch.allclose(lim.value, lim.value.T)


def test_elman_windows_of_different_lengths():
    """x (L = 6) against x2 (L′ = 4): forward aligned at the starts, backward at the ends, as the
    closed form's end-aligned recursion (which is checked against wide networks)."""
    x, x2 = _x(4, 6, 2, 1), _x(3, 4, 2, 2)
    model = ElmanRNN(2, 8, recurrent_scaling="ntk", activation="sigmoid")
    lim = coordinate_limit_ntk(model, x, x2, samples=4096, replicates=8, seed=3)
    truth = elman_limit_ntk(model, x, x2).value
    assert lim.value.shape == (4, 3)
    assert _rel(lim.value, truth) <= 3 * lim.relative_error < 0.06


def test_gru_default_limit_is_the_coordinate_sampler():
    x = _x(3, 4, 1, 3)
    model = GRURNN(1, 4)
    assert limit_kind(model) == "coordinate" and is_exact(model)
    lim = limit_ntk(model, x, samples=256, replicates=2)
    assert isinstance(lim, CoordinateLimitKernel) and lim.value.shape == (3, 3)
    assert lim.error > 0 and 0 < lim.relative_error < 1
    # Monte-Carlo keywords ask for the Monte Carlo over wider networks
    mc = limit_ntk(model, x, width=16, draws=2)
    assert mc.method.startswith("mc")
    # E[c] != 0 under NTK scaling is outside the sampler (gradient independence): Monte Carlo
    assert limit_kind(GRURNN(1, 4, c_law="constant")) == "monte_carlo"
    assert limit_kind(GRURNN(1, 4, c_law="constant", recurrent_scaling="mean_field")) == \
        "coordinate"


def test_bad_arguments():
    x = _x(2, 3, 1, 4)
    with pytest.raises(ConfigError, match="samples"):
        coordinate_limit_ntk(GRURNN(1, 4), x, samples=0)
    with pytest.raises(ConfigError, match="replicates"):
        coordinate_limit_ntk(GRURNN(1, 4), x, replicates=1)
    with pytest.raises(ConfigError, match="c_law"):
        coordinate_limit_ntk(GRURNN(1, 4, c_law="constant"), x)
    with pytest.raises(ConfigError, match="A_mean"):
        coordinate_limit_ntk(ElmanRNN(1, 4, recurrent_scaling="ntk", A_mean=0.5), x)


def test_gru_same_sample_law_as_a_wide_network_at_one_step():
    """L = 1 (h_0 = 0: no recurrent Gaussians, W_hh's gradient is zero): the GRU kernel is an
    average over i.i.d. units, so the empirical kernel of a wide network is an unbiased estimate
    at every N — checked to its own standard error over 16 networks of width 1024."""
    x = _x(5, 1, 2, 5)
    kw = dict(bias_std=0.5, c_law="normal")
    lim = coordinate_limit_ntk(GRURNN(2, 4, **kw), x, samples=16384, replicates=8, seed=2)
    Ks = torch.stack([empirical_ntk(GRURNN(2, 1024, seed=s, dtype=F64, **kw), x)
                      for s in range(16)])
    se = (Ks.std(0) / 4).norm()
    assert float((Ks.mean(0) - lim.value).norm()) <= 3 * float(
        (se ** 2 + lim.stderr.norm() ** 2).sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(recurrent_scaling="mean_field"),
                                dict(bias_std=0.5, hh_std=1.5, c_law="normal")],
                         ids=["ntk", "mf", "ntk-bias"])
def test_gru_against_wide_networks(kw):
    """The seed mean of the empirical NTK of GRUs of width 2048 and 4096 (16 windows of length
    12) approaches the sampled limit: the Richardson extrapolation 2 K̄_4096 − K̄_2048 agrees
    with it within 3 combined standard errors."""
    x = _x(16, 12, 1, 6)
    lim = coordinate_limit_ntk(GRURNN(1, 4, **kw), x, samples=16384, replicates=8)
    means, ses = [], []
    for N, S in ((2048, 8), (4096, 8)):
        Ks = torch.stack([empirical_ntk(GRURNN(1, N, seed=100 + s, dtype=F64, **kw), x)
                          for s in range(S)])
        means.append(Ks.mean(0))
        ses.append(Ks.std(0) / S ** 0.5)
    rich = 2 * means[1] - means[0]
    se = (4 * ses[1] ** 2 + ses[0] ** 2 + lim.stderr ** 2).sqrt()
    assert float((rich - lim.value).norm()) <= 3 * float(se.norm())


def test_cli_gru_uses_the_coordinate_limit(tiny_cfg):
    """`model=gru` from the config: K_∞ is the sampled coordinate limit, its relative error
    reported in the units of the distance (and far below it at N = 16)."""
    from ntk_rnn import Trainer

    cfg = tiny_cfg("model=gru", "model.width=16", "callbacks.ntk.limit=true",
                   "callbacks.ntk.n_probes=6", "callbacks.ntk.probe_length=5")
    m = Trainer.from_config(cfg, None).fit()
    assert m["ntk_limit_method"] == "coordinate"
    assert 0 < m["ntk_limit_relative_error"] < 0.01
    assert m["ntk_limit_relative_error"] < m["ntk_distance_to_limit"] / 5


@pytest.mark.slow
def test_stated_error_covers_the_truth_over_seeds():
    """Ten independent estimates on the Elman network: the true error is within twice the
    stated relative error (one standard error) in at least 8 of 10, within it in at least 3."""
    x = _x(8, 8, 1, 7)
    model = ElmanRNN(1, 8, recurrent_scaling="ntk")
    truth = elman_limit_ntk(model, x).value
    pairs = [(_rel(lim.value, truth), lim.relative_error) for lim in
             (coordinate_limit_ntk(model, x, samples=2048, replicates=8, seed=s)
              for s in range(10))]
    assert sum(t <= 2 * e for t, e in pairs) >= 8
    assert sum(t <= e for t, e in pairs) >= 3
