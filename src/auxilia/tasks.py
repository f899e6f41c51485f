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
TargetShape = Literal["same", "class_dim"]
TARGET_SHAPES = ("same", "class_dim")


class TaskError(ValueError):
    """A malformed task set-up or a loss dictionary that does not match the tasks."""


class NonFiniteLossError(FloatingPointError):
    """A task's loss (or the update built from it) is NaN or infinite."""

    def __init__(self, task: str, message: str | None = None):
        self.task = task
        super().__init__(message or f"task {task!r}: loss is not finite")


def without_class_dim(shape: torch.Size) -> tuple[int, ...]:
    """``shape`` without dim 1, where classification outputs keep their classes."""
    return tuple(shape[:1]) + tuple(shape[2:])


def check_target_shape(what: str, output: Tensor, target: Tensor, rule: TargetShape) -> None:
    """Refuse a target whose shape does not follow ``rule``, so that nothing downstream broadcasts.

    ``"same"``: target and output have the same shape. ``"class_dim"``: the target is the output's
    shape without its class dimension (dim 1) -- class indices -- or, for soft labels, a floating
    tensor of the output's own shape.
    """
    if rule == "same":
        ok = target.shape == output.shape
        expected = f"the output's shape {tuple(output.shape)}"
    else:
        soft = target.is_floating_point() and target.shape == output.shape
        ok = output.dim() >= 2 and (tuple(target.shape) == without_class_dim(output.shape) or soft)
        expected = (
            f"the output's shape without its class dimension, {without_class_dim(output.shape)}"
            if output.dim() >= 2 else "an output of shape (B, classes, ...)"
        )
    if not ok:
        raise TaskError(
            f"{what}: output shape {tuple(output.shape)} and target shape {tuple(target.shape)} do not match "
            f"(expected a target of {expected}); reshape one of them rather than let them broadcast"
        )


def check_unreduced(what: str, values: object, output: Tensor, target: Tensor) -> None:
    """Refuse unreduced values (losses or scores) that cannot be one per sample of this batch.

    They must be a tensor of shape (B, ...) with B the output's batch size and no more elements than
    either the output or the target: a loss computed on a broadcast of mismatched shapes -- (B, 1)
    against (B,) gives (B, B) -- always has more, so it is caught whatever the loss function.
    """
    if not isinstance(values, Tensor):
        raise TaskError(f"{what}: expected a tensor of unreduced values, got {type(values).__name__}")
    batch = output.shape[0]
    if values.dim() == 0 or values.shape[0] != batch:
        raise TaskError(
            f"{what}: expected one value per sample (shape ({batch}, ...)), got shape {tuple(values.shape)} "
            f"for output shape {tuple(output.shape)} and target shape {tuple(target.shape)}; "
            "use reduction='none'"
        )
    if values.numel() > min(output.numel(), target.numel()):
        raise TaskError(
            f"{what}: unreduced shape {tuple(values.shape)} has more entries than the output "
            f"{tuple(output.shape)} or the target {tuple(target.shape)}: the two were broadcast against "
            "each other; make their shapes match"
        )


class Metric(Protocol):
    """Accumulates over batches; ``compute`` gives the split-level value."""

    def reset(self) -> None: ...

    def update(self, output: Tensor, target: Tensor) -> None: ...

    def compute(self) -> float: ...


class MeanMetric:
    """Mean of a per-sample score (accuracy, squared error, ...) over every labelled sample.

    ``fn`` must give one value per sample (or per position) under the rule of
    :func:`check_unreduced`; a broadcast (B, B) score is refused rather than averaged into a wrong
    number.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], task: str | None = None):
        self.fn = fn
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        prefix = f"task {self.task!r}: " if self.task else ""
        try:
            values = self.fn(output, target)
        except TaskError as error:
            raise TaskError(f"{prefix}{error}") from error
        check_unreduced(f"{prefix}metric {getattr(self.fn, '__name__', self.fn)!r}", values, output, target)
        values = values.detach().float()
        self.total += float(values.sum())
        self.count += values.numel()

    def compute(self) -> float:
        return self.total / self.count if self.count else math.nan


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample (or per-position) accuracy; soft targets count their most likely class."""
    check_target_shape("accuracy", output, target, "class_dim")
    if target.shape == output.shape:
        target = target.argmax(dim=1)
    return (output.argmax(dim=1) == target).float()


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    check_target_shape("squared_error", output, target, "same")
    return ((output - target) ** 2).reshape(len(output), -1).mean(dim=1)


