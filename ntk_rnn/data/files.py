"""Recorded series as SequenceSources: a .csv / .npy file, and the Seattle hourly temperatures.

    X_k = (selected columns at row k),   Y_k = (target column at row k + horizon),
    k = 0 .. rows - horizon - 1,  each column z-scored over the file when ``standardize``.

Missing cells (empty, ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?``, a short row; NaN in a
.npy array) in the columns used are handled by ``missing`` (``data.missing``):

- ``error`` (default): a ConfigError naming the first one;
- ``drop``: rows with a missing cell in a used column are removed (the series closes the gap:
  the rows before and after it become neighbours);
- ``ffill``: each column carries its last value forward; rows before a column's first value are
  dropped;
- ``interpolate``: each column is interpolated linearly in the row index; rows before the first
  or after the last value of a column are dropped.

Infinite values and text in a used numeric column are errors whatever ``missing`` says.
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

MISSING_MODES = ("error", "drop", "ffill", "interpolate")
MISSING_TOKENS = frozenset({"", "na", "n/a", "#n/a", "nan", "null", "none", "?"})


def _float(v: str) -> float:
    """A csv cell as a float; NaN when missing (see MISSING_TOKENS) or not a number."""
    try:
        return float(v)
    except ValueError:
        return float("nan")


def _is_missing(v: str) -> bool:
    return v.strip().lower() in MISSING_TOKENS


def _numeric_columns(names: list[str], table: list[list[str]]) -> list[int]:
    """Columns whose first non-missing cell is a number: a date or label column (first value
    ``1958-03-29``, ``d0``, ...) is left out, a numeric column with a gap at the top is kept."""
    cols = []
    for j in range(len(names)):
        first = next((r[j] for r in table if j < len(r) and not _is_missing(r[j])), None)
        if first is not None and not np.isnan(_float(first)):
            cols.append(j)
    return cols


def _check_missing_mode(missing: Any) -> str:
    if not isinstance(missing, str) or missing not in MISSING_MODES:
        raise ConfigError(f"data.missing={missing!r} must be one of {', '.join(MISSING_MODES)}")
    return missing


def _fill(data: np.ndarray, gaps: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (rows, cols) with the cells ``gaps`` filled by ``mode``; returns the table and
    the kept rows' mask (rows that cannot be filled are dropped)."""
    keep = ~gaps.any(1)
    if mode == "drop":
        return data[keep], keep
    data = data.copy()
    rows = np.arange(len(data))
    keep = np.ones(len(data), dtype=bool)
    for j in range(data.shape[1]):
        ok = ~gaps[:, j]
        if not ok.any():
            keep[:] = False
            break
        first, last = np.argmax(ok), len(ok) - 1 - np.argmax(ok[::-1])
        keep[:first] = False
        if mode == "ffill":
            prev = np.maximum.accumulate(np.where(ok, rows, 0))
            data[:, j] = data[prev, j]
        else:  # interpolate
            data[:, j] = np.interp(rows, rows[ok], data[ok, j])
            keep[last + 1:] = False
    return data[keep], keep


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

    ``columns``: input columns by name (csv) or index (default: every numeric column; a column
    whose first non-missing value is not a number, such as a date, is skipped);
    ``target_column``: the column predicted ``horizon`` steps ahead (default: the first input);
    ``missing``: what to do with missing cells (see the module docstring).
    ``stream`` walks the file from row 0; past its end it raises ConfigError unless ``cycle``.
    ``length`` is the number of steps in the file; ``num_steps`` the number the stream can
    deliver: ``length``, or None (unbounded) when ``cycle``.
    """

    def __init__(self, path: str | Path, columns: Sequence[Any] | None = None,
                 target_column: Any = None, standardize: bool = True, cycle: bool = False,
                 horizon: int = 1, missing: str = "error") -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.path={str(path)!r} does not exist or is not a file")
        if path.suffix not in (".csv", ".npy"):
            raise ConfigError(f"data.path={str(path)!r}: only .csv and .npy files are read")
        self.path, self.cycle = path, bool(cycle)
        self.horizon = as_int(horizon, "data.horizon", 0)
        self.missing = _check_missing_mode(missing)
        names, table = _read(path)
        if len(table) == 0:
            raise ConfigError(f"data.path={path} has no data rows (header only)")
        if isinstance(columns, (str, int)):
            columns = [columns]
        if columns is None:
            cols = list(range(len(names))) if isinstance(table, np.ndarray) else \
                _numeric_columns(names, table)
        else:
            cols = [self._index(c, names, "data.columns") for c in columns]
        if not cols:
            raise ConfigError(f"data.path={path}: no numeric column to read; columns: {names}")
        tcol = cols[0] if target_column is None else self._index(
            target_column, names, "data.target_column")
        used = list(dict.fromkeys(cols + [tcol]))
        if isinstance(table, np.ndarray):
            data = table[:, used]
            gaps = np.isnan(data)
        else:
            cells = [[r[j] if j < len(r) else "" for j in used] for r in table]
            gaps = np.array([[_is_missing(v) for v in r] for r in cells],
                            dtype=bool).reshape(len(table), len(used))
            data = np.array([[_float(v) for v in r] for r in cells],
                            dtype=np.float64).reshape(len(table), len(used))
        bad = np.argwhere(~np.isfinite(data) & ~gaps)
        if bad.size:
            r, j = bad[0]
            value = data[r, j] if isinstance(table, np.ndarray) else table[r][used[j]]
            raise ConfigError(f"data.path={path}: column {names[used[j]]!r} has a non-numeric or "
                              f"infinite value {value!r} at row {r} (0-based, header excluded; "
                              f"{len(bad)} bad cells in all)")
        self.missing_cells = int(gaps.sum())
        if self.missing_cells:
            if self.missing == "error":
                r, j = np.argwhere(gaps)[0]
                raise ConfigError(
                    f"data.path={path}: column {names[used[j]]!r} has a missing value at row {r} "
                    f"(0-based, header excluded; {self.missing_cells} missing cells in all); set "
                    f"data.missing to one of {', '.join(MISSING_MODES[1:])} to drop or fill them "
                    "(data.missing=error refuses them)")
            data, keep = _fill(data, gaps, self.missing)
            self.dropped_rows = int((~keep).sum())
        else:
            self.dropped_rows = 0
        rows = data.shape[0]
        if rows < self.horizon + 2:
            after = f" after data.missing={self.missing} dropped {self.dropped_rows}" \
                if self.dropped_rows else ""
            raise ConfigError(f"data.path={path} has {rows} rows{after}; need at least horizon + "
                              f"2 = {self.horizon + 2}")
        if standardize:
            std = data.std(0)
            data = (data - data.mean(0)) / np.where(std > 0, std, 1.0)
        self.columns = [names[j] for j in cols]
        self.target_column = names[tcol]
        self.input_dim = len(cols)
        self.length = rows - self.horizon
        # what the stream can deliver: unbounded when it repeats the file (the trainer compares
        # a run's steps with this)
        self.num_steps = None if self.cycle else self.length
        self.X = torch.as_tensor(data[: self.length, [used.index(j) for j in cols]])
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
                for lo in range(0, self.length, chunk_size):
                    hi = min(lo + chunk_size, self.length)
                    yield self.X[lo:hi], self.Y[lo:hi]
                if not self.cycle:
                    raise ConfigError(
                        f"data: {self.path} holds {self.length} steps and all were used; set "
                        "data.cycle=true to repeat the file, or train for fewer steps")

        return run()

    def windows(self, n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n windows X (n, L, d) at uniform random positions in the file; Y (n,) of their last
        step."""
        n, length = as_int(n, "n", 1), as_int(length, "length", 1)
        if length > self.length:
            raise ConfigError(f"data: windows of length {length} do not fit in {self.path} "
                              f"({self.length} steps)")
        start = torch.randint(0, self.length - length + 1, (n,), generator=generator)
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
