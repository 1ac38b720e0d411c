"""Flush subnormal floats to zero around CPU work whose values underflow.

Backward vectors of a recurrent network shrink by about the recurrent gain per step (N^{−1/2}
under mean-field scaling, ``models/scaling.py``), so over a window of tens of steps they reach
float32's subnormal range (below 1.2e-38). Intel CPUs take a microcode assist for every
operation on a subnormal: measured on an Intel Xeon (AVX-512), 1 thread, mean-field ElmanRNN,
the structured NTK (N = 2048, 32 windows of 16) took 931 ms instead of 172–185 ms, and 256 steps
of truncated-BPTT training (N = 1024, window 32) 16.6 s instead of 3.0 s. What is flushed lies
below 1e-38 of the values it is summed with: both results came out bit-identical.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def flushing() -> bool:
    """True when this thread's CPU arithmetic flushes subnormals to zero (FTZ/DAZ): a float32
    subnormal times 2 comes out 0."""
    return float(torch.tensor(1e-40, dtype=torch.float32) * 2) == 0.0


@contextlib.contextmanager
def without_subnormals(device: torch.device | str = "cpu") -> Iterator[None]:
    """For work on ``device`` (nothing happens unless it is the CPU): flush subnormals to zero in
    this thread inside the block (``torch.set_flush_denormal``), then restore the caller's
    setting. torch's other intra-op threads keep their own setting."""
    if torch.device(device).type != "cpu" or flushing() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
