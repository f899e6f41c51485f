"""Loss-weighting methods: one backward of a weighted sum of the task losses.

``stl`` and ``equal`` are the two ends every comparison needs; ``fixed`` and ``hpo-random`` are
hand-set and searched weights; ``uncertainty``, ``dwa`` and ``gradnorm`` adapt the weights during
training by their papers' rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gradients import jacobian
from ..tasks import NonFiniteLossError, Task
from .base import LossWeighting
from .registry import register


@register("stl")
class SingleTask(LossWeighting):
    """Single-task learning: the primary loss alone; auxiliary heads get no gradient."""

    @property
    def ignored_tasks(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_tasks))

    def combine(self, losses: Tensor) -> Tensor:
        return losses[0]

    def task_weights(self) -> Tensor:
        weights = torch.zeros(self.num_tasks)
        weights[0] = 1.0
        return weights


@register("equal")
class Equal(LossWeighting):
    """Sum of all losses (linear scalarization, the seeds' "Aux-Head"): the cost reference."""

    def combine(self, losses: Tensor) -> Tensor:
        return losses.sum()

    def task_weights(self) -> Tensor:
        return torch.ones(self.num_tasks)


def _weight_vector(weights: Sequence[float] | Mapping[str, float], names: list[str], method: str) -> Tensor:
    """Validate user weights: a sequence in task order, or a mapping (primary defaults to 1)."""
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"{method}: weight given for unknown task {unknown[0]!r}; tasks are {names}")
        missing = [n for n in names[1:] if n not in weights]
        if missing:
            raise ValueError(f"{method}: no weight given for task {missing[0]!r}")
        values = [float(weights.get(names[0], 1.0))] + [float(weights[n]) for n in names[1:]]
    else:
        values = [float(w) for w in weights]
        if len(values) != len(names):
            raise ValueError(f"{method}: expected {len(names)} weights for tasks {names}, got {len(values)}")
    for name, value in zip(names, values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{method}: weight of task {name!r} must be finite and >= 0, got {value}")
    return torch.tensor(values, dtype=torch.float32)


@register("fixed")
class Fixed(LossWeighting):
    """User-given weights: a list in task order (primary first) or a mapping name -> weight."""

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ):
        super().__init__(tasks, primary)
        values = torch.ones(self.num_tasks) if weights is None else _weight_vector(weights, self.task_names, self.name)
        self.register_buffer("fixed_weights", values)

    def combine(self, losses: Tensor) -> Tensor:
        return (self.fixed_weights.to(losses) * losses).sum()

    def task_weights(self) -> Tensor:
        return self.fixed_weights.clone()


