"""Callbacks: hooks the trainer calls; built from ``_target_`` entries under ``callbacks:``."""

from .base import Callback, TrainState
from .checkpoint import CheckpointCallback
from .linearized import LinearizedCallback  # the linearized shadow model
from .ntk import NTKCallback
from .output import OutputTrackingCallback
from .progress import ProgressCallback

__all__ = ["Callback", "TrainState", "CheckpointCallback", "LinearizedCallback", "NTKCallback",
           "OutputTrackingCallback", "ProgressCallback"]
