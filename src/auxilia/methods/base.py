"""The two kinds of method, and what every method promises.

* :class:`LossWeighting` turns the K task losses into one objective and runs one backward.
* :class:`GradientAggregation` builds the per-task Jacobian ``G`` on the shared parameters (or on the
  shared representation), reduces it with a pure ``aggregate(G) -> direction``, and writes the
  direction into ``.grad``. Task-specific parameters (heads) get their own loss's gradient.

Either way a method is an ``nn.Module``: learnable quantities are parameters (the caller's optimizer
trains them, as for the model), histories are buffers, so everything travels in ``state_dict``.
A failing step (non-finite loss or gradient) raises before any ``.grad`` or state is touched.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gradients import (
    accumulate,
    all_finite,
    check_mode,
    combine,
    jacobian,
    step_parameters,
    write_gradient,
)
from ..tasks import NonFiniteLossError, Task, TaskSet


@dataclass
class MetaContext:
    """What a meta step may use, supplied by the training loop (or by a user's own loop).

    ``losses(batch)`` runs the current model on a batch and returns the task losses;
    ``train_batch()`` draws a fresh batch of the training split and ``aux_batch()`` one of the
    held-out ``aux`` split (``None`` when there is none).
    """

    losses: Callable[[Any], dict[str, Tensor]]
    train_batch: Callable[[], Any]
    aux_batch: Callable[[], Any] | None
    shared: list[Tensor]
    heads: list[Tensor]
    learning_rate: float

    def validation_batch(self, source: str, method: str) -> Any:
        """The batch a meta step's validation loss L_V is taken on: a fresh ``aux`` batch or a
        fresh ``train`` batch (different from the one L_T was taken on), as the method's
        ``meta_source`` says."""
        if check_meta_source(source, method) == "train":
            return self.train_batch()
        if self.aux_batch is None:
            raise ValueError(f"{method}: meta_source='aux' needs an 'aux' split; give one or use meta_source='train'")
        return self.aux_batch()


META_SOURCES = ("aux", "train")


def check_meta_source(source: str, method: str) -> str:
    """Validate a meta-learned method's ``meta_source`` hyperparameter."""
    if source not in META_SOURCES:
        raise ValueError(f"{method}: meta_source must be 'aux' or 'train', got {source!r}")
    return source


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base of every method: the tasks, the primary first, and the step counter."""

    name: str = "method"

    def __init__(self, tasks: Iterable[Task | str], primary: str | None = None):
        super().__init__()
        self.tasks = TaskSet(tasks, primary)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return self.tasks.names

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared_parameters: Iterable[Tensor],
        task_parameters: Iterable[Tensor] | None = None,
        representation: Tensor | None = None,
    ) -> dict[str, Any]:
        """Fill ``.grad`` for an ordinary ``optimizer.step()``; return what was decided.

        ``task_parameters`` are the task-specific parameters (heads); when omitted they are found by
        walking the losses' graphs. Frozen tensors (``requires_grad=False``) are skipped. Refused
        with a ``ValueError`` before anything changes (see :func:`auxilia.gradients.step_parameters`):
        empty ``shared_parameters`` (e.g. an exhausted generator), a tensor given twice (in one
        list or in both: it is not de-duplicated, since that hides a wrong split of the model),
        every shared tensor frozen, and a loss that reaches no trainable tensor. Raises
        :class:`~auxilia.tasks.NonFiniteLossError` (naming the task where it is known) when a loss
        or a gradient is not finite, before any ``.grad`` is written and with the method's state
        as it was.
        """
        ordered = self.tasks.ordered(losses)
        shared, heads = step_parameters(ordered, shared_parameters, task_parameters, self.task_names, self.ignored_tasks)
        with self.restored_on_failure():
            info = self._backward(ordered, shared, heads, representation)
        self.steps += 1
        return info

    @property
    def ignored_tasks(self) -> tuple[int, ...]:
        """Positions (in task order) of the losses this method never reads; they may be detached."""
        return ()

    @contextmanager
    def restored_on_failure(self) -> Iterator[None]:
        """Run a step that changes the method's state; if it raises, put every buffer and
        parameter back as it was, so that a failing step never leaves the method half-updated."""
        snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
        try:
            yield
        except BaseException:
            self.load_state_dict(snapshot)
            raise

    def _backward(
        self,
        losses: list[Tensor],
        shared: list[Tensor],
        heads: list[Tensor],
        representation: Tensor | None,
    ) -> dict[str, Any]:
        """Write ``.grad`` from the ordered losses into the trainable ``shared`` tensors and the
        task-specific ``heads``; the public :meth:`backward` validates and restores.

        Subclasses implement this, or override :meth:`backward` itself when they take losses in
        another form (e.g. unreduced)."""
        raise TypeError(f"{type(self).__name__} implements neither backward nor _backward")

    @property
    def needs_representation(self) -> bool:
        """Whether ``backward`` needs the shared encoder's output (``representation=``)."""
        return False

    @property
    def loss_reduction(self) -> str:
        """How ``backward`` wants each task's loss: ``"mean"`` (a scalar), ``"sample"`` (B,) or
        ``"none"`` (the loss's own per-pixel shape); see :meth:`Task.compute_loss`."""
        return "mean"

    def meta_due(self) -> bool:
        """Whether a meta step should follow the optimizer step just taken."""
        return False

    def meta_step(self, context: MetaContext) -> dict[str, Any]:
        """Update the method's own meta-parameters to lower the primary loss on held-out data."""
        raise TypeError(f"{self.name} has no meta step (its meta_due() is always false)")

    def weights(self) -> dict[str, float] | None:
        """The task weights (or preferences) in use, by task name; ``None`` if the method has none."""
        return None

    def epoch_end(self) -> None:
        """Called by training loops at the end of each epoch (methods with epoch-level state)."""

    def search_space(self, generator: torch.Generator) -> list[dict[str, Any]] | None:
        """Hyperparameter candidates for a method that is itself a search; ``None`` for the rest."""
        return None

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}"

    def _as_dict(self, values: Tensor) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.task_names, values.detach().cpu().tolist())}


