"""CIFAR-10, class-balanced labelled subsets, and the self-supervised transforms used as auxiliary
tasks (rotation by 0/90/180/270 degrees, colour-channel permutation).

Two on-disk layouts are read:

* the standard python batches (``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, pickled dictionaries with ``data`` (N, 3072) uint8 rows, channel-major, and
  ``labels``), either unpacked in ``<data_dir>/cifar-10-batches-py/`` or inside the original
  ``<data_dir>/cifar-10-python.tar.gz``. No digest is known for the batches themselves, so they are
  unpickled by :class:`BatchUnpickler`, which builds only numpy arrays and plain containers: a
  crafted batch that names any other callable (the way a pickle runs code) is refused with
  :class:`~auxilia.data.common.DatasetCorrupt` before anything is called;
* a JPEG tree in ``<data_dir>/cifar10/cifar10-jpg-q75.tar.xz`` (``train/<class>/NNNN.jpg``,
  ``test/<class>/NNNN.jpg``). Decoding it needs Pillow (``pip install 'auxilia[data]'``); the
  decoded uint8 arrays are cached after the first read, so later loads take a fraction of a second.

Images are uint8 tensors (N, 3, 32, 32); labels int64 in 0..9, names in :data:`CLASSES`.
"""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from .common import (
    DatasetCorrupt,
    DatasetMissing,
    PathLike,
    cache_dir,
    require,
    resolve,
    save_atomic,
    verify_sha256,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
JPEG_ARCHIVE = "cifar10/cifar10-jpg-q75.tar.xz"
JPEG_SHA256 = "6254f53a1bc70afc08c46178959354e8597763b03706815cc50b5e2cdff16569"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SOURCE = ("CIFAR-10 is published at https://www.cs.toronto.edu/~kriz/cifar.html: give the python batches "
          "unpacked in <data_dir>/cifar-10-batches-py/ or as <data_dir>/cifar-10-python.tar.gz, or the JPEG tree "
          f"archive at <data_dir>/{JPEG_ARCHIVE}.")
PERMUTATIONS = list(itertools.permutations(range(3)))


def _pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "decoding the CIFAR-10 JPEG tree needs Pillow, which is not installed: pip install 'auxilia[data]' "
            "(or pip install pillow)"
        ) from error
    return Image


def _jpeg_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, str, tarfile.TarInfo]]:
    """(split, class, file name, member) for every ``<split>/<class>/<name>.jpg`` in the archive."""
    for member in tar:
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if member.isfile() and len(parts) >= 3 and parts[-1].lower().endswith((".jpg", ".jpeg")):
            split, label, name = parts[-3:]
            if split in ("train", "test") and label in CLASSES:
                yield split, label, name, member


