"""Pareto sweep: AuxiNash with fixed bargaining powers against Nash-MTL over seeds.

Fixed powers steer the bargaining solution along the Pareto front of a two-task experiment: the
sweep trains ``auxinash`` with ``learn_preferences=False`` and p ∝ (t, 1 − t) for ``points``
values of t (both powers kept ≥ ``margin``; renormalized to Σp = K by the method), all with one
seed, and ``nash-mtl`` (p = 1) with as many seeds. Both tasks' test metrics of the model selected
on ``val`` are recorded in ``results.jsonl`` (the ordinary runner record), then tabulated and
plotted as two fronts: primary metric against auxiliary metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..report import _pyplot, load_results, save_figure
from .base import Experiment
from .results import output_path
from .runner import finished_runs, run_key, run_one

SWEPT, REFERENCE = "auxinash", "nash-mtl"


def preference_grid(points: int = 11, margin: float = 0.02) -> list[tuple[float, float]]:
    """(t, 1 − t) for ``points`` values of t evenly spaced in [margin, 1 − margin]."""
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    return [(round(float(t), 6), round(float(1 - t), 6)) for t in np.linspace(margin, 1 - margin, points)]


def sweep_runs(points: int = 11, seed: int = 0, margin: float = 0.02) -> list[tuple[str, int, dict[str, Any]]]:
    """(method, seed, hyperparameters) of every run of the sweep, the fixed-power ones first."""
    runs = [(SWEPT, seed, {"preferences": list(p), "learn_preferences": False}) for p in preference_grid(points, margin)]
    runs += [(REFERENCE, s, {}) for s in range(seed, seed + points)]
    return runs


def run_sweep(
    experiment: Experiment,
    out: str | Path,
    *,
    points: int = 11,
    seed: int = 0,
    margin: float = 0.02,
    budget: float = 1.0,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    trainer_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every run of the sweep not already in ``out/results.jsonl``; return the sweep's records."""
    out = Path(out)
    overrides = dict(trainer_overrides or {})
    done = finished_runs(out)
    for method, run_seed, hp in sweep_runs(points, seed, margin):
        key = run_key(experiment.name, method, run_seed, budget, hp, overrides, device=device)
        label = f"{method} p={hp['preferences']}" if "preferences" in hp else f"{method} seed {run_seed}"
        if key in done:
            log(f"{experiment.name} {label}: already in {out / 'results.jsonl'}, skipped")
            continue
        record = run_one(experiment, method, run_seed, out=out, device=device, data_dir=data_dir, budget=budget,
                         hyperparameters=hp, trainer_overrides=overrides)
        test = record["metrics"].get("test", {})
        shown = " ".join(f"{k}={v:.4g}" for k, v in test.items() if k.endswith(("accuracy", "mse")))
        log(f"{experiment.name} {label}: {shown} ({record['wall_time_s']:.1f}s)")
    return sweep_records(out, experiment.name)


def sweep_records(out: str | Path, experiment: str) -> list[dict[str, Any]]:
    """The sweep's records in ``out``: fixed-power AuxiNash and Nash-MTL runs of ``experiment``."""
    records = [r for r in load_results(out) if r["experiment"] == experiment]
    fixed = [r for r in records if r["method"] == SWEPT
             and r["config"]["hyperparameters"].get("learn_preferences") is False]
    return fixed + [r for r in records if r["method"] == REFERENCE]


