"""Tables and figures from ``results.jsonl``: mean ± std over seeds, Δp against ``stl``, cost ratios.

Peak memory is CUDA's peak allocation on GPU runs; on CPU it is the process's peak resident set, which
only grows within one process, so its ratios are meaningful for GPU runs only.

Δp is the relative change of the primary metric against ``stl`` in percent, signed so that positive
means better (for a lower-is-better metric the sign is flipped).

A row is one configuration: the runs of one method (label) that differ only by their seed. Runs
with another budget, trainer setting, option, ``--hp`` or device are another row, never averaged
in; when the rows of a table differ in such settings, a ``settings`` column says how.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .experiments.results import configuration, read_records, record_key


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` (or of the one in directory ``path``): lines that are not
    records are skipped with a warning, and a run recorded twice is counted once."""
    return read_records(path)


def settings(record: dict[str, Any]) -> dict[str, str]:
    """The configuration of a record's run as ``name: value`` strings (``hp:`` and ``option:``
    prefix hyperparameters and experiment options), seed excluded."""
    key = record_key(record)
    try:
        config = configuration(key) if key else {}
    except (json.JSONDecodeError, AttributeError):
        config = {"run_key": key}
    flat = {"budget": config.get("budget"), "device": config.get("device")}
    flat.update(config.get("trainer") or {})
    flat.update({f"hp:{k}": v for k, v in (config.get("hyperparameters") or {}).items()})
    flat.update({f"option:{k}": v for k, v in (config.get("options") or {}).items()})
    if "run_key" in config:
        flat["run_key"] = config["run_key"]
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items() if v is not None}


