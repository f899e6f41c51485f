"""Checkpoint files: a state with a format tag and a SHA-256 of its content, written atomically.

A checkpoint that was cut short, changed by one byte, written by something else or by an earlier
format is refused with :class:`CheckpointError` naming the file, never loaded as a changed state.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CHECKPOINT_FORMAT = "auxilia.training.Trainer"
CHECKPOINT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, corrupted, not a Trainer checkpoint,
    or written by a run with other settings. The message names the file."""


def write_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save ``state`` at ``path`` with a format tag and the SHA-256 of its content
    (:func:`state_digest`), through a temporary file renamed over ``path`` once complete and synced
    (so a reader never sees half a file). It loads with ``torch.load(..., weights_only=True)`` as the
    plain mapping ``state`` plus the keys ``format``, ``version`` and ``sha256``."""
    reserved = sorted({"format", "version", "sha256"} & set(state))
    if reserved:
        raise ValueError(f"a checkpointed state cannot have the key {reserved[0]!r}")
    content = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        torch.save({**content, "sha256": state_digest(content)}, file)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)


def read_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """The state :func:`write_checkpoint` saved at ``path``, after checking its checksum.

    Raises :class:`CheckpointError` naming the file when it is truncated or not a torch file, not a
    Trainer checkpoint, of another format version (checkpoints of auxilia before version 2 carried no
    checksum and are refused), or corrupted (checksum mismatch); ``FileNotFoundError`` when missing.
    """
    where = f"checkpoint {str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch reports truncation and foreign bytes in many ways
        raise CheckpointError(f"{where} cannot be read (truncated, or not a torch file): {error}") from error
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        if isinstance(content, dict) and {"model", "counters"} <= set(content):
            raise CheckpointError(f"{where} is an auxilia checkpoint from before format version {CHECKPOINT_VERSION}, "
                                  "without a checksum; it cannot be verified: start a new run")
        raise CheckpointError(f"{where} is not an auxilia Trainer checkpoint")
    if content.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{where} has format version {content.get('version')!r}; "
                              f"this auxilia reads version {CHECKPOINT_VERSION}")
    checksum = content.pop("sha256", None)
    if checksum != state_digest(content):
        raise CheckpointError(f"{where} is corrupted: its content does not match its SHA-256 checksum")
    return {k: v for k, v in content.items() if k not in ("format", "version")}


def state_digest(state: Any) -> str:
    """SHA-256 of a nested state (mappings, sequences, tensors, numbers, strings): of every key,
    value, tensor dtype, shape and byte, so that it depends on the content, not on how torch
    serialized it or onto which device it was loaded."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, Mapping):
            digest.update(f"map {len(value)}:".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "read_checkpoint", "state_digest", "write_checkpoint"]
