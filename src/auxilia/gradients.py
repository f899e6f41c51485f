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


def step_parameters(
    losses: Sequence[Tensor],
    shared_parameters: Iterable[Tensor] | Tensor,
    task_parameters: Iterable[Tensor] | Tensor | None,
    names: Sequence[str],
    ignored: Iterable[int] = (),
) -> tuple[list[Tensor], list[Tensor]]:
    """The trainable shared and task-specific tensors of one step, after refusing what would
    silently give a wrong update; ``task_parameters=None`` finds the heads by walking the graphs.

    * no shared parameters at all (an exhausted generator: ``model.encoder.parameters()`` made
      once and reused; or an empty list) would turn every method into the plain sum of losses;
    * a tensor given twice (within or across the two lists) would get its gradient twice;
    * frozen tensors (``requires_grad=False``) are skipped, as optimizers skip them; all shared
      ones frozen leaves nothing to combine;
    * a loss (other than those at the ``ignored`` positions) that reaches none of the trainable
      tensors (detached, or computed from frozen ones only) would be ignored without a word.
    """
    shared = as_parameter_list(shared_parameters)
    if not shared:
        raise ValueError(
            "shared_parameters is empty: an exhausted generator (e.g. model.encoder.parameters() "
            "created once and reused on every step) or an empty list; pass a list, e.g. "
            "list(model.encoder.parameters())"
        )
    given = None if task_parameters is None else as_parameter_list(task_parameters, "task_parameters")
    seen: dict[int, str] = {}
    for what, group in (("shared_parameters", shared), ("task_parameters", given or [])):
        for i, p in enumerate(group):
            if id(p) in seen:
                raise ValueError(
                    f"{what}[{i}] (shape {tuple(p.shape)}) is also in {seen[id(p)]}: a tensor given "
                    "twice would get its gradient twice; give each tensor once"
                )
            seen[id(p)] = what
    trainable = [p for p in shared if p.requires_grad]
    if not trainable:
        raise ValueError("every shared parameter is frozen (requires_grad=False): nothing to combine")
    skip = set(ignored)
    if given is None:
        reached = reached_parameters(losses)
        shared_ids = {id(p) for p in trainable}
        heads = list({id(x): x for leaves in reached for x in leaves if id(x) not in shared_ids}.values())
        reaches = [bool(leaves) for leaves in reached]
    else:
        heads = [p for p in given if p.requires_grad]
        targets = {id(p) for p in [*trainable, *heads]}
        reaches = [k in skip or _reaches(loss, targets) for k, loss in enumerate(losses)]
    for k, (name, ok) in enumerate(zip(names, reaches)):
        if not ok and k not in skip:
            how = "is detached (no grad_fn)" if losses[k].grad_fn is None else "reaches no trainable parameter"
            raise ValueError(
                f"task {name!r}: its loss {how}; it would be ignored. Compute it from the model's "
                "output without .detach(), torch.no_grad() or .item()"
            )
    return trainable, heads


def _reaches(loss: Tensor, targets: set[int]) -> bool:
    """Whether the loss's graph reaches a leaf in ``targets`` (walk that stops at the first)."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    mode: Literal["loop", "batched"] = "loop",
    chunk_size: int | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """(K, P) matrix of d losses[k] / d inputs, flattened and concatenated over ``inputs``.

    Inputs a loss does not reach get zero entries; an input the loss's graph does reach but autograd
    gives no gradient for (a representation that is an output of a ``torch.compile``'d region whose
    heads are inside the same region) is an error, never a zero. The graph is kept
    (``retain_graph``) so the caller can still backward through heads or the encoder afterwards.
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


def _check_missing(loss: Tensor, grads: Sequence[Tensor | None], inputs: Sequence[Tensor]) -> None:
    """Refuse a ``None`` gradient for a non-leaf input whose node the loss's graph contains.

    Autograd answers ``None`` when the loss does not depend on that output of the node; in eager
    code a graph that contains the node reaches it through the output, so this only happens when
    the consumer is fused with the producer (``torch.compile`` of the whole model) or the loss
    bypasses the tensor (a skip connection around it): a zero there would be a wrong gradient.
    Leaves are not checked: a reached leaf always gets a gradient (a compiled region gives zeros)."""
    missing = [x for g, x in zip(grads, inputs) if g is None and x.grad_fn is not None]
    if not missing or loss.grad_fn is None:
        return
    nodes = _graph_nodes(loss.grad_fn)
    for x in missing:
        if id(x.grad_fn) in nodes:
            compiled = any("Compiled" in type(n).__name__ for n in nodes.values())
            cause = (
                "the model is torch.compile'd as a whole, so the heads read the representation inside "
                "the compiled graph; compile the encoder and the heads separately, or use eager mode "
                "or mode='loop'"
                if compiled
                else "the loss reaches the encoder without passing through the given representation "
                "(pass the tensor the heads actually read)"
            )
            raise TypeError(f"no gradient reaches the representation although the loss depends on it: {cause}")


