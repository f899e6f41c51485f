"""MovieLens-100K rating regression with AutoInt, the auxiliary "task" an L2 penalty (MAOAL).

ML-100K stands in for ML-1M (not available here; its loader exists). The auxiliary loss is the mean
squared value of the shared encoder's parameters, so a method's weight on it is a learned
regularization strength (per module, for MAOAL). Adam lr 1e-3, batch 256, 20 epochs at budget 1.
Splits (seeded 0, fixed across runs): 80% train, 2% aux, 8% val, 10% test.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import load_movielens_100k
from ..models import MultiTaskModel, Squeeze, autoint_encoder, mlp_head
from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register


def _identity_loss(output: Tensor, target: Tensor) -> Tensor:
    return output


class WithPenaltyTask(MultiTaskModel):
    """Adds task ``l2``: the mean squared shared parameter, repeated per sample (so masks and
    per-sample losses work as for any task)."""

    def forward_with_representation(self, x):
        representation, outputs = super().forward_with_representation(x)
        shared = self.shared_parameters()
        penalty = sum(p.pow(2).sum() for p in shared) / sum(p.numel() for p in shared)
        outputs["l2"] = penalty.expand(representation.shape[0])
        return representation, outputs


def build(seed: int, data_dir: str | Path | None = None, budget: float = 1.0) -> Setup:
    data = load_movielens_100k(data_dir, seed=0)
    datasets = {
        name: TaskDataset(data.fields[idx], {"rating": data.ratings[idx], "l2": torch.zeros(len(idx))})
        for name, idx in data.splits.items()
    }
    torch.manual_seed(seed)
    width = 16 * data.fields.shape[1]
    model = WithPenaltyTask(autoint_encoder(data.num_embeddings), {"rating": nn.Sequential(mlp_head(width, 1), Squeeze())})
    tasks = [Task.regression("rating", role="primary"), Task("l2", _identity_loss)]
    return Setup(
        model=model, tasks=tasks, datasets=datasets,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        config=TrainerConfig(epochs=max(1, round(20 * budget)), batch_size=256, seed=seed),
        method_defaults={"maoal": {"meta_every": 20, "look_back": 3, "upper": "sgd", "upper_lr": 1e-3, "upper_momentum": 0.9}},
        notes="ML-100K; AutoInt (16-dim, 4 blocks x 4 heads); Adam 1e-3, batch 256, 20 epochs at budget 1",
    )


EXPERIMENT = register(Experiment(
    name="movielens", description="MovieLens-100K ratings (AutoInt) with an L2-penalty auxiliary",
    build=build, needs_data=True,
))
