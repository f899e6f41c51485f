"""The CPU-reduced ``cifar10-rotation`` grid: the registered experiment with smaller splits and batches.

``auxilia run`` can shrink the training split (``--option train_size``) but always evaluates the
full 4,000-image ``val`` and 10,000-image ``test`` splits (four rotated views each), which alone
takes minutes per run on one CPU core. This script builds the registered experiment unchanged and
then keeps fixed, seed-independent subsets of ``val`` and ``test`` and a smaller batch; everything
else (model, tasks, optimizer, schedule, method defaults, runner, records) is the library's.

    OMP_NUM_THREADS=1 python benchmarks/results/cifar10-rotation-maoal/run_reduced.py
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from auxilia import methods
from auxilia.experiments import get
from auxilia.experiments.runner import finished_runs, run_key, run_one

HERE = Path(__file__).resolve().parent


def _build(seed: int, data_dir=None, budget: float = 1.0, train_size: int = 512, val_size: int = 500,
           test_size: int = 1000, batch_size: int = 32, epochs: int = 2):
    setup = get("cifar10-rotation").build(seed=seed, data_dir=data_dir, budget=budget, train_size=train_size)
    keep = torch.Generator().manual_seed(0)  # the same subsets for every seed and method
    datasets = dict(setup.datasets)
    for split, size in (("val", val_size), ("test", test_size)):
        datasets[split] = datasets[split].subset(torch.randperm(len(datasets[split]), generator=keep)[:size])
    setup.datasets = datasets
    setup.config.batch_size = batch_size
    setup.config.epochs = epochs
    setup.notes += f"; CPU-reduced: batch {batch_size}, {epochs} epochs, val {val_size}, test {test_size} (fixed subsets)"
    return setup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="stl,equal,hpo-random,uncertainty,gcs,maoal")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--meta-every", type=int, default=8)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    experiment = replace(get("cifar10-rotation"), build=_build)
    options = {"train_size": args.train_size, "val_size": args.val_size, "test_size": args.test_size,
               "batch_size": args.batch_size, "epochs": args.epochs}
    done = finished_runs(args.out)
    for name in args.methods.split(","):
        accepted = methods.hyperparameters(name)
        hp = {k: v for k, v in {"meta_every": args.meta_every, "trials": args.trials}.items() if k in accepted}
        for seed in range(args.seeds):
            if run_key(experiment.name, name, seed, 1.0, hp, {}, options) in done:
                continue
            record = run_one(experiment, name, seed, out=args.out, data_dir=args.data_dir,
                             hyperparameters=hp, options=options)
            print(f"{name:12s} seed {seed}: {record['primary_metric_name']}={record['primary_metric']:.4g} "
                  f"({record['wall_time_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
