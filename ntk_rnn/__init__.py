"""ntk_rnn: recurrent networks in the kernel (NTK) regime.

Lam, Sirignano, Spiliopoulos, *Kernel Limit of Recurrent Neural Networks Trained on Ergodic Data
Sequences*, arXiv:2308.14555.
"""

# the public API, re-exported from the modules that implement it
from .activations import ACTIVATIONS, Activation, get_activation
from .ensemble import EnsembleStepper
from .errors import ConfigError, TrainingDiverged
from .fast import FastStepper
from .init import InitLaw
from .limit import LimitODE, limit_cell_ntk, solve_feedback_limit
from .model import MeanFieldRNN
from .ntk import (
    LimitKernel,
    empirical_ntk,
    limit_ntk,
    ntk_blocks,
    structured_ntk,
    training_kernel,
)
from .rtrl import OnlineState, rtrl_step

__all__ = [
    "ACTIVATIONS", "Activation", "get_activation", "ConfigError", "TrainingDiverged", "InitLaw",
    "MeanFieldRNN", "OnlineState", "rtrl_step", "FastStepper", "EnsembleStepper",
    "empirical_ntk", "ntk_blocks", "training_kernel", "structured_ntk", "limit_ntk",
    "LimitKernel", "LimitODE", "limit_cell_ntk", "solve_feedback_limit",
]
__version__ = "0.1.0"
