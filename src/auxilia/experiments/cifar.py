"""CIFAR-10 with self-supervised auxiliary tasks.

``cifar10-rotation`` (MAOAL): class (primary) and rotation prediction on every image; MAOAL's 4-layer
ConvNet; SGD lr 0.01 momentum 0.9 with cosine decay, batch 256, 200 epochs at budget 1; the ``aux``
("developing") split is 1,000 training images.

``cifar10-ssl`` (AuxiNash): only ``labels`` (5,000 or 10,000, class-balanced) training images keep
their class label; the auxiliary tasks are label-free and use every training image: rotation
prediction and colour-channel-permutation prediction (which of the 6 orders of R, G, B was applied —
a cheap pretext task that needs colour statistics, chosen as the second self-supervised auxiliary).
ResNet-18 (``backbone="resnet18"``) or MAOAL's ConvNet (``"convnet"``, for CPU runs); SGD momentum
0.9 weight decay 5e-4 with cosine decay, batch 128, 100 epochs at budget 1; lr 0.05 for ResNet-18
(AuxiNash's setting) and 0.01 for the ConvNet (MAOAL's setting for it: at 0.05 the ConvNet with
half its batch unlabelled stays at chance).

Both: 45,000 train / 1,000 aux / 4,000 val from CIFAR-10's training set (seed 0, fixed across runs),
test = CIFAR-10's test set. ``train_size`` subsamples the training split for CPU runs; ``eval_size``
keeps only that many images of val and test, for smoke tests (a reported result leaves it unset).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data import balanced_subset, channel_permutation, load_cifar10, split_indices
from ..models import SelfSupervisedViews, maoal_convnet, resnet18_cifar
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register


def _cosine(optimizer, total: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total, 1))


def _splits(data_dir, train_size: int | None, eval_size: int | None = None):
    x, y = load_cifar10(data_dir, "train")
    x_test, y_test = load_cifar10(data_dir, "test")
    splits = split_indices(len(x), {"val": 4_000, "aux": 1_000, "train": -1}, seed=0)
    for name, size in (("train_size", train_size), ("eval_size", eval_size)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be a positive number of images, got {size}")
    if train_size is not None:
        splits["train"] = splits["train"][:train_size]
    if eval_size is not None:  # smoke runs only: the protocol evaluates on all of val and test
        splits["val"] = splits["val"][:eval_size]  # already in random order
        # the test files are sorted by class: keep a random subset (the same for every run)
        keep = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:eval_size]
        x_test, y_test = x_test[keep], y_test[keep]
    return x, y, x_test, y_test, splits


def _encoder(backbone: str) -> tuple[nn.Module, int]:
    if backbone == "convnet":
        return maoal_convnet(), 32 * 8 * 8
    if backbone == "resnet18":
        return resnet18_cifar(), 512
    raise ValueError(f"backbone must be 'convnet' or 'resnet18', got {backbone!r}")


def build_rotation(
    seed: int, data_dir: str | Path | None = None, budget: float = 1.0,
    train_size: int | None = None, eval_size: int | None = None,
) -> Setup:
    x, y, x_test, y_test, splits = _splits(data_dir, train_size, eval_size)

    def dataset(images, labels):
        return TaskDataset(images, {"label": labels, "rotation": torch.arange(4).expand(len(labels), 4)})

    datasets = {name: dataset(x[idx], y[idx]) for name, idx in splits.items()}
    datasets["test"] = dataset(x_test, y_test)
    torch.manual_seed(seed)
    encoder, width = _encoder("convnet")
    model = SelfSupervisedViews(encoder, {"label": nn.Linear(width, 10), "rotation": nn.Linear(width, 4)}, "label")
    tasks = [Task.classification("label", role="primary"), Task.classification("rotation")]
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9), scheduler=_cosine,
        config=TrainerConfig(epochs=max(1, round(200 * budget)), batch_size=256, eval_batch_size=500, seed=seed),
        method_defaults={"maoal": {"meta_every": 20, "look_back": 3, "upper": "adam", "upper_lr": 1e-2}},
        notes=f"MAOAL ConvNet; SGD 0.01 m0.9 cosine, batch 256, {max(1, round(200 * budget))} epochs; train_size={train_size}, eval_size={eval_size}",
    )


def build_ssl(
    seed: int, data_dir: str | Path | None = None, budget: float = 1.0,
    labels: int = 5000, backbone: str = "resnet18", train_size: int | None = None, eval_size: int | None = None,
) -> Setup:
    x, y, x_test, y_test, splits = _splits(data_dir, train_size, eval_size)
    train = splits["train"]
    labelled = balanced_subset(y[train], labels, seed=0) if labels < len(train) else torch.arange(len(train))
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[labelled] = True

    def dataset(images, targets, label_mask=None):
        permutation = torch.randint(0, 6, (len(images),), generator=torch.Generator().manual_seed(len(images)))
        pairs = torch.stack([images, channel_permutation(images, permutation)], dim=1)
        masks = {"label": label_mask} if label_mask is not None else None
        return TaskDataset(pairs, {"label": targets, "rotation": torch.arange(4).expand(len(targets), 4),
                                   "colour": permutation}, masks)

    datasets = {"train": dataset(x[train], y[train], mask)}
    for name in ("aux", "val"):
        datasets[name] = dataset(x[splits[name]], y[splits[name]])
    datasets["test"] = dataset(x_test, y_test)
    torch.manual_seed(seed)
    encoder, width = _encoder(backbone)
    heads = {"label": nn.Linear(width, 10), "rotation": nn.Linear(width, 4), "colour": nn.Linear(width, 6)}
    model = SelfSupervisedViews(encoder, heads, "label")
    tasks = [Task.classification("label", role="primary"), Task.classification("rotation"), Task.classification("colour")]
    epochs = max(1, round(100 * budget))
    lr = 0.05 if backbone == "resnet18" else 0.01
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4), scheduler=_cosine,
        config=TrainerConfig(epochs=epochs, batch_size=128, eval_batch_size=500, seed=seed),
        notes=f"{labels} labels, {backbone}; SGD {lr} m0.9 wd5e-4 cosine, batch 128, {epochs} epochs; train_size={train_size}, eval_size={eval_size}",
    )


ROTATION = register(Experiment(
    name="cifar10-rotation", description="CIFAR-10 classification with rotation prediction; MAOAL's ConvNet",
    build=build_rotation, needs_data=True,
))
SSL = register(Experiment(
    name="cifar10-ssl", description="CIFAR-10 with 5K/10K labels; rotation and colour-permutation auxiliaries",
    build=build_ssl, needs_data=True,
))
