"""AuxiLearn (Navon et al., ICLR 2021): a learned loss combiner, trained by implicit differentiation.

Ordinary steps take one backward of L_T = φ(ℓ_0, ..., ℓ_K) (:mod:`.combiners`): the combiner runs
on a detached copy of the losses, and its derivative ∂L_T/∂ℓ is pushed through the model in a single
backward, which is the chain rule for ∂L_T/∂W at the cost of one backward. The per-task sums of
∂L_T/∂ℓ are the *effective weights* reported at every step (for ``linear`` the weights themselves;
for ``nonlinear`` and ``conv`` how much L_T rises per unit rise of every sample's or pixel's loss of
that task).

Every ``meta_every`` steps the meta step updates φ (the combiner, plus an optional label generator,
:mod:`.label_generator`) by the hypergradient of the primary loss on an ``aux``-split batch, through
:func:`auxilia.hypergrad.hypergradient` (``neumann_terms`` Hessian-vector products of step
``neumann_lr``, AuxiLearn's unscaled convention), L_T being recomputed on a fresh ``train`` batch.
The gradient is clipped to norm ``meta_max_norm`` and taken by SGD with momentum and weight decay
(the velocity is a buffer, so it travels in ``state_dict``); weights are then clamped to ≥ 0.

φ never requires grad outside the meta step, so no model optimizer picks it up (the Trainer adds
``method.parameters()`` that require grad to the model's optimizer); a label generator handed in is
treated the same way. Defaults are the official NYUv2 settings: N = 50, 3 terms, η = 1e-4, SGD lr
1e-3 momentum 0.9 weight decay 1e-4, clip 25.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gradients import accumulate, all_finite, as_parameter_list, step_parameters
from ..hypergrad import hypergradient
from ..tasks import NonFiniteLossError, Task, TaskError
from .base import MetaContext, Method, check_meta_source
from .combiners import Combiner, ConvCombiner, make_combiner
from .registry import register


@register("auxilearn")
class AuxiLearn(Method):
    """Learned loss combiner (``combiner="linear" | "nonlinear" | "conv"``), meta-learned on ``aux``."""

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        combiner: str = "linear",
        meta_every: int = 50,
        neumann_terms: int = 3,
        neumann_lr: float = 1e-4,
        meta_lr: float = 1e-3,
        meta_momentum: float = 0.9,
        meta_weight_decay: float = 1e-4,
        meta_max_norm: float = 25.0,
        meta_source: str = "aux",
        meta_scope: str = "shared",
        init: float = 1.0,
        hidden: int = 10,
        init_upper: float = 0.1,
        learn_combiner: bool = True,
        label_generator: nn.Module | Iterable[Tensor] | None = None,
    ):
        super().__init__(tasks, primary)
        if not isinstance(meta_every, int) or isinstance(meta_every, bool) or meta_every < 1:
            raise ValueError(f"{self.name}: meta_every must be a positive integer, got {meta_every!r}")
        if not isinstance(neumann_terms, int) or isinstance(neumann_terms, bool) or neumann_terms < 0:
            raise ValueError(f"{self.name}: neumann_terms must be an integer >= 0, got {neumann_terms!r}")
        for label, value in (("neumann_lr", neumann_lr), ("meta_lr", meta_lr), ("meta_max_norm", meta_max_norm)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{self.name}: {label} must be finite and > 0, got {value!r}")
        if not 0 <= meta_momentum < 1:
            raise ValueError(f"{self.name}: meta_momentum must be in [0, 1), got {meta_momentum}")
        if not (math.isfinite(meta_weight_decay) and meta_weight_decay >= 0):
            raise ValueError(f"{self.name}: meta_weight_decay must be finite and >= 0, got {meta_weight_decay}")
        check_meta_source(meta_source, self.name)
        if meta_scope not in ("shared", "all"):
            raise ValueError(f"{self.name}: meta_scope must be 'shared' or 'all', got {meta_scope!r}")
        self.combiner: Combiner = make_combiner(combiner, self.num_tasks, hidden, init_upper, init)
        self.combiner_kind = combiner
        self.meta_every, self.neumann_terms, self.neumann_lr = meta_every, neumann_terms, float(neumann_lr)
        self.meta_lr, self.meta_momentum = float(meta_lr), float(meta_momentum)
        self.meta_weight_decay, self.meta_max_norm = float(meta_weight_decay), float(meta_max_norm)
        self.meta_source, self.meta_scope = meta_source, meta_scope
        self.learn_combiner = bool(learn_combiner)
        # the generator belongs to the model (its state is in the model's state_dict); hold a plain list
        extra = [] if label_generator is None else (
            list(label_generator.parameters()) if isinstance(label_generator, nn.Module)
            else as_parameter_list(label_generator, "label_generator")
        )
        if label_generator is not None and not extra:
            raise ValueError(f"{self.name}: label_generator has no parameters (an exhausted generator expression?)")
        self._generator_parameters: list[Tensor] = extra
        if not self.learn_combiner and not extra:
            raise ValueError(f"{self.name}: learn_combiner=False and no label_generator: there is nothing to meta-learn")
        for p in self.meta_parameters():
            p.requires_grad_(False)
        for p in self.combiner.parameters():
            p.requires_grad_(False)
        size = sum(p.numel() for p in self.meta_parameters())
        self.register_buffer("velocity", torch.zeros(size))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_weights", torch.ones(self.num_tasks))

    # ------------------------------------------------------------------ what the trainer asks
    @property
    def loss_reduction(self) -> str:
        """What the combiner reads: scalars (``"mean"``), per-sample (``"sample"``) or per-pixel (``"none"``)."""
        return self.combiner.reduction

    def meta_parameters(self) -> list[Tensor]:
        """φ: the combiner's parameters (when learned) and the label generator's."""
        own = list(self.combiner.parameters()) if self.learn_combiner else []
        return own + self._generator_parameters

    def meta_due(self) -> bool:
        return int(self.steps) > 0 and int(self.steps) % self.meta_every == 0

    def weights(self) -> dict[str, float]:
        """Effective weight per task: ∂L_T/∂ℓ_k summed over samples / pixels (the last step's)."""
        if self.combiner_kind == "linear":
            return self._as_dict(self.combiner.weight)
        return self._as_dict(self.last_weights)

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}, combiner={self.combiner_kind!r}, meta_every={self.meta_every}"

    # ------------------------------------------------------------------ losses -> combiner input
    def stack(self, losses: list[Tensor]) -> Tensor:
        """The losses in the layout the combiner reads: (K,), (B, K) or (B, K, H, W).

        Scalar or per-sample losses are averaged to scalars for ``linear``; for ``nonlinear``, losses
        with extra dimensions are averaged to per-sample and scalars broadcast over the batch; for
        ``conv``, (B, C, H, W) losses are averaged over C and per-sample ones broadcast over pixels.
        """
        reduction = self.loss_reduction
        names = self.task_names
        if reduction == "mean":
            return torch.stack([loss.mean() for loss in losses])
        if reduction == "sample":
            rows = [loss.reshape(loss.shape[0], -1).mean(dim=1) if loss.dim() else loss.reshape(1) for loss in losses]
            batch = max(len(r) for r in rows)
            for name, row in zip(names, rows):
                if len(row) not in (1, batch):
                    raise TaskError(f"task {name!r}: {len(row)} per-sample losses, but another task has {batch}")
            return torch.stack([r.expand(batch) for r in rows], dim=1)
        # "none": loss images
        images: list[Tensor | None] = []
        for name, loss in zip(names, losses):
            if loss.dim() == 4:
                images.append(loss.mean(dim=1))
            elif loss.dim() == 3:
                images.append(loss)
            elif loss.dim() == 1:
                images.append(None)
            else:
                raise TaskError(
                    f"task {name!r}: the conv combiner needs per-pixel losses (B, H, W) or (B, C, H, W), "
                    f"or per-sample (B,), got shape {tuple(loss.shape)}"
                )
        reference = next((i for i in images if i is not None), None)
        if reference is None:
            raise TaskError(f"the conv combiner needs at least one task with per-pixel losses; tasks {names} have none")
        B, H, W = reference.shape
        if min(H, W) < ConvCombiner.min_size:
            raise TaskError(f"the conv combiner needs loss images of at least {ConvCombiner.min_size}x{ConvCombiner.min_size}, got {H}x{W}")
        out = []
        for name, loss, image in zip(names, losses, images):
            if image is None:
                image = loss.view(-1, 1, 1).expand(-1, H, W)
            if image.shape != (B, H, W):
                raise TaskError(f"task {name!r}: loss image of shape {tuple(image.shape)}, but another task's is {(B, H, W)}")
            out.append(image)
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------ ordinary step
    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared_parameters: Iterable[Tensor],
        task_parameters: Iterable[Tensor] | None = None,
        representation: Tensor | None = None,
    ) -> dict[str, Any]:
        """One backward of L_T = φ(losses); losses may be scalars or unreduced (per sample / pixel).

        Validated and refused as :meth:`Method.backward` says."""
        ordered = self.tasks.ordered(losses, scalar=False)
        stacked = self.stack(ordered)
        shared, heads = step_parameters(ordered, shared_parameters, task_parameters, self.task_names)
        leaf = stacked.detach().requires_grad_(True)
        with torch.enable_grad():
            objective = self.combiner(leaf)
            (slope,) = torch.autograd.grad(objective, leaf)
        inputs = [*shared, *heads]
        # into temporaries first: nothing reaches .grad unless every entry is finite everywhere
        grads = torch.autograd.grad(stacked, inputs, slope, allow_unused=True)
        finite = bool(torch.isfinite(objective.detach())) and all_finite([slope, *grads])
        if not distributed.all_agree(finite):
            raise NonFiniteLossError("combined", f"{self.name}: the combined objective ({float(objective.detach()):g}) or its gradient is not finite")
        accumulate(grads, inputs)
        # the combiner acts per sample (or on batch means), so its gradient averages like a loss's
        distributed.average_gradients(dict.fromkeys(inputs))
        effective = slope if slope.dim() == 1 else slope.transpose(0, 1).reshape(self.num_tasks, -1).sum(dim=1)
        self.last_weights = distributed.average(effective.detach()).to(self.last_weights)
        objective = distributed.average(objective.detach())
        self.steps += 1
        return {"weights": self.weights(), "objective": float(objective.detach())}

    # ------------------------------------------------------------------ meta step
    def meta_gradient(self, context: MetaContext) -> tuple[list[Tensor], dict[str, Any]]:
        """dL_V/dφ at the current model, by implicit differentiation (φ must require grad)."""
        train = self.tasks.ordered(context.losses(context.train_batch()), scalar=False)
        train_loss = self.combiner(self.stack(train))
        batch = context.validation_batch(self.meta_source, self.name)
        val_loss = self.tasks.ordered(context.losses(batch), scalar=False)[0].mean()
        W = list(context.shared) + (list(context.heads) if self.meta_scope == "all" else [])
        result = hypergradient(
            train_loss, val_loss, W, self.meta_parameters(),
            terms=self.neumann_terms, step_size=self.neumann_lr,
        )
        values = distributed.average(torch.stack([val_loss.detach(), train_loss.detach().to(val_loss.dtype)]))
        info = {"val_loss": float(values[0]), "train_objective": float(values[1])}
        return list(result), info

    def meta_step(self, context: MetaContext) -> dict[str, Any]:
        """Update φ; on any failure φ, the velocity and the counters are left as they were."""
        phi = self.meta_parameters()
        snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
        saved = [p.detach().clone() for p in self._generator_parameters]
        try:
            for p in phi:
                p.requires_grad_(True)
            grads, info = self.meta_gradient(context)
            flat = torch.cat([g.reshape(-1) for g in grads]).to(self.velocity)
            if not bool(torch.isfinite(flat).all()):
                raise FloatingPointError(f"{self.name}: the hypergradient is not finite")
            norm = float(flat.norm())
            if norm > self.meta_max_norm:
                flat = flat * (self.meta_max_norm / norm)
            with torch.no_grad():
                values = torch.cat([p.detach().reshape(-1) for p in phi]).to(self.velocity)
                self.velocity = self.meta_momentum * self.velocity + flat + self.meta_weight_decay * values
                update = (values - self.meta_lr * self.velocity).split([p.numel() for p in phi])
                for p, new in zip(phi, update):
                    p.copy_(new.view_as(p))
                self.combiner.project()
            self.meta_steps += 1
        except BaseException:
            self.load_state_dict(snapshot)
            with torch.no_grad():
                for p, old in zip(self._generator_parameters, saved):
                    p.copy_(old)
            raise
        finally:
            for p in phi:
                p.requires_grad_(False)
        return {**info, "hypergrad_norm": norm, "meta_weights": self.weights()}
