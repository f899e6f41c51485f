"""Run logs: one long-format CSV (step, epoch, split, name, value), optionally TensorBoard too.

Long format keeps the file valid when a method adds a quantity mid-run (a new weight, a meta-loss).
Every :meth:`RunLogger.log` call is flushed to the operating system before it returns, so a process
killed at any moment (``kill -9`` included) loses no row logged before that call; a resumed run
first drops the rows its checkpoint does not cover, so that the file ends with exactly the rows an
uninterrupted run writes.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HEADER = ["step", "epoch", "split", "name", "value"]
RowFilter = Callable[[int, str], bool]


class RunLogger:
    """Writes ``log_dir/log.csv`` (nothing when ``log_dir`` is ``None``).

    ``keep``: ``None`` starts a fresh file; otherwise the existing file is continued, keeping only
    the rows for which ``keep(step, split)`` is true (and dropping a row cut short by a kill), and
    the header is written when the file is missing or empty.
    """

    def __init__(self, log_dir: str | Path | None, tensorboard: bool = False, keep: RowFilter | None = None):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._file = None
        self._csv = None
        self._tb = None
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "log.csv"
        if keep is not None and path.exists():
            _keep_rows(path, keep)
        else:
            _write_rows(path, [])
        self._file = path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "TensorBoard logging needs the 'tensorboard' extra: pip install 'auxilia[tensorboard]'"
                ) from error
            self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))

    def log(self, step: int, epoch: int, split: str, values: Mapping[str, Any]) -> None:
        if self._csv is None:
            return
        for name, value in _flatten(values):
            self._csv.writerow([step, epoch, split, name, f"{value:.9g}"])
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{name}", value, step)
        self._file.flush()  # rows are tiny: a kill loses nothing already logged

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _keep_rows(path: Path, keep: RowFilter) -> None:
    """Rewrite ``path`` with its well-formed rows that ``keep`` accepts (atomically: a kill during
    the rewrite leaves the old file)."""
    with path.open(newline="") as file:
        rows = [row for row in csv.reader(file) if _complete(row) and keep(int(row[0]), row[2])]
    _write_rows(path, rows)


def _complete(row: list[str]) -> bool:
    """A data row as :meth:`RunLogger.log` writes it (not the header, not a line cut short)."""
    if len(row) != len(HEADER) or not row[0].isdigit() or not row[1].isdigit():
        return False
    try:
        float(row[4])
    except ValueError:
        return False
    return True


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(HEADER)
        writer.writerows(rows)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out
