"""ntk_rnn: recurrent networks in the kernel (NTK) regime.

Lam, Sirignano, Spiliopoulos, *Kernel Limit of Recurrent Neural Networks Trained on Ergodic Data
Sequences*, arXiv:2308.14555.
"""

# the public API, re-exported from the modules that implement it
from .callbacks import (
    Callback,
    CheckpointCallback,
    NTKCallback,
    OutputTrackingCallback,
    ProgressCallback,
)
from .errors import ConfigError, TrainingDiverged
from .limit import LimitKernel, LimitODE, limit_cell_ntk, limit_ntk, solve_feedback_limit
from .models import (
    ACTIVATIONS,
    GRURNN,
    Activation,
    ElmanRNN,
    Family,
    InitLaw,
    MeanFieldRNN,
    family_of,
    get_activation,
)
from .ntk import empirical_ntk, ntk_blocks, structured_ntk, training_kernel
from .online import EnsembleStepper, FastStepper, OnlineState, rtrl_step
from .run import Trainer, TrainingInterrupted

__all__ = [
    "Trainer", "TrainingInterrupted", "Callback", "NTKCallback", "OutputTrackingCallback",
    "CheckpointCallback", "ProgressCallback",
    "ACTIVATIONS", "Activation", "get_activation", "ConfigError", "TrainingDiverged", "InitLaw",
    "MeanFieldRNN", "ElmanRNN", "GRURNN", "Family", "family_of",
    "OnlineState", "rtrl_step", "FastStepper", "EnsembleStepper",
    "empirical_ntk", "ntk_blocks", "training_kernel", "structured_ntk", "limit_ntk",
    "LimitKernel", "LimitODE", "limit_cell_ntk", "solve_feedback_limit",
]
__version__ = "0.1.0"
