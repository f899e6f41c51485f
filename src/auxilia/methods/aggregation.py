"""Gradient-aggregation baselines: each reduces the per-task Jacobian G (K x P) to one direction.

Every method here works on the K x K Gram matrix M = G Gᵀ alone (in float64) and returns
coefficients c with direction = cᵀG, so its cost beyond the per-task gradients is O(K²P) for M plus
O(K³), never a Python loop over parameters. The coefficients are the weights reported per task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from ..gradients import gram
from ..solvers import cagrad_weights, min_norm_point
from ..tasks import Task
from .base import GradientAggregation
from .registry import register


def _normalized_gram(G: Tensor) -> np.ndarray:
    """M / max diag(M): every rule below is invariant to a common scale, and this keeps 1e±15
    gradients away from overflow and underflow."""
    M = gram(G).cpu().numpy()
    scale = float(np.max(np.diag(M))) if M.size else 0.0
    return M / scale if scale > 0 else np.zeros_like(M)


def _as_coefficients(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=like.device)


@register("pcgrad")
class PCGrad(GradientAggregation):
    """Yu et al. 2020: each task's gradient is projected off every other task's gradient it conflicts
    with (negative dot product), the others taken in a random order; the projected gradients are summed.

    The order comes from a generator seeded by (``seed``, step count), so a run and its resumption
    draw the same orders.
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__(tasks, primary, mode, chunk_size)
        if not isinstance(seed, int):
            raise ValueError(f"{self.name}: seed must be an integer, got {seed!r}")
        self.seed = seed

    def _coefficients(self, G: Tensor) -> Tensor:
        M = _normalized_gram(G)
        K = len(M)
        generator = np.random.default_rng([self.seed, int(self.steps)])
        C = np.eye(K)  # row i: the projected gradient of task i as a combination of the rows of G
        for i in range(K):
            for j in generator.permutation(K):
                if j == i or M[j, j] <= 0:
                    continue
                dot = float(C[i] @ M[:, j])
                if dot < 0:
                    C[i, j] -= dot / M[j, j]
        return _as_coefficients(C.sum(axis=0), G)


@register("pcgrad-aux")
class PCGradAux(GradientAggregation):
    """PCGrad for auxiliary learning: only auxiliary gradients are projected, and only off the primary
    gradient when they conflict with it. The primary gradient is never altered."""

    def _coefficients(self, G: Tensor) -> Tensor:
        M = _normalized_gram(G)
        c = np.ones(len(M))
        if M[0, 0] > 0:
            conflicts = np.minimum(M[0, 1:], 0.0)
            c[0] -= conflicts.sum() / M[0, 0]
        return _as_coefficients(c, G)


@register("gcs")
class GradientCosineSimilarity(GradientAggregation):
    """Du et al. 2020: an auxiliary gradient is added only when its cosine similarity with the
    primary gradient is positive. ``weighted=False`` (the default, the paper's unweighted rule) adds
    it whole; ``weighted=True`` scales it by the cosine. A zero gradient has cosine 0: dropped."""

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        weighted: bool = False,
    ):
        super().__init__(tasks, primary, mode, chunk_size)
        if not isinstance(weighted, bool):
            raise ValueError(f"{self.name}: weighted must be True or False, got {weighted!r}")
        self.weighted = weighted

    def _coefficients(self, G: Tensor) -> Tensor:
        M = _normalized_gram(G)
        norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
        denominator = norms[0] * norms[1:]
        cosine = np.divide(M[0, 1:], denominator, out=np.zeros(len(M) - 1), where=denominator > 0)
        cosine = np.clip(cosine, -1.0, 1.0)
        keep = cosine > 0
        aux = np.where(keep, cosine if self.weighted else 1.0, 0.0)
        return _as_coefficients(np.concatenate([[1.0], aux]), G)


@register("mgda")
class MGDA(GradientAggregation):
    """Sener & Koltun 2018: the min-norm point of the convex hull of the task gradients, a common
    descent direction when one exists. Solved exactly on the Gram matrix (Wolfe's algorithm).

    ``normalization="l2"`` first scales every gradient to unit norm (the hull of directions) and
    returns the min-norm point of those; ``"none"`` (default) uses the raw gradients. With
    ``mode="representation"`` this is the paper's MGDA-UB.
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        normalization: str = "none",
    ):
        super().__init__(tasks, primary, mode, chunk_size)
        if normalization not in ("none", "l2"):
            raise ValueError(f"{self.name}: normalization must be 'none' or 'l2', got {normalization!r}")
        self.normalization = normalization

    def _coefficients(self, G: Tensor) -> Tensor:
        if self.normalization == "l2":
            raw = gram(G).cpu().numpy()
            norms = np.sqrt(np.clip(np.diag(raw), 0.0, None))
            inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
            w = min_norm_point(raw * np.outer(inverse, inverse)).w  # Gram of the unit gradients
            return _as_coefficients(w * inverse, G)
        return _as_coefficients(min_norm_point(_normalized_gram(G)).w, G)


@register("cagrad")
class CAGrad(GradientAggregation):
    """Liu et al. 2021: the direction that maximizes the worst task's improvement within a ball of
    radius c‖ḡ‖ around the mean gradient ḡ. Its dual, min over the simplex of g_wᵀḡ + c‖ḡ‖‖g_w‖,
    is solved on the Gram matrix; then d = ḡ + (c‖ḡ‖/‖g_w‖) g_w, divided by 1 + c² (``rescale=1``, the
    official default), 1 + c (``rescale=2``) or left as is (``rescale=0``).
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        c: float = 0.4,
        rescale: int = 1,
    ):
        super().__init__(tasks, primary, mode, chunk_size)
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"{self.name}: c must be finite and >= 0, got {c!r}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"{self.name}: rescale must be 0, 1 or 2, got {rescale!r}")
        self.c, self.rescale = float(c), rescale
        self.register_buffer("dual_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def _coefficients(self, G: Tensor) -> Tensor:
        M = _normalized_gram(G)
        K = len(M)
        mean = np.full(K, 1.0 / K)
        w = cagrad_weights(M, self.c).w
        self.dual_weights = torch.as_tensor(w, dtype=torch.float64, device=self.dual_weights.device)
        mean_norm = math.sqrt(max(float(mean @ M @ mean), 0.0))
        w_norm = math.sqrt(max(float(w @ M @ w), 0.0))
        coefficients = mean.copy()
        if w_norm > 0:
            coefficients += (self.c * mean_norm / w_norm) * w
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return _as_coefficients(coefficients / divisor, G)
