"""Where datasets live, how they are checked, and how they are split.

Loaders take a ``data_dir``; when it is omitted, :func:`default_data_dir` looks at ``$AUXILIA_DATA``,
then ``./data``, then ``../shared/data``. A missing file raises :class:`DatasetMissing` naming the
file, where it was looked for, and where to get it. Nothing is downloaded implicitly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor


class DatasetMissing(FileNotFoundError):
    """A dataset file is not where the loader looked."""


class DatasetCorrupt(ValueError):
    """A dataset file does not have the expected checksum."""


def default_data_dir() -> Path:
    for candidate in (os.environ.get("AUXILIA_DATA"), "data", "../shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return Path(os.environ.get("AUXILIA_DATA", "data"))


def resolve(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


def require(path: Path, source: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"missing dataset file {path.name!r}: looked for {path}. {source}")
    return path


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    """Check a standard file's checksum; a mismatch names the file and both digests."""
    actual = sha256(path)
    if actual != expected:
        raise DatasetCorrupt(f"{path}: SHA-256 is {actual}, expected {expected}; the file is corrupt or not the standard one")
    return path


def split_indices(n: int, sizes: dict[str, int | float], seed: int) -> dict[str, Tensor]:
    """Disjoint random index sets, seeded; float sizes are fractions of n, the last split may be -1
    for "the rest"."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for name, size in sizes.items():
        count = n - start if size == -1 else (round(size * n) if isinstance(size, float) else int(size))
        if count < 0 or start + count > n:
            raise ValueError(f"split sizes {sizes} do not fit {n} samples")
        out[name] = order[start : start + count]
        start += count
    return out


def cache_dir(data_dir: Path) -> Path:
    """Derived data (generated datasets, decoded images) goes to ``$AUXILIA_CACHE`` or
    ``~/.cache/auxilia``, never next to the read-only originals."""
    root = Path(os.environ.get("AUXILIA_CACHE", Path.home() / ".cache" / "auxilia"))
    root.mkdir(parents=True, exist_ok=True)
    return root
