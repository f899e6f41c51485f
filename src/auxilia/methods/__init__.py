"""Every method behind one registry: ``available()``, ``create(name, tasks=..., primary=..., **hp)``."""

from . import aggregation, nash, weighting  # noqa: F401  (registers the methods)
from . import auxilearn  # noqa: F401  (registers auxilearn)
from . import maoal  # noqa: F401  (registers maoal)
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
