"""Experiments ``auxilia run`` can reproduce; each registers itself by name."""

from . import toy  # noqa: F401  (registers the experiment)
from .base import Experiment, Setup, available, get, register

__all__ = ["Experiment", "Setup", "available", "get", "register"]
