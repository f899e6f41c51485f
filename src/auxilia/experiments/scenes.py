"""Dense prediction on procedurally rendered scenes: the stand-in for NYUv2 (see :mod:`auxilia.data.scenes`).

Primary task semantic segmentation (4 classes: floor, wall, box, sphere; mIoU), auxiliary tasks
depth (L1) and surface normals (cosine): the pairing of AuxiLearn's, AuxiNash's and Aux-NAS's NYUv2
experiments. ``primary`` and ``auxiliaries`` choose another pairing (Aux-NAS also reports normals
as the primary task). Labels are exact, so differences between methods are not label noise.

Model: a U-Net-shaped encoder-decoder (:class:`~auxilia.models.dense.DenseEncoderDecoder`, widths
``widths``) shared by every task and one pixel head per task. Adam lr 1e-3, batch 32, 30 epochs at
budget 1 on 2,000 training scenes of 64 x 64; ``aux`` 100, ``val`` 300, ``test`` 500 scenes, all
disjoint (scene generation seed 0, fixed across runs; the run's seed sets the model's
initialization and the data order). ``size``, ``train_size`` and ``widths`` shrink it for CPU runs.

``arch`` (``auxilia run scenes --arch NAME``) swaps the U-Net for a chain encoder-decoder of the same
widths (:func:`~auxilia.architectures.dense_architecture`): ``shared`` (one chain for every task,
Aux-Head), ``aux-g-stage``, ``aux-g-layer`` or ``aux-nas`` (one chain per task, fused); ``backbone``
``token`` uses transformer blocks instead; ``arch_options`` are passed to
:class:`~auxilia.architectures.AuxNAS` (e.g. ``{"arch_lr": 0.1, "window": 2}``). Runs with an ``arch``
record the learned α as ``alpha/...`` metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..architectures import alpha_metrics, dense_architecture
from ..data import SCENE_CLASSES, load_scenes
from ..dense_tasks import DENSE_TASKS
from ..models import dense_model
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register

SPLIT_SIZES = {"aux": 100, "val": 300, "test": 500}


def _tasks(primary: str, auxiliaries: Sequence[str]) -> list:
    names = [primary, *auxiliaries]
    unknown = [n for n in names if n not in DENSE_TASKS]
    if unknown:
        raise ValueError(f"scenes: unknown task {unknown[0]!r}; tasks are {sorted(DENSE_TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"scenes: a task appears twice in primary={primary!r}, auxiliaries={list(auxiliaries)}")
    return [DENSE_TASKS[primary](primary, role="primary"), *(DENSE_TASKS[n](n) for n in auxiliaries)]


def build(
    seed: int,
    data_dir: str | Path | None = None,
    budget: float = 1.0,
    primary: str = "segmentation",
    auxiliaries: Sequence[str] = ("depth", "normals"),
    size: int = 64,
    train_size: int = 2000,
    widths: Sequence[int] = (32, 64, 128),
    arch: str | None = None,
    backbone: str = "conv",
    arch_options: Mapping[str, Any] | None = None,
) -> Setup:
    tasks = _tasks(primary, auxiliaries)
    if train_size < 1:
        raise ValueError(f"scenes: train_size must be positive, got {train_size}")
    datasets = load_scenes({"train": train_size, **SPLIT_SIZES}, seed=0, size=size)
    torch.manual_seed(seed)
    if arch is None:
        model = dense_model(len(SCENE_CLASSES), [t.name for t in tasks], widths=tuple(widths))
    else:  # a chain backbone: shared by the tasks, or one branch per task (Aux-G, Aux-NAS)
        model = dense_architecture(arch, [t.name for t in tasks], len(SCENE_CLASSES), widths=tuple(widths),
                                   backbone=backbone, image_size=size, **dict(arch_options or {}))
    return Setup(
        model=model,
        tasks=tasks,
        datasets=datasets,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        config=TrainerConfig(epochs=max(1, round(30 * budget)), batch_size=32, eval_batch_size=100, seed=seed),
        metrics_fn=alpha_metrics if arch is not None else None,
        notes=(f"scenes {size}x{size}, {train_size} train / 100 aux / 300 val / 500 test; encoder-decoder widths "
               f"{tuple(widths)}; Adam 1e-3, batch 32, 30 epochs at budget 1"
               + (f"; architecture {arch} ({backbone} chain backbone)" if arch is not None else "")),
    )


EXPERIMENT = register(Experiment(
    name="scenes",
    description="rendered scenes: segmentation (primary), depth and normals (auxiliary); encoder-decoder",
    build=build,
    report_metrics=("segmentation/pixel_accuracy", "depth/abs_err", "normals/angle_err"),
))
