"""How AuxiLearn reshapes the training loss on the ``toy`` regression (the paper's illustration).

Trains ``auxilearn`` on the toy (seed 0, the experiment's defaults) and draws, over the plane of the
shared weights W ∈ R², three landscapes: the primary loss on noise-free targets (what we want to
minimize), the training objective with the initial combiner (all weights 1: the sum of the losses,
whose minimum sits between W* and the harmful task's W̃), and the training objective with the
learned combiner at the end of training. Each panel marks W*, W̃ and its own minimizer.

    python benchmarks/auxilearn_landscape.py --out benchmarks/results/auxilearn-toy/landscape.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from auxilia import methods
from auxilia.experiments import get
from auxilia.experiments.toy import W_HARMFUL, W_STAR
from auxilia.training import Trainer


def objective_grid(x: torch.Tensor, targets: dict[str, torch.Tensor], weights: dict[str, float], grid: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k mean((x W - y_k)²) for every W in ``grid`` (G, 2)."""
    predictions = grid @ x.T  # (G, N)
    return sum(w * ((predictions - targets[name]) ** 2).mean(dim=1) for name, w in weights.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/auxilearn-toy/landscape.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiment = get("toy")
    setup = experiment.setup(args.seed)
    method = methods.create("auxilearn", setup.tasks, **setup.method_defaults.get("auxilearn", {}))
    initial = method.weights()
    trainer = Trainer(setup.model, method, setup.datasets, setup.optimizer, setup.config,
                      scheduler=setup.scheduler, metrics_fn=setup.metrics_fn)
    trainer.fit()
    learned = method.weights()
    trained_w = setup.model.encoder.weight.detach().reshape(-1)

    xs, ys = torch.linspace(-2.5, 2.5, 201), torch.linspace(-5.0, 2.5, 201)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    train_x, train_targets, _ = setup.datasets["train"].__getitems__(list(range(len(setup.datasets["train"]))))
    test_x, test_targets, _ = setup.datasets["test"].__getitems__(list(range(len(setup.datasets["test"]))))
    panels = [
        ("primary loss (noise-free test targets)", objective_grid(test_x, test_targets, {"main": 1.0}, grid)),
        ("training objective, initial combiner\n" + _fmt(initial), objective_grid(train_x, train_targets, initial, grid)),
        ("training objective, learned combiner\n" + _fmt(learned), objective_grid(train_x, train_targets, learned, grid)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        surface = values.reshape(gx.shape)
        ax.contourf(gx, gy, torch.log1p(surface - surface.min()), levels=30, cmap="viridis")
        best = grid[int(values.argmin())]
        ax.plot(*W_STAR, "w*", markersize=14, label="W* (primary)")
        ax.plot(*W_HARMFUL, "rX", markersize=11, label="W̃ (harmful)")
        ax.plot(float(best[0]), float(best[1]), "o", color="orange", markersize=8, label="minimum of this surface")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("W[0]")
    axes[2].plot(float(trained_w[0]), float(trained_w[1]), "k+", markersize=12, mew=2, label="W after training")
    axes[0].set_ylabel("W[1]")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"toy (seed {args.seed}): log(1 + loss - min) over the shared weights W")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"initial weights {initial}\nlearned weights {learned}\ntrained W {trained_w.tolist()}\nwrote {out}")


def _fmt(weights: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in weights.items())


if __name__ == "__main__":
    main()
