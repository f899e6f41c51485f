"""UCI Adult (census income): income is the primary task, other columns can be auxiliary targets.

Numeric columns are standardized (statistics of the training split only) and categorical columns
one-hot encoded. A column used as an auxiliary target is removed from the inputs, so no task can
read its own label. Categorical targets become class indices, numeric ones standardized values.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .common import require, resolve, split_indices, verify_sha256

SHA256 = "1c5316247e07e1dfde1834ed02508155ed950a1814b950da9c5e30b4f24bc9c0"
SOURCE = "Adult is published by the UCI repository (https://archive.ics.uci.edu/dataset/2/adult); put it at <data_dir>/tabular/adult.csv.gz."
NUMERIC = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender", "native-country"]
PRIMARY = "income"


@dataclass
class TabularData:
    inputs: Tensor  # (N, F) float
    targets: dict[str, Tensor]
    splits: dict[str, Tensor]  # split name -> indices
    feature_names: list[str]
    classes: dict[str, list[str]]  # categorical target -> class names (empty list for numeric)


def read_adult(data_dir: str | Path | None = None, verify: bool = True) -> list[dict[str, str]]:
    path = require(resolve(data_dir) / "tabular" / "adult.csv.gz", SOURCE)
    if verify:
        verify_sha256(path, SHA256)
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def load_adult(
    data_dir: str | Path | None = None,
    auxiliary: tuple[str, ...] = ("relationship", "marital-status", "occupation", "age", "hours-per-week"),
    seed: int = 0,
    sizes: dict[str, int | float] | None = None,
) -> TabularData:
    """Features, the ``income`` target and the chosen auxiliary targets, with seeded splits."""
    rows = read_adult(data_dir)
    unknown = [c for c in auxiliary if c not in NUMERIC + CATEGORICAL]
    if unknown:
        raise ValueError(f"unknown Adult column {unknown[0]!r}; columns: {NUMERIC + CATEGORICAL}")
    n = len(rows)
    splits = split_indices(n, sizes or {"train": 0.6, "aux": 0.05, "val": 0.15, "test": -1}, seed)
    train = splits["train"]
    features, names = [], []
    for column in NUMERIC:
        if column in auxiliary:
            continue
        values = torch.tensor([float(r[column]) for r in rows])
        mean, std = values[train].mean(), values[train].std().clamp(min=1e-8)
        features.append(((values - mean) / std)[:, None])
        names.append(column)
    for column in CATEGORICAL:
        if column in auxiliary:
            continue
        levels = sorted({r[column] for r in rows})
        index = torch.tensor([levels.index(r[column]) for r in rows])
        features.append(torch.nn.functional.one_hot(index, len(levels)).float())
        names.extend(f"{column}={level}" for level in levels)
    targets = {PRIMARY: torch.tensor([1 if r[PRIMARY].strip().startswith(">50K") else 0 for r in rows])}
    classes: dict[str, list[str]] = {PRIMARY: ["<=50K", ">50K"]}
    for column in auxiliary:
        if column in CATEGORICAL:
            levels = sorted({r[column] for r in rows})
            targets[column] = torch.tensor([levels.index(r[column]) for r in rows])
            classes[column] = levels
        else:
            values = torch.tensor([float(r[column]) for r in rows])
            targets[column] = (values - values[train].mean()) / values[train].std().clamp(min=1e-8)
            classes[column] = []
    return TabularData(torch.cat(features, dim=1), targets, splits, names, classes)
