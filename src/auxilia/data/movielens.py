"""MovieLens ratings with user and item features as categorical fields (for AutoInt-style models).

Each rating becomes one row of field indices: user, item, age bucket, gender, occupation, zip prefix,
first genre; all fields share one embedding index space (offsets per field). The target is the
rating (1..5) as a float. ML-100K is read from the CSV layout in ``ml-100k/``; ML-1M from its
original ``::``-separated ``.dat`` files.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
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

SHA256 = {
    "ratings.csv.gz": "cacd682954f73e531721bab945bd98ac57be7417cd8dd650cbc07eae69d4cab5",
    "users.csv.gz": "741ad1bb309920a8145c6adea27a492e248d8a619cb6f582405525a800505bfd",
    "items.csv.gz": "b62e62520437f972c5dc30855dcd321a9e12920a11f45fab65fb33881fcbb8e7",
}
SOURCE = "MovieLens is published by GroupLens (https://grouplens.org/datasets/movielens/)."
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western"]
FIELDS = ["user", "item", "age", "gender", "occupation", "zip", "genre"]
DEFAULT_SPLITS = {"train": 0.8, "aux": 0.02, "val": 0.08, "test": -1}


@dataclass
class RatingsData:
    """Ratings as rows of categorical field indices; field ``f`` of a row lies in
    ``offsets[f] <= index < offsets[f] + field_sizes[f]``."""

    fields: Tensor  # (N, F) long, global indices into one embedding table
    ratings: Tensor  # (N,) float
    field_sizes: list[int]
    splits: dict[str, Tensor]
    field_names: list[str] = dataclass_field(default_factory=lambda: list(FIELDS))
    levels: list[list[str]] = dataclass_field(default_factory=list)  # field -> its values, in index order

    @property
    def num_embeddings(self) -> int:
        return sum(self.field_sizes)

    @property
    def num_fields(self) -> int:
        return len(self.field_sizes)

    @property
    def offsets(self) -> list[int]:
        return [sum(self.field_sizes[:f]) for f in range(len(self.field_sizes))]

    def datasets(self, task: str = "rating") -> dict:
        """One ``TaskDataset`` per split: field indices in, the rating under ``task`` out."""
        return task_datasets(self.fields, {task: self.ratings}, self.splits)


def _age_bucket(age: int) -> int:
    return sum(age >= edge for edge in (18, 25, 35, 45, 50, 56))


def _encode(columns: list[list[str]], ratings: list[float], seed: int, sizes) -> RatingsData:
    if not ratings:
        raise DatasetCorrupt("no ratings were read")
    encoded, field_sizes, all_levels, offset = [], [], [], 0
    for column in columns:
        levels = sorted(set(column))
        lookup = {v: i for i, v in enumerate(levels)}
        encoded.append(torch.tensor([lookup[v] for v in column]) + offset)
        field_sizes.append(len(levels))
        all_levels.append(levels)
        offset += len(levels)
    n = len(ratings)
    splits = split_indices(n, sizes or DEFAULT_SPLITS, seed)
    return RatingsData(torch.stack(encoded, dim=1), torch.tensor(ratings, dtype=torch.float32), field_sizes, splits,
                       list(FIELDS), all_levels)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="", encoding="latin-1") as f:
        return list(csv.DictReader(f))


def load_movielens_100k(
    data_dir: PathLike | None = None, seed: int = 0, sizes: dict[str, int | float] | None = None, verify: bool = True
) -> RatingsData:
    """MovieLens-100K from ``ml-100k/{ratings,users,items}.csv.gz`` (checked by SHA-256): 100,000
    ratings, 943 users, 1,682 items. Default splits: 80% train, 2% aux, 8% val, 10% test."""
    folder = resolve(data_dir) / "ml-100k"
    source = SOURCE + " Put ratings.csv.gz, users.csv.gz and items.csv.gz in <data_dir>/ml-100k/."
    tables = {}
    for name, digest in SHA256.items():
        path = require(folder / name, source)
        if verify:
            verify_sha256(path, digest)
        tables[name] = _read_csv(path)
    users = {r["user_id"]: r for r in tables["users.csv.gz"]}
    items = {r["movie_id"]: r for r in tables["items.csv.gz"]}
    columns: list[list[str]] = [[] for _ in FIELDS]
    ratings = []
    for r in tables["ratings.csv.gz"]:
        user, item = _lookup(users, r["user_id"], "user", "users.csv.gz"), _lookup(items, r["movie_id"], "movie", "items.csv.gz")
        genre = next((g for g in GENRES_100K if item.get(g) == "1"), "unknown")
        values = [r["user_id"], r["movie_id"], str(_age_bucket(int(user["age"]))), user["gender"], user["occupation"],
                  user["zip_code"][:1], genre]
        for column, value in zip(columns, values):
            column.append(value)
        ratings.append(float(r["rating"]))
    return _encode(columns, ratings, seed, sizes)


def load_movielens_1m(
    data_dir: PathLike | None = None, seed: int = 0, sizes: dict[str, int | float] | None = None
) -> RatingsData:
    """ML-1M from its original files ``ml-1m/ratings.dat`` (``UserID::MovieID::Rating::Timestamp``),
    ``ml-1m/users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``, age already bucketed) and
    ``ml-1m/movies.dat`` (``MovieID::Title::Genres``, genres ``|``-separated), Latin-1 encoded.
    Same fields and splits as :func:`load_movielens_100k`."""
    folder = resolve(data_dir) / "ml-1m"
    source = SOURCE + " Unpack ml-1m.zip so that ratings.dat, users.dat and movies.dat are in <data_dir>/ml-1m/."

    def read(name: str, width: int) -> list[list[str]]:
        path = require(folder / name, source)
        rows = []
        for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != width:
                raise DatasetCorrupt(f"{path}:{number}: expected {width} '::'-separated fields, got {len(parts)}")
            rows.append(parts)
        return rows

    users = {u[0]: u for u in read("users.dat", 5)}
    movies = {m[0]: m for m in read("movies.dat", 3)}
    columns: list[list[str]] = [[] for _ in FIELDS]
    ratings = []
    for user_id, movie_id, rating, _ in read("ratings.dat", 4):
        _, gender, age, occupation, zip_code = _lookup(users, user_id, "user", "users.dat")
        genre = _lookup(movies, movie_id, "movie", "movies.dat")[2].split("|")[0]
        for column, value in zip(columns, [user_id, movie_id, age, gender, occupation, zip_code[:1], genre]):
            column.append(value)
        ratings.append(float(rating))
    return _encode(columns, ratings, seed, sizes)


def _lookup(table: dict, key: str, what: str, file: str):
    try:
        return table[key]
    except KeyError:
        raise DatasetCorrupt(f"a rating refers to {what} {key!r}, which {file} does not list") from None
