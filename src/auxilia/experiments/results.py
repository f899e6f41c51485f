"""``results.jsonl``: one JSON record per finished run, appended under a lock, read back tolerantly.

* Appending takes an exclusive ``fcntl`` lock on the file, re-reads the run keys already there and
  writes only a run not yet recorded, so two ``auxilia run`` on one ``--out`` never record a run
  twice (where ``fcntl`` does not exist, e.g. Windows, the append is unlocked).
* Reading skips a line that is not a JSON record with a warning naming the file and line, and keeps
  the first record of each run key: a file concatenated from several, or written before the lock,
  still counts every run once.
* Nothing inside ``--out`` is written through a symbolic link: an existing link at (or above, up to
  ``--out`` itself) a path the runner writes is refused with :class:`~.base.UsageError`, so a link
  planted in a results directory cannot redirect a write out of it. ``--out`` itself may be a link.

Run keys are JSON objects (:func:`run_key`); the lists written by
earlier versions are read as the same key with ``device`` taken from the record, so that old
files keep resuming and keep counting each run once.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import methods as method_registry
from .base import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

RESULTS = "results.jsonl"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def output_path(out: str | Path, *parts: str) -> Path:
    """``out/parts...``, refusing a component that climbs out (``..``, absolute) or that exists as
    a symbolic link."""
    out = Path(out)
    path = out
    for part in Path(*parts).parts if parts else ():
        if part in ("..", "") or Path(part).is_absolute():
            raise UsageError(f"refusing to write {Path(out, *parts)}: it leaves the results directory {out}")
        path = path / part
        if path.is_symlink():
            raise UsageError(f"refusing to write through {path}: it is a symbolic link inside the results "
                             f"directory {out}; remove it or choose another --out")
    return path


def refuse_links_under(out: str | Path, folder: Path) -> None:
    """Refuse any symbolic link already inside ``folder`` (a run's log directory, about to be
    written by the trainer)."""
    if not folder.is_dir():
        return
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            if Path(root, name).is_symlink():
                raise UsageError(f"refusing to write into {folder}: {Path(root, name)} is a symbolic link "
                                 f"inside the results directory {out}")


def run_key(
    experiment: str, method: str, seed: int, budget: float,
    hyperparameters: Mapping[str, Any], trainer_overrides: Mapping[str, Any],
    options: Mapping[str, Any] | None = None, *, device: str = "cpu",
) -> str:
    """Identifies a run in ``results.jsonl``, so that a grid resumes without redoing finished runs
    and a changed setting is never taken for a finished run.

    It holds everything the user chose that changes the result: the experiment, method and seed,
    the budget, the hyperparameters given that this method accepts, the trainer settings given
    (epochs, max steps, batch size, amp), the experiment's options (including ``arch``) and the
    device type. Not the data directory: every dataset file is checked against its SHA-256 (the
    CIFAR-10 python batches, with no known digest, are only read as plain arrays), so the same key
    means the same data wherever it lives. Not the number of processes: ``--nproc`` takes the
    single-process step on the same global batch.
    """
    try:
        accepted = method_registry.hyperparameters(method)
        hyperparameters = {k: v for k, v in hyperparameters.items() if k in accepted}
    except ValueError:  # a method no longer registered keeps what was recorded
        pass
    settings = {k: v for k, v in trainer_overrides.items() if v is not None and k != "progress"}
    key = {
        "experiment": experiment, "method": method, "seed": seed, "budget": budget,
        "hyperparameters": jsonable(hyperparameters), "trainer": jsonable(settings),
        "options": jsonable(dict(options or {})), "device": torch.device(device).type,
    }
    return json.dumps(key, sort_keys=True)


def configuration(key: str) -> dict[str, Any]:
    """What a run key says about the configuration, without the seed: the runs of one
    configuration are the seeds of one row of a table."""
    parsed = json.loads(key)
    parsed.pop("seed", None)
    return parsed


def record_key(record: dict[str, Any]) -> str | None:
    """The run key of ``record``; a key in the earlier list layout is converted to today's."""
    key = record.get("run_key")
    if not isinstance(key, str):
        return None
    try:
        parsed = json.loads(key)
    except json.JSONDecodeError:
        return key
    if isinstance(parsed, list) and len(parsed) in (6, 7):
        experiment, method, seed, budget, hyperparameters, settings, *options = parsed
        return run_key(experiment, method, seed, budget, hyperparameters, settings, options[0] if options else None,
                       device=(record.get("config") or {}).get("device") or "cpu")
    return key


def _parse(lines: Iterable[bytes | str], path: Path, warn: bool) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.strip())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            record, reason = None, str(error)
        else:
            reason = f"a JSON {type(record).__name__}, not a record"
        if isinstance(record, dict):
            yield record
        elif warn:
            warnings.warn(f"{path}:{number}: skipped a line that is not a run record ({reason})", stacklevel=3)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every run record of a ``results.jsonl`` (or of the one in directory ``path``), each run once."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.exists():
        raise UsageError(f"no results file at {path}")
    records, seen, repeated = [], set(), 0
    with path.open("rb") as f:
        for record in _parse(f, path, warn=True):
            key = record_key(record)
            if key is not None and key in seen:
                repeated += 1
                continue
            seen.add(key)
            records.append(record)
    if repeated:
        warnings.warn(f"{path}: {repeated} record(s) repeat a run already recorded; each run is counted once",
                      stacklevel=2)
    return records


def finished_runs(out: str | Path) -> set[str]:
    """The run keys recorded in ``out/results.jsonl`` (empty when there is none yet)."""
    path = output_path(out, RESULTS)
    if not path.exists():
        return set()
    return {key for record in read_records(path) if (key := record_key(record)) is not None}


def append_record(out: str | Path, record: dict[str, Any]) -> bool:
    """Append ``record`` to ``out/results.jsonl`` unless its run is already there; returns whether
    it was written. The check and the write happen under one exclusive lock."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = output_path(out, RESULTS)

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | _NOFOLLOW, 0o644)

    try:
        handle = open(path, "a+b", opener=opener)  # noqa: SIM115 - closed below, after the lock
    except OSError as error:
        if path.is_symlink():
            raise UsageError(f"refusing to write through {path}: it is a symbolic link") from None
        raise UsageError(f"cannot append to {path}: {error.strerror}") from None
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        existing = handle.read()
        key = record_key(record)
        if key is not None and any(record_key(r) == key for r in _parse(existing.splitlines(), path, warn=False)):
            return False
        line = json.dumps(record) + "\n"
        if existing and not existing.endswith(b"\n"):  # a line cut short by a killed writer stays on its own
            line = "\n" + line
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())
    return True


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it: mappings and sequences of numbers and strings; NaN is ``None``,
    an infinity its string, a tensor a list, anything else its ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)
