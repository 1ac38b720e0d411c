"""Recorded series as SequenceSources: a .csv / .npy file, and the Seattle hourly temperatures.

    X_k = (selected columns at row k),   Y_k = (target column at row k + horizon),
    k = 0 .. rows - horizon - 1,  each column z-scored over the file when ``standardize``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .base import as_int


def _float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


def _read(path: Path) -> tuple[list[str], list[list[str]] | np.ndarray]:
    """Column names and the raw table (csv: rows of strings, header line required; npy: array)."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        arr = arr[:, None] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise ConfigError(f"data.path={path}: the array has shape {arr.shape}; expected "
                              "(rows,) or (rows, columns)")
        return [str(j) for j in range(arr.shape[1])], arr.astype(np.float64)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"data.path={path} is empty")
    return [h.strip() for h in rows[0]], rows[1:]


class FileSeries:
    """A recorded series read from ``path`` (.csv with a header line, or .npy).

    ``columns``: input columns by name (csv) or index (default: every numeric column);
    ``target_column``: the column predicted ``horizon`` steps ahead (default: the first input).
    ``stream`` walks the file from row 0; past its end it raises ConfigError unless ``cycle``.
    """

    def __init__(self, path: str | Path, columns: Sequence[Any] | None = None,
                 target_column: Any = None, standardize: bool = True, cycle: bool = False,
                 horizon: int = 1) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.path={str(path)!r} does not exist or is not a file")
        if path.suffix not in (".csv", ".npy"):
            raise ConfigError(f"data.path={str(path)!r}: only .csv and .npy files are read")
        self.path, self.cycle = path, bool(cycle)
        self.horizon = as_int(horizon, "data.horizon", 0)
        names, table = _read(path)
        if len(table) == 0:
            raise ConfigError(f"data.path={path} has no data rows (header only)")
        if isinstance(columns, (str, int)):
            columns = [columns]
        if columns is None:
            first = table[0] if len(table) else []
            cols = [j for j in range(len(names))
                    if isinstance(table, np.ndarray)
                    or (j < len(first) and not np.isnan(_float(first[j])))]
        else:
            cols = [self._index(c, names, "data.columns") for c in columns]
        if not cols:
            raise ConfigError(f"data.path={path}: no numeric column to read; columns: {names}")
        tcol = cols[0] if target_column is None else self._index(
            target_column, names, "data.target_column")
        used = list(dict.fromkeys(cols + [tcol]))
        if isinstance(table, np.ndarray):
            data = table[:, used]
        else:
            data = np.array([[_float(r[j]) if j < len(r) else np.nan for j in used]
                             for r in table], dtype=np.float64).reshape(len(table), len(used))
        bad = np.argwhere(~np.isfinite(data))
        if bad.size:
            r, j = bad[0]
            raise ConfigError(f"data.path={path}: column {names[used[j]]!r} has a missing or "
                              f"non-numeric value at row {r} (0-based, header excluded; "
                              f"{len(bad)} bad cells in all)")
        rows = data.shape[0]
        if rows < self.horizon + 2:
            raise ConfigError(f"data.path={path} has {rows} rows; need at least horizon + 2 = "
                              f"{self.horizon + 2}")
        if standardize:
            std = data.std(0)
            data = (data - data.mean(0)) / np.where(std > 0, std, 1.0)
        self.columns = [names[j] for j in cols]
        self.target_column = names[tcol]
        self.input_dim = len(cols)
        self.num_steps = rows - self.horizon
        self.X = torch.as_tensor(data[: self.num_steps, [used.index(j) for j in cols]])
        self.Y = torch.as_tensor(data[self.horizon:, used.index(tcol)]).contiguous()

    def _index(self, col: Any, names: list[str], field: str) -> int:
        if isinstance(col, (int, np.integer)) and not isinstance(col, bool):
            if 0 <= col < len(names):
                return int(col)
        elif isinstance(col, str) and col in names:
            return names.index(col)
        raise ConfigError(f"{field}: column {col!r} is not in {self.path}; available columns: "
                          f"{names} (or indices 0..{len(names) - 1})")

    def stream(self, generator: torch.Generator, chunk_size: int
               ) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunks of the file in order (``generator`` unused: the series is fixed)."""
        chunk_size = as_int(chunk_size, "chunk_size", 1)

        def run() -> Iterator[tuple[Tensor, Tensor]]:
            while True:
                for lo in range(0, self.num_steps, chunk_size):
                    hi = min(lo + chunk_size, self.num_steps)
                    yield self.X[lo:hi], self.Y[lo:hi]
                if not self.cycle:
                    raise ConfigError(
                        f"data: {self.path} holds {self.num_steps} steps and all were used; set "
                        "data.cycle=true to repeat the file, or train for fewer steps")

        return run()

    def windows(self, n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n windows X (n, L, d) at uniform random positions in the file; Y (n,) of their last
        step."""
        n, length = as_int(n, "n", 1), as_int(length, "length", 1)
        if length > self.num_steps:
            raise ConfigError(f"data: windows of length {length} do not fit in {self.path} "
                              f"({self.num_steps} steps)")
        start = torch.randint(0, self.num_steps - length + 1, (n,), generator=generator)
        idx = start[:, None] + torch.arange(length)
        return self.X[idx], self.Y[idx[:, -1]]


def seattle_temps_path() -> Path:
    """The hourly Seattle temperatures of 2010 (8759 rows: date, temp in °F), as shipped
    offline inside the ``vega_datasets`` package."""
    try:
        from vega_datasets import local_data
    except ImportError:
        raise ConfigError("data: SeattleTemps needs the vega_datasets package "
                          "(pip install vega_datasets)") from None
    return Path(local_data.seattle_temps.filepath)


class SeattleTemps(FileSeries):
    """FileSeries on the Seattle hourly temperature (column ``temp``), read offline from
    vega_datasets: X_k = temp_k, Y_k = temp_{k+horizon} (z-scored)."""

    def __init__(self, standardize: bool = True, cycle: bool = False, horizon: int = 1) -> None:
        super().__init__(seattle_temps_path(), columns=["temp"], standardize=standardize,
                         cycle=cycle, horizon=horizon)


VegaTemperature = SeattleTemps
