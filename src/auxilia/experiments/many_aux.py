"""``many-aux``: few-shot digit classification with many binary attribute tasks, a stand-in for
AuxiLearn's CUB-200 setting (species from 5 or 10 images per class, 312 binary attributes).

CUB's attributes are per-image binary annotations ("has_bill_shape::hooked", ...) that mostly
describe the species but disagree with the species' typical value on many images, and some of them
are hardly related to the species at all. This experiment builds the same structure on MNIST, the
only real image data here with enough classes to draw few-shot sets from:

* ``informative`` attributes: a fixed random binary table gives every digit class a value per
  attribute (seed 0, fixed across runs); each image's attribute is its class's value flipped with
  probability ``flip`` (annotation noise);
* ``noise`` attributes: independent fair coins per image, unrelated to the digit (tasks that can
  only be memorized, so they hurt when weighted like the others).

Each run draws ``shots`` labelled training images per class (seeded by the run's seed, so the
methods of one seed see the same images); ``aux_shots`` of them are held out as the ``aux`` split,
so every method trains on ``shots - aux_shots`` images per class and no method sees more labels than
another. ``val``: 100 images per class from the rest of MNIST's training set (model selection);
``test``: MNIST's 10,000 test images. Every image carries every attribute.

LeNet encoder; a LeNet head for the digit, a linear 2-way head per attribute. Adam lr 1e-3,
batch 20, 100 epochs at budget 1; AuxiLearn takes a meta step every 10 steps.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data import load_mnist
from ..models import MultiTaskModel, lenet_encoder, lenet_head
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register

CLASSES = 10


def attributes(labels: torch.Tensor, informative: int, noise: int, flip: float, generator: torch.Generator) -> torch.Tensor:
    """(N, informative + noise) binary attributes: noisy class-level values, then pure noise."""
    table = torch.randint(0, 2, (CLASSES, informative), generator=torch.Generator().manual_seed(0))
    values = table[labels]
    flips = torch.rand(values.shape, generator=generator) < flip
    values = values ^ flips.long()
    coins = torch.randint(0, 2, (len(labels), noise), generator=generator)
    return torch.cat([values, coins], dim=1)


def _few_shot(labels: torch.Tensor, per_class: int, generator: torch.Generator, exclude: torch.Tensor) -> torch.Tensor:
    chosen = []
    for c in range(CLASSES):
        pool = torch.nonzero((labels == c) & ~exclude).flatten()
        chosen.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
    return torch.cat(chosen)


def build(
    seed: int, data_dir: str | Path | None = None, budget: float = 1.0,
    shots: int = 5, aux_shots: int = 1, informative: int = 30, noise: int = 10, flip: float = 0.2,
) -> Setup:
    if not (isinstance(shots, int) and isinstance(aux_shots, int) and 0 < aux_shots < shots):
        raise ValueError(f"need 0 < aux_shots < shots, got shots={shots}, aux_shots={aux_shots}")
    if informative < 0 or noise < 0 or informative + noise < 1:
        raise ValueError(f"need at least one attribute, got informative={informative}, noise={noise}")
    if not 0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip}")
    x, y = load_mnist(data_dir, "train")
    x_test, y_test = load_mnist(data_dir, "test")
    g = torch.Generator().manual_seed(1_000 + seed)
    used = torch.zeros(len(y), dtype=torch.bool)
    val = _few_shot(y, 100, torch.Generator().manual_seed(0), used)  # fixed across runs
    used[val] = True
    labelled = _few_shot(y, shots, g, used).view(CLASSES, shots)
    splits = {"train": labelled[:, aux_shots:].reshape(-1), "aux": labelled[:, :aux_shots].reshape(-1), "val": val}
    names = [f"attr{j:02d}" for j in range(informative + noise)]

    def dataset(images, labels, gen):
        attrs = attributes(labels, informative, noise, flip, gen)
        targets = {"digit": labels, **{n: attrs[:, j] for j, n in enumerate(names)}}
        return TaskDataset(images.unsqueeze(1).float() / 255.0, targets)

    datasets = {name: dataset(x[idx], y[idx], g) for name, idx in splits.items()}
    datasets["test"] = dataset(x_test, y_test, g)
    torch.manual_seed(seed)
    heads: dict[str, nn.Module] = {"digit": lenet_head(CLASSES), **{n: nn.Linear(50, 2) for n in names}}
    model = MultiTaskModel(lenet_encoder(), heads)
    tasks = [Task.classification("digit", role="primary"), *(Task.classification(n) for n in names)]
    epochs = max(1, round(100 * budget))
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        config=TrainerConfig(epochs=epochs, batch_size=20, eval_batch_size=2000, seed=seed),
        method_defaults={"auxilearn": {"meta_every": 10}},
        notes=(f"MNIST {shots}-shot ({aux_shots}/class as aux), {informative} informative (flip {flip}) + {noise} noise "
               f"binary attributes; LeNet; Adam 1e-3, batch 20, {epochs} epochs"),
    )


EXPERIMENT = register(Experiment(
    name="many-aux",
    description="few-shot MNIST with many binary attribute auxiliaries (a stand-in for CUB's 312 attributes)",
    build=build, needs_data=True,
))
