"""Experiments ``auxilia run`` can reproduce; each registers itself by name."""

from . import adult, cifar, learned_aux, many_aux, movielens, multimnist, scenes, toy  # noqa: F401  (registers the experiments)
from .base import Experiment, Setup, UsageError, available, get, register

__all__ = ["Experiment", "Setup", "UsageError", "available", "get", "register"]
