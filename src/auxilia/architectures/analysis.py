"""What Aux-NAS converged to: the α of every connection, summary statistics, and a plot.

:func:`alpha_summary` gives, per direction, the statistics the Aux-NAS paper reports for its learned
primary -> auxiliary weights (min, max, mean, median). :func:`alpha_metrics` flattens both into
``alpha/...`` numbers for a Trainer's ``metrics_fn``, so every recorded run carries them.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .auxnas import AUXILIARY_TO_PRIMARY, PRIMARY_TO_AUXILIARY, AuxNAS

SHORT = {PRIMARY_TO_AUXILIARY: "p2a", AUXILIARY_TO_PRIMARY: "a2p"}


@torch.no_grad()
def alpha_table(model: AuxNAS) -> list[dict[str, Any]]:
    """One row per connection: source, source_layer, target, target_layer, direction, alpha (the
    learned sigmoid, ignoring cuts and eval mode) and whether it is cut."""
    if model.alpha_logits is not None:
        values = torch.sigmoid(model.alpha_logits).tolist()
    else:
        values = [1.0] * len(model.connections)
    cut = model.cut_mask.tolist()
    return [
        {"source": c.source, "source_layer": c.source_layer, "target": c.target, "target_layer": c.target_layer,
         "direction": c.direction, "alpha": float(v), "cut": bool(k)}
        for c, v, k in zip(model.connections, values, cut)
    ]


def alpha_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per direction: count, min, max, mean and median of α."""
    out: dict[str, dict[str, float]] = {}
    for direction in (PRIMARY_TO_AUXILIARY, AUXILIARY_TO_PRIMARY):
        values = [float(r["alpha"]) for r in rows if r["direction"] == direction]
        if values:
            out[direction] = {"count": float(len(values)), "min": min(values), "max": max(values),
                              "mean": statistics.fmean(values), "median": statistics.median(values)}
    return out


def alpha_metrics(model: Any) -> dict[str, float]:
    """``alpha/<p2a|a2p>/<stat>`` and ``alpha/<source>.<j>-><target>.<i>`` for an :class:`AuxNAS`
    with learned α; empty for any other model (usable as an experiment's ``metrics_fn``)."""
    if not isinstance(model, AuxNAS) or model.alpha_logits is None:
        return {}
    rows = alpha_table(model)
    out = {}
    for direction, stats in alpha_summary(rows).items():
        for key, value in stats.items():
            out[f"alpha/{SHORT[direction]}/{key}"] = value
    for row in rows:
        out[f"alpha/{row['source']}.{row['source_layer']}->{row['target']}.{row['target_layer']}"] = row["alpha"]
    return out


def rows_from_metrics(metrics: Mapping[str, float], primary: str) -> list[dict[str, Any]]:
    """Invert :func:`alpha_metrics`'s per-connection entries (e.g. from a ``results.jsonl`` record)."""
    rows = []
    for key, value in metrics.items():
        if not key.startswith("alpha/") or "->" not in key:
            continue
        source, target = key[len("alpha/"):].split("->")
        (s, j), (t, i) = source.rsplit(".", 1), target.rsplit(".", 1)
        direction = PRIMARY_TO_AUXILIARY if s == primary else AUXILIARY_TO_PRIMARY
        rows.append({"source": s, "source_layer": int(j), "target": t, "target_layer": int(i),
                     "direction": direction, "alpha": float(value)})
    return rows


def plot_alpha(tables: Sequence[Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Heat maps of α (target layer x source layer offset), one per direction, averaged over the given
    tables (e.g. one per seed). Needs matplotlib (the ``plot`` extra)."""
    import numpy as np

    from ..report import _pyplot, save_figure

    plt = _pyplot()

    rows = [r for table in tables for r in table]
    if not rows:
        raise ValueError("no connections to plot")
    layers = 1 + max(r["target_layer"] for r in rows)
    window = 1 + max(r["target_layer"] - r["source_layer"] for r in rows)
    directions = [d for d in (PRIMARY_TO_AUXILIARY, AUXILIARY_TO_PRIMARY) if any(r["direction"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(directions), figsize=(4.5 * len(directions), 0.35 * layers + 1.8), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        total = np.zeros((layers, window))
        count = np.zeros((layers, window))
        for r in rows:
            if r["direction"] == direction:
                i, d = r["target_layer"], r["target_layer"] - r["source_layer"]
                total[i, d] += r["alpha"]
                count[i, d] += 1
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(layers):
            for d in range(window):
                if count[i, d]:
                    ax.text(d, i, f"{grid[i, d]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, d] < 0.5 else "black")
        ax.set_xticks(range(window), [f"j=i-{d}" if d else "j=i" for d in range(window)])
        ax.set_ylabel("target layer i")
        ax.set_title(direction)
        fig.colorbar(image, ax=ax, fraction=0.05)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def report_alpha(results: str | Path, out: str | Path | None = None, split: str = "test") -> str:
    """From a ``results.jsonl`` (or its directory): per run label with learned α, the α statistics
    per direction (mean ± std over seeds of each run's min, max, mean, median) as a Markdown table,
    written to ``alpha.md`` with one heat map ``alpha_<label>.png`` per label (when matplotlib is
    available). The α of the model selected on ``val`` is read from the ``split`` metrics."""
    import json

    import numpy as np

    path = Path(results)
    path = path / "results.jsonl" if path.is_dir() else path
    out_dir = Path(out) if out is not None else path.parent
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_label: dict[str, list[list[dict[str, Any]]]] = {}
    for record in records:
        metrics = record.get("metrics", {}).get(split, {})
        primary = record.get("primary_metric_name", "").split("/")[1] if "/" in record.get("primary_metric_name", "") else ""
        rows = rows_from_metrics(metrics, primary)
        if rows:
            by_label.setdefault(record.get("label") or record["method"], []).append(rows)
    lines = ["| run | direction | connections | min | max | mean | median |", "|---|---|---|---|---|---|---|"]
    for label, tables in by_label.items():
        summaries = [alpha_summary(t) for t in tables]
        for direction in (PRIMARY_TO_AUXILIARY, AUXILIARY_TO_PRIMARY):
            stats = [s[direction] for s in summaries if direction in s]
            if not stats:
                continue
            cells = [f"{np.mean([s[k] for s in stats]):.3g} ± {np.std([s[k] for s in stats]):.2g}"
                     for k in ("min", "max", "mean", "median")]
            lines.append(f"| {label} ({len(stats)} seeds) | {direction} | {int(stats[0]['count'])} | " + " | ".join(cells) + " |")
        try:
            plot_alpha(tables, out_dir / f"alpha_{label.replace('/', '_')}.png", title=f"{label}: α at the selected epoch, mean over {len(tables)} seeds")
        except ImportError:
            pass
    table = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "alpha.md").write_text(table + "\n")
    return table

