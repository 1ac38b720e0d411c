"""Online SGD steps along the stream: the reference RTRL step (theory §3), the fast steppers
(compiled kernel / batched torch) the ensemble stepper, and truncated BPTT for any other model."""

from ..models.recurrence import ONLINE_GRADIENTS, OnlineState
from .bptt import BPTTEnsembleStepper, BPTTStepper
from .ensemble import EnsembleStepper
from .fast import FastStepper
from .feedback import FeedbackState, feedback_step
from .rtrl import ReferenceStepper, rtrl_step

__all__ = ["ONLINE_GRADIENTS", "OnlineState", "FeedbackState", "rtrl_step", "feedback_step",
           "ReferenceStepper", "FastStepper", "EnsembleStepper", "BPTTStepper",
           "BPTTEnsembleStepper"]
