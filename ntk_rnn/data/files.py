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
from .base import RecordsArgs, as_int

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
    ``1958-03-29``, ``d0``, ...) is left out, a numeric column with a gap at the top is kept.
    One pass over the rows, each cell looked at until its column is decided (linear)."""
    undecided = list(range(len(names)))
    numeric = set()
    for r in table:
        if not undecided:
            break
        n, left = len(r), []
        for j in undecided:
            v = r[j] if j < n else ""
            if v.strip().lower() in MISSING_TOKENS:
                left.append(j)
            elif _float(v) == _float(v):  # (not NaN)
                numeric.add(j)
        undecided = left
    return sorted(numeric)


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


#: a line of a .csv longer than this is refused before it is read into memory (a file without
#: line breaks, binary data); legitimate wide files (10^5 columns of numbers) stay well below
MAX_LINE_BYTES = 64 << 20
#: a single csv field longer than this is refused (csv's own limit, raised: a long number list)
MAX_FIELD_BYTES = 1 << 20


def _check_lines(path: Path) -> None:
    """Linear scan, memory bounded by MAX_LINE_BYTES: refuse a line longer than that."""
    with open(path, "rb") as f:
        n = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            n += 1
            if len(line) > MAX_LINE_BYTES:
                raise ConfigError(f"data.path={path}: line {n} is longer than "
                                  f"{MAX_LINE_BYTES >> 20} MiB (no line breaks? not a text "
                                  "table?); a .csv needs one row per line")


def _read_npy(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays (would need pickle), a damaged header
        raise ConfigError(f"data.path={path}: cannot read the array ({str(exc).strip()[:200]}); "
                          "save a numeric array (np.save of float or int values)") from None
    except (OSError, EOFError) as exc:
        raise ConfigError(f"data.path={path}: cannot read the array ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise ConfigError(f"data.path={path}: the array holds {getattr(arr, 'dtype', '?')} "
                          "values; a numeric array (float or int) is needed")
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2:
        raise ConfigError(f"data.path={path}: the array has shape {arr.shape}; expected "
                          "(rows,) or (rows, columns)")
    return [str(j) for j in range(arr.shape[1])], arr.astype(np.float64)


def _read(path: Path) -> tuple[list[str], list[list[str]] | np.ndarray]:
    """Column names and the raw table (csv: rows of strings, header line required; npy: array).
    Pathological files (a line without end, a huge field, bytes that are not UTF-8, duplicate
    column names) are refused with one line; time and memory are linear in the file."""
    if path.suffix == ".npy":
        return _read_npy(path)
    _check_lines(path)
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_BYTES)
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [r for r in reader if any(c.strip() for c in r)]
    except UnicodeDecodeError as exc:
        line = f" (line {reader.line_num + 1})" if reader is not None else ""
        raise ConfigError(f"data.path={path} is not UTF-8 text: byte {exc.object[exc.start]:#04x}"
                          f"{line} cannot be decoded; save the file as UTF-8") from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None else "?"
        raise ConfigError(f"data.path={path}: line {line} cannot be read as csv ({exc})") from None
    finally:
        csv.field_size_limit(old)
    if not rows:
        raise ConfigError(f"data.path={path} is empty")
    names = [h.strip() for h in rows[0]]
    seen: dict[str, int] = {}
    for j, h in enumerate(names):
        if h in seen:
            raise ConfigError(f"data.path={path}: the header names column {h!r} twice (columns "
                              f"{seen[h]} and {j}); give every column its own name")
        seen[h] = j
    return names, rows[1:]


def _shown(names: list[str], n: int = 20) -> str:
    """A list of column names for a message, cut after ``n``."""
    return str(names) if len(names) <= n else str(names[:n])[:-1] + f", ... ({len(names)} in all)]"


class FileSeries(RecordsArgs):
    """A recorded series read from ``path`` (.csv with a header line, or .npy).

    ``columns``: input columns by name (csv) or index (default: every numeric column; a column
    whose first non-missing value is not a number, such as a date, is skipped);
    ``target_column``: the column predicted ``horizon`` steps ahead (default: the input column,
    when there is exactly one; with several inputs it must be given: a ConfigError lists them);
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
        if target_column is None and len(cols) > 1:
            raise ConfigError(
                f"data.target_column is not set and data.path={path} has {len(cols)} input "
                f"columns {_shown([names[j] for j in cols])}: say which one to predict "
                "(data.target_column=<name>), and data.columns=[...] for the inputs")
        tcol = cols[0] if target_column is None else self._index(
            target_column, names, "data.target_column")
        used = list(dict.fromkeys(cols + [tcol]))
        pos = {j: i for i, j in enumerate(used)}  # (linear in columns: no list.index)
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
        self.X = torch.as_tensor(data[: self.length, [pos[j] for j in cols]])
        self.Y = torch.as_tensor(data[self.horizon:, pos[tcol]]).contiguous()

    def _index(self, col: Any, names: list[str], field: str) -> int:
        if not hasattr(self, "_names_at") or self._names_at[0] is not names:
            self._names_at = (names, {n: j for j, n in enumerate(names)})
        if isinstance(col, (int, np.integer)) and not isinstance(col, bool):
            if 0 <= col < len(names):
                return int(col)
        elif isinstance(col, str) and col in self._names_at[1]:
            return self._names_at[1][col]
        raise ConfigError(f"{field}: column {col!r} is not in {self.path}; available columns: "
                          f"{_shown(names)} (or indices 0..{len(names) - 1})")

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
