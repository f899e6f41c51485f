"""Dataset loaders and generators. Loaders take a ``data_dir`` and never download implicitly."""

from .adult import TabularData, load_adult
from .common import DatasetCorrupt, DatasetMissing, default_data_dir, split_indices, verify_sha256
from .mnist import compose_multi_mnist, load_mnist, load_multi_mnist, read_idx
from .movielens import RatingsData, load_movielens_1m, load_movielens_100k

__all__ = [
    "DatasetCorrupt",
    "DatasetMissing",
    "RatingsData",
    "TabularData",
    "compose_multi_mnist",
    "default_data_dir",
    "load_adult",
    "load_mnist",
    "load_movielens_1m",
    "load_movielens_100k",
    "load_multi_mnist",
    "read_idx",
    "split_indices",
    "verify_sha256",
]
