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
from pathlib import Path

import torch
from torch import Tensor

from .common import require, resolve, split_indices, verify_sha256

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


@dataclass
class RatingsData:
    fields: Tensor  # (N, F) long, global indices into one embedding table
    ratings: Tensor  # (N,) float
    field_sizes: list[int]
    splits: dict[str, Tensor]

    @property
    def num_embeddings(self) -> int:
        return sum(self.field_sizes)


def _age_bucket(age: int) -> int:
    return sum(age >= edge for edge in (18, 25, 35, 45, 50, 56))


def _encode(columns: list[list[str]], ratings: list[float], seed: int, sizes) -> RatingsData:
    encoded, field_sizes, offset = [], [], 0
    for column in columns:
        levels = {v: i for i, v in enumerate(sorted(set(column)))}
        encoded.append(torch.tensor([levels[v] for v in column]) + offset)
        field_sizes.append(len(levels))
        offset += len(levels)
    n = len(ratings)
    splits = split_indices(n, sizes or {"train": 0.8, "aux": 0.02, "val": 0.08, "test": -1}, seed)
    return RatingsData(torch.stack(encoded, dim=1), torch.tensor(ratings, dtype=torch.float32), field_sizes, splits)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="", encoding="latin-1") as f:
        return list(csv.DictReader(f))


def load_movielens_100k(data_dir: str | Path | None = None, seed: int = 0, sizes=None, verify: bool = True) -> RatingsData:
    folder = resolve(data_dir) / "ml-100k"
    tables = {}
    for name, digest in SHA256.items():
        path = require(folder / name, SOURCE + " Put ratings.csv.gz, users.csv.gz and items.csv.gz in <data_dir>/ml-100k/.")
        if verify:
            verify_sha256(path, digest)
        tables[name] = _read_csv(path)
    users = {r["user_id"]: r for r in tables["users.csv.gz"]}
    items = {r["movie_id"]: r for r in tables["items.csv.gz"]}
    columns: list[list[str]] = [[] for _ in FIELDS]
    ratings = []
    for r in tables["ratings.csv.gz"]:
        user, item = users[r["user_id"]], items[r["movie_id"]]
        genre = next((g for g in GENRES_100K if item.get(g) == "1"), "unknown")
        values = [r["user_id"], r["movie_id"], str(_age_bucket(int(user["age"]))), user["gender"], user["occupation"],
                  user["zip_code"][:1], genre]
        for column, value in zip(columns, values):
            column.append(value)
        ratings.append(float(r["rating"]))
    return _encode(columns, ratings, seed, sizes)


def load_movielens_1m(data_dir: str | Path | None = None, seed: int = 0, sizes=None) -> RatingsData:
    """ML-1M from ``ml-1m/{ratings,users,movies}.dat`` (``UserID::MovieID::Rating::Timestamp``,
    ``UserID::Gender::Age::Occupation::Zip``, ``MovieID::Title::Genres``)."""
    folder = resolve(data_dir) / "ml-1m"
    source = SOURCE + " Unpack ml-1m.zip into <data_dir>/ml-1m/."

    def read(name: str) -> list[list[str]]:
        path = require(folder / name, source)
        return [line.rstrip("\n").split("::") for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]

    users = {u[0]: u for u in read("users.dat")}
    movies = {m[0]: m for m in read("movies.dat")}
    columns: list[list[str]] = [[] for _ in FIELDS]
    ratings = []
    for user_id, movie_id, rating, _ in read("ratings.dat"):
        _, gender, age, occupation, zip_code = users[user_id]
        genre = movies[movie_id][2].split("|")[0]
        for column, value in zip(columns, [user_id, movie_id, age, gender, occupation, zip_code[:1], genre]):
            column.append(value)
        ratings.append(float(rating))
    return _encode(columns, ratings, seed, sizes)