@register("hpo-random")
class RandomSearch(Fixed):
    """Fixed weights chosen by random search, each candidate trained and selected on ``val``.

    As a method it trains with ``weights`` like ``fixed``; the runner asks :meth:`search_space` for
    ``trials`` candidates (auxiliary weights log-uniform in [``low``, ``high``], primary weight 1),
    trains one run per candidate, and keeps the best on ``val`` (MAOAL's "HPO-tune").
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        trials: int = 8,
        low: float = 1e-2,
        high: float = 10.0,
    ):
        super().__init__(tasks, primary, weights)
        if not isinstance(trials, int) or trials < 1:
            raise ValueError(f"{self.name}: trials must be a positive integer, got {trials!r}")
        if not (0 < low < high < math.inf):
            raise ValueError(f"{self.name}: need 0 < low < high < inf, got low={low}, high={high}")
        self.trials, self.low, self.high = trials, low, high

    def search_space(self, generator: torch.Generator) -> list[dict[str, Any]]:
        K = self.num_tasks
        logs = torch.empty(self.trials, K - 1, dtype=torch.float64).uniform_(
            math.log(self.low), math.log(self.high), generator=generator
        )
        return [{"weights": [1.0] + row.exp().tolist()} for row in logs]


@register("uncertainty")
class Uncertainty(LossWeighting):
    """Kendall et al. 2018: learned log-variances s_k, objective Σ exp(-s_k) ℓ_k + s_k.

    ``s`` is a parameter of this module: give ``method.parameters()`` to the optimizer with the model's.
    """

    def __init__(self, tasks: Iterable[Task | str], primary: str | None = None, init: float = 0.0):
        super().__init__(tasks, primary)
        if not math.isfinite(init):
            raise ValueError(f"{self.name}: init must be finite, got {init}")
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def combine(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses)
        return (torch.exp(-s) * losses + s).sum()

    def task_weights(self) -> Tensor:
        return torch.exp(-self.log_vars.detach())


@register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Liu et al. 2019: w_k = K softmax(r_k / T), r_k the ratio of task k's mean loss over the last two
    epochs. Equal weights until two epochs are complete; training loops call :meth:`epoch_end`."""

    def __init__(self, tasks: Iterable[Task | str], primary: str | None = None, temperature: float = 2.0):
        super().__init__(tasks, primary)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{self.name}: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        K = self.num_tasks
        self.register_buffer("current", torch.ones(K))
        self.register_buffer("epoch_sum", torch.zeros(K, dtype=torch.float64))
        self.register_buffer("epoch_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, K, dtype=torch.float64))  # [t-2, t-1]
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def combine(self, losses: Tensor) -> Tensor:
        self.epoch_sum += distributed.average(losses.detach()).to(self.epoch_sum)  # the global batch's losses
        self.epoch_batches += 1
        return (self.current.to(losses) * losses).sum()

    def epoch_end(self) -> None:
        if int(self.epoch_batches) == 0:
            return
        mean = self.epoch_sum / self.epoch_batches
        self.history = torch.stack([self.history[1], mean])
        self.epochs_done += 1
        self.epoch_sum.zero_()
        self.epoch_batches.zero_()
        if int(self.epochs_done) >= 2:
            ratio = self.history[1] / self.history[0].clamp(min=1e-12)
            self.current = (self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)).float()

    def task_weights(self) -> Tensor:
        return self.current.clone()


@register("gradnorm")
class GradNorm(LossWeighting):
    """Chen et al. 2018: learned weights w so that each task's weighted gradient norm on the last
    shared layer tracks its relative inverse training rate, with asymmetry ``alpha``.

    The last shared layer is the last shared parameter with two or more dimensions (its weight
    matrix or kernel). ``w`` is a parameter of this module, trained by the caller's optimizer with
    the gradient of the GradNorm loss; it is renormalized to sum to K before each step.
    """

    def __init__(self, tasks: Iterable[Task | str], primary: str | None = None, alpha: float = 1.5):
        super().__init__(tasks, primary)
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"{self.name}: alpha must be finite and >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.loss_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def task_weights(self) -> Tensor:
        return self.loss_weights.detach().clone()

    def combine(self, losses: Tensor) -> Tensor:
        return (self.loss_weights.detach().to(losses) * losses).sum()

    def _backward(self, losses, shared, heads, representation):
        with torch.no_grad():
            w = self.loss_weights.clamp_(min=0)
            w.mul_(self.num_tasks / w.sum().clamp(min=1e-12))
        layer = next((p for p in reversed(shared) if p.dim() >= 2), None)
        last = [layer] if layer is not None else shared
        # in float64: the squares of a finite float32 gradient overflow from entries of ~1e19 on
        norms = torch.linalg.vector_norm(distributed.average(jacobian(losses, last, retain_graph=True)), dim=1, dtype=torch.float64)
        loss_values = distributed.average(torch.stack(losses).detach())
        if not bool(torch.isfinite(norms).all()):
            bad = self.task_names[int((~torch.isfinite(norms)).nonzero()[0])]
            raise NonFiniteLossError(bad, f"task {bad!r}: gradient is not finite")
        if not bool(self.initialized):
            self.initial_losses.copy_(loss_values)
            self.initialized.fill_(True)
        weighted = self.loss_weights.double() * norms
        rates = loss_values / self.initial_losses.clamp(min=1e-12)
        relative = rates / rates.mean().clamp(min=1e-12)
        target = (weighted.mean() * relative.double().pow(self.alpha)).detach()
        grad = torch.autograd.grad((weighted - target).abs().sum(), self.loss_weights)[0]
        info = super()._backward(losses, shared, heads, representation)
        if self.loss_weights.grad is None:
            self.loss_weights.grad = grad
        else:
            self.loss_weights.grad.add_(grad)
        return info
