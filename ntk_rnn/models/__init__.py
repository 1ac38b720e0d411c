"""The networks: MeanFieldRNN (Models D and F of the paper), ElmanRNN, GRURNN, activations, initial
laws, and the model-family seam (``family_of``)."""

from .activations import ACTIVATIONS, Activation, get_activation
from .elman import ElmanRNN
from .family import Family, family_of, register_family
from .gru import GRURNN
from .init import InitLaw
from .mean_field import MeanFieldRNN

__all__ = ["ACTIVATIONS", "Activation", "get_activation", "InitLaw", "MeanFieldRNN", "ElmanRNN",
           "GRURNN", "Family", "family_of", "register_family"]
