"""The Nash bargaining solver on the K x K Gram matrix, in float64 numpy (K is small; torch's per-op cost
would dominate).

:func:`nash_bargaining` solves α_k (Mα)_k = p_k, α > 0 — the optimality condition of the convex problem
min_α ½ αᵀMα − Σ_k p_k log α_k — by damped Newton. A plain fixed-point iteration diverges once
gradients conflict; Newton with a backtracking line search that keeps α > 0 converges in a handful of
iterations.

The system is solved on the gradients' correlation matrix (α_k = β_k / ‖g_k‖), so the gradients'
scales, and their spread between tasks, do not affect the accuracy. When no direction improves every
task (a non-negative combination of the gradients cancels: exactly opposed gradients, or more tasks
than shared parameters) the problem has no solution; a small ridge on M's diagonal then gives the
bargaining of a slightly regularized game, whose update is correspondingly small. Tasks whose
gradient is zero get α_k = 0 (their gradient contributes nothing to the update anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGES = (1e-10, 1e-8, 1e-6, 1e-4)  # ρ, tried in turn: M_kk·ρ is added to M_kk
ACCEPT = 1e3  # a solve is accepted when its residual is within ACCEPT x tol


@dataclass
class NashSolution:
    alpha: np.ndarray
    iterations: int
    residual: float  # max_k |α_k ((M + diag(ridge))α)_k − p_k| / p_k on the active tasks
    ridge: np.ndarray | float = 0.0  # (K,) ridge added to M's diagonal: ρ·M_kk, zero unless M has no agreement


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

    Solved exactly first (from ``warm_start``, then from a cold start). The exact problem has no
    solution when some non-negative combination of the gradients cancels (0 in their convex hull:
    no direction improves every task), and it is numerically out of reach when it nearly does (α
    grows like 1/√λ_min(M) and α_k (Mα)_k loses all its digits to cancellation). Then the smallest
    ridge ρ of :data:`RIDGES` (ρ·M_kk added to M_kk) whose solve reaches ``tol`` x 1e3 is used:
    the bargaining of a slightly regularized game, whose update is correspondingly small. The
    returned solution always has a finite α and, among the attempts, the smallest residual.
    """
    best: NashSolution | None = None
    attempts = [(warm_start, 0.0), (None, 0.0)] if warm_start is not None else [(None, 0.0)]
    attempts += [(None, r) for r in RIDGES]
    for start, ridge in attempts:
        solution = _nash(M, p, start, tol, max_iter, ridge)
        if best is None or solution.residual < best.residual:
            best = solution
        if solution.residual <= tol * ACCEPT:
            return solution
    assert best is not None
    return best


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
    alpha = np.zeros(K)
    ridges = np.zeros(K)
    # A task whose gradient is exactly zero (or so small that 1/‖g_k‖ overflows) takes no part.
    active = (diag > 1e-300) & np.isfinite(1.0 / np.sqrt(np.maximum(diag, 1e-300)))
    if not active.any():
        return NashSolution(alpha, 0, 0.0, ridges)
    idx = np.flatnonzero(active)
    # Jacobi scaling: with α_k = β_k / ‖g_k‖ the system reads β_k (Cβ)_k = p_k, C the correlation
    # matrix of the gradients. The solution is then independent of the gradients' scales (Nash
    # bargaining is invariant to rescaling a task's loss), so scales from 1e-15 to 1e15, and spreads
    # between tasks as wide, cost nothing in accuracy.
    norms = np.sqrt(diag[idx])
    A = M[np.ix_(idx, idx)] / np.outer(norms, norms)
    A = 0.5 * (A + A.T) + ridge * np.eye(len(idx))
    q = p[idx]
    x = None
    if warm_start is not None:
        candidate = np.asarray(warm_start, dtype=np.float64)[idx] * norms
        if np.all(np.isfinite(candidate)) and np.all(candidate > 0):
            x = candidate
    if x is None:
        x = np.sqrt(q / np.diag(A))
    # Along the ray t·x the objective is ½t²xᵀAx − Σq log t + const, minimized at t² = Σq / xᵀAx:
    # starting there saves the many halving steps Newton needs when α is far larger than x.
    curvature = float(x @ A @ x)
    if curvature > 0 and np.isfinite(curvature):
        x = x * np.sqrt(q.sum() / curvature)
    value = _objective(A, q, x)
    best_x, best_residual = x, float(np.max(np.abs(x * (A @ x) - q) / q))
    iterations = 0
    for iterations in range(1, max_iter + 1):
        if best_residual < tol:
            break
        Ax = A @ x
        grad = Ax - q / x
        hess = A + np.diag(q / x**2)
        try:
            delta = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            delta = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ delta)
        if not decrement >= 0:  # numerical trouble: fall back to a scaled gradient step
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
        if not np.isfinite(residual) or not np.all(x > 0):
            break
        if residual < best_residual:
            best_x, best_residual = x, residual
    alpha[idx] = best_x / norms
    ridges[idx] = ridge * diag[idx]
    return NashSolution(alpha, iterations, best_residual, ridges)


def nash_sensitivity(M: np.ndarray, p: np.ndarray, alpha: np.ndarray, ridge: np.ndarray | float = 0.0) -> np.ndarray:
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
    ridges = np.broadcast_to(np.asarray(ridge, dtype=np.float64), (K,))
    H = M[np.ix_(idx, idx)] + np.diag(p[idx] / a**2 + ridges[idx])
    out[np.ix_(idx, idx)] = np.linalg.solve(H, np.diag(1.0 / a))
    return out
