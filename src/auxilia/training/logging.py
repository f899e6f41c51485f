"""Run logs: one long-format CSV (step, epoch, split, name, value), optionally TensorBoard too.

Long format keeps the file valid when a method adds a quantity mid-run (a new weight, a meta-loss).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, log_dir: str | Path | None, tensorboard: bool = False, resume: bool = False):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._file = None
        self._csv = None
        self._tb = None
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "log.csv"
        fresh = not (resume and path.exists())
        self._file = path.open("w" if fresh else "a", newline="")
        self._csv = csv.writer(self._file)
        if fresh:
            self._csv.writerow(["step", "epoch", "split", "name", "value"])
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


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out
