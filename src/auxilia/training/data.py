"""Batches the Trainer can replay exactly: a seeded permutation per epoch, resumable mid-epoch.

A batch is ``(inputs, targets)`` or ``(inputs, targets, masks)`` where ``targets`` and ``masks`` map
task names to tensors; a mask marks the samples that carry that task's label.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ..distributed import shard_bounds, world_size

Batch = tuple[Any, dict[str, Tensor], dict[str, Tensor]]


class TaskDataset(Dataset):
    """In-memory inputs with per-task targets (and optional masks), fetched a whole batch at a time."""

    def __init__(self, inputs: Tensor, targets: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None):
        n = len(inputs)
        for name, target in targets.items():
            if len(target) != n:
                raise ValueError(f"task {name!r}: {len(target)} targets for {n} inputs")
        masks = dict(masks or {})
        for name, mask in masks.items():
            if name not in targets:
                raise ValueError(f"mask given for task {name!r}, which has no targets")
            if mask.shape != (n,):
                raise ValueError(f"task {name!r}: mask must have shape ({n},), got {tuple(mask.shape)}")
        self.inputs, self.targets, self.masks = inputs, dict(targets), {k: v.bool() for k, v in masks.items()}

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return (
            self.inputs[idx],
            {k: v[idx] for k, v in self.targets.items()},
            {k: v[idx] for k, v in self.masks.items()},
        )

    def subset(self, indices: Tensor) -> TaskDataset:
        inputs, targets, masks = self.__getitems__(indices.tolist())
        return TaskDataset(inputs, targets, masks)


def as_batch(batch: Any) -> Batch:
    """Normalize ``(x, targets)`` / ``(x, targets, masks)`` to the three-part form."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        inputs, targets = batch[0], batch[1]
        masks = batch[2] if len(batch) == 3 else {}
        if not isinstance(targets, Mapping):
            raise TypeError("a batch's targets must be a mapping from task name to tensor")
        return inputs, dict(targets), dict(masks)
    raise TypeError("a batch must be (inputs, targets) or (inputs, targets, masks)")


def epoch_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    skip: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """The batches of one epoch in an order fixed by (seed, epoch), starting after ``skip`` batches.

    ``shard=(rank, world)`` yields only that process's contiguous part of each global batch (see
    :func:`auxilia.distributed.shard_bounds`); the global batches are the same for every ``world``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    if drop_last:
        order = order[: n - n % batch_size]
    order = order[skip * batch_size :]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if shard is not None:
        rank, world = shard
        batches = [batch[slice(*shard_bounds(len(batch), rank, world))] for batch in batches]
    batches = [batch.tolist() for batch in batches]
    if isinstance(dataset, TaskDataset):
        for indices in batches:
            yield dataset.__getitems__(indices)
        return
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    for batch in loader:
        yield as_batch(batch)


class MetaBatches:
    """Fresh random batches for the meta step taken after step ``step``: reproducible and resumable.

    The n-th draw of a split is seeded by (seed, step, split, n), so a method that takes its training
    and validation losses from two ``train`` draws gets two different batches, and every process
    draws the same global batch. Under several processes it is cut to a multiple of their number and
    each process takes an equal share (meta quantities are then plain means over processes).
    """

    SALTS: ClassVar[dict[str, int]] = {"train": 1, "aux": 2}

    def __init__(self, datasets: Mapping[str, Dataset], size: int, *, seed: int, step: int):
        self.datasets, self.size, self.seed, self.step = datasets, size, seed, step
        self.calls = dict.fromkeys(self.SALTS, 0)

    def draw(self, split: str) -> Batch:
        dataset = self.datasets[split]
        salt = self.SALTS[split] + 1_000 * self.calls[split]  # the first draw is what it always was
        self.calls[split] += 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 7 + salt)
        n = len(dataset)  # type: ignore[arg-type]
        size = min(self.size, n)
        indices = torch.randperm(n, generator=generator)[:size].tolist()
        world = world_size()
        if world > 1:
            if size < world:
                raise ValueError(f"the {split!r} split has {n} samples, fewer than the {world} processes")
            size -= size % world
            indices = indices[slice(*shard_bounds(size))]
        if hasattr(dataset, "__getitems__"):
            return as_batch(dataset.__getitems__(indices))
        return as_batch(default_collate([dataset[i] for i in indices]))


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = False) -> int:
    n = len(dataset)  # type: ignore[arg-type]
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_length(batch: Batch) -> int:
    """The number of samples in a batch (of its targets; of its inputs when it has none)."""
    inputs, targets, _ = batch
    first = next(iter(targets.values()), None)
    return len(first) if first is not None else len(inputs)


def to_device(batch: Batch, device: torch.device) -> Batch:
    inputs, targets, masks = batch

    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, Mapping):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        return x

    return move(inputs), move(targets), move(masks)
