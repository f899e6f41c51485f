"""Training: batches, the Trainer, run logs, checkpoints."""

from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .data import TaskDataset, epoch_batches
from .logging import RunLogger
from .trainer import (
    AllStepsSkippedError,
    FitResult,
    Trainer,
    TrainerConfig,
    peak_memory_bytes,
    seed_everything,
    unchanged_on_error,
)

__all__ = [
    "AllStepsSkippedError",
    "CheckpointError",
    "FitResult",
    "RunLogger",
    "TaskDataset",
    "Trainer",
    "TrainerConfig",
    "epoch_batches",
    "peak_memory_bytes",
    "read_checkpoint",
    "seed_everything",
    "unchanged_on_error",
    "write_checkpoint",
]
