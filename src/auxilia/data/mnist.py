"""MNIST from the original IDX files, and Multi-MNIST generated from it.

Multi-MNIST (Sabour et al. 2017, as used by MGDA, Nash-MTL and AuxiNash): two digits on one canvas,
one shifted up-left and one down-right by up to ``max_shift`` pixels each, overlaid (pixel-wise
max) on a 36 x 36 canvas and resized to 28 x 28 (bilinear, antialiased); the tasks are the ``left``
(up-left) and ``right`` (down-right) digits. Generation is deterministic in the seed and cached
under a key holding every generation parameter.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import PathLike, cache_dir, cache_key, require, resolve, save_atomic, verify_sha256

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
SOURCE = ("MNIST is published at http://yann.lecun.com/exdb/mnist/: put the four IDX .gz files "
          "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
          "t10k-labels-idx1-ubyte.gz) in <data_dir>/mnist/.")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not): two zero bytes, a type code, the number of dimensions,
    the big-endian dimensions, then the values."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[data[2]])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def load_mnist(data_dir: PathLike | None = None, split: str = "train", verify: bool = True) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 28, 28) and int64 labels of the ``train`` (60k) or ``test`` (10k) split.

    Files are checked against the standard SHA-256 digests unless ``verify=False``.
    """
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
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def compose_multi_mnist(
    images: Tensor,
    labels: Tensor,
    seed: int,
    max_shift: int = 4,
    canvas: int = 36,
    size: int = 28,
    chunk: int = 8192,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Multi-MNIST image per input image: it is the ``left`` digit, and a uniformly drawn image
    (the partner) the ``right`` one.

    The left digit's top-left corner is placed ``(m - dy, m - dx)`` and the right digit's
    ``(m + dy', m + dx')`` on a ``canvas`` x ``canvas`` square, ``m = (canvas - 28) / 2`` and every
    shift drawn from ``0..max_shift``; the two are overlaid by pixel-wise max and resized to
    ``size`` x ``size``. Returns float images (N, 1, size, size) in [0, 1] and the left and right
    labels. Vectorized: 60k images take about a second.
    """
    if images.dim() != 3:
        raise ValueError(f"images must be (N, H, W), got {tuple(images.shape)}")
    n, h, w = images.shape
    margin_y, margin_x = (canvas - h) // 2, (canvas - w) // 2
    if not 0 <= max_shift <= min(margin_y, margin_x):
        raise ValueError(f"max_shift must be in 0..{min(margin_y, margin_x)} for a {canvas}-pixel canvas, got {max_shift}")
    g = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, n, (n,), generator=g)
    shifts = torch.randint(0, max_shift + 1, (n, 4), generator=g)  # left dy, dx; right dy, dx
    digits = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    out = torch.empty(n, 1, size, size)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        left = _place(digits[start:stop], shifts[start:stop, :2], margin_y, margin_x, -1, canvas)
        right = _place(digits[partner[start:stop]], shifts[start:stop, 2:], margin_y, margin_x, 1, canvas)
        overlaid = torch.maximum(left, right).float().div_(255.0)
        out[start:stop] = F.interpolate(overlaid[:, None], size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)
    return out.clamp_(0, 1), labels, labels[partner]


def _place(digits: Tensor, shifts: Tensor, margin_y: int, margin_x: int, sign: int, canvas: int) -> Tensor:
    """Paste each digit on a blank canvas at ``margin + sign * shift``: one slice assignment per
    distinct shift, not per image."""
    n, h, w = digits.shape
    out = digits.new_zeros(n, canvas, canvas)
    codes = shifts[:, 0] * 1000 + shifts[:, 1]
    for code in codes.unique().tolist():
        dy, dx = divmod(code, 1000)
        rows = (codes == code).nonzero().flatten()
        y, x = margin_y + sign * dy, margin_x + sign * dx
        out[rows, y : y + h, x : x + w] = digits[rows]
    return out


def load_multi_mnist(
    data_dir: PathLike | None = None,
    split: str = "train",
    seed: int = 0,
    cache: bool | PathLike = True,
    max_shift: int = 4,
    canvas: int = 36,
    size: int = 28,
    verify: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-MNIST images (N, 1, size, size) in [0, 1] with ``left`` and ``right`` labels, generated
    from MNIST's ``split`` with ``seed``.

    Pixels are stored with 8 bits (the precision of MNIST itself), so the images are multiples of
    1/255 whether they come from the cache or not. ``cache``: ``True`` for the default cache
    directory (see :func:`~auxilia.data.common.cache_dir`), a path for another one, ``False`` to
    regenerate every time. The cache file name holds a digest of every generation parameter.
    """
    root = resolve(data_dir)
    params = {"split": split, "seed": seed, "max_shift": max_shift, "canvas": canvas, "size": size, "version": 2}
    path = None
    if cache is not False:
        path = cache_dir(root, None if cache is True else cache) / f"{cache_key('multi_mnist', **params)}.pt"
        if path.exists():
            stored = torch.load(path, weights_only=True)
            return stored["images"].float().div_(255.0), stored["left"], stored["right"]
    images, labels = load_mnist(root, split, verify=verify)
    x, left, right = compose_multi_mnist(images, labels, seed, max_shift=max_shift, canvas=canvas, size=size)
    quantized = x.mul_(255.0).round_().to(torch.uint8)
    if path is not None:
        save_atomic({"images": quantized, "left": left, "right": right, "params": params}, path)
    return quantized.float().div_(255.0), left, right
