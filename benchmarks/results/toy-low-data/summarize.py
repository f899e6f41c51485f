"""Tables for the low-data toy: the sweep (chosen on `val` only) and the reported runs.

    python benchmarks/results/toy-low-data/summarize.py sweep     # sweep/main_labels*/results.jsonl
    python benchmarks/results/toy-low-data/summarize.py weights   # per-seed weights of the reported runs
    python benchmarks/results/toy-low-data/summarize.py last      # w_dist after the last epoch (diagnostic)
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SWEPT = {"auxilearn": ("meta_source", "meta_every", "meta_lr"), "auxinash": ("meta_source", "hypergrad_every", "meta_lr")}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3g} ± {statistics.pstdev(values):.2g}"


def sweep() -> None:
    grids: dict[str, dict[tuple, dict[int, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in sorted((HERE / "sweep").glob("main_labels*/results.jsonl")):
        n = int(path.parent.name.removeprefix("main_labels"))
        for record in load(path):
            if record["method"] not in SWEPT:  # stl on the same seeds, for reference
                continue
            hp = record["config"]["hyperparameters"]
            key = tuple(hp[k] for k in SWEPT[record["method"]])
            grids[record["method"]][key][n].append(record)
    for method, grid in grids.items():
        sizes = sorted({n for by_n in grid.values() for n in by_n})
        print(f"\n### {method}\n")
        print("| " + " | ".join(SWEPT[method]) + " | " + " | ".join(f"val/main/mse N={n}" for n in sizes)
              + " | mean val (both N) | " + " | ".join(f"w_dist N={n}" for n in sizes) + " |")
        print("|" + "---|" * (len(SWEPT[method]) + 2 * len(sizes) + 1))
        scores = {}
        for key, by_n in sorted(grid.items(), key=lambda kv: kv[0]):
            vals = {n: [r["metrics"]["val"]["main/mse"] for r in by_n[n]] for n in sizes}
            if any(len(v) != 3 for v in vals.values()):
                continue
            scores[key] = statistics.fmean(statistics.fmean(v) for v in vals.values())
            cells = [str(k) for k in key] + [mean_std(vals[n]) for n in sizes] + [f"{scores[key]:.3f}"]
            cells += [mean_std([r["metrics"]["test"]["w_dist"] for r in by_n[n]]) for n in sizes]
            print("| " + " | ".join(cells) + " |")
        for n in sizes:
            stl = [r for r in load(HERE / "sweep" / f"main_labels{n}" / "results.jsonl") if r["method"] == "stl"]
            if stl:
                print(f"\nstl at N={n} on these seeds: val/main/mse {mean_std([r['metrics']['val']['main/mse'] for r in stl])}, "
                      f"w_dist {mean_std([r['metrics']['test']['w_dist'] for r in stl])}", end="")
        print()
        best = min(scores, key=scores.get)
        print(f"\nchosen on val (lowest mean of the per-N seed means): {dict(zip(SWEPT[method], best))}")
        for n in sizes:
            per_n = min(scores, key=lambda k: statistics.fmean(r["metrics"]["val"]["main/mse"] for r in grid[k][n]))
            print(f"  best on val at N={n} alone: {dict(zip(SWEPT[method], per_n))}")


def weights() -> None:
    for path in sorted(HERE.glob("main_labels*/results.jsonl")):
        print(f"\n### {path.parent.name}\n")
        print("| method | seed | main | helpful | harmful | harmful ÷ helpful | w_dist |")
        print("|---|---|---|---|---|---|---|")
        by_method = defaultdict(list)
        for r in load(path):
            if r["method"] in ("auxilearn", "auxinash"):
                by_method[r["method"]].append(r)
        for method, records in by_method.items():
            for r in sorted(records, key=lambda r: r["seed"]):
                w = r["weights"]
                print(f"| {method} | {r['seed']} | {w['main']:.3g} | {w['helpful']:.3g} | {w['harmful']:.3g} | "
                      f"{w['harmful'] / w['helpful']:.3g} | {r['metrics']['test']['w_dist']:.3f} |")
            m = {t: statistics.fmean(r["weights"][t] for r in records) for t in ("main", "helpful", "harmful")}
            d = statistics.fmean(r["metrics"]["test"]["w_dist"] for r in records)
            print(f"| {method} | mean | {m['main']:.3g} | {m['helpful']:.3g} | {m['harmful']:.3g} | "
                  f"{m['harmful'] / m['helpful']:.3g} | {d:.3f} |")


def last() -> None:
    """w_dist of the model after the last epoch (from the runs' log.csv), beside the val-selected one."""
    print("| main_labels | method | w_dist, model selected on val | w_dist after the last epoch | last epoch, per seed |")
    print("|---|---|---|---|---|")
    for path in sorted(HERE.glob("main_labels*/results.jsonl")):
        records = load(path)
        for method in dict.fromkeys(r["method"] for r in records):
            mine = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
            finals = []
            for r in mine:
                log = path.parent / "runs" / "toy" / method / f"seed{r['seed']}" / "log.csv"
                rows = [row for row in csv.DictReader(log.open()) if row["split"] == "val" and row["name"] == "w_dist"]
                finals.append(float(rows[-1]["value"]))
            selected = [r["metrics"]["test"]["w_dist"] for r in mine]
            print(f"| {path.parent.name.removeprefix('main_labels')} | {method} | {mean_std(selected)} | {mean_std(finals)} | "
                  + ", ".join(f"{v:.3f}" for v in finals) + " |")


if __name__ == "__main__":
    {"sweep": sweep, "weights": weights, "last": last}[sys.argv[1] if len(sys.argv) > 1 else "weights"]()
