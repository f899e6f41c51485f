"""The 2-D regression of AuxiLearn and AuxiNash: one helpful and one harmful auxiliary task.

All tasks share one linear map W ∈ R² (no bias, identity heads). The primary task has the right
weights W* = (1, 1) but noisy labels (σ = 5); the helpful auxiliary has the same W* and clean labels
(σ = 0.25); the harmful one clean labels of the wrong weights W̃ = (−1, −4). x ~ N(0, I), 1000
training samples. A method that leans on the helpful task and ignores the harmful one ends closer to
W* than the primary task alone can get; summing all losses lands between W* and W̃.

Splits: ``train`` 1000, ``aux`` 100 and ``val`` 200 (noisy labels, like train), ``test`` 1000 with
noise-free primary targets, so the test MSE measures the error of W itself.

Option ``main_labels`` (default 1000, every training sample): how many of the 1000 training samples
carry the primary label; the others are masked for the primary task (their primary targets are set
to 0 and never read), while both auxiliary tasks stay labelled on all 1000 — the low-data regime
auxiliary learning is meant for. The labelled samples are a random subset drawn from a generator of
its own (seeded by the seed), so the data of every split is the same for every ``main_labels`` and
the subsets are nested (the 50 labelled samples are among the 200). The held-out ``aux`` and ``val``
splits keep their noisy primary labels but are cut to at most ``main_labels`` samples each (their
first ``min(100, main_labels)`` and ``min(200, main_labels)``): the user holds out no more labelled
data than they train on. ``test`` is unchanged. At the default nothing is masked or cut. Below 1000
labels, AuxiNash's method defaults are those chosen on ``val`` for this regime (``LOW_DATA_DEFAULTS``);
results in ``benchmarks/results/toy-low-data``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ..tasks import Task
from ..training.data import TaskDataset
from ..training.trainer import TrainerConfig
from .base import Experiment, Setup, register

W_STAR = (1.0, 1.0)
W_HARMFUL = (-1.0, -4.0)
TASKS = {"main": (W_STAR, 5.0), "helpful": (W_STAR, 0.25), "harmful": (W_HARMFUL, 0.25)}
SIZES = {"train": 1000, "aux": 100, "val": 200, "test": 1000}


class SharedLinear(nn.Module):
    """y = W x shared by every task; the heads are identities (no task-specific parameters)."""

    def __init__(self, task_names: list[str], in_features: int = 2):
        super().__init__()
        self.task_names = list(task_names)
        self.encoder = nn.Linear(in_features, 1, bias=False)

    def forward_with_representation(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        representation = self.encoder(x)
        prediction = representation.squeeze(-1)
        return representation, {name: prediction for name in self.task_names}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_representation(x)[1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[nn.Parameter]:
        return []


def make_split(n: int, generator: torch.Generator, noisy_primary: bool = True) -> TaskDataset:
    x = torch.randn(n, 2, generator=generator)
    targets = {}
    for name, (w, sigma) in TASKS.items():
        clean = x @ torch.tensor(w)
        noise = sigma * torch.randn(n, generator=generator)
        targets[name] = clean if (name == "main" and not noisy_primary) else clean + noise
    return TaskDataset(x, targets)


def w_dist(model: nn.Module) -> dict[str, float]:
    W = model.encoder.weight.detach().reshape(-1).cpu()
    return {"w_dist": float((W - torch.tensor(W_STAR)).norm())}


# 400 steps: a meta step every 5 gives AuxiLearn 80 combiner updates (every 50 would give 8)
# AuxiNash: at the official every-25 / lr 5e-3, 16 meta steps move p by < 0.2 in 400 steps.
# A meta step every step with lr 1 (the gradient of p is clipped to norm 1, Σp = 3) was the
# best on val main/mse of 30 settings (meta_source train/aux, hypergrad_every 1-25, meta_lr
# 0.01-1, 3 seeds each); lr 0.5 was within 0.02 of it.
FULL_DATA_DEFAULTS = {
    "auxilearn": {"meta_every": 5},
    "auxinash": {"hypergrad_every": 1, "meta_lr": 1.0, "meta_source": "train"},
}
# With main_labels below 1000: chosen on val main/mse (mean over main_labels 50 and 200 of the mean
# over seeds 100-102; benchmarks/results/toy-low-data/sweep.sh). AuxiLearn's full-data setting won
# again; AuxiNash takes L_V from `aux` (a `train` batch now holds ~2.5 primary labels at N=50).
LOW_DATA_DEFAULTS = {
    "auxilearn": {"meta_every": 5},
    "auxinash": {"hypergrad_every": 1, "meta_lr": 0.5, "meta_source": "aux"},
}


def primary_label_mask(seed: int, main_labels: int, n: int = SIZES["train"]) -> Tensor:
    """Which of the ``n`` training samples carry the primary label: ``main_labels`` of them, a
    random subset fixed by ``seed`` (a prefix of one permutation, so smaller subsets nest)."""
    if isinstance(main_labels, bool) or not isinstance(main_labels, int) or not 1 <= main_labels <= n:
        raise ValueError(f"toy: main_labels must be an integer in 1..{n}, got {main_labels!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 + seed))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:main_labels]] = True
    return mask


def held_out_sizes(main_labels: int) -> dict[str, int]:
    """``aux`` and ``val`` sizes: the defaults (100, 200), but never more than ``main_labels``."""
    return {split: min(SIZES[split], main_labels) for split in ("aux", "val")}


def limit_primary_labels(datasets: dict[str, TaskDataset], seed: int, main_labels: int) -> dict[str, TaskDataset]:
    """Mask all but ``main_labels`` primary labels of ``train``; cut ``aux`` and ``val`` to size."""
    mask = primary_label_mask(seed, main_labels)
    if bool(mask.all()):
        return datasets
    train = datasets["train"]
    targets = dict(train.targets)
    # unlabelled primary targets are zeroed: code that ignored the mask would be hurt, not helped
    targets["main"] = torch.where(mask, targets["main"], torch.zeros_like(targets["main"]))
    out = dict(datasets)
    out["train"] = TaskDataset(train.inputs, targets, {**train.masks, "main": mask})
    for split, size in held_out_sizes(main_labels).items():
        out[split] = datasets[split].subset(torch.arange(size))
    return out


def build(seed: int, data_dir: str | Path | None = None, budget: float = 1.0, main_labels: int = SIZES["train"]) -> Setup:
    generator = torch.Generator().manual_seed(10_000 + seed)
    datasets = {split: make_split(n, generator, noisy_primary=split != "test") for split, n in SIZES.items()}
    datasets = limit_primary_labels(datasets, seed, main_labels)
    torch.manual_seed(seed)
    tasks = [Task.regression("main", role="primary"), Task.regression("helpful"), Task.regression("harmful")]
    model = SharedLinear([t.name for t in tasks])
    config = TrainerConfig(epochs=max(1, round(20 * budget)), batch_size=50, seed=seed)
    notes = "x ~ N(0, I); SGD lr 0.02 momentum 0.9 cosine-annealed, batch 50, 20 epochs; test primary targets noise-free"
    low_data = main_labels < SIZES["train"]
    if low_data:
        sizes = held_out_sizes(main_labels)
        notes += f"; primary labels on {main_labels} of {SIZES['train']} train samples, aux {sizes['aux']}, val {sizes['val']}"
    return Setup(
        model=model,
        tasks=tasks,
        datasets=datasets,
        optimizer=partial(torch.optim.SGD, lr=0.02, momentum=0.9),
        scheduler=lambda optimizer, total: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total),
        config=config,
        metrics_fn=w_dist,
        notes=notes,
        method_defaults={k: dict(v) for k, v in (LOW_DATA_DEFAULTS if low_data else FULL_DATA_DEFAULTS).items()},
    )


EXPERIMENT = register(
    Experiment(
        name="toy",
        description="2-D linear regression, a helpful and a harmful auxiliary (AuxiLearn / AuxiNash)",
        build=build,
        report_metrics=("w_dist",),
    )
)
