"""The SequenceSource protocol (theory §1) and the shape/finiteness checks the trainer applies.

A source is one ergodic sequence (X_k ∈ R^d, Y_k ∈ R). It must provide

- ``input_dim: int``
- ``stream(generator, chunk_size)``: yield chunks ``(X (T, d), Y (T,))`` of one long sequence,
  T <= chunk_size, started from (approximately) the stationary law;
- ``windows(n, length, generator)``: n independent stationary windows ``(n, L, d)`` and the
  targets ``(n,)`` of their last step, for probes and for the limit;

and may provide ``num_steps`` (int or None), the number of elements the stream can deliver
(None = unbounded, e.g. a recorded series that cycles), and ``length`` (int), the number of
distinct steps behind a finite or cycled series (the windows are drawn from these). Any class
with these members plugs into the trainer by ``data._target_``.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..records import RecordsArgs  # noqa: F401  (the sources' base: data.base.RecordsArgs)


@runtime_checkable
class SequenceSource(Protocol):
    input_dim: int

    def stream(
        self, generator: torch.Generator, chunk_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]: ...

    def windows(
        self, n: int, length: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]: ...


def source_name(source: object) -> str:
    cls = type(source)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_source(source: object) -> SequenceSource:
    """Fail early, naming the missing member, if ``source`` does not follow the protocol."""
    missing = [m for m in ("input_dim", "stream", "windows") if not hasattr(source, m)]
    if missing:
        raise ConfigError(
            f"data: {source_name(source)} is not a SequenceSource: it lacks {missing} "
            "(see ntk_rnn.data.SequenceSource)"
        )
    d = source.input_dim
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ConfigError(f"data: {source_name(source)}.input_dim={d!r} must be an integer >= 1")
    return source  # type: ignore[return-value]


def check_chunk(source: object, X: Tensor, Y: Tensor, chunk_size: Optional[int] = None) -> None:
    """A stream chunk must be X (T, d), Y (T,), finite, T >= 1 (and <= chunk_size)."""
    d = source.input_dim  # type: ignore[attr-defined]
    if not (isinstance(X, Tensor) and isinstance(Y, Tensor)):
        raise ConfigError(f"data: {source_name(source)}.stream must yield (Tensor, Tensor) pairs")
    if X.dim() != 2 or X.shape[1] != d or Y.shape != (X.shape[0],) or X.shape[0] < 1:
        raise ConfigError(
            f"data: {source_name(source)}.stream yielded X {tuple(X.shape)}, Y {tuple(Y.shape)}; "
            f"expected X (T, {d}) and Y (T,) with T >= 1"
        )
    if chunk_size is not None and X.shape[0] > chunk_size:
        raise ConfigError(
            f"data: {source_name(source)}.stream yielded {X.shape[0]} rows, more than "
            f"chunk_size={chunk_size}"
        )
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise ConfigError(f"data: {source_name(source)}.stream yielded NaN or Inf values")


def check_windows(source: object, X: Tensor, Y: Tensor, n: int, length: int) -> None:
    """``windows`` must return X (n, L, d), Y (n,), finite."""
    d = source.input_dim  # type: ignore[attr-defined]
    if not (isinstance(X, Tensor) and isinstance(Y, Tensor)):
        raise ConfigError(f"data: {source_name(source)}.windows must return (Tensor, Tensor)")
    if tuple(X.shape) != (n, length, d) or tuple(Y.shape) != (n,):
        raise ConfigError(
            f"data: {source_name(source)}.windows({n}, {length}) returned X {tuple(X.shape)}, "
            f"Y {tuple(Y.shape)}; expected X ({n}, {length}, {d}) and Y ({n},)"
        )
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise ConfigError(f"data: {source_name(source)}.windows returned NaN or Inf values")


# --- helpers for implementations ----------------------------------------------------------


def as_array(value: Any, field: str) -> np.ndarray:
    """``value`` (number, nested list, OmegaConf ListConfig, array, tensor) as a finite float64
    numpy array; a ConfigError naming ``field`` otherwise."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{field}={value!r} must be a number or a (nested) list of numbers"
        ) from None
    if not np.isfinite(arr).all():
        raise ConfigError(f"{field}={value!r} must be finite")
    return arr


def as_int(value: Any, field: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``; a ConfigError naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{field}={value!r} must be an integer >= {minimum}")
    return int(value)


def fork(generator: torch.Generator) -> torch.Generator:
    """A child generator seeded from ``generator`` now, so a lazily consumed stream is fixed at
    the call and does not shift if the caller uses ``generator`` again meanwhile."""
    child = torch.Generator()
    child.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return child