class LossWeighting(Method):
    """A method that only rescales losses: one backward of ``combine(losses)``."""

    @abc.abstractmethod
    def combine(self, losses: Tensor) -> Tensor:
        """Map the (K,) loss vector (task order, primary first) to the scalar training objective."""

    @abc.abstractmethod
    def task_weights(self) -> Tensor:
        """The (K,) weights currently applied to the losses."""

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.task_weights())

    def _backward(self, losses, shared, heads, representation):
        ignored = set(self.ignored_tasks)  # no backward into losses the objective does not read
        objective = self.combine(torch.stack([x.detach() if k in ignored else x for k, x in enumerate(losses)]))
        own = [p for p in self.parameters() if p.requires_grad]
        inputs = list({id(p): p for p in [*shared, *heads, *own]}.values())
        # into temporaries first: nothing reaches .grad unless every entry is finite everywhere
        grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        finite_objective = bool(torch.isfinite(objective.detach()))
        if not distributed.all_agree(finite_objective and all_finite(grads)):
            detail = "objective" if not finite_objective else "objective's gradient"
            raise NonFiniteLossError("combined", f"{self.name}: the combined {detail} is not finite (objective {float(objective.detach()):g})")
        accumulate(grads, inputs)
        if distributed.active():
            distributed.average_gradients(inputs)  # one reduction, P floats (as DDP)
            objective = distributed.average(objective.detach())
        return {"weights": self.weights(), "objective": float(objective.detach())}


class GradientAggregation(Method):
    """A method that reduces the per-task Jacobian of the shared parameters to one direction.

    ``mode`` selects how ``G`` is built (see :mod:`auxilia.gradients`); ``aggregate`` is the pure core,
    usable on any (K, P) matrix without a model.
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
    ):
        super().__init__(tasks, primary)
        self.mode = check_mode(mode)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.chunk_size = chunk_size
        self.register_buffer("last_weights", torch.ones(self.num_tasks, dtype=torch.float64))

    @property
    def needs_representation(self) -> bool:
        return self.mode == "representation"

    def aggregate(self, G: Tensor) -> Tensor:
        """(K, P) Jacobian, primary row first -> (P,) update direction; sets ``last_weights``."""
        if G.dim() != 2 or G.shape[0] != self.num_tasks:
            raise ValueError(
                f"{self.name}: expected a ({self.num_tasks}, P) matrix for tasks {self.task_names}, "
                f"got shape {tuple(G.shape)}"
            )
        coefficients = self._coefficients(G)
        self.last_weights = coefficients.detach().to(self.last_weights)
        return combine(coefficients, G)

    @abc.abstractmethod
    def _coefficients(self, G: Tensor) -> Tensor:
        """The (K,) combination coefficients c with direction = cᵀ G."""

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.last_weights)

    def _backward(self, losses, shared, heads, representation):
        if self.mode == "representation":
            if representation is None:
                raise ValueError(
                    f"{self.name}: mode='representation' needs the shared encoder's output passed as "
                    "representation="
                )
            if not representation.requires_grad:
                raise ValueError(f"{self.name}: the representation does not require grad")
            targets: Sequence[Tensor] = [representation]
            how = "loop"
            heads = [p for p in heads if p is not representation]
        else:
            targets = shared
            how = self.mode
        # The heads ride along in the same K backward passes: their gradient is the column sum.
        width = sum(t.numel() for t in targets)
        full = jacobian(losses, [*targets, *heads], how, self.chunk_size, retain_graph=True)
        offset = 0
        if self.mode == "representation":
            # rows are per-sample blocks: the global G is the processes' blocks side by side
            G, offset = distributed.gather_rows(full[:, :width] * distributed.fraction(), len(representation))
            head_rows = distributed.average(full[:, width:])
            full = torch.cat([G, head_rows], dim=1) if distributed.active() else full
        else:
            full = distributed.average(full)  # K·P floats: the global batch's per-task gradients
            G, head_rows = full[:, :width], full[:, width:]
        # the same matrix on every process: checked before a solver reads it; one reduction as the
        # fast check, the exact element-wise one only when the sum is not finite
        if not bool(torch.isfinite(full.sum())) and not bool(torch.isfinite(full).all()):
            bad = self.task_names[int((~torch.isfinite(full).all(dim=1)).nonzero()[0])]
            raise NonFiniteLossError(bad, f"{self.name}: the gradient of task {bad!r} is not finite")
        direction = self.aggregate(G)
        head_gradient = head_rows.sum(dim=0)
        if not all_finite([direction, head_gradient]):
            raise NonFiniteLossError("combined", f"{self.name}: the combined update is not finite")
        if self.mode == "representation":
            local = direction[offset : offset + width].view_as(representation)
            pulled = torch.autograd.grad(representation, shared, local, allow_unused=True)
            if distributed.active():  # each process pulled back its own rows: their sum, everywhere
                share = distributed.fraction()
                pulled = distributed.average_all([None if g is None else g / share for g in pulled])
            if not all_finite(pulled):
                raise NonFiniteLossError("combined", f"{self.name}: the update pulled back through the encoder is not finite")
            if heads:
                write_gradient(head_gradient, heads)
            accumulate(pulled, shared)
        else:
            if heads:
                write_gradient(head_gradient, heads)
            write_gradient(direction, shared)
        return {"weights": self.weights()}