def read_cifar10_jpeg(archive: PathLike, limit: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Decode a CIFAR-10 JPEG-tree archive (any compression ``tarfile`` reads) into
    ``{split: (uint8 images (N, 3, 32, 32), labels)}``, ordered by class then file name.

    ``limit`` stops after that many images in archive order (to inspect an archive quickly); the
    whole 60k-image archive takes a minute or so. Needs Pillow.
    """
    Image = _pillow()
    archive = Path(archive)
    found: dict[str, list[tuple[int, str, np.ndarray]]] = {"train": [], "test": []}
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for split, label, name, member in _jpeg_members(tar):
            if limit is not None and count >= limit:
                break
            handle = tar.extractfile(member)
            if handle is None:
                continue
            with Image.open(io.BytesIO(handle.read())) as image:
                pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != (32, 32, 3):
                raise DatasetCorrupt(f"{archive}:{member.name}: expected a 32x32 image, got {pixels.shape[:2]}")
            found[split].append((CLASSES.index(label), name, pixels))
            count += 1
    out = {}
    for split, items in found.items():
        items.sort(key=lambda item: (item[0], item[1]))
        images = np.stack([i[2] for i in items]) if items else np.zeros((0, 32, 32, 3), np.uint8)
        out[split] = (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                      torch.tensor([i[0] for i in items], dtype=torch.long))
    return out


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's python batches that resolves only the globals a pickled numpy
    array needs (and ``_codecs.encode``, how protocol 2 spells ``bytes``): unpickling calls whatever
    global a file names, so an unverified file must not name anything else."""

    ALLOWED = frozenset({
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a numpy array")
        return super().find_class(module, name)


def _unpickle(handle: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = BatchUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DatasetCorrupt(f"{where}: refused, not a plain CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict):
        raise DatasetCorrupt(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetCorrupt(f"{where}: not a CIFAR-10 batch (keys {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetCorrupt(f"{where}: data {data.shape} and labels {labels.shape} are not a CIFAR-10 batch")
    if len(labels) and not (labels.min() >= 0 and labels.max() < len(CLASSES)):
        raise DatasetCorrupt(f"{where}: labels outside 0..{len(CLASSES) - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_batches(source: PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """Images and labels of ``split`` from the python batches: ``source`` is the
    ``cifar-10-batches-py`` folder or the ``cifar-10-python.tar.gz`` archive holding it."""
    if split not in BATCHES:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    source = Path(source)
    images, labels = [], []
    if source.is_dir():
        for name in BATCHES[split]:
            with require(source / name, SOURCE).open("rb") as f:
                x, y = _unpickle(f, str(source / name))
            images.append(x)
            labels.append(y)
    else:
        with tarfile.open(require(source, SOURCE), "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in BATCHES[split]:
                if name not in members:
                    raise DatasetMissing(source / "cifar-10-batches-py" / name, SOURCE)
                x, y = _unpickle(tar.extractfile(members[name]), f"{source}:{members[name].name}")
                images.append(x)
                labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10(
    data_dir: PathLike | None = None, split: str = "train", verify: bool = True, cache: bool | PathLike = True
) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 3, 32, 32) and labels of ``train`` (50k) or ``test`` (10k).

    Looks for, in order: ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``, then the JPEG tree
    archive (SHA-256-checked unless ``verify=False``; decoded once and cached, see ``cache``:
    ``True`` for the default cache directory, a path for another, ``False`` for none).
    """
    if split not in BATCHES:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = resolve(data_dir)
    for batches in (root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"):
        if batches.exists():
            return read_cifar10_batches(batches, split)
    archive = require(root / JPEG_ARCHIVE, SOURCE)
    cached = None
    if cache is not False:
        cached = cache_dir(root, None if cache is True else cache) / f"{archive.name.split('.')[0]}-v1.pt"
        if cached.exists():
            return tuple(torch.load(cached, weights_only=True)[split])  # type: ignore[return-value]
    if verify:
        verify_sha256(archive, JPEG_SHA256)
    decoded = read_cifar10_jpeg(archive)
    if cached is not None:
        save_atomic(decoded, cached)
    return decoded[split]


def balanced_subset(labels: Tensor, count: int, seed: int, exclude: Tensor | None = None) -> Tensor:
    """``count`` indices with the same number per class (seeded), drawn outside ``exclude``;
    sorted. The classes are ``0..labels.max()``."""
    classes = int(labels.max()) + 1
    if count % classes:
        raise ValueError(f"{count} labels cannot be split evenly over {classes} classes")
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(classes):
        pool = torch.nonzero((labels == c) & allowed).flatten()
        if len(pool) < count // classes:
            raise ValueError(f"class {c} has only {len(pool)} samples available, {count // classes} needed")
        chosen.append(pool[torch.randperm(len(pool), generator=generator)[: count // classes]])
    return torch.cat(chosen).sort().values


def semi_supervised_split(
    labels: Tensor, num_labelled: int, seed: int, pool: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Split ``pool`` (default: every index) into a class-balanced labelled subset of
    ``num_labelled`` indices and the unlabelled rest, both sorted and disjoint. Indices are into
    ``labels``; anything outside ``pool`` (val, test) is never in either part."""
    pool = torch.arange(len(labels)) if pool is None else pool.flatten().long()
    in_pool = torch.zeros(len(labels), dtype=torch.bool)
    in_pool[pool] = True
    labelled = balanced_subset(labels, num_labelled, seed, exclude=torch.nonzero(~in_pool).flatten())
    in_pool[labelled] = False
    return labelled, torch.nonzero(in_pool).flatten()


def rotations(x: Tensor) -> Tensor:
    """The four rotations of a batch (B, C, H, W) -> (4B, C, H, W), rotation k (by k * 90 degrees
    counter-clockwise) in block k."""
    return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])


def rotate(x: Tensor, k: Tensor | int) -> Tensor:
    """Rotate image ``i`` of a square batch (B, C, H, W) by ``k[i] * 90`` degrees counter-clockwise
    (``torch.rot90`` convention); ``k`` an int or (B,) integers."""
    if isinstance(k, int):
        return torch.rot90(x, k, dims=(-2, -1))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"per-image rotations need square images, got {tuple(x.shape[-2:])}")
    k = k.to(x.device).long() % 4
    out = x.clone()
    for r in range(1, 4):
        rows = (k == r).nonzero().flatten()
        if len(rows):
            out[rows] = torch.rot90(x[rows], r, dims=(-2, -1))
    return out


def rotation_task(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Each image rotated by a random multiple of 90 degrees, and that multiple (0..3) as the label."""
    k = torch.randint(0, 4, (x.shape[0],), generator=generator)
    return rotate(x, k), k


def channel_permutation(x: Tensor, index: Tensor) -> Tensor:
    """Permute each image's colour channels by ``PERMUTATIONS[index[i]]`` (6 classes)."""
    table = torch.tensor(PERMUTATIONS, device=x.device)[index.to(x.device)]  # (B, 3)
    return torch.gather(x, 1, table[:, :, None, None].expand(-1, -1, *x.shape[-2:]))

