"""Shared helpers for `make bench`: machine description and robust timing."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def isa() -> str:
    """The CPU's widest x86 vector ISA: 'AVX-512' (avx512f), 'AVX2', 'SSE' (or the machine name),
    from /proc/cpuinfo; printed beside every benchmark figure."""
    from ntk_rnn.ntk._features_c import cpu_isa

    return cpu_isa()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu} ({isa()}); {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); {gpu}")


def best_time(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
