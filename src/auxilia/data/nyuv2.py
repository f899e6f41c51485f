"""NYUv2 in the preprocessed layout of MTAN (Liu et al. 2019), shared by most auxiliary- and
multi-task-learning code (AuxiLearn, Nash-MTL, AuxiNash, Aux-NAS)::

    <root>/train/image/0.npy   (H, W, 3) float, RGB in [0, 1]
    <root>/train/label/0.npy   (H, W) 13-class semantic labels, -1 where unlabelled
    <root>/train/depth/0.npy   (H, W, 1) metres, 0 where missing
    <root>/train/normal/0.npy  (H, W, 3) unit surface normals (0 where missing)
    <root>/val/...             the same; files numbered 0 .. N - 1

(795 train and 654 val images of 288 x 384 in the original). ``<root>`` is ``<data_dir>/nyuv2``,
or ``<data_dir>`` itself when it holds ``train/`` and ``val/``. Tensors come out channel-first:
image (3, H, W) float, ``segmentation`` (H, W) int64 (ignore index -1), ``depth`` (1, H, W),
``normals`` (3, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .common import DatasetCorrupt, DatasetMissing, PathLike, resolve

CLASSES = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
           "wall", "window"]
IGNORE_INDEX = -1
FOLDERS = {"segmentation": "label", "depth": "depth", "normals": "normal"}
SOURCE = ("The preprocessed NYUv2 (.npy per image, from the MTAN repository https://github.com/lorenmt/mtan) "
          "goes in <data_dir>/nyuv2/ with train/ and val/ folders, each holding image/, label/, depth/ and normal/.")


def nyuv2_root(data_dir: PathLike | None = None) -> Path:
    base = resolve(data_dir)
    return base if (base / "train").is_dir() and not (base / "nyuv2").is_dir() else base / "nyuv2"


class NYUv2(Dataset):
    """NYUv2 read lazily, one image at a time (memory-mapped): item ``i`` is
    ``(image, {task: target})`` for the chosen ``tasks``."""

    def __init__(
        self,
        data_dir: PathLike | None = None,
        split: str = "train",
        tasks: Sequence[str] = ("segmentation", "depth", "normals"),
        mmap: bool = True,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"NYUv2 split must be 'train' or 'val', got {split!r}")
        unknown = [t for t in tasks if t not in FOLDERS]
        if unknown:
            raise ValueError(f"unknown NYUv2 task {unknown[0]!r}; tasks: {list(FOLDERS)}")
        self.root = nyuv2_root(data_dir) / split
        self.tasks = tuple(tasks)
        self.mmap = mmap
        image_dir = self.root / "image"
        if not image_dir.is_dir():
            raise DatasetMissing(image_dir, SOURCE)
        numbers = sorted(int(p.stem) for p in image_dir.glob("*.npy") if p.stem.isdigit())
        if not numbers:
            raise DatasetMissing(image_dir / "0.npy", SOURCE)
        if numbers != list(range(len(numbers))):
            gap = next(i for i, k in enumerate(numbers) if i != k)
            raise DatasetMissing(image_dir / f"{gap}.npy", SOURCE + " Files must be numbered 0 .. N - 1.")
        self.size = len(numbers)
        for task in self.tasks:
            for i in (0, self.size - 1):
                path = self.root / FOLDERS[task] / f"{i}.npy"
                if not path.exists():
                    raise DatasetMissing(path, SOURCE)

    def __len__(self) -> int:
        return self.size

    def _load(self, folder: str, index: int) -> np.ndarray:
        path = self.root / folder / f"{index}.npy"
        if not path.exists():
            raise DatasetMissing(path, SOURCE)
        return np.load(path, mmap_mode="r" if self.mmap else None, allow_pickle=False)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        index %= self.size
        image = self._load("image", index)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DatasetCorrupt(f"{self.root}/image/{index}.npy: expected (H, W, 3), got {image.shape}")
        out = torch.from_numpy(np.array(np.moveaxis(image, -1, 0), dtype=np.float32))
        targets = {}
        for task in self.tasks:
            array = self._load(FOLDERS[task], index)
            if task == "segmentation":
                array = np.asarray(array).squeeze()
                target = torch.from_numpy(np.rint(array).astype(np.int64))
            else:
                if array.ndim == 2:
                    array = array[..., None]
                target = torch.from_numpy(np.array(np.moveaxis(array, -1, 0), dtype=np.float32))
            if target.shape[-2:] != out.shape[-2:]:
                raise DatasetCorrupt(
                    f"{self.root}/{FOLDERS[task]}/{index}.npy: size {tuple(target.shape[-2:])} differs from the "
                    f"image's {tuple(out.shape[-2:])}"
                )
            targets[task] = target
        return out, targets


def load_nyuv2(
    data_dir: PathLike | None = None,
    split: str = "train",
    tasks: Sequence[str] = ("segmentation", "depth", "normals"),
    indices: Sequence[int] | None = None,
):
    """NYUv2 ``split`` read into memory as a ``TaskDataset`` (images (N, 3, H, W), targets as in
    :class:`NYUv2`); ``indices`` picks a subset. The full train split takes about 1.3 GB as float32;
    :class:`NYUv2` reads lazily instead."""
    from ..training.data import TaskDataset

    dataset = NYUv2(data_dir, split, tasks, mmap=False)
    items = [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]
    if not items:
        raise ValueError("no NYUv2 images selected")
    images = torch.stack([x for x, _ in items])
    targets = {t: torch.stack([y[t] for _, y in items]) for t in dataset.tasks}
    return TaskDataset(images, targets)
