"""Data: ergodic sequences (X_k ∈ R^d, Y_k ∈ R) for online training and kernel limits (theory §1).

Every source follows the SequenceSource protocol of :mod:`ntk_rnn.data.base`; the config
group ``conf/data/`` builds one by ``_target_``.
"""

from .base import SequenceSource, check_chunk, check_source, check_windows
from .chains import VAR1, MarkovChain, ThresholdAR
from .files import FileSeries, SeattleTemps, VegaTemperature, seattle_temps_path
from .targets import TARGETS, FadingMemory, LagNonlinear, Target, make_target

__all__ = [
    "SequenceSource", "check_source", "check_chunk", "check_windows",
    "VAR1", "MarkovChain", "ThresholdAR",
    "FileSeries", "SeattleTemps", "VegaTemperature", "seattle_temps_path",
    "Target", "LagNonlinear", "FadingMemory", "TARGETS", "make_target",
]
