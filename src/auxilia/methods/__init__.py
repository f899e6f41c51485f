"""Every method behind one registry: ``available()``, ``create(name, tasks=..., primary=..., **hp)``."""

from . import (  # noqa: F401  (registers the methods)
    aggregation,
    auxilearn,
    maoal,
    nash,
    weighting,
)
from .base import GradientAggregation, LossWeighting, Method
from .registry import available, create, get, hyperparameters, register

__all__ = [
    "GradientAggregation",
    "LossWeighting",
    "Method",
    "available",
    "create",
    "get",
    "hyperparameters",
    "register",
]