def _value(record: dict[str, Any], metric: str) -> float:
    if metric == "primary":
        value = record.get("primary_metric")
    else:
        value = record.get("metrics", {}).get("test", {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarize(
    records: Iterable[dict[str, Any]], experiment: str, extra_metrics: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per configuration (in first-seen order): n, mean and std of the primary and extra
    metrics over its seeds. ``row["settings"]`` holds what the row's runs set that not every row
    shares (empty when every row has the same configuration)."""
    runs = [r for r in records if r["experiment"] == experiment]
    # a run's label names its row: the method, or "<arch>/<method>" when an architecture was chosen
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("label") or r["method"], tuple(sorted(settings(r).items()))), []).append(r)
    shared = set.intersection(*(set(config) for _, config in groups)) if groups else set()
    rows = []
    for (method, config), mine in groups.items():
        row: dict[str, Any] = {"method": method, "base_method": mine[0]["method"], "n": len(mine),
                               "higher_is_better": mine[0].get("higher_is_better", False),
                               "settings": {k: v for k, v in config if (k, v) not in shared}}
        for metric in ("primary", *extra_metrics):
            values = np.array([_value(r, metric) for r in mine], dtype=float)
            row[metric] = (float(np.nanmean(values)), float(np.nanstd(values))) if np.isfinite(values).any() else (math.nan, math.nan)
        row["time_per_step_s"] = float(np.mean([r["time_per_step_s"] for r in mine]))
        row["peak_memory_bytes"] = float(np.mean([r.get("peak_memory_bytes", 0) for r in mine]))
        row["comparable"] = {k: v for k, v in config if not k.startswith(("hp:", "option:arch"))}
        rows.append(row)
    for row in rows:
        stl = _reference(rows, "stl", row)
        if stl is None or not stl["primary"][0]:
            row["delta_p"] = math.nan
            continue
        change = (row["primary"][0] - stl["primary"][0]) / abs(stl["primary"][0]) * 100
        row["delta_p"] = change if row["higher_is_better"] else -change
    return rows


def _reference(rows: Sequence[dict[str, Any]], method: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The row ``row`` is compared with: ``method``'s row (named so, else under any architecture)
    of the same configuration apart from hyperparameters and architecture; None if there is none."""
    same = [r for r in rows if r.get("base_method") == method and r.get("comparable") == row.get("comparable")]
    return next((r for r in same if r["method"] == method), None) or next(iter(same), None)


def row_name(row: dict[str, Any]) -> str:
    """The row's method, with its differing settings when there are any (for plots)."""
    extra = " ".join(f"{k}={v}" for k, v in row.get("settings", {}).items())
    return f"{row['method']} ({extra})" if extra else row["method"]


def format_table(rows: Sequence[dict[str, Any]], primary_name: str, extra_metrics: Sequence[str] = ()) -> str:
    """A Markdown table (readable in a terminal too), with a ``settings`` column and a note under it
    when the experiment was run in several configurations: rows that differ in more than their
    methods' hyperparameters, or one method in several rows."""
    labels = [row["method"] for row in rows]
    several = len(set(labels)) < len(labels) or any(
        not name.startswith("hp:") for row in rows for name in row.get("settings", {}))
    header = ["method", *(["settings"] if several else []), "seeds", primary_name, *extra_metrics,
              "Δp vs stl (%)", "step time ÷ equal", "peak memory ÷ equal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        equal = _reference(rows, "equal", row)
        cells = [row["method"]]
        if several:
            cells.append(" ".join(f"{k}={v}" for k, v in row["settings"].items()) or "—")
        cells.append(str(row["n"]))
        for metric in ("primary", *extra_metrics):
            mean, std = row[metric]
            cells.append(f"{mean:.4g} ± {std:.2g}")
        delta = row["delta_p"]
        cells.append("—" if math.isnan(delta) else ("0.0" if abs(delta) < 0.05 else f"{delta:+.1f}"))
        cells.append(f"{row['time_per_step_s'] / equal['time_per_step_s']:.2f}" if equal else "—")
        cells.append(f"{row['peak_memory_bytes'] / equal['peak_memory_bytes']:.2f}" if equal and equal["peak_memory_bytes"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if several:
        lines += ["", ("Rows are configurations (runs that differ only by seed); `settings` lists what a row's "
                       "runs set that not every row shares (hp: method hyperparameter, option: experiment "
                       "option). Δp and cost ratios compare rows whose settings differ at most in hp and arch.")]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need the 'plot' extra: pip install 'auxilia[plot]'") from error
    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; every plot of the package ends here."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def plot_primary(rows: Sequence[dict[str, Any]], primary_name: str, path: str | Path) -> Path:
    """Bar chart of the primary metric per method, with the std over seeds as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.2))
    means = [row["primary"][0] for row in rows]
    stds = [row["primary"][1] for row in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(rows)), [row_name(row) for row in rows], rotation=45, ha="right")
    ax.set_ylabel(primary_name)
    ax.set_title("primary metric (mean ± std over seeds)")
    return save_figure(fig, path)


def plot_weights(records: Iterable[dict[str, Any]], experiment: str, path: str | Path) -> Path | None:
    """Each method's task weights over training (first seed), one panel per method that has weights."""
    plt = _pyplot()
    runs: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["experiment"] == experiment and record.get("weights_history") and record["method"] not in runs:
            runs[record["method"]] = record
    if not runs:
        return None
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (method, record) in zip(axes.flat, runs.items()):
        history = record["weights_history"]
        steps = [h["step"] for h in history]
        for task in [k for k in history[0] if k != "step"]:
            ax.plot(steps, [h.get(task, math.nan) for h in history], label=task)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{experiment}: task weights over training (seed {next(iter(runs.values()))['seed']})", fontsize=10)
    return save_figure(fig, path)


def plot_run_log(
    log_csv: str | Path, prefixes: Sequence[str], path: str | Path, title: str = "", log_scale: Sequence[str] = ()
) -> Path:
    """Series of one run's ``log.csv`` over training, one panel per name prefix.

    Each panel plots every logged ``<prefix>/<name>`` of the ``train`` split against the step, e.g.
    ``("weights", "alpha")`` for AuxiNash's bargaining powers p and its bargaining solution α.
    Prefixes in ``log_scale`` get a logarithmic y axis.
    """
    import csv

    series: dict[str, dict[str, list[tuple[int, float]]]] = {prefix: {} for prefix in prefixes}
    with Path(log_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != "train" or "/" not in row["name"]:
                continue
            prefix, name = row["name"].split("/", 1)
            if prefix in series:
                series[prefix].setdefault(name, []).append((int(row["step"]), float(row["value"])))
    empty = [prefix for prefix, values in series.items() if not values]
    if empty:
        raise ValueError(f"{log_csv}: nothing logged under {empty[0]!r}/")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(prefixes), figsize=(3.6 * len(prefixes), 2.8), squeeze=False)
    for ax, prefix in zip(axes.flat, prefixes):
        for name, points in series[prefix].items():
            ax.plot([s for s, _ in points], [v for _, v in points], label=name, lw=1)
        if prefix in log_scale:
            ax.set_yscale("log")
        ax.set_title(prefix, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
