"""Online SGD steps along the stream: the reference RTRL step (theory §3), the fast steppers
(compiled kernel / batched torch) the ensemble stepper, and truncated BPTT for any other model."""

from .bptt import BPTTEnsembleStepper, BPTTStepper
from .ensemble import EnsembleStepper
from .fast import FastStepper
from .feedback import FeedbackState, feedback_step
from .rtrl import GRADIENTS, OnlineState, ReferenceStepper, rtrl_step

__all__ = ["GRADIENTS", "OnlineState", "FeedbackState", "rtrl_step", "feedback_step",
           "ReferenceStepper", "FastStepper", "EnsembleStepper", "BPTTStepper",
           "BPTTEnsembleStepper"]
