"""MNIST from the original IDX files, and Multi-MNIST generated from it.

Multi-MNIST (Sabour et al. 2017, as used by MGDA, Nash-MTL and AuxiNash): two digits on one
canvas, one shifted up-left and one down-right by up to 4 pixels each, overlaid (pixel-wise max) on
a 36 x 36 canvas and resized to 28 x 28; the tasks are the ``left`` (up-left) and ``right`` digits.
Generation is deterministic in the seed and cached.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import cache_dir, require, resolve, verify_sha256

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
SOURCE = "MNIST is published at http://yann.lecun.com/exdb/mnist/ (the four IDX .gz files go in <data_dir>/mnist/)."


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): big-endian header of dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def load_mnist(data_dir: str | Path | None = None, split: str = "train", verify: bool = True) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 28, 28) and int64 labels of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in FILES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    folder = resolve(data_dir) / "mnist"
    arrays = []
    for name in FILES[split]:
        path = require(folder / name, SOURCE)
        if verify:
            verify_sha256(path, SHA256[name])
        arrays.append(read_idx(path))
    images, labels = arrays
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def compose_multi_mnist(images: Tensor, labels: Tensor, seed: int, max_shift: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One Multi-MNIST image per input image: it is the left digit, a random other image the right.

    Returns float images (N, 1, 28, 28) in [0, 1] and the left and right labels.
    """
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, n, (n,), generator=g)
    shifts = torch.randint(0, max_shift + 1, (n, 4), generator=g)  # left dy, dx; right dy, dx
    canvas = torch.zeros(n, 36, 36)
    digits = images.float() / 255.0
    for i in range(n):
        ly, lx, ry, rx = shifts[i].tolist()
        left = canvas.new_zeros(36, 36)
        right = canvas.new_zeros(36, 36)
        left[4 - ly : 32 - ly, 4 - lx : 32 - lx] = digits[i]
        right[4 + ry : 32 + ry, 4 + rx : 32 + rx] = digits[partner[i]]
        canvas[i] = torch.maximum(left, right)
    resized = F.interpolate(canvas[:, None], size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp(0, 1), labels, labels[partner]


def load_multi_mnist(
    data_dir: str | Path | None = None, split: str = "train", seed: int = 0, cache: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-MNIST images (N, 1, 28, 28) with ``left`` and ``right`` labels, generated from MNIST's
    ``split`` with ``seed`` and cached (the cache key holds every generation parameter)."""
    root = resolve(data_dir)
    path = cache_dir(root) / f"multi_mnist-{split}-seed{seed}-shift4-v1.pt"
    if cache and path.exists():
        stored = torch.load(path, weights_only=True)
        return stored["images"], stored["left"], stored["right"]
    images, labels = load_mnist(root, split)
    x, left, right = compose_multi_mnist(images, labels, seed)
    if cache:
        tmp = path.with_suffix(".tmp")
        torch.save({"images": x, "left": left, "right": right}, tmp)
        tmp.replace(path)
    return x, left, right
