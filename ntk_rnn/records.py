"""Objects that remember the arguments they were built with (models and data sources), so that a
run built in Python writes a config.yaml that rebuilds the same objects, and a model can be built
again at another width (``models.family.Family.at_width``)."""

from __future__ import annotations

import functools
import inspect
from typing import Any


class RecordsArgs:
    """Records the arguments an object was constructed with as ``init_args`` (the outermost
    ``__init__`` of a subclass chain), so a run built in Python writes a config.yaml that rebuilds
    the same object (``ntk_rnn.run.build.describe``) — not a guess from its attributes."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_args", False):
            return

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "init_args" not in self.__dict__:
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                self.init_args = {k: v for k, v in list(bound.arguments.items())[1:]}
            init(self, *args, **kw)

        recording_init._records_args = True
        cls.__init__ = recording_init
