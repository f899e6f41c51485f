"""Hypergradients by implicit differentiation, shared by every meta-learned method.

A method trains the model weights W on a training objective L_T(W, φ) that depends on its own
meta-parameters φ (a loss combiner, bargaining powers, module weights), and wants φ to lower the
primary loss on held-out data, L_V(W). At a (near-)stationary W of L_T the implicit function theorem
gives

    dL_V/dφ = ∂L_V/∂φ − (∂²L_T/∂φ∂W) H⁻¹ ∂L_V/∂W,      H = ∂²L_T/∂W².

H⁻¹ g_V is approximated by a truncated Neumann series, v = η Σ_{i=0}^{n} (I − η H)^i g_V, using only
Hessian-vector products. Convention: ``scale_by_step=False`` (the default, as in AuxiLearn's official
code and the learning rates tuned with it) drops the leading η, so v is 1/η times the series
approximation of H⁻¹ g_V; ``scale_by_step=True`` keeps it and converges to the exact implicit gradient
as n grows when 0 < η < 2 / λ_max(H).

Cost per call, in backward-equivalents: one backward for g_V, one double-backward-capable backward
for ∂L_T/∂W, n Hessian-vector products (each about two backwards) and one mixed product for φ:
about 4 + 2n in theory; :attr:`Hypergradient.backward_calls` counts the autograd calls made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .gradients import as_parameter_list


class HypergradientError(RuntimeError):
    """The hypergradient cannot be computed (e.g. an operation without a double backward)."""


@dataclass
class Hypergradient:
    """The result: one gradient per meta-parameter, the Neumann vector v, and the call count."""

    grads: list[Tensor]
    vector: list[Tensor]
    backward_calls: int


def _check_scalar(loss: Tensor, what: str) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise HypergradientError(f"{what} must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise HypergradientError(f"{what} does not require grad: it does not depend on any parameter")


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _double_backward_error(error: RuntimeError) -> HypergradientError:
    return HypergradientError(
        "an operation in the training loss has no double backward, so Hessian-vector products "
        f"cannot be formed: {str(error).splitlines()[0]}. Replace it with a twice-differentiable "
        "operation (or a custom autograd.Function whose backward is itself differentiable)."
    )


def _check_twice_differentiable(grads: Sequence[Tensor]) -> None:
    """Autograd marks a backward that cannot be differentiated again with an error node that it
    silently prunes when nothing else connects through it; find it before trusting a zero result."""
    seen: set[int] = set()
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in ("Error", "DelayedError"):
            raise _double_backward_error(RuntimeError(
                "a backward marked once_differentiable (or otherwise not differentiable) is in the graph"
            ))
        stack.extend(next_node for next_node, _ in node.next_functions)


def neumann_vector(
    train_grads: Sequence[Tensor],
    parameters: Sequence[Tensor],
    vector: Sequence[Tensor],
    terms: int = 3,
    step_size: float = 1.0,
    scale_by_step: bool = False,
) -> tuple[list[Tensor], int]:
    """v = [η] Σ_{i=0}^{terms} (I − η H)^i ``vector``, with H the Hessian behind ``train_grads``.

    ``train_grads`` must be ∂L_T/∂W built with ``create_graph=True``. Returns v and the number of
    Hessian-vector products taken (``terms``).
    """
    if terms < 0:
        raise ValueError(f"terms must be >= 0, got {terms}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    p = [x.detach().clone() for x in vector]
    total = [x.clone() for x in p]
    for _ in range(terms):
        try:
            hvp = torch.autograd.grad(train_grads, parameters, grad_outputs=p, retain_graph=True, allow_unused=True)
        except RuntimeError as error:
            raise _double_backward_error(error) from error
        hvp = _zeros_for_none(hvp, parameters)
        p = [pi - step_size * hi.detach() for pi, hi in zip(p, hvp)]
        total = [t + pi for t, pi in zip(total, p)]
    if scale_by_step:
        total = [step_size * t for t in total]
    return total, terms


def hypergradient(
    train_loss: Tensor,
    val_loss: Tensor,
    parameters: Iterable[Tensor],
    meta_parameters: Iterable[Tensor],
    *,
    terms: int = 3,
    step_size: float = 1.0,
    scale_by_step: bool = False,
    accumulate: bool = False,
) -> Hypergradient:
    """dL_V/dφ by implicit differentiation (see the module docstring for the convention).

    ``parameters`` (W) and ``meta_parameters`` (φ) may be any iterables, generators included; a
    parameter neither loss reaches gets a zero gradient. With ``accumulate=True`` the result is
    also added into each φ's ``.grad`` for a meta-optimizer step. W's ``.grad`` is not touched.
    """
    W = as_parameter_list(parameters, "parameters")
    phi = as_parameter_list(meta_parameters, "meta_parameters")
    if not W:
        raise HypergradientError("no parameters given (an exhausted generator?)")
    if not phi:
        raise HypergradientError("no meta_parameters given (an exhausted generator?)")
    _check_scalar(train_loss, "train_loss")
    _check_scalar(val_loss, "val_loss")
    calls = 0

    # ∂L_V/∂W, and ∂L_V/∂φ where φ enters L_V directly
    val_grads = torch.autograd.grad(val_loss, W + phi, retain_graph=False, allow_unused=True)
    calls += 1
    g_val = _zeros_for_none(val_grads[: len(W)], W)
    direct = _zeros_for_none(val_grads[len(W) :], phi)

    train_grads = torch.autograd.grad(train_loss, W, create_graph=True, allow_unused=True)
    calls += 1
    reached = [(g, w) for g, w in zip(train_grads, W) if g is not None]
    if not reached:
        raise HypergradientError("the training loss does not depend on the given parameters")
    grads_reached = [g for g, _ in reached]
    params_reached = [w for _, w in reached]
    if not any(g.requires_grad for g in grads_reached):
        raise HypergradientError(
            "∂L_T/∂W does not depend on the meta-parameters or on W: nothing to differentiate "
            "(is the training loss linear in W and free of φ?)"
        )
    _check_twice_differentiable(grads_reached)
    g_val_reached = [g for g, tg in zip(g_val, train_grads) if tg is not None]
    v, hvps = neumann_vector(grads_reached, params_reached, g_val_reached, terms, step_size, scale_by_step)
    calls += hvps

    try:
        mixed = torch.autograd.grad(grads_reached, phi, grad_outputs=v, allow_unused=True)
    except RuntimeError as error:
        if "does not require grad" in str(error):
            raise HypergradientError(
                "the training loss's gradient does not depend on the meta-parameters: they do not "
                "influence training, so their hypergradient is only the direct term"
            ) from error
        raise _double_backward_error(error) from error
    calls += 1
    grads = [d - m for d, m in zip(direct, _zeros_for_none(mixed, phi))]
    if accumulate:
        for x, g in zip(phi, grads):
            x.grad = g.clone() if x.grad is None else x.grad + g
    full_v = []
    it = iter(v)
    for tg, w in zip(train_grads, W):
        full_v.append(next(it) if tg is not None else torch.zeros_like(w))
    return Hypergradient(grads, full_v, calls)
