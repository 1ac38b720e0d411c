"""The networks: MeanFieldRNN (Models D and F of the paper), activations and initial laws."""

from .activations import ACTIVATIONS, Activation, get_activation
from .init import InitLaw
from .mean_field import MeanFieldRNN

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "InitLaw", "MeanFieldRNN"]
from .elman import ElmanRNN
from .gru import GRURNN

__all__ += ["ElmanRNN", "GRURNN"]
