"""Nash-MTL and AuxiNash: the update d = Σ α_k g_k with α the (asymmetric) Nash bargaining solution.

α solves α_k (Mα)_k = p_k, M = G Gᵀ, by damped Newton on the K x K matrix
(:func:`auxilia.solvers.nash_bargaining`), warm-started from the previous step. Nash-MTL is the
symmetric game, p_k = 1; AuxiNash gives every task a bargaining power p_k and learns p so that the
primary loss on held-out data falls. Powers are normalized to Σ p_k = K (as in the official code), so
uniform p is exactly Nash-MTL.

As in the official code the Gram matrix is divided by its Frobenius norm before solving
(``gram_normalization="frobenius"``) and the combined update is clipped to ``max_norm``; with
``"none"`` α solves the system for M itself (then ‖d‖² = Σ p_k).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..gradients import combine
from ..hypergrad import neumann_vector
from ..solvers import NashSolution, nash_bargaining, nash_sensitivity
from ..tasks import Task
from .aggregation import normalized_gram
from .base import GradientAggregation, MetaContext, check_meta_source
from .registry import register


def _preferences(value: Sequence[float] | Mapping[str, float] | None, names: list[str], method: str) -> Tensor:
    K = len(names)
    if value is None:
        values = [1.0] * K
    elif isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"{method}: preference given for unknown task {unknown[0]!r}; tasks are {names}")
        values = [float(value.get(n, 1.0)) for n in names]
    else:
        values = [float(v) for v in value]
        if len(values) != K:
            raise ValueError(f"{method}: expected {K} preferences for tasks {names}, got {len(values)}")
    for name, v in zip(names, values):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{method}: the preference of task {name!r} must be finite and > 0, got {v}")
    p = torch.tensor(values, dtype=torch.float64)
    return p * (K / p.sum())


@register("nash-mtl")
class NashMTL(GradientAggregation):
    """Navon et al. 2022: the Nash bargaining solution of the tasks over the update direction."""

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        gram_normalization: str = "frobenius",
    ):
        super().__init__(tasks, primary, mode, chunk_size)
        if not (max_norm > 0 or max_norm == 0):
            raise ValueError(f"{self.name}: max_norm must be >= 0 (0 disables clipping), got {max_norm}")
        if not isinstance(update_weights_every, int) or update_weights_every < 1:
            raise ValueError(f"{self.name}: update_weights_every must be a positive integer, got {update_weights_every!r}")
        if gram_normalization not in ("frobenius", "none"):
            raise ValueError(f"{self.name}: gram_normalization must be 'frobenius' or 'none', got {gram_normalization!r}")
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.gram_normalization = gram_normalization
        K = self.num_tasks
        self.register_buffer("preferences", torch.ones(K, dtype=torch.float64))
        self.register_buffer("alpha", torch.ones(K, dtype=torch.float64))
        self.register_buffer("solved", torch.zeros((), dtype=torch.bool))
        self.register_buffer("residual", torch.zeros((), dtype=torch.float64))

    def _solver_gram(self, G: Tensor) -> tuple[np.ndarray, float]:
        """The matrix the bargaining is solved on, and the factor f with α = f · (its solution).

        It is built from the Gram matrix divided by its largest diagonal σ², which is finite and
        exact for gradients of any scale; ``"frobenius"`` divides by the Frobenius norm instead
        (the same matrix, f = 1), ``"none"`` keeps the normalized one and un-normalizes α by
        f = 1/σ (α_k (Mα)_k = p_k with M = σ²A), so neither underflows nor overflows."""
        A, top = normalized_gram(G)
        if not math.isfinite(top):
            return A, 1.0
        if self.gram_normalization == "frobenius":
            norm = float(np.linalg.norm(A))
            return (A / norm, 1.0) if norm > 0 else (A, 1.0)
        return A, (1.0 / top if top > 0 else 1.0)

    def _solve(self, M: np.ndarray, factor: float, warm: np.ndarray | None) -> tuple[np.ndarray, NashSolution]:
        """α on the un-normalized scale (see :meth:`_solver_gram`) and the solution on M's."""
        solution = nash_bargaining(M, self.preferences.cpu().numpy(), warm_start=None if warm is None else warm / factor)
        return solution.alpha * factor, solution

    def _coefficients(self, G: Tensor) -> Tensor:
        """α for this step: solved on the (normalized) Gram matrix, or reused between solves."""
        if not bool(self.solved) or int(self.steps) % self.update_weights_every == 0:
            M, factor = self._solver_gram(G)
            alpha, solution = self._solve(M, factor, self.alpha.cpu().numpy() if bool(self.solved) else None)
            self.alpha = torch.as_tensor(alpha, dtype=torch.float64, device=self.alpha.device)
            self.residual = torch.tensor(solution.residual, dtype=torch.float64, device=self.alpha.device)
            self.solved = torch.ones((), dtype=torch.bool, device=self.solved.device)
        return self.alpha.to(G.device)

    def aggregate(self, G: Tensor) -> Tensor:
        """d = Σ α_k g_k, clipped to ``max_norm``.

        The norm is that of the direction actually returned, not αᵀMα: when the gradients nearly
        cancel (no direction improves every task), α is large and Σ α_k g_k, formed in G's
        precision, can be far longer than the Gram matrix predicts.
        """
        if G.dim() != 2 or G.shape[0] != self.num_tasks:
            raise ValueError(
                f"{self.name}: expected a ({self.num_tasks}, P) matrix for tasks {self.task_names}, "
                f"got shape {tuple(G.shape)}"
            )
        alpha = self._coefficients(G)
        direction = combine(alpha, G)
        factor = 1.0
        if self.max_norm > 0:
            norm = float(torch.linalg.vector_norm(direction, dtype=torch.float64))
            if norm > self.max_norm:
                factor = self.max_norm / norm
                direction = direction * factor
        self.last_weights = (alpha * factor).detach().to(self.last_weights)
        return direction

    def _backward(self, losses, shared, heads, representation):
        info = super()._backward(losses, shared, heads, representation)
        info["alpha"] = self._as_dict(self.alpha)
        return info

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.alpha)


