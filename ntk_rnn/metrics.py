"""Kernel metrics; the implementation lives in ``ntk_rnn.ntk.metrics``."""

from .ntk.metrics import *  # noqa: F401,F403
from .ntk.metrics import __all__  # noqa: F401
