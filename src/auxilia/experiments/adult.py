"""Adult: predict income (primary) with five other census columns as auxiliary tasks.

Auxiliaries: relationship, marital status and occupation (classification), age and weekly hours
(regression, standardized); each is removed from the inputs. A small, CPU-fast setting with many
auxiliaries of mixed usefulness. MLP (256, 128) shared, linear heads; Adam lr 1e-3, batch 256,
10 epochs at budget 1. Splits (seeded 0, fixed across runs): 60% train, 5% aux, 15% val, 20% test.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data import load_adult
from ..models import MultiTaskModel, Squeeze, mlp_encoder
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register

AUXILIARY = ("relationship", "marital-status", "occupation", "age", "hours-per-week")


def build(seed: int, data_dir: str | Path | None = None, budget: float = 1.0) -> Setup:
    data = load_adult(data_dir, auxiliary=AUXILIARY, seed=0)
    datasets = {
        name: TaskDataset(data.inputs[idx], {t: v[idx] for t, v in data.targets.items()})
        for name, idx in data.splits.items()
    }
    torch.manual_seed(seed)
    tasks = [Task.classification("income", role="primary")]
    heads: dict[str, nn.Module] = {"income": nn.Linear(128, 2)}
    for column in AUXILIARY:
        if data.classes[column]:
            tasks.append(Task.classification(column))
            heads[column] = nn.Linear(128, len(data.classes[column]))
        else:
            tasks.append(Task.regression(column))
            heads[column] = nn.Sequential(nn.Linear(128, 1), Squeeze())
    model = MultiTaskModel(mlp_encoder(data.inputs.shape[1], (256, 128)), heads)
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        config=TrainerConfig(epochs=max(1, round(10 * budget)), batch_size=256, seed=seed),
        notes="Adult; MLP (256, 128); Adam 1e-3, batch 256, 10 epochs at budget 1",
    )


EXPERIMENT = register(Experiment(
    name="adult", description="census income (primary) with five other columns as auxiliaries; MLP",
    build=build, needs_data=True,
))
