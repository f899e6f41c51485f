"""Training: batches, the Trainer, run logs, checkpoints."""

from .data import TaskDataset, epoch_batches
from .logging import RunLogger
from .trainer import (
    AllStepsSkippedError,
    CheckpointError,
    FitResult,
    Trainer,
    TrainerConfig,
    peak_memory_bytes,
    read_checkpoint,
    seed_everything,
    unchanged_on_error,
    write_checkpoint,
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
