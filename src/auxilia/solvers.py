"""Small exact solvers on the K x K Gram matrix, in float64 numpy (K is small; torch's per-op cost
would dominate).

:func:`nash_bargaining` solves α_k (Mα)_k = p_k, α > 0 — the optimality condition of the convex problem
min_α ½ αᵀMα − Σ_k p_k log α_k — by damped Newton. A plain fixed-point iteration diverges once
gradients conflict; Newton with a backtracking line search that keeps α > 0 converges in a handful of
iterations.

Degenerate Gram matrices (zero rows, exactly opposed gradients) make the problem unbounded: a tiny
ridge relative to M's scale keeps α finite, and tasks whose gradient is zero get α_k = 0 (their
gradient contributes nothing to the update anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE = 1e-10


@dataclass
class NashSolution:
    alpha: np.ndarray
    iterations: int
    residual: float  # max_k |α_k (Mα)_k − p_k| / p_k on the active tasks
    ridge: float = 0.0  # absolute ridge added to M's diagonal (non-zero only for degenerate M)


def _objective(M: np.ndarray, p: np.ndarray, alpha: np.ndarray) -> float:
    return 0.5 * float(alpha @ M @ alpha) - float(p @ np.log(alpha))


def nash_bargaining(
    M: np.ndarray,
    p: np.ndarray,
    warm_start: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 30,
) -> NashSolution:
    """α > 0 with α_k (Mα)_k = p_k for a PSD Gram matrix ``M`` and bargaining powers ``p`` > 0.

    Solved exactly first; only if that does not converge (the problem is unbounded when some
    positive combination of gradients cancels) again with a ridge of 1e-10 relative to M's scale.
    """
    solution = _nash(M, p, warm_start, tol, max_iter, ridge=0.0)
    if solution.residual <= tol * 1e3 and np.all(np.isfinite(solution.alpha)):
        return solution
    return _nash(M, p, None, tol, max_iter, ridge=RIDGE)


def _nash(M, p, warm_start, tol: float, max_iter: int, ridge: float) -> NashSolution:
    M = np.asarray(M, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    K = M.shape[0]
    if M.shape != (K, K) or p.shape != (K,):
        raise ValueError(f"expected a (K, K) matrix and (K,) powers, got {M.shape} and {p.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("the Gram matrix is not finite")
    if not np.all(p > 0) or not np.all(np.isfinite(p)):
        raise ValueError(f"bargaining powers must be finite and > 0, got {p}")
    diag = np.clip(np.diag(M), 0.0, None)
    scale = float(diag.max()) if K else 0.0
    alpha = np.zeros(K)
    active = diag > scale * 1e-20 if scale > 0 else np.zeros(K, dtype=bool)
    if not active.any():
        return NashSolution(alpha, 0, 0.0)
    idx = np.flatnonzero(active)
    A = M[np.ix_(idx, idx)] / scale
    A = 0.5 * (A + A.T) + ridge * np.eye(len(idx))
    q = p[idx]
    x = None
    if warm_start is not None:
        candidate = np.asarray(warm_start, dtype=np.float64)[idx] * np.sqrt(scale)
        if np.all(np.isfinite(candidate)) and np.all(candidate > 0):
            x = candidate
    if x is None:
        x = np.sqrt(q / np.diag(A))
    value = _objective(A, q, x)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        Ax = A @ x
        grad = Ax - q / x
        hess = A + np.diag(q / x**2)
        try:
            delta = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            delta = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ delta)
        if decrement < 0:  # numerical trouble: fall back to a scaled gradient step
            delta = grad * x**2 / q
            decrement = float(grad @ delta)
        shrinking = delta > 0
        step = 1.0
        if shrinking.any():
            step = min(1.0, 0.99 * float(np.min(x[shrinking] / delta[shrinking])))
        # Near the optimum (small Newton decrement) the full step converges quadratically and the
        # objective's rounding would stall a line search; farther away, backtrack on the objective.
        while decrement > 0.1:
            trial_value = _objective(A, q, x - step * delta)
            if trial_value <= value - 0.25 * step * decrement or step < 1e-12:
                break
            step *= 0.5
        x = x - step * delta
        value = _objective(A, q, x)
        residual = float(np.max(np.abs(x * (A @ x) - q) / q))
        if residual < tol:
            break
    alpha[idx] = x / np.sqrt(scale)
    residual = float(np.max(np.abs(x * (A @ x) - q) / q))
    return NashSolution(alpha, iterations, residual, ridge * scale)


def nash_sensitivity(M: np.ndarray, p: np.ndarray, alpha: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """dα/dp (K x K) at a solution: (M + diag(p/α²))⁻¹ diag(1/α) (AuxiNash, Prop. 4.2).

    Differentiating α_k (Mα)_k = p_k gives diag(Mα) dα + diag(α) M dα = dp; with (Mα)_k = p_k/α_k this
    is diag(α)(M + diag(p/α²)) dα = dp. Tasks with α_k = 0 (zero gradient) get zero rows. Pass the
    solution's ``ridge`` so that the derivative is of the system that was actually solved.
    """
    M = np.asarray(M, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    K = len(alpha)
    out = np.zeros((K, K))
    idx = np.flatnonzero(alpha > 0)
    if len(idx) == 0:
        return out
    a = alpha[idx]
    H = M[np.ix_(idx, idx)] + np.diag(p[idx] / a**2 + ridge)
    out[np.ix_(idx, idx)] = np.linalg.solve(H, np.diag(1.0 / a))
    return out


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, Σ w = 1} (sort-based, exact)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    ks = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - cumulative / ks > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


@dataclass
class SimplexSolution:
    w: np.ndarray
    iterations: int
    gap: float  # Frank–Wolfe duality gap: an upper bound on objective(w) − optimum


def min_norm_point(M: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> SimplexSolution:
    """argmin over the simplex of wᵀMw: the min-norm point of the convex hull of the rows of G
    (M = G Gᵀ), by Wolfe's algorithm — exact after finitely many affine minimizations, unlike
    Frank–Wolfe's sublinear convergence."""
    M = np.asarray(M, dtype=np.float64)
    K = M.shape[0]
    scale = float(np.max(np.diag(M))) if K else 0.0
    if not scale > 0:
        w = np.zeros(K)
        w[0] = 1.0
        return SimplexSolution(w, 0, 0.0)
    A = M / scale
    A = 0.5 * (A + A.T)
    first = int(np.argmin(np.diag(A)))
    support = [first]
    w = np.zeros(K)
    w[first] = 1.0
    iterations = 0
    for iterations in range(1, max_iter + 1):
        Aw = A @ w
        j = int(np.argmin(Aw))
        if float(w @ Aw) - Aw[j] <= tol or j in support:  # optimal, or at the limit of precision
            break
        support.append(j)
        while True:
            S = np.array(support)
            n = len(S)
            system = np.zeros((n + 1, n + 1))
            system[:n, :n] = A[np.ix_(S, S)]
            system[:n, n] = 1.0
            system[n, :n] = 1.0
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            v = np.linalg.lstsq(system, rhs, rcond=None)[0][:n]
            if np.all(v > 1e-14):
                w = np.zeros(K)
                w[S] = v
                break
            current = w[S]
            negative = v <= 1e-14
            theta = float(np.min(current[negative] / np.maximum(current[negative] - v[negative], 1e-300)))
            theta = min(max(theta, 0.0), 1.0)
            mixed = current + theta * (v - current)
            mixed[mixed < 1e-14] = 0.0
            w = np.zeros(K)
            w[S] = mixed
            support = [int(k) for k in S if w[k] > 0]
            if not support:
                support = [int(S[int(np.argmax(mixed))])]
                w[support[0]] = 1.0
                break
        w = np.maximum(w, 0.0)
        w /= w.sum()
    Aw = A @ w
    gap = float(w @ Aw - np.min(Aw)) * scale
    return SimplexSolution(w, iterations, max(gap, 0.0))


