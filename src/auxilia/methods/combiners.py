"""AuxiLearn's loss combiners: small networks φ mapping the task losses to the training objective.

Every combiner is monotone in every loss (raising a loss never lowers the objective), which is what
keeps the learned objective a sensible training loss; :meth:`Combiner.project` restores the
constraint after each meta step.

* :class:`LinearCombiner`: L_T = Σ_k w_k ℓ_k on the (K,) mean losses; w initialized to 1, kept ≥ 0.
* :class:`NonlinearCombiner`: per-sample loss vectors (B, K) -> an MLP K -> hidden -> 1 with
  Softplus, weights ≥ 0, last layer without bias; L_T = mean over the batch + the primary loss
  (skip term).
* :class:`ConvCombiner`: per-pixel loss images (B, K, H, W) -> conv3x3 K->8, Softplus, avg-pool 2,
  conv3x3 8->16, Softplus, avg-pool 2, conv1x1 16->1; weights ≥ 0; L_T = mean + the primary loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Combiner(nn.Module):
    """Maps stacked losses (primary first along dim 1, or dim 0 for the linear one) to a scalar."""

    #: what the combiner reads: "mean" (K,), "sample" (B, K) or "none" (B, K, H, W)
    reduction: str = "mean"

    def project(self) -> None:
        """Restore the constraints (non-negative weights) after a meta step."""
        with torch.no_grad():
            for weight in self.constrained():
                weight.clamp_(min=0)

    def constrained(self) -> list[Tensor]:
        """The parameters kept ≥ 0."""
        return []


class LinearCombiner(Combiner):
    """L_T = Σ_k w_k ℓ_k, w ≥ 0, initialized to ``init`` (1: the sum of the losses)."""

    reduction = "mean"

    def __init__(self, num_tasks: int, init: float = 1.0):
        super().__init__()
        if not (math.isfinite(init) and init >= 0):
            raise ValueError(f"linear combiner: init must be finite and >= 0, got {init}")
        self.weight = nn.Parameter(torch.full((num_tasks,), float(init)))

    def forward(self, losses: Tensor) -> Tensor:
        return (self.weight.to(losses.dtype) * losses).sum()

    def constrained(self) -> list[Tensor]:
        return [self.weight]


class NonlinearCombiner(Combiner):
    """Monotone MLP on per-sample loss vectors; the primary loss passes through a skip term."""

    reduction = "sample"

    def __init__(self, num_tasks: int, hidden: int = 10, init_upper: float = 0.1):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"nonlinear combiner: hidden must be a positive integer, got {hidden!r}")
        if not (math.isfinite(init_upper) and init_upper > 0):
            raise ValueError(f"nonlinear combiner: init_upper must be finite and > 0, got {init_upper}")
        self.hidden = nn.Linear(num_tasks, hidden)
        self.out = nn.Linear(hidden, 1, bias=False)
        self.activation = nn.Softplus()
        with torch.no_grad():
            for weight in self.constrained():
                weight.uniform_(0.0, init_upper)
            self.hidden.bias.zero_()

    def forward(self, losses: Tensor) -> Tensor:  # (B, K)
        losses = losses.to(self.hidden.weight.dtype)
        return self.out(self.activation(self.hidden(losses))).mean() + losses[:, 0].mean()

    def constrained(self) -> list[Tensor]:
        return [self.hidden.weight, self.out.weight]


class ConvCombiner(Combiner):
    """Monotone CNN on the loss image (B, K, H, W); the primary loss passes through a skip term."""

    reduction = "none"
    min_size = 4  # two 2x2 average pools

    def __init__(self, num_tasks: int, init_upper: float = 0.1):
        super().__init__()
        if not (math.isfinite(init_upper) and init_upper > 0):
            raise ValueError(f"conv combiner: init_upper must be finite and > 0, got {init_upper}")
        self.conv1 = nn.Conv2d(num_tasks, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 1, 1, bias=False)
        self.activation = nn.Softplus()
        self.pool = nn.AvgPool2d(2)
        with torch.no_grad():
            for weight in self.constrained():
                weight.uniform_(0.0, init_upper)
            self.conv1.bias.zero_()
            self.conv2.bias.zero_()

    def forward(self, losses: Tensor) -> Tensor:  # (B, K, H, W)
        losses = losses.to(self.conv1.weight.dtype)
        x = self.pool(self.activation(self.conv1(losses)))
        x = self.pool(self.activation(self.conv2(x)))
        return self.conv3(x).mean() + losses[:, 0].mean()

    def constrained(self) -> list[Tensor]:
        return [self.conv1.weight, self.conv2.weight, self.conv3.weight]


COMBINERS = {"linear": LinearCombiner, "nonlinear": NonlinearCombiner, "conv": ConvCombiner}


def make_combiner(kind: str, num_tasks: int, hidden: int, init_upper: float, init: float) -> Combiner:
    """Build the combiner named ``kind`` with its own hyperparameters."""
    if kind == "linear":
        return LinearCombiner(num_tasks, init)
    if kind == "nonlinear":
        return NonlinearCombiner(num_tasks, hidden, init_upper)
    if kind == "conv":
        return ConvCombiner(num_tasks, init_upper)
    raise ValueError(f"auxilearn: combiner must be one of {sorted(COMBINERS)}, got {kind!r}")