def front_points(records: Sequence[dict[str, Any]], metrics: tuple[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per method, one point per run: the test values of both ``metrics`` and the run's label."""
    fronts: dict[str, list[dict[str, Any]]] = {SWEPT: [], REFERENCE: []}
    for r in records:
        test = r["metrics"].get("test", {})
        missing = [m for m in metrics if m not in test]
        if missing:
            raise KeyError(f"run {r['method']} seed {r['seed']} has no test metric {missing[0]!r}; it has {sorted(test)}")
        hp = r["config"]["hyperparameters"]
        label = "p=" + ",".join(f"{v:.2f}" for v in hp["preferences"]) if "preferences" in hp else f"seed {r['seed']}"
        fronts[r["method"]].append({"x": float(test[metrics[0]]), "y": float(test[metrics[1]]), "label": label})
    return fronts


def format_sweep(fronts: dict[str, list[dict[str, Any]]], metrics: tuple[str, str]) -> str:
    """A Markdown table of every point, then each front's mean ± std and its non-dominated count."""
    lines = [f"| method | run | test/{metrics[0]} | test/{metrics[1]} |", "|---|---|---|---|"]
    for method, points in fronts.items():
        for point in points:
            lines.append(f"| {method} | {point['label']} | {point['x']:.4f} | {point['y']:.4f} |")
    lines += ["", f"| method | runs | test/{metrics[0]} | test/{metrics[1]} | non-dominated in the union |", "|---|---|---|---|---|"]
    everything = [(p["x"], p["y"]) for points in fronts.values() for p in points]
    for method, points in fronts.items():
        if not points:
            continue
        xs, ys = np.array([p["x"] for p in points]), np.array([p["y"] for p in points])
        kept = sum(not _dominated((p["x"], p["y"]), everything) for p in points)
        lines.append(f"| {method} | {len(points)} | {xs.mean():.4f} ± {xs.std():.4f} | {ys.mean():.4f} ± {ys.std():.4f} | {kept} |")
    return "\n".join(lines)


def _dominated(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """Whether another point is at least as good in both (higher is better) and better in one."""
    return any(o[0] >= point[0] and o[1] >= point[1] and o != point for o in others)


def plot_fronts(fronts: dict[str, list[dict[str, Any]]], metrics: tuple[str, str], path: str | Path, title: str = "") -> Path:
    """Scatter of both fronts: fixed-power AuxiNash (annotated with t) and Nash-MTL seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    swept = fronts.get(SWEPT, [])
    if swept:
        ax.plot([p["x"] for p in swept], [p["y"] for p in swept], "-o", color="#c44e52", ms=5,
                label="AuxiNash, fixed p (one seed)")
        for p in swept:
            ax.annotate(p["label"].split(",")[0].replace("p=", ""), (p["x"], p["y"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    reference = fronts.get(REFERENCE, [])
    if reference:
        ax.scatter([p["x"] for p in reference], [p["y"] for p in reference], marker="x", color="#4c72b0",
                   label=f"Nash-MTL ({len(reference)} seeds)")
    ax.set_xlabel(f"test {metrics[0]}")
    ax.set_ylabel(f"test {metrics[1]}")
    ax.set_title(title or "Pareto sweep", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=130)


def default_metrics(records: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The first metric of the primary task and the same metric of the other task."""
    if not records:
        raise ValueError("no sweep records")
    first = records[0]
    primary = first["primary_metric_name"].split("/", 1)[1]
    task, metric = primary.split("/", 1)
    others = sorted({k.split("/", 1)[0] for k in first["metrics"].get("test", {}) if "/" in k} - {task})
    if len(others) != 1:
        raise ValueError(f"a Pareto front needs exactly two tasks; found {task!r} and {others}")
    return primary, f"{others[0]}/{metric}"


def report_sweep(out: str | Path, experiment: str, plots: bool = True) -> str:
    """Write ``pareto_table.md`` (and ``pareto_front.png``) for the sweep in ``out``; return the table."""
    out = Path(out)
    records = sweep_records(out, experiment)
    metrics = default_metrics(records)
    fronts = front_points(records, metrics)
    table = format_sweep(fronts, metrics)
    output_path(out, "pareto_table.md").write_text(table + "\n")
    if plots:
        plot_fronts(fronts, metrics, output_path(out, "pareto_front.png"),
                    title=f"{experiment}: fixed-p AuxiNash vs Nash-MTL")
    return table


__all__ = ["format_sweep", "front_points", "plot_fronts", "preference_grid", "report_sweep", "run_sweep", "sweep_records", "sweep_runs"]