def absolute_error(output: Tensor, target: Tensor) -> Tensor:
    check_target_shape("absolute_error", output, target, "same")
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

    Shapes are checked before the loss runs, because a loss that broadcasts a (B, 1) output against
    a (B,) target returns (B, B) values whose mean looks plausible and is wrong. ``target_shape``
    declares the relation: ``"same"`` (regression, depth, normals: target shape == output shape) or
    ``"class_dim"`` (classification, segmentation: target shape == output shape without dim 1, or
    soft labels of the output's shape). A custom task may leave it ``None``; its losses must then be
    (B, ...) with no more entries than the output or the target (see :func:`check_unreduced`), which
    refuses any loss evaluated on a broadcast -- but not one that broadcasts and then reduces, so a
    custom task whose shapes follow one of the two relations should declare it.
    """

    name: str
    loss: PerSampleLoss
    role: Role = "auxiliary"
    metrics: Mapping[str, Callable[..., object]] = field(default_factory=dict)
    higher_is_better: bool = False
    target_shape: TargetShape | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"task name must be a non-empty string, got {self.name!r}")
        if self.role not in ("primary", "auxiliary"):
            raise TaskError(f"task {self.name!r}: role must be 'primary' or 'auxiliary', got {self.role!r}")
        if not callable(self.loss):
            raise TaskError(f"task {self.name!r}: loss must be callable")
        if self.target_shape is not None and self.target_shape not in TARGET_SHAPES:
            raise TaskError(
                f"task {self.name!r}: target_shape must be one of {TARGET_SHAPES} or None, got {self.target_shape!r}"
            )

    @property
    def is_primary(self) -> bool:
        return self.role == "primary"

    @classmethod
    def classification(cls, name: str, role: Role = "auxiliary") -> Task:
        """Logits (B, C, ...) against class indices (B, ...) or soft labels (B, C, ...)."""
        return cls(name, cross_entropy, role, {"accuracy": accuracy}, higher_is_better=True, target_shape="class_dim")

    @classmethod
    def regression(cls, name: str, role: Role = "auxiliary") -> Task:
        """Predictions and targets of one shape: a (B, 1) head needs (B, 1) targets, not (B,)."""
        return cls(name, mse, role, {"mse": squared_error, "mae": absolute_error}, target_shape="same")

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss, after shape checks that name this task (see the class docstring)."""
        if not isinstance(output, Tensor) or not isinstance(target, Tensor):
            raise TaskError(
                f"task {self.name!r}: output and target must be tensors, got "
                f"{type(output).__name__} and {type(target).__name__}"
            )
        if output.dim() == 0 or target.dim() == 0 or output.shape[0] != target.shape[0]:
            raise TaskError(
                f"task {self.name!r}: output has batch size {output.shape[0] if output.dim() else 'none'} "
                f"but target has {target.shape[0] if target.dim() else 'none'} "
                f"(output shape {tuple(output.shape)}, target shape {tuple(target.shape)})"
            )
        if self.target_shape is not None:
            check_target_shape(f"task {self.name!r}", output, target, self.target_shape)
        try:
            losses = self.loss(output, target)
        except (RuntimeError, ValueError, IndexError) as error:
            raise TaskError(
                f"task {self.name!r}: loss failed on output shape {tuple(output.shape)} and target "
                f"shape {tuple(target.shape)}: {error}"
            ) from error
        check_unreduced(f"task {self.name!r}: loss", losses, output, target)
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
            made[metric_name] = _make_metric(factory, self.name)
        return made

    def _check_mask(self, mask: Tensor, per_sample: Tensor) -> Tensor:
        if mask.shape != per_sample.shape:
            raise TaskError(
                f"task {self.name!r}: mask shape {tuple(mask.shape)} does not match batch size "
                f"{per_sample.shape[0]}"
            )
        return mask.to(per_sample.dtype)


def _make_metric(factory: Callable[..., object], task: str) -> Metric:
    if isinstance(factory, type):
        return factory()  # type: ignore[return-value]
    return MeanMetric(factory, task)  # type: ignore[arg-type]


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
            return Task(task, mse, role, target_shape="same")
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