@register("auxinash")
class AuxiNash(NashMTL):
    """Shamsian et al. 2023: asymmetric bargaining, with the bargaining powers p learned.

    Every ``hypergrad_every`` steps (the meta step): L_V is the primary loss on a batch from a
    different ``train`` batch (``meta_source="train"``, the official default) or from the ``aux``
    split; with α fixed, dL_V/dα_k = −g_kᵀ v where v is the implicit-differentiation vector of L_T =
    Σ α_k ℓ_k (:func:`auxilia.hypergrad.neumann_vector`: ``neumann_terms`` Hessian-vector products with
    step ``neumann_lr``, AuxiLearn's convention); dα/dp = (M + diag(p/α²))⁻¹ diag(1/α). The gradient
    of p is clipped to norm ``meta_max_norm`` and taken by SGD with momentum; p is then clipped at
    ``min_preference`` and renormalized to Σ p = K. ``learn_preferences=False`` keeps p fixed (Pareto
    sweeps). p, α and the momentum buffer are in ``state_dict``.
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        mode: str = "loop",
        chunk_size: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        gram_normalization: str = "frobenius",
        preferences: Sequence[float] | Mapping[str, float] | None = None,
        learn_preferences: bool = True,
        hypergrad_every: int = 25,
        meta_source: str = "train",
        neumann_terms: int = 3,
        neumann_lr: float = 1e-4,
        meta_lr: float = 5e-3,
        meta_momentum: float = 0.9,
        meta_max_norm: float = 1.0,
        min_preference: float = 1e-4,
    ):
        super().__init__(tasks, primary, mode, chunk_size, max_norm, update_weights_every, gram_normalization)
        if not isinstance(hypergrad_every, int) or hypergrad_every < 1:
            raise ValueError(f"{self.name}: hypergrad_every must be a positive integer, got {hypergrad_every!r}")
        check_meta_source(meta_source, self.name)
        if not isinstance(neumann_terms, int) or neumann_terms < 0:
            raise ValueError(f"{self.name}: neumann_terms must be an integer >= 0, got {neumann_terms!r}")
        for label, value in (("neumann_lr", neumann_lr), ("meta_lr", meta_lr), ("meta_max_norm", meta_max_norm), ("min_preference", min_preference)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self.name}: {label} must be finite and > 0, got {value}")
        if not 0 <= meta_momentum < 1:
            raise ValueError(f"{self.name}: meta_momentum must be in [0, 1), got {meta_momentum}")
        self.preferences = _preferences(preferences, self.task_names, self.name)
        self.learn_preferences = bool(learn_preferences)
        self.hypergrad_every = hypergrad_every
        self.meta_source = meta_source
        self.neumann_terms, self.neumann_lr = neumann_terms, float(neumann_lr)
        self.meta_lr, self.meta_momentum = float(meta_lr), float(meta_momentum)
        self.meta_max_norm, self.min_preference = float(meta_max_norm), float(min_preference)
        self.register_buffer("momentum", torch.zeros(self.num_tasks, dtype=torch.float64))

    def weights(self) -> dict[str, float]:
        """The bargaining powers p (what AuxiNash learns); α is in ``alpha``."""
        return self._as_dict(self.preferences)

    def meta_due(self) -> bool:
        return self.learn_preferences and int(self.steps) % self.hypergrad_every == 0

    def preference_gradient(self, context: MetaContext) -> tuple[Tensor, dict[str, Any]]:
        """dL_V/dp at the current parameters, by implicit differentiation through α(p)."""
        W = [p for p in context.shared if p.requires_grad]
        losses = self.tasks.ordered(context.losses(context.train_batch()))
        per_task = [torch.autograd.grad(loss, W, create_graph=True, retain_graph=True, allow_unused=True) for loss in losses]
        per_task = [[torch.zeros_like(w) if g is None else g for g, w in zip(grads, W)] for grads in per_task]
        # the global meta batch's per-task gradients (the graphs in per_task stay local: the
        # Hessian-vector products through them are averaged where they are evaluated)
        flat = distributed.average(torch.stack([torch.cat([g.detach().reshape(-1) for g in grads]) for grads in per_task]))
        M, factor = self._solver_gram(flat)
        p = self.preferences.cpu().numpy()
        alpha, solution = self._solve(M, factor, self.alpha.cpu().numpy())
        a = torch.as_tensor(alpha, dtype=flat.dtype, device=flat.device)
        train_grads = [sum(a[k] * per_task[k][i] for k in range(len(losses))) for i in range(len(W))]
        val_batch = context.validation_batch(self.meta_source, self.name)
        val_loss = self.tasks.ordered(context.losses(val_batch))[0]
        g_val = distributed.average_all(torch.autograd.grad(val_loss, W, allow_unused=True))
        g_val = [torch.zeros_like(w) if g is None else g for g, w in zip(g_val, W)]
        v, _ = neumann_vector(train_grads, W, g_val, self.neumann_terms, self.neumann_lr)
        v_flat = torch.cat([x.reshape(-1) for x in v])
        dval_dalpha = -(flat.double() @ v_flat.double()).cpu().numpy()
        sensitivity = factor * nash_sensitivity(M, p, solution.alpha, solution.ridge)  # dα/dp on α's scale
        grad = torch.as_tensor(sensitivity.T @ dval_dalpha, dtype=torch.float64, device=self.preferences.device)
        return grad, {"val_loss": float(distributed.average(val_loss.detach()))}

    def meta_step(self, context: MetaContext) -> dict[str, Any]:
        with self.restored_on_failure():
            grad, info = self.preference_gradient(context)
            if not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(f"{self.name}: the preference gradient is not finite")
            norm = float(grad.norm())
            if norm > self.meta_max_norm:
                grad = grad * (self.meta_max_norm / norm)
            self.momentum = self.meta_momentum * self.momentum + grad
            p = (self.preferences - self.meta_lr * self.momentum).clamp(min=self.min_preference)
            self.preferences = p * (self.num_tasks / p.sum())
        return {**info, "preference_grad_norm": norm}