def _graph_nodes(root: object) -> dict[int, object]:
    """Every autograd node reachable from ``root``, by id (graph walk, no backward)."""
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(next_node for next_node, _ in node.next_functions)  # type: ignore[attr-defined]
    return seen


def _jacobian_loop(losses: Sequence[Tensor], inputs: list[Tensor], retain_graph: bool) -> Tensor:
    sizes = [x.numel() for x in inputs]
    out = inputs[0].new_empty((len(losses), sum(sizes)))  # every entry is written below
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            out[k].zero_()
            continue
        keep = retain_graph or k < len(losses) - 1
        grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
        _check_missing(loss, grads, inputs)
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
        for k in alive[start : start + step]:
            _check_missing(losses[k], grads, inputs)
        out[alive[start : start + step]] = _flat(grads, inputs, (rows.shape[0],))
    return out


_CHUNK = 1 << 16  # columns per float64 block: K x 65536 doubles, a few MB for K <= 10


def gram(G: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """M = G Gᵀ (K x K) accumulated in float64 over blocks of columns, for the solvers built on it.

    A float32 product loses squared norms below 1e-38 and overflows above 1e38 (gradients of scale
    1e±19), and it is known to only 1e-7 of its largest entry, which hides a task 1e3 times
    smaller than another. In float64 the Gram matrix of any float32 G is exact to ~1e-16 without
    rescaling; the blocks avoid a full (K, P) float64 copy of G.
    """
    if G.dtype == torch.float64:
        return (G @ G.T).to(dtype)
    M = G.new_zeros((G.shape[0], G.shape[0]), dtype=torch.float64)
    for block in torch.split(G, _CHUNK, dim=1):
        block = block.double()
        M.addmm_(block, block.T)
    return M.to(dtype)


# float32 combines coefficients within [_LOW, _HIGH] well: none is lost to overflow or underflow,
# and none is large enough for the cancellation of large terms to cost more than G's own precision
_LOW, _HIGH = 2.0**-60, 2.0**10


def combine(coefficients: Tensor, G: Tensor) -> Tensor:
    """cᵀG (P,) in G's dtype, without overflow, underflow or cancellation of the coefficients.

    Coefficients from a scale-invariant solver are as extreme as the gradients are (α_k ~ 1/‖g_k‖):
    cast to float32 a coefficient of 1e40 is infinite and one of 1e-50 is zero, although each
    product c_k g_k is an ordinary number; and large coefficients whose terms nearly cancel (a
    CAGrad or Nash update near a Pareto-stationary point) leave only float32 rounding. Such
    coefficients are combined in float64, block by block; ordinary ones take the plain product.
    """
    c = coefficients.detach().to(device=G.device, dtype=torch.float64)
    if G.dtype == torch.float64:
        return c @ G
    magnitude = c.abs()
    nonzero = magnitude[magnitude > 0]
    if not bool(torch.isfinite(c).all()) or nonzero.numel() == 0 or (
        float(nonzero.max()) <= _HIGH and float(nonzero.min()) >= _LOW
    ):
        return c.to(G.dtype) @ G
    out = G.new_empty(G.shape[1])
    for piece, block in zip(torch.split(out, _CHUNK), torch.split(G, _CHUNK, dim=1)):
        piece.copy_(c @ block.double())
    return out


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """Whether every entry of every tensor is finite: one fused max-abs reduction per dtype (a
    max never overflows, and NaN and Inf propagate through it)."""
    present = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not present:
        return True
    peaks = torch._foreach_norm(present, float("inf"))
    return bool(torch.isfinite(torch.stack([p.double() for p in peaks])).all())


def accumulate(grads: Sequence[Tensor | None], parameters: Sequence[Tensor]) -> None:
    """Add per-parameter gradients into ``.grad`` as ``backward`` would; ``None`` leaves it alone."""
    for g, p in zip(grads, parameters):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype)
        else:
            p.grad.add_(g.to(p.dtype))


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
        nodes = _graph_nodes(loss.grad_fn) if loss.grad_fn is not None else {}
        leaves = {id(v): v for v in (getattr(n, "variable", None) for n in nodes.values()) if v is not None}
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
