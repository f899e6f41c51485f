"""Multi-MNIST: classify the up-left digit (primary) with the down-right digit as the auxiliary task.

LeNet-style shared encoder and one head per digit (MGDA / Nash-MTL / AuxiNash). Data: Multi-MNIST
generated from MNIST's training images (generation seed 0, fixed across runs), split 50k train / 1k
aux / 9k val; test from MNIST's test images. Adam lr 1e-3, batch 256, 10 epochs at budget 1.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..data import load_multi_mnist, split_indices
from ..models import MultiTaskModel, lenet_encoder, lenet_head
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register


def build(seed: int, data_dir: str | Path | None = None, budget: float = 1.0) -> Setup:
    x, left, right = load_multi_mnist(data_dir, "train", seed=0)
    x_test, left_test, right_test = load_multi_mnist(data_dir, "test", seed=0)
    splits = split_indices(len(x), {"train": 50_000, "aux": 1_000, "val": -1}, seed=0)
    datasets = {name: TaskDataset(x[idx], {"left": left[idx], "right": right[idx]}) for name, idx in splits.items()}
    datasets["test"] = TaskDataset(x_test, {"left": left_test, "right": right_test})
    torch.manual_seed(seed)
    tasks = [Task.classification("left", role="primary"), Task.classification("right")]
    model = MultiTaskModel(lenet_encoder(), {"left": lenet_head(), "right": lenet_head()})
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        config=TrainerConfig(epochs=max(1, round(10 * budget)), batch_size=256, seed=seed),
        notes="Multi-MNIST generated from MNIST (seed 0); Adam 1e-3, batch 256, 10 epochs at budget 1",
    )


EXPERIMENT = register(Experiment(
    name="multimnist", description="two overlaid MNIST digits: left (primary), right (auxiliary); LeNet",
    build=build, needs_data=True,
))
