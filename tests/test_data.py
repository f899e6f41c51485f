import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from auxilia.data import (
    DatasetCorrupt,
    DatasetMissing,
    compose_multi_mnist,
    load_adult,
    load_mnist,
    load_movielens_1m,
    load_movielens_100k,
    read_idx,
    split_indices,
    verify_sha256,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"datasets not found at {DATA}")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


def test_missing_file_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(DatasetMissing, match="train-images-idx3-ubyte.gz.*lecun"):
        load_mnist(tmp_path, "train")
    with pytest.raises(DatasetMissing, match="adult.csv.gz.*uci"):
        load_adult(tmp_path)


def test_checksum_mismatch_is_reported(tmp_path):
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(1))
    with pytest.raises(DatasetCorrupt, match="t10k-images"):
        load_mnist(tmp_path, "test")
    images, labels = load_mnist(tmp_path, "test", verify=False)
    assert images.shape == (1, 28, 28) and labels.tolist() == [0]
    with pytest.raises(DatasetCorrupt):
        verify_sha256(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "0" * 64)


def test_splits_are_disjoint_seeded_and_complete():
    a = split_indices(100, {"train": 0.6, "aux": 5, "val": -1}, seed=3)
    b = split_indices(100, {"train": 0.6, "aux": 5, "val": -1}, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in a] == [60, 5, 35]
    assert len(torch.cat(list(a.values())).unique()) == 100
    with pytest.raises(ValueError):
        split_indices(10, {"train": 20}, seed=0)


def test_multi_mnist_composition_is_deterministic_and_places_digits():
    digits = torch.zeros(6, 28, 28, dtype=torch.uint8)
    digits[:, 10:18, 10:18] = 255  # a centred square
    labels = torch.arange(6)
    x1, left1, right1 = compose_multi_mnist(digits, labels, seed=1)
    x2, left2, right2 = compose_multi_mnist(digits, labels, seed=1)
    assert torch.equal(x1, x2) and torch.equal(right1, right2)
    assert x1.shape == (6, 1, 28, 28) and 0 <= x1.min() and x1.max() <= 1
    assert torch.equal(left1, labels) and set(right1.tolist()) <= set(range(6))
    # the left digit alone (every partner blank) lands up-left of the centre, the right one down-right
    lone = torch.zeros(50, 28, 28, dtype=torch.uint8)
    lone[0, 10:18, 10:18] = 255
    x, _, right = compose_multi_mnist(lone, torch.arange(50), seed=2)
    assert right[0] != 0
    ys, xs = torch.nonzero(x[0, 0] > 0.5, as_tuple=True)
    assert ys.float().mean() <= 14.1 and xs.float().mean() <= 14.1
    partners = (right == 0).nonzero().flatten()
    partners = partners[partners != 0]
    assert len(partners) > 0
    ys, xs = torch.nonzero(x[int(partners[0]), 0] > 0.5, as_tuple=True)
    assert ys.float().mean() >= 13.9 and xs.float().mean() >= 13.9


@needs_data
def test_mnist_real_files():
    images, labels = load_mnist(DATA, "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist()[:2] == [980, 1135]


@needs_data
def test_adult_has_no_target_leakage():
    data = load_adult(DATA, auxiliary=("relationship", "age"), seed=0)
    n = len(data.inputs)
    assert n == 48_842
    assert not any(name.startswith(("relationship=", "age")) for name in data.feature_names)
    assert set(data.targets) == {"income", "relationship", "age"}
    assert data.targets["income"].float().mean().item() == pytest.approx(0.239, abs=0.01)
    assert sum(len(v) for v in data.splits.values()) == n
    assert abs(float(data.targets["age"][data.splits["train"]].mean())) < 1e-5
    with pytest.raises(ValueError, match="unknown Adult column"):
        load_adult(DATA, auxiliary=("salary",))


@needs_data
def test_movielens_100k_fields():
    data = load_movielens_100k(DATA)
    assert data.fields.shape == (100_000, 7)
    offsets = np.cumsum([0] + data.field_sizes)
    for f in range(7):
        column = data.fields[:, f]
        assert offsets[f] <= column.min() and column.max() < offsets[f + 1]
    assert data.field_sizes[:2] == [943, 1682]
    assert 1 <= data.ratings.min() and data.ratings.max() <= 5


def test_movielens_1m_layout_fixture(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n")
    (folder / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n2::2::1::978300275\n")
    data = load_movielens_1m(tmp_path, sizes={"train": 2, "test": -1})
    assert data.fields.shape == (4, 7)
    assert data.ratings.tolist() == [5.0, 3.0, 4.0, 1.0]
    assert data.field_sizes[0] == 2 and data.field_sizes[6] == 2  # users; first genres Animation, Adventure
    with pytest.raises(DatasetMissing, match="users.dat"):
        load_movielens_1m(tmp_path / "elsewhere")
