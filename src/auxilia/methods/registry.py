"""Name -> method class. Methods register themselves; ``create`` validates hyperparameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..tasks import Task
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available under ``name``."""

    def decorate(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters a method accepts, with their defaults."""
    signature = inspect.signature(get(name).__init__)
    skipped = {"self", "tasks", "primary"}
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in skipped and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def create(name: str, tasks: Iterable[Task | str], primary: str | None = None, **hyperparameters_: Any) -> Method:
    """Build method ``name`` for ``tasks``; unknown hyperparameters are an error, not ignored."""
    cls = get(name)
    accepted = hyperparameters(name)
    unknown = sorted(set(hyperparameters_) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {unknown[0]!r}; it accepts: "
            f"{', '.join(f'{k}={v!r}' for k, v in accepted.items()) or 'none'}"
        )
    return cls(tasks, primary, **hyperparameters_)
