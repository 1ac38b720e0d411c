"""Running training: build from config, the one training loop (E >= 1 networks), resume,
signals. ``Trainer`` is the Python API; the CLI (``python -m ntk_rnn.train``) calls
``Trainer.from_config``."""

from .signals import TrainingInterrupted
from .trainer import EnsembleIncomplete, Trainer

__all__ = ["Trainer", "TrainingInterrupted", "EnsembleIncomplete"]
