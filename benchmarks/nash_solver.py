"""Time and accuracy of the Nash bargaining solver, against a cvxpy formulation of the same problem.

Both solve min_α ½ αᵀMα − Σ_k p_k log α_k (whose optimality condition is α_k (Mα)_k = p_k) on Gram
matrices M = G Gᵀ from generated families, for K ∈ {2, 3, 5, 10}; the accuracy of each is the
relative KKT residual max_k |α_k (Mα)_k − p_k| / p_k on the matrix it was given. Our solver is timed
cold (no warm start) and warm (started from the solution for a slightly different G, as in training,
where α is carried over from the previous step). cvxpy is optional: without it only our rows are
written.

    python benchmarks/nash_solver.py --out benchmarks/results/nash_solver
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from auxilia.solvers import nash_bargaining

FAMILIES = ("random", "conflicting", "scaled", "low_rank")


def gradients(family: str, K: int, rng: np.random.Generator) -> np.ndarray:
    """A (K, P) gradient matrix of one family.

    random: Gaussian rows, P = 4K. conflicting: a shared direction with alternating signs plus noise
    (pairs of tasks pull against each other). scaled: Gaussian rows whose norms span 1e-6..1e6.
    low_rank: P = K rows drawn from a rank-⌈K/2⌉ subspace plus a 1e-6 perturbation (M nearly singular,
    the situation of many tasks on few shared parameters) but with a common descent direction.
    """
    P = 4 * K
    if family == "random":
        return rng.standard_normal((K, P))
    if family == "conflicting":
        base = rng.standard_normal(P)
        signs = np.where(np.arange(K) % 2 == 0, 1.0, -0.8)
        return signs[:, None] * base + 0.5 * rng.standard_normal((K, P))
    if family == "scaled":
        return rng.standard_normal((K, P)) * np.logspace(-6, 6, K)[:, None]
    if family == "low_rank":
        rank = max(1, (K + 1) // 2)
        common = rng.standard_normal(P)
        basis = rng.standard_normal((rank, P))
        G = np.abs(rng.standard_normal((K, rank))) @ basis + 3.0 * common
        return G + 1e-6 * rng.standard_normal((K, P))
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def residual(M: np.ndarray, p: np.ndarray, alpha: np.ndarray) -> float:
    return float(np.max(np.abs(alpha * (M @ alpha) - p) / p))


def cvxpy_solve(M: np.ndarray, p: np.ndarray):
    """The reference formulation: the same convex problem, handed to cvxpy's default conic solver."""
    import cvxpy as cp

    K = len(p)
    L = np.linalg.cholesky(M + 1e-12 * np.trace(M) / K * np.eye(K))  # ½‖Lᵀα‖², a DCP-friendly form
    alpha = cp.Variable(K, pos=True)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ alpha) - p @ cp.log(alpha)))
    try:
        problem.solve()
    except cp.error.SolverError:  # counted as a failure by the caller
        return np.full(K, np.nan)
    return np.asarray(alpha.value, dtype=float) if alpha.value is not None else np.full(K, np.nan)


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(Ks, instances: int, repeats: int, use_cvxpy: bool, seed: int = 0) -> list[dict]:
    rows = []
    for K in Ks:
        for family in FAMILIES:
            rng = np.random.default_rng([seed, K, FAMILIES.index(family)])
            cold_t, warm_t, cold_r, warm_r, iters, ref_t, ref_r, ref_fail = [], [], [], [], [], [], [], 0
            for _ in range(instances):
                G = gradients(family, K, rng)
                M = G @ G.T
                M = M / np.linalg.norm(M)  # as the methods solve it (Frobenius normalization)
                p = rng.uniform(0.2, 2.0, K)
                p = p * K / p.sum()
                t, solution = _timed(lambda M=M, p=p: nash_bargaining(M, p), repeats)
                cold_t.append(t)
                cold_r.append(residual(M, p, solution.alpha))
                iters.append(solution.iterations)
                G2 = G + 0.05 * np.linalg.norm(G, axis=1, keepdims=True) / np.sqrt(G.shape[1]) * rng.standard_normal(G.shape)
                M2 = G2 @ G2.T
                M2 = M2 / np.linalg.norm(M2)
                t, warm = _timed(lambda M2=M2, p=p, a=solution.alpha: nash_bargaining(M2, p, warm_start=a), repeats)
                warm_t.append(t)
                warm_r.append(residual(M2, p, warm.alpha))
                if use_cvxpy:
                    t, alpha = _timed(lambda M=M, p=p: cvxpy_solve(M, p), 1)
                    ref_t.append(t)
                    if np.all(np.isfinite(alpha)) and np.all(alpha > 0):
                        ref_r.append(residual(M, p, alpha))
                    else:
                        ref_fail += 1
            row = {
                "K": K, "family": family, "instances": instances,
                "ours_cold_ms": 1e3 * statistics.median(cold_t), "ours_cold_ms_p95": 1e3 * float(np.percentile(cold_t, 95)),
                "ours_warm_ms": 1e3 * statistics.median(warm_t), "ours_warm_ms_p95": 1e3 * float(np.percentile(warm_t, 95)),
                "ours_iterations_median": statistics.median(iters), "ours_iterations_max": max(iters),
                "ours_residual_max": max(cold_r + warm_r),
            }
            if use_cvxpy:
                row.update({
                    "cvxpy_ms": 1e3 * statistics.median(ref_t),
                    "cvxpy_residual_median": statistics.median(ref_r) if ref_r else None,
                    "cvxpy_residual_max": max(ref_r) if ref_r else None,
                    "cvxpy_failures": ref_fail,
                })
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def render(rows, machine, args, use_cvxpy: bool) -> str:
    lines = [
        "# Nash bargaining solver: time and KKT residual",
        "",
        f"Machine: {machine['processor']} ({machine['note']}), numpy {machine['numpy']}"
        + (f", cvxpy {machine['cvxpy']} (default solver {machine['cvxpy_solver']})" if use_cvxpy else "") + ".",
        f"Command: `python benchmarks/nash_solver.py --instances {args.instances} --repeats {args.repeats}`.",
        "",
        ("Problem: min ½αᵀMα − Σ p_k log α_k on the Frobenius-normalized Gram matrix of generated gradients "
        "(families in the script's `gradients`), p random with Σp = K. Residual: max_k |α_k(Mα)_k − p_k| / p_k. "
        "Our times are the median over instances of the median of the repeats; `cold`: no warm start; "
        "`warm`: started from the solution of a 5%-perturbed G (the training situation). cvxpy: one solve "
        "per instance, including its problem construction (as a per-step call would)."),
        "",
    ]
    header = ["K", "family", "ours cold ms (p95)", "ours warm ms (p95)", "Newton its (max)", "ours max residual"]
    if use_cvxpy:
        header += ["cvxpy ms", "cvxpy residual median (max)", "cvxpy failures"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["K"]), r["family"], f"{r['ours_cold_ms']:.3f} ({r['ours_cold_ms_p95']:.3f})",
                 f"{r['ours_warm_ms']:.3f} ({r['ours_warm_ms_p95']:.3f})",
                 f"{r['ours_iterations_median']:.0f} ({r['ours_iterations_max']})", f"{r['ours_residual_max']:.1e}"]
        if use_cvxpy:
            med, mx = r["cvxpy_residual_median"], r["cvxpy_residual_max"]
            cells += [f"{r['cvxpy_ms']:.1f}", f"{med:.1e} ({mx:.1e})" if med is not None else "—", str(r["cvxpy_failures"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 3, 5, 10])
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cvxpy", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/nash_solver")
    args = parser.parse_args()
    use_cvxpy = not args.no_cvxpy
    machine = {"processor": _cpu_name(), "note": "CPU, 2 cores shared", "numpy": np.__version__,
               "platform": platform.platform()}
    if use_cvxpy:
        try:
            import cvxpy as cp
        except ImportError:
            print("cvxpy is not installed: timing our solver only")
            use_cvxpy = False
        else:
            machine["cvxpy"] = cp.__version__
            machine["cvxpy_solver"] = "CLARABEL" if "CLARABEL" in cp.installed_solvers() else cp.installed_solvers()[0]
    rows = run(args.tasks, args.instances, args.repeats, use_cvxpy)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(rows, machine, args, use_cvxpy))
    print(out.with_suffix(".md").read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