def _bordered_solve(A: np.ndarray, rhs: np.ndarray, total: float) -> np.ndarray:
    """x with A x − ν 1 = rhs and Σ x = total (least squares when singular)."""
    n = len(rhs)
    system = np.zeros((n + 1, n + 1))
    system[:n, :n] = A
    system[:n, n] = -1.0
    system[n, :n] = 1.0
    return np.linalg.lstsq(system, np.append(rhs, total), rcond=None)[0][:n]


def _cagrad_face(A: np.ndarray, a: np.ndarray, radius: float) -> np.ndarray | None:
    """The stationary point of F on the affine hull of a face, in closed form, or None.

    Stationarity is μ A w − ν 1 = −a with μ = radius / ‖g_w‖. Writing w = u + v / μ with A u ∝ 1,
    Σ u = 1 and A v − ν' 1 = −a, Σ v = 0 (so uᵀA v = 0) gives ‖g_w‖² = uᵀAu + vᵀAv / μ², hence
    μ² = (radius² − vᵀAv) / uᵀAu.
    """
    u = _bordered_solve(A, np.zeros(len(a)), 1.0)
    v = _bordered_solve(A, -a, 0.0)
    uAu, vAv = float(u @ A @ u), float(v @ A @ v)
    if uAu <= 1e-14 or radius**2 <= vAv:
        return None
    mu = np.sqrt((radius**2 - vAv) / uAu)
    return u + v / mu


