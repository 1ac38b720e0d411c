"""The C kernels (real ``.c`` files with one shared header) and their loader.

``ntk_rnn.h``  σ, σ' and Model D's S/P/Q recursion (theory §3), written once for both kernels
``fast.c``     many exact online SGD steps per call (Model D and F): ``ntk_rnn.online.fast``
``features.c`` per-unit features of the structured NTK (theory §4): ``ntk_rnn.ntk._features_c``
``loader.py``  compile (``-D`` defines, no templating), cache per user, load, self-check, fall back
"""

from .loader import (
    ACT_CODES,
    KernelFallbackWarning,
    KernelUnavailable,
    build,
    cache_dir,
    compiler,
    load_checked,
)

__all__ = ["ACT_CODES", "KernelFallbackWarning", "KernelUnavailable", "build", "cache_dir",
           "compiler", "load_checked"]
