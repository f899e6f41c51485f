"""Training: batches, the Trainer, run logs."""

from .data import TaskDataset, epoch_batches
from .logging import RunLogger
from .trainer import FitResult, Trainer, TrainerConfig, peak_memory_bytes, seed_everything

__all__ = [
    "FitResult",
    "RunLogger",
    "TaskDataset",
    "Trainer",
    "TrainerConfig",
    "epoch_batches",
    "peak_memory_bytes",
    "seed_everything",
]