def cagrad_weights(
    M: np.ndarray, c: float, tol: float = 1e-10, max_iter: int = 200
) -> SimplexSolution:
    """CAGrad's dual: argmin over the simplex of F(w) = g_wᵀ ḡ + c ‖ḡ‖ ‖g_w‖, with ḡ the mean gradient
    and g_w = Σ w_k g_k, all through M = G Gᵀ. F is convex (a linear term plus a norm).

    An active-set method in the manner of Wolfe's, started from the best vertex: on each face the stationary point is in closed
    form (:func:`_cagrad_face`); a point outside the simplex is approached from the current iterate
    until a weight hits zero (F decreases, being convex); the most violating task joins the face
    until the KKT conditions hold. Where a face has no smooth stationary point (the optimum at
    g_w = 0), accelerated projected gradient finishes from the current iterate. The returned gap is
    the Frank–Wolfe duality gap, a certificate of optimality.
    """
    M = np.asarray(M, dtype=np.float64)
    K = M.shape[0]
    scale = float(np.max(np.diag(M))) if K else 0.0
    if not scale > 0 or K == 1:
        return SimplexSolution(np.full(K, 1.0 / K), 0, 0.0)
    A = M / scale
    A = 0.5 * (A + A.T)
    a = A.mean(axis=1)  # g_k · ḡ
    radius = c * float(np.sqrt(max(A.mean(), 0.0)))  # c ‖ḡ‖

    def gradient(w: np.ndarray) -> np.ndarray:
        Aw = A @ w
        return a + radius * Aw / max(float(np.sqrt(max(w @ Aw, 0.0))), 1e-12)

    vertex_values = a + radius * np.sqrt(np.clip(np.diag(A), 0.0, None))
    start = int(np.argmin(vertex_values))
    w = np.zeros(K)
    w[start] = 1.0
    support = [start]
    iterations, exact = 0, False
    for iterations in range(1, 4 * K + 10):
        S = np.array(support)
        z = _cagrad_face(A[np.ix_(S, S)], a[S], radius)
        if z is None:
            break
        if np.all(z > 0):
            w = np.zeros(K)
            w[S] = z
            g = gradient(w)
            level = float(g[S].mean())
            outside = [k for k in range(K) if k not in support]
            j = min(outside, key=lambda k: g[k]) if outside else None
            if j is None or g[j] >= level - tol:
                exact = True
                break
            support.append(j)
            continue
        current = w[S]
        negative = z <= 0
        theta = float(np.min(current[negative] / np.maximum(current[negative] - z[negative], 1e-300)))
        moved = current + min(max(theta, 0.0), 1.0) * (z - current)
        moved[moved < 1e-15] = 0.0
        w = np.zeros(K)
        w[S] = moved
        w /= w.sum()
        support = [int(k) for k in S if w[k] > 0]
    if not exact:

        def value(x: np.ndarray) -> float:
            return float(a @ x) + radius * float(np.sqrt(max(x @ A @ x, 0.0)))

        w, extra = _projected_gradient(value, gradient, w, tol, max_iter)
        iterations += extra
        kink = min_norm_point(A).w  # where 0 is in the hull, F's kink at g_w = 0 may be the optimum
        if value(kink) < value(w):
            w = kink
    g = gradient(w)
    gap = float(g @ w - np.min(g))
    return SimplexSolution(w, iterations, max(gap, 0.0) * scale)


def _projected_gradient(value, gradient, w: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    """Accelerated projected gradient on the simplex with backtracking and adaptive restart."""
    y, t, step = w.copy(), 1.0, 1.0
    iterations = 0
    for iterations in range(1, max_iter + 1):
        fy, gy = value(y), gradient(y)
        while True:
            candidate = project_simplex(y - step * gy)
            diff = candidate - y
            fc = value(candidate)
            if fc <= fy + gy @ diff + 0.5 / step * (diff @ diff) + 1e-15:
                break
            step *= 0.5
        if fc > value(w):
            y, t = w.copy(), 1.0
            continue
        t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        y = candidate + ((t - 1) / t_next) * (candidate - w)
        w, t = candidate, t_next
        step *= 1.5
        g = gradient(w)
        if float(g @ w - np.min(g)) <= tol:
            break
    return w, iterations
