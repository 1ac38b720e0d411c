"""Monte-Carlo limit kernel: the estimator, and that its standard error is honest against a
high-precision reference (Model D, whose analytic limit is known to ~1e-9)."""

import functools

import pytest
import torch

from ntk_rnn.errors import ConfigError
from ntk_rnn.limit import limit_ntk
from ntk_rnn.limit.monte_carlo import draw_seeds, mc_limit_ntk
from ntk_rnn.models import ElmanRNN, MeanFieldRNN
from ntk_rnn.ntk import empirical_ntk

F64 = torch.float64


@pytest.fixture(scope="module")
def model_d_case():
    x = torch.randn(6, 8, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = limit_ntk(MeanFieldRNN(1, 4, dtype=F64), x, tol=1e-8, method="quadrature")
    assert ref.converged and ref.error < 1e-8
    return x, ref.value


def test_interval_covers_high_precision_reference(model_d_case):
    """Model D: E[K^N] = K_∞ exactly, so the only error is Monte Carlo. Over 6 independent
    estimates the 95% intervals cover the reference for ≳ 95% of the 6·21 distinct entries, no
    entry is off by more than 4 standard errors, and the scalar relative error is the size of
    the actual error (neither optimistic nor grossly conservative)."""
    x, ref = model_d_case
    iu = torch.triu_indices(6, 6)
    covered, total, ratios = 0, 0, []
    factory = functools.partial(MeanFieldRNN, 1, dtype=F64)
    for seed in range(6):
        mc = mc_limit_ntk(factory, x, width=256, draws=24, seed=seed)
        assert mc.mean.dtype == F64 and mc.mean.shape == (6, 6) and mc.draws == 24
        dev = (mc.mean - ref)[iu[0], iu[1]]
        covered += int((dev.abs() <= mc.error_entries[iu[0], iu[1]]).sum())
        total += dev.numel()
        assert float((dev.abs() / mc.stderr[iu[0], iu[1]]).max()) < 4.0
        ratios.append(float((mc.mean - ref).norm() / ref.norm()) / mc.relative_error)
    assert covered / total >= 0.88, covered / total
    mean_ratio = sum(ratios) / len(ratios)
    assert 0.5 < mean_ratio < 1.6, ratios


def test_estimator_is_mean_and_standard_error_of_the_draws():
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    factory = functools.partial(ElmanRNN, 2, recurrent_scaling="ntk", dtype=F64)
    mc = mc_limit_ntk(factory, x, width=6, draws=4, seed=7)
    Ks = torch.stack([empirical_ntk(factory(width=6, seed=s), x) for s in draw_seeds(7, 4)])
    torch.testing.assert_close(mc.mean, Ks.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mc.stderr, Ks.std(0) / 2.0, rtol=1e-10, atol=1e-14)
    assert mc.value is mc.mean and mc.error == float(mc.error_entries.max())
    assert mc.relative_error == pytest.approx(float(mc.stderr.norm() / mc.mean.norm()))
    # the draws differ and do not reuse the training seeds 0, 1, 2, ...
    seeds = draw_seeds(7, 4)
    assert len(set(seeds)) == 4 and not set(seeds) & set(range(100))
    # rectangular kernels, and the bias check at a second width
    x2 = x[:2, :3]
    mc2 = mc_limit_ntk(factory, x, width=6, draws=3, x2=x2, compare_width=3)
    assert mc2.mean.shape == (3, 2) and mc2.bias_estimate is not None and mc2.bias_estimate >= 0


def test_standard_error_shrinks_with_draws_and_width(model_d_case):
    x, _ = model_d_case
    factory = functools.partial(MeanFieldRNN, 1, dtype=F64)
    a = mc_limit_ntk(factory, x, width=64, draws=16).relative_error
    b = mc_limit_ntk(factory, x, width=64, draws=64).relative_error
    c = mc_limit_ntk(factory, x, width=256, draws=64).relative_error
    assert 1.4 < a / b < 2.9  # ∝ 1/√R
    assert 1.4 < b / c < 2.9  # ∝ 1/√N for Model D (an average over N units)


def test_errors():
    x = torch.zeros(2, 3, 1)
    factory = functools.partial(MeanFieldRNN, 1)
    with pytest.raises(ConfigError, match=r"draws=1"):
        mc_limit_ntk(factory, x, width=8, draws=1)
    with pytest.raises(ConfigError, match=r"width=0"):
        mc_limit_ntk(factory, x, width=0)
    with pytest.raises(ConfigError, match=r"compare_width=8"):
        mc_limit_ntk(factory, x, width=8, compare_width=8)
    with pytest.raises(ConfigError, match=r"not an nn.Module"):
        mc_limit_ntk(lambda width, seed: None, x, width=8)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_gru_default_limit_states_an_error_that_covers_a_far_better_estimate():
    """GRU (no closed form): the callback's Monte-Carlo limit (N′ and N′/2, bias included in the
    stated error) against a reference of 16x the unit-draws at 4x the width. The reference's own
    error is ~1/4 of the tested one's, so the stated error must cover the distance."""
    from ntk_rnn.limit import limit_ntk as any_limit
    from ntk_rnn.models import GRURNN

    x = torch.randn(5, 6, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    base = GRURNN(1, 8, dtype=F64)
    lim = any_limit(base, x, width=64, draws=8, seed=1)
    ref = mc_limit_ntk(lambda width, seed: base.at_width(width, seed), x, width=256, draws=32,
                       seed=5)
    assert lim.bias_estimate is not None and lim.relative_error >= lim.bias_estimate
    assert _rel(lim.value, ref.value) <= lim.relative_error + ref.relative_error
