"""Gradient-aggregation baselines: each reduces the per-task Jacobian G (K x P) to one direction.

Every method here reads G only through its K x K Gram matrix M = G Gᵀ, taken in float64 and divided
by its largest diagonal entry (every rule below is invariant to a common scale, and gradients from
1e-15 to 1e15 then stay clear of overflow and underflow). Each returns coefficients c with
direction = cᵀG, so the cost beyond the per-task gradients is one K x K product over P plus O(K³)
work on M, never a loop over parameters. The coefficients are the per-task weights the method
reports.

The two optimization-based methods solve small convex problems over the probability simplex
{w ≥ 0, Σw = 1} exactly, by active-set methods on M:

* :func:`min_norm_weights` — min wᵀQw over the simplex, MGDA's min-norm point, by Wolfe's primal
  active-set algorithm. Each iteration solves one bordered linear system on the current support;
  it stops when the KKT conditions hold, after finitely many steps.
* :func:`cagrad_dual` — min over the simplex of aᵀw + r‖g_w‖, CAGrad's dual. On the affine hull of a
  face the minimizer has a closed form; the same active-set logic moves between faces, and the one
  non-smooth point (g_w = 0) is certified or left through a non-negative least-squares problem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..gradients import gram
from ..tasks import Task
from .base import GradientAggregation
from .registry import register

__all__ = [
    "MGDA",
    "CAGrad",
    "CAGradSolution",
    "GradientCosineSimilarity",
    "PCGrad",
    "PCGradAux",
    "cagrad_dual",
    "min_norm_weights",
    "normalized_gram",
]

# KKT tolerance of the solvers, relative to the Gram matrix normalized to a largest diagonal of 1.
TOLERANCE = 1e-12


# --------------------------------------------------------------------------------------------------
# The Gram matrix


def normalized_gram(G: Tensor) -> tuple[np.ndarray, float]:
    """(M / σ², σ): the float64 Gram matrix of G's rows divided by its largest diagonal entry σ²
    (σ is the largest row norm).

    The Gram matrix is accumulated in float64, which holds that of any float32 G; a float64 G
    with entries beyond about 1e±150 is first divided by its largest entry. An all-zero G gives
    a zero matrix and σ = 0; a G holding NaN or Inf gives a NaN matrix and σ = NaN.
    """
    M = gram(G).cpu().numpy()
    top = float(np.max(np.diag(M))) if M.size else 0.0
    peak = 1.0
    working = np.finfo(np.float64)
    if not (math.isfinite(top) and np.all(np.isfinite(M))) or top < working.tiny / working.eps:
        peak = float(G.detach().abs().max()) if G.numel() else 0.0
        if not math.isfinite(peak):
            return np.full_like(M, np.nan), math.nan
        if peak == 0.0:
            return np.zeros_like(M), 0.0
        M = gram(G / peak).cpu().numpy()
        top = float(np.max(np.diag(M)))
        if not top > 0.0:
            return np.zeros_like(M), 0.0
    A = M / top
    return 0.5 * (A + A.T), math.sqrt(top) * peak


def _kink_threshold() -> float:
    """Below this squared distance (normalized units) a face's affine hull is taken to contain 0:
    the float64 Gram matrix (:func:`auxilia.gradients.gram`) is itself only known to about ε."""
    return 64.0 * float(np.finfo(np.float64).eps)


def _coefficients(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=like.device)


# --------------------------------------------------------------------------------------------------
# Solvers on the simplex


def _bordered(Q: np.ndarray) -> np.ndarray:
    """[[Q, −1], [1ᵀ, 0]]: the KKT matrix of a face of the simplex is a principal submatrix."""
    K = len(Q)
    out = np.zeros((K + 1, K + 1))
    out[:K, :K] = Q
    out[:K, K] = -1.0
    out[K, :K] = 1.0
    return out


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """system⁻¹ rhs; a (nearly) singular system — gradients that are (nearly) linearly or
    affinely dependent — gets a least-squares solution instead of LU's unreliable one. For the
    consistent systems solved here that is still an exact solution, one of many."""
    try:
        solution = np.linalg.solve(system, rhs)
        residual = float(np.max(np.abs(system @ solution - rhs)))
        if residual <= 1e-13 * (1.0 + float(np.max(np.abs(rhs)))):
            return solution
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(system, rhs, rcond=None)[0]


def _face(bordered: np.ndarray, support: list[int], right: np.ndarray) -> np.ndarray:
    """Solve Q_SS z − ν 1 = right_S, Σ z = right_K on the support S (``right`` is indexed over
    all K tasks plus the sum, one column per right-hand side); returns z."""
    index = np.array(support + [len(bordered) - 1])
    return _solve(bordered[index[:, None], index], right[index])[:-1]


def _feasible_start(start: np.ndarray | None, K: int) -> np.ndarray | None:
    """``start`` cleaned into a point of the simplex, or None when it is unusable."""
    if start is None:
        return None
    w = np.asarray(start, dtype=np.float64)
    if w.shape != (K,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        return None
    w = np.where(w > 1e-12 * float(w.max(initial=0.0)), w, 0.0)
    total = float(w.sum())
    return w / total if total > 0 else None


def _step_toward(
    w: np.ndarray, support: list[int], target: np.ndarray, limit: float
) -> tuple[np.ndarray, int, float]:
    """Move w along target − w_S (or along ``target`` itself when ``limit`` is infinite) until a
    weight of the support reaches zero (or the step reaches ``limit``). Returns the new point, the
    task whose weight reached zero (-1 if none) and the step length."""
    current = w[support]
    direction = target - current if math.isfinite(limit) else target
    blocked = direction < 0
    theta, index = limit, -1
    if blocked.any():
        ratios = current[blocked] / -direction[blocked]
        position = int(np.argmin(ratios))
        if ratios[position] < theta:
            theta = float(ratios[position])
            index = support[int(np.flatnonzero(blocked)[position])]
    moved = np.clip(current + theta * direction, 0.0, None)
    out = np.zeros_like(w)
    out[support] = moved
    if index >= 0:
        out[index] = 0.0
    total = float(out.sum())
    return (out / total if total > 0 else w), index, theta


def min_norm_weights(
    Q: np.ndarray,
    start: np.ndarray | None = None,
    tol: float = TOLERANCE,
    max_iter: int | None = None,
) -> np.ndarray:
    """argmin over the simplex of wᵀQw for a positive semidefinite Q: with Q = G Gᵀ, the weights of
    the min-norm point of the convex hull of G's rows.

    Primal active set (Wolfe's algorithm), started at ``start`` (a point of the simplex, e.g. the
    previous solution) or else at the shortest row: on the current support S the minimizer over
    the affine hull comes from one bordered linear system; if it leaves the simplex the iterate
    moves toward it until a weight reaches zero and that task leaves S; otherwise the task whose
    entry of Qw is lowest joins S, until every entry is within ``tol`` of wᵀQw (the common value on
    S) — the KKT conditions. The objective falls at every step and no face is visited twice, so
    the method ends after finitely many steps.
    """
    Q = np.asarray(Q, dtype=np.float64)
    K = Q.shape[0]
    w = _feasible_start(start, K)
    if w is None:
        w = np.zeros(K)
        w[int(np.argmin(np.diag(Q)))] = 1.0
    support = [int(k) for k in np.flatnonzero(w)]
    bordered = _bordered(Q)
    right = np.zeros(K + 1)
    right[K] = 1.0
    lengths = np.sqrt(np.clip(np.diag(Q), 0.0, None))
    newest = -1  # the task that joined the support last, while its weight is still zero
    for _ in range(max_iter if max_iter is not None else 8 * K + 16):
        index = np.array(support)
        z = _face(bordered, support, right)
        if z.min() > 0:
            w = np.zeros(K)
            w[index] = z
            gradient = Q @ w
            level = float(w @ gradient)
            # g_j·d ≥ ‖d‖² up to tol · ‖g_j‖‖d‖, so that the test is relative to each task's own
            # scale: a task 1e30 times smaller than another is judged as precisely as the others
            slack = (gradient - level) / np.maximum(lengths * math.sqrt(max(level, 0.0)), np.finfo(np.float64).tiny)
            slack[index] = np.inf
            j = int(np.argmin(slack))
            if not (slack[j] < -tol and gradient[j] < level):
                break
            support.append(j)
            newest = j
            continue
        w, dropped, theta = _step_toward(w, support, z, 1.0)
        if dropped == newest and theta <= 0.0:
            break  # the new task cannot enter at this precision: w is optimal
        support = [k for k in support if w[k] > 0]
    return w


def _nonnegative_qp(Q: np.ndarray, q: np.ndarray, tol: float = TOLERANCE) -> np.ndarray:
    """argmin over β ≥ 0 of ½βᵀQβ + qᵀβ, Q positive semidefinite and q in its range
    (Lawson–Hanson in Gram form). With Q = G Gᵀ and q = G b, Gᵀβ is the projection of −b onto the
    cone spanned by G's rows.

    Along combinations of gradients that (nearly) cancel the objective is flat up to rounding, so
    each subproblem is solved by truncated least squares: β takes no component there instead of
    drifting to sizes that would amplify that rounding in the direction.
    """
    K = len(q)
    beta = np.zeros(K)
    support: list[int] = []
    for _ in range(8 * K + 16):
        gradient = Q @ beta + q
        gradient[support] = np.inf
        j = int(np.argmin(gradient))
        if not gradient[j] < -tol:
            break
        support.append(j)
        while support:
            index = np.array(support)
            z = np.linalg.lstsq(Q[index[:, None], index], -q[index], rcond=1e-12)[0]
            if z.min() > 0:
                beta = np.zeros(K)
                beta[index] = z
                break
            current = beta[index]
            blocked = z <= 0
            ratios = current[blocked] / (current[blocked] - z[blocked])
            position = int(np.argmin(ratios))
            theta = float(ratios[position])
            dropped = support[int(np.flatnonzero(blocked)[position])]
            if dropped == j and theta <= 0.0:
                support.pop()
                return beta  # the new task cannot enter at this precision
            beta = np.zeros(K)
            beta[index] = np.clip(current + theta * (z - current), 0.0, None)
            beta[dropped] = 0.0
            support = [k for k in support if beta[k] > 0]
    return beta


def _cone_projection(
    A: np.ndarray, a: np.ndarray, zero: float, tol: float = TOLERANCE
) -> np.ndarray:
    """β ≥ 0 with Gᵀβ the projection of −b onto the cone of G's rows, given A = G Gᵀ and a = G b.

    The cone does not depend on the rows' lengths, so the problem is solved for unit rows, where it
    is well scaled however different the lengths are; rows with ‖g_k‖² ≤ ``zero`` (below the Gram
    matrix's precision) take no part.
    """
    squared = np.diag(A)
    live = np.flatnonzero(squared > zero)
    beta = np.zeros(len(a))
    if len(live):
        inverse = 1.0 / np.sqrt(squared[live])
        unit = A[live[:, None], live] * np.outer(inverse, inverse)
        beta[live] = _nonnegative_qp(0.5 * (unit + unit.T), a[live] * inverse, tol) * inverse
    return beta


@dataclass
class CAGradSolution:
    """The dual weights w, the norm ‖g_w‖ (normalized units) and, where the optimum is the kink
    g_w = 0, the weights β ≥ 0 of the primal solution ḡ + Σ β_k g_k."""

    w: np.ndarray
    norm: float
    correction: np.ndarray | None = None


def cagrad_dual(
    A: np.ndarray,
    c: float,
    start: np.ndarray | None = None,
    tol: float = TOLERANCE,
    kink: float = 1e-14,
    max_iter: int | None = None,
) -> CAGradSolution:
    """argmin over the simplex of F(w) = aᵀw + r‖g_w‖ with a = A 1/K (so aᵀw = ḡ·g_w),
    r = c‖ḡ‖ and ‖g_w‖² = wᵀAw, for a positive semidefinite A (largest diagonal about 1).

    F depends on w through x = g_w only: F = ḡ·x + r‖x‖ over the convex hull H of the gradients.
    On the affine hull x₀ + V of a face (x₀ its min-norm point, h = ‖x₀‖, b the norm of ḡ's
    projection onto V) the minimizer lies at x₀ moved against that projection by h b / √(r² − b²);
    when b ≥ r there is none, F falls without bound along the face, and the iterate slides to the
    face's boundary. Faces are entered and left as in :func:`min_norm_weights`, from ``start``
    (e.g. the previous solution) or else the best vertex.

    F is not differentiable at x = 0. The first time a face passes within √``kink`` of 0, the
    min-norm point of H decides whether 0 ∈ H (to that precision). If so, x = 0 (F = 0) is optimal
    iff the projection y₀ of −ḡ onto the cone of the gradients has ‖y₀‖ ≤ r; otherwise y₀'s
    weights, renormalized, are a point of negative F from which the search continues, and no point
    near 0 is visited again.
    """
    A = np.asarray(A, dtype=np.float64)
    K = A.shape[0]
    a = A.mean(axis=1)
    r = c * math.sqrt(max(float(a.mean()), 0.0))

    def norm(w: np.ndarray) -> float:
        return math.sqrt(max(float(w @ A @ w), 0.0))

    def value(w: np.ndarray) -> float:
        return float(a @ w) + r * norm(w)

    if K == 1:
        return CAGradSolution(np.ones(1), norm(np.ones(1)))
    if r == 0.0:  # F is linear: a minimizing vertex (the direction is ḡ whatever w is)
        w = np.zeros(K)
        w[int(np.argmin(a))] = 1.0
        return CAGradSolution(w, norm(w))
    w = _feasible_start(start, K)
    if w is None:
        w = np.zeros(K)
        w[int(np.argmin(a + r * np.sqrt(np.clip(np.diag(A), 0.0, None))))] = 1.0
    support = [int(k) for k in np.flatnonzero(w)]
    best, best_value = w, value(w)
    newest = -1  # the task that joined the support last, while its weight is still zero
    near_zero_checked = False
    bordered = _bordered(A)
    right = np.zeros((K + 1, 2))
    right[K, 0] = 1.0  # u: the min-norm point of the face's affine hull
    right[:K, 1] = -a  # v: −(ḡ projected onto the face's directions), in weights summing to 0
    for _ in range(max_iter if max_iter is not None else 16 * K + 32):
        index = np.array(support)
        uv = _face(bordered, support, right)
        u, v = uv[:, 0], uv[:, 1]
        As = A[index[:, None], index]
        h2 = max(float(u @ As @ u), 0.0)
        b2 = max(float(v @ As @ v), 0.0)
        if h2 <= kink and not near_zero_checked:
            near_zero_checked = True
            m = min_norm_weights(A)
            if float(m @ A @ m) <= kink:  # 0 ∈ H: is x = 0 optimal?
                beta = _cone_projection(A, a, kink, tol)
                total = float(beta.sum())
                if total <= 0.0 or norm(beta) <= r * (1.0 + 1e-12):
                    return CAGradSolution(m, 0.0, beta)
                w = beta / total
                support = [int(k) for k in np.flatnonzero(w)]
                best, best_value, newest = w, value(w), -1
                continue
        if b2 >= r * r:  # unbounded below on this face: slide along v to its boundary
            w, dropped, theta = _step_toward(w, support, v, math.inf)
            if dropped < 0 or (dropped == newest and theta <= 0.0):
                break
        else:
            z = u + v * math.sqrt(h2 / (r * r - b2))
            if z.min() > 0:
                w = np.zeros(K)
                w[index] = z / z.sum()
                newest = -1
                gradient = a + (r / max(norm(w), 1e-150)) * (A @ w)
                level = float(w @ gradient)
                gradient[index] = np.inf
                j = int(np.argmin(gradient))
                if not gradient[j] < level - tol:
                    break
                support.append(j)
                newest = j
                continue
            w, dropped, theta = _step_toward(w, support, z, 1.0)
            if dropped == newest and theta <= 0.0:
                break  # the new task cannot enter at this precision: w is optimal
        support = [k for k in support if w[k] > 0]
        if newest not in support:
            newest = -1
        current = value(w)
        if current < best_value:
            best, best_value = w, current
    if value(w) > best_value:
        w = best
    return CAGradSolution(w, norm(w))


# --------------------------------------------------------------------------------------------------
# Methods


def _check_int(method: str, name: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{method}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


@register("pcgrad")
class PCGrad(GradientAggregation):
    """Yu et al. 2020 ("gradient surgery"): each task's gradient is projected onto the normal plane
    of every other task's gradient it conflicts with (negative dot product), the others visited in
    a random order; the projected gradients are summed. Conflicting components no longer cancel
    each other's progress, while agreeing ones are kept.

    All projections act on coefficients over G's rows, with dot products read from the Gram
    matrix: O(K³) work instead of O(K²P). The visiting orders come from a ``torch.Generator``
    seeded by (``seed``, step count), so a run and its resumption from a checkpoint draw the same
    orders and the global random state is never touched.
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
        self.seed = _check_int(self.name, "seed", seed)

    def orders(self) -> Tensor:
        """(K, K) integer tensor: row i is the order in which task i visits the tasks this step
        (its own index included, and skipped)."""
        step = int(self.steps)
        state = np.random.SeedSequence([self.seed, step]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))
        K = self.num_tasks
        return torch.rand((K, K), generator=generator, dtype=torch.float64).argsort(dim=1)

    def _coefficients(self, G: Tensor) -> Tensor:
        A, top = normalized_gram(G)
        K = len(A)
        if not math.isfinite(top):
            return _coefficients(np.full(K, np.nan), G)
        orders = self.orders().numpy()
        rows = np.arange(K)
        visited = A[orders]  # visited[i, t] = Gram row of the t-th task in task i's order
        squared = np.diag(A)[orders]
        usable = (orders != rows[:, None]) & (squared > 0)
        C = np.eye(K)  # row i: task i's projected gradient as a combination of G's rows
        for t in range(K):  # all tasks advance one position of their own order at once
            dots = np.einsum("ik,ik->i", C, visited[:, t])  # (projected g_i) · g_orders[i, t]
            hit = usable[:, t] & (dots < 0)
            C[rows[hit], orders[hit, t]] -= dots[hit] / squared[hit, t]
        return _coefficients(C.sum(axis=0), G)


