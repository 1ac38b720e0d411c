"""The C kernels (real ``.c`` files with one shared header) and their loader.

``ntk_rnn.h``  σ, σ' and Model D's S/P/Q recursion (theory §3), written once for all kernels
``fast.c``     many exact online SGD steps per call (Model D and F): ``ntk_rnn.online.fast``
``features.c`` per-unit features of the structured NTK (theory §4): ``ntk_rnn.ntk._features_c``
``bptt.c``     truncated BPTT of ElmanRNN and GRURNN: ``ntk_rnn.online.bptt``
``loader.py``  compile (``-D`` defines, no templating), cache per user, load; `Kernel`: the
               binding each kernel module declares (signatures, self-check, fallback, status)
"""

from .loader import (
    ACT_CODES,
    Kernel,
    KernelFallbackWarning,
    KernelUnavailable,
    build,
    cache_dir,
    compiler,
)

__all__ = ["ACT_CODES", "Kernel", "KernelFallbackWarning", "KernelUnavailable", "build",
           "cache_dir", "compiler"]
