"""ntk_rnn: recurrent networks in the kernel (NTK) regime.

Lam, Sirignano, Spiliopoulos, *Kernel Limit of Recurrent Neural Networks Trained on Ergodic Data
Sequences*, arXiv:2308.14555.
"""

from .activations import ACTIVATIONS, Activation, get_activation
from .errors import ConfigError, TrainingDiverged
from .init import InitLaw
from .model import MeanFieldRNN
from .rtrl import OnlineState, rtrl_step

__all__ = [
    "ACTIVATIONS", "Activation", "get_activation", "ConfigError", "TrainingDiverged", "InitLaw",
    "MeanFieldRNN", "OnlineState", "rtrl_step",
]
__version__ = "0.1.0"
