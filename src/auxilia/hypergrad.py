"""Hypergradients by implicit differentiation, shared by every meta-learned method.

A method trains the model weights W on a training objective L_T(W, φ) that depends on its own
meta-parameters φ (a loss combiner, bargaining powers, module weights) and wants φ to lower a
validation loss L_V(W, φ) on held-out data. At a (near-)stationary point of L_T in W, the implicit
function theorem gives

    dL_V/dφ = ∂L_V/∂φ − (∂²L_T/∂φ∂W) H⁻¹ ∂L_V/∂W,        H = ∂²L_T/∂W².

``H⁻¹ g_V`` (g_V = ∂L_V/∂W) is approximated by a truncated Neumann series built from
Hessian-vector products only:

    v = c · Σ_{i=0}^{n} (I − η H)^i g_V,        n = ``terms``, η = ``step_size``,

which takes n Hessian-vector products and holds n + 1 addends. The hypergradient is
``∂L_V/∂φ − ∂(∂L_T/∂W · v)/∂φ``.

The leading factor c (``scale_by_step``)
    * ``scale_by_step=False`` (default): c = 1, the convention of the official AuxiLearn code and
      of AuxiNash, whose meta learning rates were tuned with it. v is then 1/η times the
      series approximation of H⁻¹ g_V; since η is small (1e-4 there) the step size of the
      meta-optimizer absorbs the scale.
    * ``scale_by_step=True``: c = η. This is the exact approximation: v → H⁻¹ g_V as n grows
      whenever 0 < η < 2 / λ_max(H) and H is positive definite. It is also the best-response
      Jacobian of n + 1 unrolled SGD steps of size η, so MAOAL's look-back of M_lb lower steps
      (the sum over τ < M_lb of (I − η H)^τ, η the lower learning rate) is ``terms=M_lb - 1``
      with ``scale_by_step=True``.

H need not be symmetric: the series applies the transposed Jacobian of the training gradient,
so a caller whose update direction is not the gradient of one scalar (module-wise weighted
gradients, say) passes that direction as ``train_grads`` instead of a training loss.

Cost per call. With one plain backward of L_T as the unit and the two forward passes left to the
caller: one backward for g_V (≈ 1), one graph-building backward for ∂L_T/∂W (≈ 1.5), n
Hessian-vector products through the second-order graph (≈ 2.5 to 3.5 each) and one mixed product
for φ (≈ 1.5): about 4 + 2.8·n backward-equivalents. Measured (median of 15, one CPU thread, a
two-layer MLP at batch 128 and a three-layer CNN at batch 32, n ∈ {0, 1, 3, 5, 10}): 3.7–4.8 +
2.6–3.5·n, i.e. ≈ 12–15 for the default n = 3. The number of autograd calls is exact:
``terms + 3`` (``terms + 2`` when the training gradients are supplied), reported as
:attr:`Hypergradient.backward_calls`; :func:`neumann_vector` returns its own count (``terms``).

Nothing here writes the ``.grad`` of W. With ``retain_graph=False`` (default) the graphs of both
losses are released as they are consumed, so L_T and L_V must come from separate forward passes
(pass ``retain_graph=True`` when they share one, or to backward through them afterwards).
Operations whose backward is not itself differentiable (a ``once_differentiable`` custom function,
an ATen op without a double backward such as ``torch.cdist``) raise :class:`HypergradientError`
instead of silently dropping their curvature; a custom backward that detaches its result without
any marker cannot be detected and contributes no curvature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import distributed
from .gradients import as_parameter_list

__all__ = [
    "Hypergradient",
    "HypergradientError",
    "hypergradient",
    "mixed_product",
    "neumann_vector",
    "training_gradients",
]


class HypergradientError(RuntimeError):
    """The hypergradient cannot be computed; the message names the cause."""


class Hypergradient(list):
    """dL_V/dφ, one tensor per meta-parameter in the order given (a plain ``list`` of tensors).

    Attributes:
        vector: the Neumann vector v, one tensor per parameter of W (zeros where neither loss
            reaches); AuxiNash uses it directly, dL_V/dα_k = −g_kᵀ v.
        backward_calls: the number of ``torch.autograd.grad`` calls made.
    """

    def __init__(self, grads: Iterable[Tensor], vector: list[Tensor], backward_calls: int):
        super().__init__(grads)
        self.vector = vector
        self.backward_calls = backward_calls

    @property
    def grads(self) -> list[Tensor]:
        return list(self)

    def __repr__(self) -> str:
        return f"Hypergradient({list.__repr__(self)}, backward_calls={self.backward_calls})"


_SECOND_ORDER = ("double backward", "differentiate twice", "once_differentiable")
_NO_DOUBLE_BACKWARD = _SECOND_ORDER + ("is not implemented", "not supported")
_VAL, _TRAIN = "validation gradient", "training gradient"
_HVP, _MIXED = "Hessian-vector product", "mixed derivative"
_MARKED = "a backward marked once_differentiable, or otherwise not differentiable, is in its graph"
_FREED = ("backward through the graph a second time", "already been freed")


def _no_double_backward(detail: str) -> HypergradientError:
    return HypergradientError(
        "an operation in the training loss has no double backward, so Hessian-vector products "
        f"cannot be formed ({detail}). Replace it with a twice-differentiable operation, or give "
        "a custom autograd.Function a backward that is itself differentiable."
    )


def _translate(error: RuntimeError, stage: str) -> BaseException:
    """Name the cause of an autograd failure where it is a known one; otherwise keep the error."""
    text = str(error)
    first = text.splitlines()[0] if text else type(error).__name__
    lowered = text.lower()
    if any(p in lowered for p in _FREED):
        return HypergradientError(
            f"{stage}: part of the graph was already released ({first}). The training and "
            "validation losses probably share a forward pass, or one was backpropagated already; "
            "compute them from separate forward passes or pass retain_graph=True."
        )
    if stage in (_HVP, _MIXED):
        patterns = _NO_DOUBLE_BACKWARD
    elif stage == _TRAIN:  # a first-order backward only fails for this reason if it says so
        patterns = _SECOND_ORDER
    else:
        patterns = ()
    if any(p in lowered for p in patterns):
        return _no_double_backward(first)
    return error


def _grad(outputs, inputs, grad_outputs=None, *, retain_graph, create_graph=False, stage):
    """torch.autograd.grad with errors translated. Under a sharded meta batch (several processes,
    :func:`auxilia.distributed.sharded`) every value returned is the global batch's: each is linear
    in the per-sample losses, so it is averaged here; gradients kept as graphs (``create_graph``)
    stay local, and the products taken through them are averaged when they are evaluated."""
    try:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
            create_graph=create_graph, allow_unused=True,
        )
    except RuntimeError as error:
        translated = _translate(error, stage)
        if translated is error:
            raise
        raise translated from error
    if create_graph or not distributed.active():
        return grads
    return tuple(distributed.average_all(grads))


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _check_scalar(loss: object, what: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise HypergradientError(f"{what} must be a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise HypergradientError(
            f"{what} must be a scalar tensor, got shape {tuple(loss.shape)} (reduce it first)"
        )
    if not loss.requires_grad:
        raise HypergradientError(
            f"{what} does not require grad: it depends on no parameter (computed under no_grad?)"
        )
    return loss


def _check_series(terms: int, step_size: float) -> None:
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 0:
        raise ValueError(f"terms must be an integer >= 0, got {terms!r}")
    if not (isinstance(step_size, (int, float)) and 0 < float(step_size) < float("inf")):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")


def _walk(roots: Sequence[Tensor], targets: Sequence[Tensor] = ()) -> tuple[bool, list[bool]]:
    """Traverse the graph behind ``roots``: whether a not-differentiable backward marker is in it,
    and which of ``targets`` it reaches.

    Autograd marks a backward that cannot be differentiated again with an error node, but prunes
    that node silently whenever the requested inputs are not behind it, returning ``None`` instead
    of raising; the marker therefore has to be looked for.
    """
    leaf_ids = {id(t): k for k, t in enumerate(targets) if t.is_leaf}
    target_nodes = [t.grad_fn for t in targets]  # held, so that their ids stay valid
    node_ids = {id(n): k for k, n in enumerate(target_nodes) if n is not None}
    reached = [False] * len(targets)
    seen: dict[int, object] = {}  # keeps the visited node objects alive so that ids stay unique
    marked = False
    stack = [g.grad_fn for g in roots if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if id(node) in node_ids:
            reached[node_ids[id(node)]] = True
        name = type(node).__name__
        if name in ("Error", "DelayedError"):
            marked = True
        elif name == "AccumulateGrad":
            k = leaf_ids.get(id(node.variable))
            if k is not None:
                reached[k] = True
        stack.extend(child for child, _ in node.next_functions)
    return marked, reached


def training_gradients(
    train_loss: Tensor, parameters: Iterable[Tensor] | Tensor
) -> list[Tensor | None]:
    """∂L_T/∂W with the graph kept for second derivatives (``None`` where L_T does not reach)."""
    W = as_parameter_list(parameters, "parameters")
    _check_scalar(train_loss, "train_loss")
    active = [w for w in W if w.requires_grad]
    with torch.enable_grad():
        grads = iter(_grad(train_loss, active, retain_graph=True, create_graph=True, stage=_TRAIN))
    return [next(grads) if w.requires_grad else None for w in W]


def _pairs(train_grads: Sequence[Tensor | None], parameters: Sequence[Tensor]) -> list[int]:
    if len(train_grads) != len(parameters):
        raise ValueError(
            f"train_grads has {len(train_grads)} entries for {len(parameters)} parameters"
        )
    for g, w in zip(train_grads, parameters):
        if g is not None and g.shape != w.shape:
            raise ValueError(
                f"a training gradient of shape {tuple(g.shape)} does not match its parameter's "
                f"shape {tuple(w.shape)}"
            )
    return [i for i, g in enumerate(train_grads) if g is not None and g.requires_grad]


def neumann_vector(
    train_grads: Sequence[Tensor | None],
    parameters: Sequence[Tensor],
    vector: Sequence[Tensor],
    terms: int = 3,
    step_size: float = 1e-4,
    scale_by_step: bool = False,
) -> tuple[list[Tensor], int]:
    """v = c · Σ_{i=0}^{terms} (I − η H)^i ``vector``, η = ``step_size``, c = η or 1.

    c is η when ``scale_by_step`` is true (the exact approximation of H⁻¹ ``vector``), else 1.

    ``train_grads`` is ∂L_T/∂W (or any update direction) built with ``create_graph=True``, aligned
    with ``parameters``; ``None`` entries and entries without a graph contribute no curvature.
    ``parameters`` that do not require grad get a zero Hessian-vector product. H is applied
    transposed (exact for a symmetric Hessian). The graph of ``train_grads`` is kept.

    Returns v (detached, one tensor per parameter) and the number of autograd calls made.
    """
    _check_series(terms, step_size)
    W, grads, vector = list(parameters), list(train_grads), list(vector)
    return _neumann(grads, W, vector, terms, step_size, scale_by_step, check=True)


def _neumann(train_grads, W, vector, terms, step_size, scale_by_step, check):
    if len(vector) != len(W):
        raise ValueError(f"vector has {len(vector)} entries for {len(W)} parameters")
    rows = _pairs(train_grads, W)
    if check and _walk([train_grads[i] for i in rows])[0]:
        raise _no_double_backward(_MARKED)
    active = [j for j, w in enumerate(W) if w.requires_grad]
    p = [x.detach().clone() for x in vector]
    total = [x.clone() for x in p]
    calls = 0
    for _ in range(terms):
        if rows and active:
            with torch.enable_grad():
                hvp = _grad(
                    [train_grads[i] for i in rows], [W[j] for j in active], [p[i] for i in rows],
                    retain_graph=True, stage=_HVP,
                )
            calls += 1
            for j, h in zip(active, hvp):
                if h is not None:
                    p[j] = p[j] - step_size * h.detach()
        total = [t + x for t, x in zip(total, p)]
    if scale_by_step:
        total = [step_size * t for t in total]
    return total, calls


def mixed_product(
    train_grads: Sequence[Tensor | None],
    meta_parameters: Sequence[Tensor],
    vector: Sequence[Tensor],
    retain_graph: bool = False,
) -> list[Tensor]:
    """∂(∂L_T/∂W · v)/∂φ, the mixed second derivative applied to v: one tensor per
    meta-parameter, zeros where φ does not reach. The hypergradient is minus this, plus any
    direct ∂L_V/∂φ."""
    phi = list(meta_parameters)
    rows = [i for i, g in enumerate(train_grads) if g is not None and g.requires_grad]
    active = [k for k, m in enumerate(phi) if m.requires_grad]
    out = [torch.zeros_like(m) for m in phi]
    if not rows or not active:
        return out
    with torch.enable_grad():
        mixed = _grad(
            [train_grads[i] for i in rows], [phi[k] for k in active], [vector[i] for i in rows],
            retain_graph=retain_graph, stage=_MIXED,
        )
    for k, g in zip(active, mixed):
        if g is not None:
            out[k] = g
    return out


def hypergradient(
    train_loss: Tensor | None,
    val_loss: Tensor,
    parameters: Iterable[Tensor] | Tensor,
    meta_parameters: Iterable[Tensor] | Tensor,
    *,
    terms: int = 3,
    step_size: float = 1e-4,
    scale_by_step: bool = False,
    accumulate: bool = False,
    train_grads: Sequence[Tensor | None] | None = None,
    retain_graph: bool = False,
) -> Hypergradient:
    """dL_V/dφ by implicit differentiation through a Neumann series (see the module docstring).

    Args:
        train_loss: scalar L_T(W, φ); ``None`` when ``train_grads`` is given instead.
        val_loss: scalar L_V; it may depend on φ directly, whose partial derivative is then added.
        parameters: W, any iterable of tensors (a generator is read once). Tensors that do not
            require grad or that neither loss reaches are allowed and contribute nothing.
        meta_parameters: φ, any iterable of tensors. Those L_T does not reach get only their direct
            term (zero when L_V does not reach them either); if L_T reaches none, it is an error.
        terms: n, the number of Hessian-vector products (the series has n + 1 addends).
        step_size: η. The default 1e-4 is the value AuxiLearn and AuxiNash were tuned with (their
            "hypergradient learning rate"); with ``scale_by_step=True`` choose η < 2 / λ_max(H).
        scale_by_step: multiply the series by η (exact inverse-Hessian approximation) or not
            (default, AuxiLearn's convention).
        accumulate: also add the result into each φ's ``.grad`` for a meta-optimizer step.
        train_grads: ∂L_T/∂W (or another update direction) aligned with ``parameters`` and built
            with ``create_graph=True``, instead of ``train_loss``.
        retain_graph: keep the graphs of both losses for later use; by default they are released.

    Returns:
        a :class:`Hypergradient`: the list of dL_V/dφ, with ``.vector`` (v) and
        ``.backward_calls``.
    """
    W = as_parameter_list(parameters, "parameters")
    phi = as_parameter_list(meta_parameters, "meta_parameters")
    if not W:
        raise HypergradientError("no parameters given (an exhausted generator?)")
    if not phi:
        raise HypergradientError("no meta_parameters given (an exhausted generator?)")
    if (train_loss is None) == (train_grads is None):
        raise ValueError("give exactly one of train_loss and train_grads")
    if train_loss is not None:
        _check_scalar(train_loss, "train_loss")
    _check_scalar(val_loss, "val_loss")
    _check_series(terms, step_size)
    w_active = [w for w in W if w.requires_grad]
    phi_active = [m for m in phi if m.requires_grad]
    if not w_active:
        raise HypergradientError("none of the parameters requires grad")
    if not phi_active:
        raise HypergradientError("none of the meta_parameters requires grad")
    calls = 0

    with torch.enable_grad():
        # ∂L_V/∂W, and ∂L_V/∂φ where φ enters L_V directly
        found = iter(_grad(val_loss, w_active + phi_active, retain_graph=retain_graph, stage=_VAL))
        calls += 1
        g_val = [next(found) if w.requires_grad else None for w in W]
        g_val = _zeros_for_none(g_val, W)
        direct = _zeros_for_none([next(found) if m.requires_grad else None for m in phi], phi)

        if train_grads is None:
            train_grads = training_gradients(train_loss, W)
            calls += 1
        else:
            train_grads = list(train_grads)
        rows = _pairs(train_grads, W)
        if not rows:
            raise HypergradientError(
                "∂L_T/∂W depends neither on the parameters nor on the meta-parameters (the "
                "training loss does not reach the parameters, is linear in them and free of φ, or "
                "its gradient was built without create_graph=True)"
            )
        marked, reached = _walk([train_grads[i] for i in rows], phi_active)
        if marked:
            raise _no_double_backward(_MARKED)
        if not any(reached):
            raise HypergradientError(
                "the meta-parameters do not influence the training loss's gradient ∂L_T/∂W, so "
                "they have no implicit effect on the validation loss"
            )
        v, hvps = _neumann(train_grads, W, g_val, terms, step_size, scale_by_step, check=False)
        calls += hvps
        mixed = mixed_product(train_grads, phi, v, retain_graph=retain_graph)
        calls += 1
    del train_grads

    grads = [(d - m).detach() for d, m in zip(direct, mixed)]
    if accumulate:
        for m, g in zip(phi, grads):
            if m.grad is None:
                m.grad = g.clone()
            else:
                m.grad.add_(g)
    return Hypergradient(grads, v, calls)
