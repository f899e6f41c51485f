"""What an experiment is: data, model, tasks and training defaults, built from a seed.

An experiment never names a method: the runner combines any registered method with any experiment.
Per-method defaults (e.g. MAOAL's upper learning rate for this data) go in ``method_defaults``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..tasks import Task
from ..training.trainer import OptimizerFactory, SchedulerFactory, TrainerConfig


@dataclass
class Setup:
    """Everything one run of an experiment needs, freshly built for one seed."""

    model: nn.Module
    tasks: list[Task]
    datasets: Mapping[str, Dataset]
    optimizer: OptimizerFactory
    config: TrainerConfig
    scheduler: SchedulerFactory | None = None
    metrics_fn: Callable[[nn.Module], Mapping[str, float]] | None = None
    method_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    notes: str = ""


Builder = Callable[..., Setup]


@dataclass(frozen=True)
class Experiment:
    """A named experiment. ``build(seed=, data_dir=, budget=)`` returns a fresh :class:`Setup`;
    ``budget`` scales the training length (1 = the documented protocol)."""

    name: str
    description: str
    build: Builder
    report_metrics: tuple[str, ...] = ()
    needs_data: bool = False

    def options(self) -> dict[str, Any]:
        """The experiment's own options (beyond seed, data_dir and budget) with their defaults."""
        signature = inspect.signature(self.build)
        return {p.name: p.default for p in signature.parameters.values() if p.name not in ("seed", "data_dir", "budget")}

    def setup(self, seed: int, data_dir: str | Path | None = None, budget: float = 1.0, **options: Any) -> Setup:
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            accepted = ", ".join(f"{k}={v!r}" for k, v in self.options().items()) or "none"
            raise ValueError(f"experiment {self.name!r} has no option {unknown[0]!r}; it accepts: {accepted}")
        return self.build(seed=seed, data_dir=data_dir, budget=budget, **options)


_EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    if experiment.name in _EXPERIMENTS:
        raise ValueError(f"experiment {experiment.name!r} is already registered")
    _EXPERIMENTS[experiment.name] = experiment
    return experiment


def available() -> list[str]:
    return sorted(_EXPERIMENTS)


def get(name: str) -> Experiment:
    try:
        return _EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(available())}") from None
