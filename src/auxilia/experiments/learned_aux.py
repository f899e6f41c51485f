"""``learned-aux``: CIFAR-10 with an auxiliary task whose labels AuxiLearn's generator invents.

The primary network (MAOAL's ConvNet, or ResNet-18 with ``backbone="resnet18"``) has the 10-way
class head and a 10·ψ-way auxiliary head. A small CNN (two conv layers, global pooling) generates,
for every image, a soft label over the ψ sub-classes of its true class
(:mod:`auxilia.methods.label_generator`); ``auxilearn`` meta-learns it (and the linear weights of the
two losses) on the ``aux`` split. The generator is frozen for every other method, so ``equal``
trains the auxiliary head on the initial, random sub-class labels: the ablation "an auxiliary task
of the same shape, not learned".

Splits as in the other CIFAR-10 experiments: 45,000 train / 1,000 aux / 4,000 val from CIFAR-10's
training set (seed 0), test = CIFAR-10's test set; ``train_size`` keeps the first images of the
training split (the low-data regime where an auxiliary task matters most, and CPU runs) and
``eval_size`` the first images of the (randomly ordered) validation split; the test set is always
all of CIFAR-10's test images.
SGD lr 0.05 momentum 0.9 weight decay 5e-4, cosine decay, batch 128, 50 epochs at budget 1;
AuxiLearn with its official settings except a meta step every 20 steps.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..methods.label_generator import (
    LabelGenerator,
    LearnedAuxiliaryModel,
    learned_label_task,
    small_cnn,
)
from ..models import Normalize
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register
from .cifar import _cosine, _encoder, _splits

CLASSES = 10


def build(
    seed: int, data_dir: str | Path | None = None, budget: float = 1.0,
    psi: int = 5, backbone: str = "convnet", train_size: int | None = None, eval_size: int | None = None,
    meta_every: int = 20,
) -> Setup:
    x, y, x_test, y_test, splits = _splits(data_dir, train_size)
    if eval_size is not None:  # fewer validation images per epoch; the test set is always complete
        if eval_size < 1:
            raise ValueError(f"eval_size must be a positive number of images, got {eval_size}")
        splits["val"] = splits["val"][:eval_size]

    def dataset(images, labels):
        return TaskDataset(images, {"label": labels, "learned": labels})  # the generator's mask is the class

    datasets = {name: dataset(x[idx], y[idx]) for name, idx in splits.items()}
    datasets["test"] = dataset(x_test, y_test)
    torch.manual_seed(seed)
    encoder, width = _encoder(backbone)
    body, features = small_cnn(3, 16)
    generator = LabelGenerator(body, features, CLASSES, psi)
    model = LearnedAuxiliaryModel(encoder, width, CLASSES, generator, "label", "learned", normalize=Normalize())
    tasks = [Task.classification("label", role="primary"), learned_label_task("learned", CLASSES, psi)]
    epochs = max(1, round(50 * budget))
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4), scheduler=_cosine,
        config=TrainerConfig(epochs=epochs, batch_size=128, eval_batch_size=500, seed=seed),
        method_defaults={"auxilearn": {"label_generator": model.generator, "meta_every": meta_every}},
        notes=(f"learned auxiliary labels, psi={psi}, {backbone}; SGD 0.05 m0.9 wd5e-4 cosine, batch 128, "
               f"{epochs} epochs; train_size={train_size}; auxilearn meta step every {meta_every}"),
    )


EXPERIMENT = register(Experiment(
    name="learned-aux",
    description="CIFAR-10 with an auxiliary task of generated sub-class labels (AuxiLearn's label generator)",
    build=build, needs_data=True,
))
