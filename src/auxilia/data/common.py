"""Where datasets live, how they are checked, cached and split.

Loaders take a ``data_dir``; when it is omitted, :func:`default_data_dir` looks at ``$AUXILIA_DATA``,
then ``./data``, then ``../shared/data``. A missing file raises :class:`DatasetMissing` naming the
file, where it was looked for, and where to get it; a file that is not the standard one raises
:class:`DatasetCorrupt`. Nothing is downloaded implicitly.

Derived data (generated datasets, decoded images) is cached in :func:`cache_dir`: an explicit
directory, else ``$AUXILIA_CACHE``, else ``~/.cache/auxilia``; never next to the originals, which may
be read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..training.data import TaskDataset

PathLike = str | os.PathLike


class DatasetMissing(FileNotFoundError):
    """A dataset file is not where the loader looked.

    ``filename`` is the full path looked at; the message also says where to get the file.
    """

    def __init__(self, path: PathLike, source: str = ""):
        path = Path(path)
        message = f"missing dataset file {path.name!r}: looked for {path}"
        if source:
            message += f". {source}"
        super().__init__(message)
        self.filename = str(path)
        self.source = source

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.filename, self.source)


class DatasetCorrupt(ValueError):
    """A dataset file does not have the expected checksum or layout."""


def default_data_dir() -> Path:
    """``$AUXILIA_DATA`` if set, else the first existing of ``./data`` and ``../shared/data``."""
    env = os.environ.get("AUXILIA_DATA")
    if env:
        return Path(env)
    for candidate in ("data", os.path.join("..", "shared", "data")):
        if Path(candidate).is_dir():
            return Path(candidate)
    return Path("data")


def resolve(data_dir: PathLike | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


def require(path: Path, source: str) -> Path:
    """``path`` if it exists, else :class:`DatasetMissing` naming it and saying where to get it."""
    if not path.exists():
        raise DatasetMissing(path, source)
    return path


def sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: PathLike, expected: str) -> Path:
    """Check a standard file's SHA-256; a mismatch raises :class:`DatasetCorrupt` naming the file and
    both digests. Returns the path, so calls chain."""
    path = Path(path)
    if not path.exists():
        raise DatasetMissing(path)
    actual = sha256(path)
    if actual != expected.lower():
        raise DatasetCorrupt(
            f"{path}: SHA-256 is {actual}, expected {expected}; the file is damaged or not the standard one "
            "(pass verify=False to read it anyway)"
        )
    return path


def split_indices(n: int, sizes: Mapping[str, int | float], seed: int) -> dict[str, Tensor]:
    """Disjoint random index sets over ``range(n)``, a function of ``seed`` only.

    Integer sizes are counts, float sizes fractions of ``n``; one size may be ``-1`` for "the rest".
    Each split's indices are in random order; together they cover at most ``n`` samples.

    >>> s = split_indices(10, {"train": 0.6, "val": 2, "test": -1}, seed=0)
    >>> [len(s[k]) for k in s]
    [6, 2, 2]
    """
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one split may take the rest (-1), got {rest}")
    counts = {}
    for name, size in sizes.items():
        if size == -1:
            continue
        count = round(size * n) if isinstance(size, float) else int(size)
        if count < 0 or (isinstance(size, float) and not 0 <= size <= 1):
            raise ValueError(f"split {name!r}: size {size} is neither a count nor a fraction of {n} samples")
        counts[name] = count
    taken = sum(counts.values())
    if taken > n:
        raise ValueError(f"split sizes {dict(sizes)} need {taken} samples, only {n} exist")
    if rest:
        counts[rest[0]] = n - taken
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for name in sizes:
        out[name] = order[start : start + counts[name]]
        start += counts[name]
    return out


def splits(n: int, sizes: Mapping[str, int | float] | None = None, seed: int = 0) -> dict[str, Tensor]:
    """:func:`split_indices` with the library's default proportions: 70% ``train``, 5% ``aux``,
    10% ``val`` and the rest ``test``."""
    return split_indices(n, sizes or {"train": 0.7, "aux": 0.05, "val": 0.1, "test": -1}, seed)


def task_datasets(
    inputs: Tensor,
    targets: Mapping[str, Tensor],
    split: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, TaskDataset]:
    """One :class:`~auxilia.training.data.TaskDataset` per split, indexing inputs, targets and masks."""
    from ..training.data import TaskDataset

    out = {}
    for name, idx in split.items():
        out[name] = TaskDataset(
            inputs[idx], {k: v[idx] for k, v in targets.items()}, {k: v[idx] for k, v in (masks or {}).items()}
        )
    return out


def cache_dir(data_dir: PathLike | None = None, cache: PathLike | None = None) -> Path:
    """The directory for derived data: ``cache`` if given, else ``$AUXILIA_CACHE``, else
    ``~/.cache/auxilia``; created on demand. (``data_dir`` is accepted for symmetry with the loaders
    and is not written to.)"""
    if cache is not None:
        root = Path(cache)
    else:
        root = Path(os.environ.get("AUXILIA_CACHE") or Path.home() / ".cache" / "auxilia")
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_key(name: str, **params: Any) -> str:
    """A file-name-safe key for derived data: ``name`` plus a digest of every generation parameter."""
    blob = json.dumps(params, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