@register("pcgrad-aux")
class PCGradAux(GradientAggregation):
    """PCGrad for auxiliary learning (as in the Aux-NAS paper's baselines): only auxiliary
    gradients are projected, and only off the primary gradient when they conflict with it. The
    primary gradient itself is never altered, so the auxiliaries can help the primary task but
    never push against it."""

    def _coefficients(self, G: Tensor) -> Tensor:
        A, top = normalized_gram(G)
        K = len(A)
        if not math.isfinite(top):
            return _coefficients(np.full(K, np.nan), G)
        c = np.ones(K)
        if A[0, 0] > 0:
            conflicts = np.minimum(A[0, 1:], 0.0)
            c[0] -= float(conflicts.sum()) / A[0, 0]
        return _coefficients(c, G)


@register("gcs")
class GradientCosineSimilarity(GradientAggregation):
    """Du et al. 2020: an auxiliary gradient is added only while its cosine similarity with the
    primary gradient is positive, i.e. only while it is (locally) a descent direction for the
    primary loss too.

    ``weighted=False`` (the default: the paper's main, unweighted rule) adds an agreeing auxiliary
    gradient whole; ``weighted=True`` scales it by the cosine. A zero gradient (primary or
    auxiliary) has cosine 0, so the auxiliary is dropped.
    """

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
            raise ValueError(f"{self.name}: weighted must be True or False, got {weighted!r}")  # noqa: TRY004 (every bad hyperparameter is a ValueError)
        self.weighted = weighted

    def cosines(self, G: Tensor) -> np.ndarray:
        """(K - 1,) cosine similarity of each auxiliary gradient with the primary one (0 where
        either is zero)."""
        A, _ = normalized_gram(G)
        norms = np.sqrt(np.clip(np.diag(A), 0.0, None))
        denominator = norms[0] * norms[1:]
        cosine = np.divide(
            A[0, 1:], denominator, out=np.zeros(len(A) - 1), where=denominator > 0
        )
        return np.clip(cosine, -1.0, 1.0)

    def _coefficients(self, G: Tensor) -> Tensor:
        cosine = self.cosines(G)
        keep = cosine > 0
        aux = np.where(keep, cosine if self.weighted else 1.0, 0.0)
        return _coefficients(np.concatenate([[1.0], aux]), G)


