"""UCI Adult (census income): ``income`` is the primary task, other columns can be auxiliary targets.

Preprocessing:

* numeric columns are standardized with the statistics of the ``train`` split only;
* categorical columns are one-hot encoded in ``inputs`` and also given as integer codes in
  ``categorical`` (for embedding models); levels are sorted, ``?`` (unknown) is a level of its own;
* a column used as an auxiliary target is removed from the inputs, together with any column that
  determines it (``education`` and ``educational-num`` are the same information), so no task can
  read its own label;
* categorical targets are class indices (names in ``classes``), numeric targets standardized values.
  With ``unknown="mask"`` a categorical target's ``?`` rows are masked instead (``masks``).

Splits are seeded and disjoint (default 60% train, 5% aux, 15% val, 20% test).
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    DatasetCorrupt,
    PathLike,
    require,
    resolve,
    split_indices,
    task_datasets,
    verify_sha256,
)

SHA256 = "1c5316247e07e1dfde1834ed02508155ed950a1814b950da9c5e30b4f24bc9c0"
SOURCE = ("Adult is published by the UCI repository (https://archive.ics.uci.edu/dataset/2/adult); "
          "put it, as a gzipped CSV with a header row, at <data_dir>/tabular/adult.csv.gz.")
NUMERIC = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
               "native-country"]
PRIMARY = "income"
# columns that carry the same information as another column: a target removes its twins from the inputs
REDUNDANT = {"education": ("educational-num",), "educational-num": ("education",)}
DEFAULT_SPLITS = {"train": 0.6, "aux": 0.05, "val": 0.15, "test": -1}


@dataclass
class TabularData:
    """Inputs, targets and splits of a tabular dataset; index any tensor with ``splits[name]``."""

    inputs: Tensor  # (N, F) float: standardized numeric columns, then one-hot categorical columns
    targets: dict[str, Tensor]  # task -> (N,) long class indices or (N,) float standardized values
    splits: dict[str, Tensor]  # split name -> indices
    feature_names: list[str]  # one per input column
    classes: dict[str, list[str]]  # task -> class names (empty list for a numeric target)
    masks: dict[str, Tensor] = field(default_factory=dict)  # task -> (N,) bool, True where labelled
    categorical: Tensor | None = None  # (N, C) long codes of the categorical input columns
    categorical_names: list[str] = field(default_factory=list)
    cardinalities: list[int] = field(default_factory=list)
    target_stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # numeric task -> (mean, std)

    def datasets(self) -> dict:
        """One ``TaskDataset`` per split (inputs: the float ``inputs``)."""
        return task_datasets(self.inputs, self.targets, self.splits, self.masks)


def read_adult(data_dir: PathLike | None = None, verify: bool = True) -> list[dict[str, str]]:
    """The raw rows of ``tabular/adult.csv.gz`` as dictionaries of stripped strings."""
    path = require(resolve(data_dir) / "tabular" / "adult.csv.gz", SOURCE)
    if verify:
        verify_sha256(path, SHA256)
    with gzip.open(path, "rt", newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    missing = [c for c in NUMERIC + CATEGORICAL + [PRIMARY] if rows and c not in rows[0]]
    if missing:
        raise DatasetCorrupt(f"{path}: no column {missing[0]!r}; expected the columns {NUMERIC + CATEGORICAL + [PRIMARY]}")
    return rows


def load_adult(
    data_dir: PathLike | None = None,
    auxiliary: tuple[str, ...] = ("relationship", "marital-status", "occupation", "age", "hours-per-week"),
    seed: int = 0,
    sizes: dict[str, int | float] | None = None,
    unknown: str = "level",
    verify: bool = True,
) -> TabularData:
    """Features, the ``income`` target and the chosen ``auxiliary`` targets, with seeded splits.

    ``unknown``: ``"level"`` keeps ``?`` as a class of a categorical target, ``"mask"`` masks those
    rows out of that task (``masks``).
    """
    if unknown not in ("level", "mask"):
        raise ValueError(f"unknown must be 'level' or 'mask', got {unknown!r}")
    bad = [c for c in auxiliary if c not in NUMERIC + CATEGORICAL]
    if bad:
        raise ValueError(f"unknown Adult column {bad[0]!r}; auxiliary targets can be any of {NUMERIC + CATEGORICAL}")
    if len(set(auxiliary)) != len(auxiliary):
        raise ValueError(f"auxiliary targets repeat a column: {list(auxiliary)}")
    rows = read_adult(data_dir, verify=verify)
    n = len(rows)
    split = split_indices(n, sizes or DEFAULT_SPLITS, seed)
    train = split["train"]
    if len(train) < 2:
        raise ValueError("the train split needs at least 2 rows for the standardization statistics")
    excluded = set(auxiliary) | {twin for column in auxiliary for twin in REDUNDANT.get(column, ())}

    def numeric(column: str) -> tuple[Tensor, float, float]:
        values = torch.tensor([float(r[column]) for r in rows], dtype=torch.float64)
        mean, std = values[train].mean(), values[train].std().clamp(min=1e-12)
        return ((values - mean) / std).float(), float(mean), float(std)

    def codes(column: str) -> tuple[Tensor, list[str]]:
        levels = sorted({r[column] for r in rows})
        lookup = {level: i for i, level in enumerate(levels)}
        return torch.tensor([lookup[r[column]] for r in rows]), levels

    features, names = [], []
    for column in NUMERIC:
        if column not in excluded:
            features.append(numeric(column)[0][:, None])
            names.append(column)
    categorical, categorical_names, cardinalities = [], [], []
    for column in CATEGORICAL:
        if column in excluded:
            continue
        index, levels = codes(column)
        features.append(F.one_hot(index, len(levels)).float())
        names.extend(f"{column}={level}" for level in levels)
        categorical.append(index)
        categorical_names.append(column)
        cardinalities.append(len(levels))

    income = [r[PRIMARY].rstrip(".") for r in rows]
    if not set(income) <= {"<=50K", ">50K"}:
        raise DatasetCorrupt(f"unexpected income values {sorted(set(income) - {'<=50K', '>50K'})}")
    targets = {PRIMARY: torch.tensor([int(v == ">50K") for v in income])}
    classes: dict[str, list[str]] = {PRIMARY: ["<=50K", ">50K"]}
    masks: dict[str, Tensor] = {}
    stats: dict[str, tuple[float, float]] = {}
    for column in auxiliary:
        if column in CATEGORICAL:
            index, levels = codes(column)
            if unknown == "mask" and "?" in levels:
                known = [level for level in levels if level != "?"]
                remap = torch.tensor([known.index(level) if level != "?" else 0 for level in levels])
                masks[column] = index != levels.index("?")
                index, levels = remap[index], known
            targets[column], classes[column] = index, levels
        else:
            targets[column], mean, std = numeric(column)
            classes[column] = []
            stats[column] = (mean, std)
    return TabularData(
        inputs=torch.cat(features, dim=1), targets=targets, splits=split, feature_names=names, classes=classes,
        masks=masks, categorical=torch.stack(categorical, dim=1) if categorical else torch.zeros(n, 0, dtype=torch.long),
        categorical_names=categorical_names, cardinalities=cardinalities, target_stats=stats,
    )
