"""What an experiment is: data, model, tasks and training defaults, built from a seed.

An experiment never names a method: the runner combines any registered method with any experiment.
Per-method defaults (e.g. MAOAL's upper learning rate for this data) go in ``method_defaults``.

An experiment's options are the keyword parameters of its builder beyond ``seed``, ``data_dir`` and
``budget``; their defaults and type annotations are the declaration, checked by
:meth:`Experiment.check_options` before anything is built. :meth:`Experiment.setup` seeds every RNG
with the run's seed before it calls the builder, so nothing a builder draws depends on what ran
before it in the process.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..tasks import Task
from ..training.trainer import OptimizerFactory, SchedulerFactory, TrainerConfig, seed_everything


class UsageError(ValueError):
    """A user's choice (an option, a hyperparameter, a path) that is refused before any training;
    the command line prints it as one line and exits with status 2."""


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
        return {p.name: p.default for p in signature.parameters.values() if p.name not in _RUN_PARAMETERS}

    def option_types(self) -> dict[str, Any]:
        """The declared type of each option: the builder's annotation (``Any`` where it has none)."""
        hints = typing.get_type_hints(self.build)
        return {name: hints.get(name, Any) for name in self.options()}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse (:class:`UsageError`) an option this experiment does not declare or a value not
        of its declared type; the builder still checks what a type cannot say (e.g. a task name)."""
        declared = self.options()
        for name, value in options.items():
            if name not in declared:
                accepted = ", ".join(f"{k}={v!r}" for k, v in declared.items()) or "none"
                raise UsageError(f"experiment {self.name!r} has no option {name!r}; it accepts: {accepted}")
            hint = self.option_types()[name]
            if not _conforms(value, hint):
                raise UsageError(f"experiment {self.name!r}: option {name} must be {describe_type(hint)}, "
                                 f"got {value!r}")

    def setup(self, seed: int, data_dir: str | Path | None = None, budget: float = 1.0, **options: Any) -> Setup:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise UsageError(f"budget must be a positive number, got {budget!r}")
        self.check_options(options)
        seed_everything(seed)
        return self.build(seed=seed, data_dir=data_dir, budget=budget, **options)


_RUN_PARAMETERS = ("seed", "data_dir", "budget")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON-like ``value`` has the annotated type (unions, sequences and mappings of
    plain types); an annotation this cannot read accepts anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        key, item = args if len(args) == 2 else (Any, Any)
        return isinstance(value, Mapping) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe_type(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return "None" if hint is type(None) else hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


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
        raise UsageError(f"unknown experiment {name!r}; available: {', '.join(available())}") from None
