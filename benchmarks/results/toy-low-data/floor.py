"""What a perfect meta-optimizer of a linear combiner could reach on the toy (no training, closed form).

For weights (a, b, c) ≥ 0 on the main, helpful and harmful losses, the minimizer of the weighted
training loss a·L_main + b·L_helpful + c·L_harmful (each a mean over its labelled train samples) is a
weighted least-squares fit W(a, b, c). A meta step that fully minimized the primary loss on `aux`
would pick the (a, b, c) whose W fits `aux` best. This prints, per seed, the distance from W* of
that W (on a grid of 5151 points of the simplex), of the least-squares fits of the labelled train
and `aux` primary labels, and of W(0, 1, 0) (the helpful task alone).

    python benchmarks/results/toy-low-data/floor.py
"""

from __future__ import annotations

import statistics

import torch

from auxilia.experiments import get
from auxilia.experiments.toy import W_STAR

TOY = get("toy")
W_STAR_T = torch.tensor(W_STAR, dtype=torch.float64)


def moments(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = x.double(), y.double()
    return x.T @ x / len(x), x.T @ y / len(x)


def fit(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(A, b)


def main() -> None:
    grid = [(i / 100, j / 100, 1 - (i + j) / 100) for i in range(101) for j in range(101 - i)]
    print("| main_labels | seed | LS of labelled train (≈ stl) | LS of aux | best W(a,b,c) on aux | its (a, b, c) | helpful alone |")
    print("|---|---|---|---|---|---|---|")
    for n in (50, 200, 1000):
        rows = []
        for seed in range(3):
            d = TOY.setup(seed=seed, main_labels=n).datasets
            train, aux = d["train"], d["aux"]
            mask = train.masks.get("main", torch.ones(len(train), dtype=torch.bool))
            mom = {"main": moments(train.inputs[mask], train.targets["main"][mask])}
            for task in ("helpful", "harmful"):
                mom[task] = moments(train.inputs, train.targets[task])
            A_aux, b_aux = moments(aux.inputs, aux.targets["main"])
            y2 = float((aux.targets["main"].double() ** 2).mean())
            best = None
            for w in grid:
                A = sum(wk * mom[t][0] for wk, t in zip(w, ("main", "helpful", "harmful")))
                b = sum(wk * mom[t][1] for wk, t in zip(w, ("main", "helpful", "harmful")))
                W = fit(A, b)
                loss = y2 - 2 * W @ b_aux + W @ A_aux @ W
                if best is None or loss < best[0]:
                    best = (float(loss), W, w)
            dist = lambda W: float((W - W_STAR_T).norm())
            row = (dist(fit(*mom["main"])), dist(fit(A_aux, b_aux)), dist(best[1]), best[2], dist(fit(*mom["helpful"])))
            rows.append(row)
            print(f"| {n} | {seed} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | ({row[3][0]:.2f}, {row[3][1]:.2f}, {row[3][2]:.2f}) | {row[4]:.3f} |")
        means = [statistics.fmean(r[k] for r in rows) for k in (0, 1, 2)]
        print(f"| {n} | mean | {means[0]:.3f} | {means[1]:.3f} | {means[2]:.3f} | | {statistics.fmean(r[4] for r in rows):.3f} |")


if __name__ == "__main__":
    main()
