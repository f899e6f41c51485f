"""Tasks: what a model predicts, how it is scored, and which one matters.

A :class:`Task` owns its loss and metrics; a :class:`TaskSet` owns the rule that exactly one task is
primary and checks every loss dictionary a method receives, so a typo or a NaN is reported by task
name instead of surfacing as a silent wrong update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Role = Literal["primary", "auxiliary"]
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
REDUCTIONS = ("mean", "sample", "none")


class TaskError(ValueError):
    """A malformed task set-up or a loss dictionary that does not match the tasks."""


class NonFiniteLossError(FloatingPointError):
    """A task's loss (or the update built from it) is NaN or infinite."""

    def __init__(self, task: str, message: str | None = None):
        self.task = task
        super().__init__(message or f"task {task!r}: loss is not finite")


class Metric(Protocol):
    """Accumulates over batches; ``compute`` gives the split-level value."""

    def reset(self) -> None: ...

    def update(self, output: Tensor, target: Tensor) -> None: ...

    def compute(self) -> float: ...


class MeanMetric:
    """Mean of a per-sample score (accuracy, squared error, ...) over every labelled sample."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        values = self.fn(output, target).detach().float()
        self.total += float(values.sum())
        self.count += values.numel()

    def compute(self) -> float:
        return self.total / self.count if self.count else math.nan


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    return (output.argmax(dim=1) == target).float()


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).reshape(len(output), -1).mean(dim=1)


def absolute_error(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).abs().reshape(len(output), -1).mean(dim=1)


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target.to(output.dtype), reduction="none")


@dataclass(frozen=True)
class Task:
    """One prediction target.

    ``loss(output, target)`` must return *unreduced* losses, one entry per sample (or per pixel); the
    task reduces them, so that masking of unlabelled samples and the per-sample losses some methods
    need live in one place. ``metrics`` maps a metric name to a factory of fresh :class:`Metric`s
    (or to a per-sample function, averaged over samples). ``higher_is_better`` applies to the first
    metric, which is the task's headline number.
    """

    name: str
    loss: PerSampleLoss
    role: Role = "auxiliary"
    metrics: Mapping[str, Callable[..., object]] = field(default_factory=dict)
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"task name must be a non-empty string, got {self.name!r}")
        if self.role not in ("primary", "auxiliary"):
            raise TaskError(f"task {self.name!r}: role must be 'primary' or 'auxiliary', got {self.role!r}")
        if not callable(self.loss):
            raise TaskError(f"task {self.name!r}: loss must be callable")

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    @classmethod
    def classification(cls, name: str, role: Role = "auxiliary") -> Task:
        return cls(name, cross_entropy, role, {"accuracy": accuracy}, higher_is_better=True)

    @classmethod
    def regression(cls, name: str, role: Role = "auxiliary") -> Task:
        return cls(name, mse, role, {"mse": squared_error, "mae": absolute_error})

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss with shape checks that name this task."""
        if output.shape[:1] != target.shape[:1]:
            raise TaskError(
                f"task {self.name!r}: output has batch size {output.shape[0] if output.dim() else 'none'} "
                f"but target has {target.shape[0] if target.dim() else 'none'} "
                f"(output shape {tuple(output.shape)}, target shape {tuple(target.shape)})"
            )
        try:
            losses = self.loss(output, target)
        except (RuntimeError, ValueError, IndexError) as error:
            raise TaskError(
                f"task {self.name!r}: loss failed on output shape {tuple(output.shape)} and target "
                f"shape {tuple(target.shape)}: {error}"
            ) from error
        if losses.dim() == 0 or losses.shape[0] != output.shape[0]:
            raise TaskError(
                f"task {self.name!r}: loss must return one value per sample (shape ({output.shape[0]}, ...)), "
                f"got shape {tuple(losses.shape)}; use reduction='none'"
            )
        return losses

    def compute_loss(
        self, output: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        """Mean loss over the labelled samples; 0 (still on the graph) when none is labelled.

        ``reduction="sample"`` returns the (B,) per-sample losses and ``"none"`` the loss function's
        own unreduced shape (B, ...), e.g. per pixel, for methods that combine losses sample- or
        pixel-wise. There, unlabelled samples are 0 and labelled ones are scaled by B / labelled,
        so that the plain mean of either equals the ``"mean"`` loss.
        """
        if reduction not in REDUCTIONS:
            raise TaskError(f"task {self.name!r}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        losses = self.per_sample_loss(output, target)
        per_sample = losses.reshape(losses.shape[0], -1).mean(dim=1)
        if mask is None:
            if reduction == "mean":
                return per_sample.mean()
            return per_sample if reduction == "sample" else losses
        mask = self._check_mask(mask, per_sample)
        labelled = mask.sum()
        if reduction == "mean":
            return (per_sample * mask).sum() / labelled.clamp(min=1)
        scale = mask * (mask.numel() / labelled.clamp(min=1))
        if reduction == "sample":
            return per_sample * scale
        return losses * scale.view(-1, *([1] * (losses.dim() - 1)))

    def new_metrics(self) -> dict[str, Metric]:
        made: dict[str, Metric] = {}
        for metric_name, factory in self.metrics.items():
            made[metric_name] = _make_metric(factory)
        return made

    def _check_mask(self, mask: Tensor, per_sample: Tensor) -> Tensor:
        if mask.shape != per_sample.shape:
            raise TaskError(
                f"task {self.name!r}: mask shape {tuple(mask.shape)} does not match batch size "
                f"{per_sample.shape[0]}"
            )
        return mask.to(per_sample.dtype)


def _make_metric(factory: Callable[..., object]) -> Metric:
    if isinstance(factory, type):
        return factory()  # type: ignore[return-value]
    return MeanMetric(factory)  # type: ignore[arg-type]


class TaskSet(Sequence[Task]):
    """An ordered set of tasks with exactly one primary, which always comes first.

    Row 0 of every Jacobian and entry 0 of every weight vector is the primary task; the auxiliary
    tasks follow in the order given.
    """

    def __init__(self, tasks: Iterable[Task | str], primary: str | None = None):
        items = [self._as_task(t, primary) for t in tasks]
        if not items:
            raise TaskError("no tasks given")
        names = [t.name for t in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TaskError(f"duplicate task names: {duplicates}")
        if primary is not None:
            if primary not in names:
                raise TaskError(f"primary task {primary!r} is not among the tasks {names}")
            items = [t if (t.name == primary) == t.is_primary else _with_role(t, primary) for t in items]
        primaries = [t.name for t in items if t.is_primary]
        if not primaries:
            raise TaskError(f"no primary task among {names}: mark exactly one with role='primary'")
        if len(primaries) > 1:
            raise TaskError(f"more than one primary task: {primaries}; exactly one is allowed")
        self._tasks = tuple(sorted(items, key=lambda t: not t.is_primary))

    @staticmethod
    def _as_task(task: Task | str, primary: str | None) -> Task:
        if isinstance(task, Task):
            return task
        if isinstance(task, str):
            role: Role = "primary" if task == primary else "auxiliary"
            return Task(task, mse, role)
        raise TaskError(f"expected a Task or a task name, got {type(task).__name__}")

    def __getitem__(self, index):  # type: ignore[override]
        return self._tasks[index]

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __repr__(self) -> str:
        return f"TaskSet({', '.join(t.name + ('*' if t.is_primary else '') for t in self._tasks)})"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    @property
    def primary(self) -> Task:
        return self._tasks[0]

    @property
    def auxiliary(self) -> tuple[Task, ...]:
        return self._tasks[1:]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def get(self, name: str) -> Task:
        for task in self._tasks:
            if task.name == name:
                return task
        raise TaskError(f"unknown task {name!r}; known tasks: {self.names}")

    def ordered(
        self, losses: Mapping[str, Tensor], *, check_finite: bool = True, scalar: bool = True
    ) -> list[Tensor]:
        """The losses as a list in task order, after checking names, shapes and finiteness.

        ``scalar=False`` accepts unreduced losses of any shape (checked element-wise)."""
        unknown = [name for name in losses if name not in self.names]
        if unknown:
            raise TaskError(f"unknown task {unknown[0]!r} in losses; known tasks: {self.names}")
        missing = [name for name in self.names if name not in losses]
        if missing:
            raise TaskError(f"no loss given for task {missing[0]!r}; every task needs one")
        ordered = []
        for name in self.names:
            loss = losses[name]
            if not isinstance(loss, Tensor):
                raise TaskError(f"task {name!r}: loss must be a tensor, got {type(loss).__name__}")
            if not scalar:
                ordered.append(loss)
                continue
            if loss.numel() != 1:
                raise TaskError(
                    f"task {name!r}: loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first"
                )
            ordered.append(loss.reshape(()))
        if check_finite and not scalar:
            for name, loss in zip(self.names, ordered):
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise NonFiniteLossError(name, f"task {name!r}: loss has non-finite entries")
        elif check_finite:
            finite = torch.isfinite(torch.stack([loss.detach() for loss in ordered]).float())
            if not bool(finite.all()):
                k = int((~finite).nonzero()[0])
                name = self.names[k]
                raise NonFiniteLossError(name, f"task {name!r}: loss is {float(ordered[k].detach()):g}")
        return ordered


def _with_role(task: Task, primary: str) -> Task:
    from dataclasses import replace

    return replace(task, role="primary" if task.name == primary else "auxiliary")