@register("mgda")
class MGDA(GradientAggregation):
    """Sener & Koltun 2018: the min-norm point of the convex hull of the task gradients. It is a
    descent direction for every task at once when one exists, and zero at a Pareto-stationary
    point (e.g. when two gradients exactly oppose, or one is zero).

    Solved exactly on the Gram matrix by :func:`min_norm_weights` (Wolfe's active-set algorithm,
    warm-started from the previous step's weights; the paper's Frank–Wolfe converges sublinearly).
    ``normalization="none"`` (default) uses the raw gradients. ``"l2"`` first scales every gradient
    to unit norm (zero gradients stay zero) and the direction is the min-norm point of the
    *normalized* gradients, Σ w_k g_k/‖g_k‖, so the reported coefficients are w_k/‖g_k‖. With
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
            raise ValueError(
                f"{self.name}: normalization must be 'none' or 'l2', got {normalization!r}"
            )
        self.normalization = normalization
        K = self.num_tasks
        self.register_buffer("_warm", torch.full((K,), 1.0 / K, dtype=torch.float64))

    def _coefficients(self, G: Tensor) -> Tensor:
        A, top = normalized_gram(G)
        K = len(A)
        if not math.isfinite(top):
            return _coefficients(np.full(K, np.nan), G)
        if top == 0.0:  # every point of the hull is 0
            return _coefficients(np.full(K, 0.0 if self.normalization == "l2" else 1.0 / K), G)
        inverse = np.ones(K)
        if self.normalization == "l2":
            norms = np.sqrt(np.clip(np.diag(A), 0.0, None))
            inverse = np.divide(1.0, norms, out=np.zeros(K), where=norms > 0)
            A = A * np.outer(inverse, inverse)
            A = 0.5 * (A + A.T)
            inverse = inverse / top
        w = min_norm_weights(A, start=self._warm.cpu().numpy())
        self._warm = torch.as_tensor(w, dtype=torch.float64, device=self._warm.device)
        return _coefficients(w * inverse, G)


@register("cagrad")
class CAGrad(GradientAggregation):
    """Liu et al. 2021, conflict-averse gradient descent: the update d maximizes the worst task's
    local improvement min_k g_k·d within a ball of radius c‖ḡ‖ around the mean gradient ḡ, so it
    stays close to plain averaging while avoiding directions that hurt any task much.

    As in the official code, the dual — min over the simplex of F(w) = g_w·ḡ + c‖ḡ‖‖g_w‖,
    g_w = Σ w_k g_k — is solved (exactly, by :func:`cagrad_dual`, warm-started from the previous
    step's w) and d = ḡ + (c‖ḡ‖/‖g_w‖) g_w, divided by 1 + c² (``rescale=1``, the default),
    1 + c (``rescale=2``) or left as is (``rescale=0``). Where the optimum is g_w = 0 (a convex
    combination of the gradients cancels) that formula is 0/0 and the official code's output is
    arbitrary; the primal solution ḡ + y₀ is used instead, y₀ the projection of −ḡ onto the cone of
    the gradients: it lies in the ball and conflicts with no task.
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
        if (
            isinstance(c, bool)
            or not isinstance(c, (int, float))
            or not (math.isfinite(c) and c >= 0)
        ):
            raise ValueError(f"{self.name}: c must be a finite number >= 0, got {c!r}")
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ValueError(f"{self.name}: rescale must be 0, 1 or 2, got {rescale!r}")
        self.c, self.rescale = float(c), int(rescale)
        K = self.num_tasks
        self.register_buffer("_warm", torch.full((K,), 1.0 / K, dtype=torch.float64))

    def _coefficients(self, G: Tensor) -> Tensor:
        A, top = normalized_gram(G)
        K = len(A)
        if not math.isfinite(top):
            return _coefficients(np.full(K, np.nan), G)
        divisor = (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]
        mean = np.full(K, 1.0 / K)
        if top == 0.0 or self.c == 0.0:
            return _coefficients(mean / divisor, G)
        solution = cagrad_dual(A, self.c, self._warm.cpu().numpy(), kink=_kink_threshold())
        self._warm = torch.as_tensor(solution.w, dtype=torch.float64, device=self._warm.device)
        if solution.correction is not None:
            coefficients = mean + solution.correction
        elif solution.norm > 0:
            radius = self.c * math.sqrt(max(float(A.mean()), 0.0))
            coefficients = mean + (radius / solution.norm) * solution.w
        else:
            coefficients = mean
        return _coefficients(coefficients / divisor, G)
