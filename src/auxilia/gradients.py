"""Per-task gradients, built once for every method.

The Jacobian ``G`` (K x P) has one row per task (row 0 the primary task) holding that task's gradient
on the shared parameters. Three ways to get it:

* ``loop``: K backward passes (exact, always works);
* ``batched``: one vmapped backward over the K unit vectors (exact; faster when kernels are small;
  falls back to ``loop`` when an operation has no batching rule);
* ``representation``: the Jacobian with respect to the shared encoder's *output* instead of its
  parameters; one backward through the encoder then pulls the aggregated direction back. A
  different (cheaper) quantity, so it is only used when asked for.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

GradientMode = Literal["loop", "batched", "representation"]
MODES: tuple[str, ...] = ("loop", "batched", "representation")

_fallback_warned = False


def check_mode(mode: str) -> GradientMode:
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {MODES}")
    return mode  # type: ignore[return-value]


def as_parameter_list(parameters: Iterable[Tensor] | Tensor, what: str = "shared_parameters") -> list[Tensor]:
    """Materialize an iterable of tensors once (a generator would be empty the second time)."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = list(parameters)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}: expected tensors, got {type(p).__name__}")
    return params


def jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    mode: Literal["loop", "batched"] = "loop",
    chunk_size: int | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """(K, P) matrix of d losses[k] / d inputs, flattened and concatenated over ``inputs``.

    Inputs a loss does not reach get zero rows. The graph is kept (``retain_graph``) so the caller can
    still backward through heads or the encoder afterwards.
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("jacobian needs at least one input tensor (no shared parameters given?)")
    if mode == "batched":
        try:
            return _jacobian_batched(losses, inputs, chunk_size, retain_graph)
        except RuntimeError as error:
            if "vmap" not in str(error).lower() and "batch" not in str(error).lower():
                raise
            global _fallback_warned
            if not _fallback_warned:
                warnings.warn(
                    f"batched per-task gradients are not supported by an operation of this model "
                    f"({str(error).splitlines()[0][:160]}); falling back to mode='loop'",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _fallback_warned = True
    return _jacobian_loop(losses, inputs, retain_graph)


def _flat(grads: Sequence[Tensor | None], inputs: Sequence[Tensor], leading: tuple[int, ...] = ()) -> Tensor:
    pieces = []
    for g, x in zip(grads, inputs):
        if g is None:
            pieces.append(x.new_zeros(leading + (x.numel(),)))
        else:
            pieces.append(g.reshape(leading + (x.numel(),)))
    return torch.cat(pieces, dim=-1)


def _jacobian_loop(losses: Sequence[Tensor], inputs: list[Tensor], retain_graph: bool) -> Tensor:
    sizes = [x.numel() for x in inputs]
    out = inputs[0].new_empty((len(losses), sum(sizes)))  # every entry is written below
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            out[k].zero_()
            continue
        keep = retain_graph or k < len(losses) - 1
        grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
        for piece, g in zip(torch.split(out[k], sizes), grads):
            if g is None:
                piece.zero_()
            else:
                piece.copy_(g.reshape(-1))
    return out


def _jacobian_batched(
    losses: Sequence[Tensor], inputs: list[Tensor], chunk_size: int | None, retain_graph: bool
) -> Tensor:
    alive = [k for k, loss in enumerate(losses) if loss.requires_grad]
    K = len(losses)
    P = sum(x.numel() for x in inputs)
    out = inputs[0].new_zeros((K, P))
    if not alive:
        return out
    stacked = torch.stack([losses[k] for k in alive])
    eye = torch.eye(len(alive), dtype=stacked.dtype, device=stacked.device)
    step = chunk_size or len(alive)
    if step < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, len(alive), step):
        rows = eye[start : start + step]
        keep = retain_graph or start + step < len(alive)
        grads = torch.autograd.grad(
            stacked, inputs, grad_outputs=rows, retain_graph=keep, allow_unused=True, is_grads_batched=True
        )
        out[alive[start : start + step]] = _flat(grads, inputs, (rows.shape[0],))
    return out


def gram(G: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """M = G Gᵀ (K x K), returned in float64 for the solvers built on it.

    The product is taken in G's own precision (float32 gradients carry no more than float32
    accuracy, and copying a K x P matrix to float64 would cost more than the product); half
    precision is first raised to float32.
    """
    if G.dtype not in (torch.float32, torch.float64):
        G = G.float()
    return (G @ G.T).to(dtype)


def write_gradient(direction: Tensor, parameters: Sequence[Tensor]) -> None:
    """Add a flat direction into ``.grad`` of each parameter, as ``backward`` would (accumulating)."""
    offset = 0
    for p in parameters:
        n = p.numel()
        piece = direction[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
    if offset != direction.numel():
        raise ValueError(f"direction has {direction.numel()} entries but the parameters hold {offset}")


def split(flat: Tensor, parameters: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter views of a flat (..., P) tensor, e.g. of a Jacobian's columns."""
    sizes = [p.numel() for p in parameters]
    pieces = torch.split(flat, sizes, dim=-1)
    return [piece.reshape(flat.shape[:-1] + p.shape) for piece, p in zip(pieces, parameters)]


def reached_parameters(losses: Sequence[Tensor]) -> list[list[Tensor]]:
    """For each loss, the leaf tensors requiring grad that its graph reaches (graph walk, no backward).

    Used to find task-specific parameters when the caller does not name them, and to tell which
    parameters are shared (reached by more than one loss).
    """
    found: list[list[Tensor]] = []
    for loss in losses:
        leaves: dict[int, Tensor] = {}
        seen: set[int] = set()
        stack = [loss.grad_fn] if loss.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None:
                leaves[id(variable)] = variable
            stack.extend(next_node for next_node, _ in node.next_functions)
        found.append(list(leaves.values()))
    return found


def other_parameters(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> list[Tensor]:
    """Leaves the losses reach that are not in ``shared`` (the task-specific heads)."""
    shared_ids = {id(p) for p in shared}
    out: dict[int, Tensor] = {}
    for leaves in reached_parameters(losses):
        for leaf in leaves:
            if id(leaf) not in shared_ids:
                out[id(leaf)] = leaf
    return list(out.values())
