"""Dataset loaders and generators.

Loaders take a ``data_dir`` (default: :func:`default_data_dir`), check standard files by SHA-256,
raise :class:`DatasetMissing` naming a missing file and where to get it, and never download. Nothing
is unpickled unless it can only build arrays: CIFAR-10's python batches (no known digest) go
through a restricted unpickler, ``.npy`` files are read with ``allow_pickle=False`` and caches with
``torch.load(weights_only=True)``.
Derived data (Multi-MNIST, decoded CIFAR-10 JPEGs) is cached in :func:`cache_dir`.

============================ ===============================================================
MNIST, Multi-MNIST           :func:`load_mnist`, :func:`load_multi_mnist`, :func:`compose_multi_mnist`
CIFAR-10                     :func:`load_cifar10`, :func:`read_cifar10_batches`, :func:`read_cifar10_jpeg`,
                             :func:`balanced_subset`, :func:`semi_supervised_split`, :func:`rotate`,
                             :func:`rotations`, :func:`rotation_task`, :func:`channel_permutation`
Adult (tabular)              :func:`load_adult`
MovieLens                    :func:`load_movielens_100k`, :func:`load_movielens_1m`
Procedural scenes            :func:`generate_scenes`, :func:`load_scenes`, :func:`normals_from_depth`
NYUv2 (MTAN layout)          :class:`NYUv2`, :func:`load_nyuv2`
Splits and datasets          :func:`split_indices`, :func:`splits`, :func:`task_datasets`
============================ ===============================================================
"""

from .adult import TabularData, load_adult
from .cifar import CLASSES as CIFAR10_CLASSES
from .cifar import (
    balanced_subset,
    channel_permutation,
    load_cifar10,
    read_cifar10_batches,
    read_cifar10_jpeg,
    rotate,
    rotation_task,
    rotations,
    semi_supervised_split,
)
from .common import (
    DatasetCorrupt,
    DatasetMissing,
    cache_dir,
    default_data_dir,
    split_indices,
    splits,
    task_datasets,
    verify_sha256,
)
from .mnist import compose_multi_mnist, load_mnist, load_multi_mnist, read_idx
from .movielens import RatingsData, load_movielens_1m, load_movielens_100k
from .nyuv2 import CLASSES as NYUV2_CLASSES
from .nyuv2 import NYUv2, load_nyuv2
from .scenes import CLASSES as SCENE_CLASSES
from .scenes import Scenes, backproject, generate_scenes, load_scenes, normals_from_depth

__all__ = [
    "CIFAR10_CLASSES",
    "NYUV2_CLASSES",
    "SCENE_CLASSES",
    "DatasetCorrupt",
    "DatasetMissing",
    "NYUv2",
    "RatingsData",
    "Scenes",
    "TabularData",
    "backproject",
    "balanced_subset",
    "cache_dir",
    "channel_permutation",
    "compose_multi_mnist",
    "default_data_dir",
    "generate_scenes",
    "load_adult",
    "load_cifar10",
    "load_mnist",
    "load_movielens_1m",
    "load_movielens_100k",
    "load_multi_mnist",
    "load_nyuv2",
    "load_scenes",
    "normals_from_depth",
    "read_cifar10_batches",
    "read_cifar10_jpeg",
    "read_idx",
    "rotate",
    "rotation_task",
    "rotations",
    "semi_supervised_split",
    "split_indices",
    "splits",
    "task_datasets",
    "verify_sha256",
]
