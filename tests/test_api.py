"""The public names the issues and the README use are importable from the package root and are
the implementing modules' own objects (no copies)."""

import ntk_rnn
from ntk_rnn import ensemble, fast, limit, metrics, ntk


def test_root_reexports():
    assert not [n for n in ntk_rnn.__all__ if not hasattr(ntk_rnn, n)]
    assert ntk_rnn.empirical_ntk is ntk.empirical.empirical_ntk
    assert ntk_rnn.limit_ntk is ntk.limit.limit_ntk
    assert ntk_rnn.LimitODE is limit.ode.LimitODE
    assert ntk_rnn.FastStepper is fast.FastStepper
    assert ntk_rnn.EnsembleStepper is ensemble.EnsembleStepper
    assert metrics.relative_frobenius is ntk.metrics.relative_frobenius
