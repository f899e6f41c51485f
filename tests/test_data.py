import gzip
import importlib.util
import pickle
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from auxilia.data import (
    SCENE_CLASSES,
    DatasetCorrupt,
    DatasetMissing,
    NYUv2,
    backproject,
    balanced_subset,
    cache_dir,
    channel_permutation,
    compose_multi_mnist,
    default_data_dir,
    generate_scenes,
    load_adult,
    load_cifar10,
    load_mnist,
    load_movielens_1m,
    load_movielens_100k,
    load_multi_mnist,
    load_nyuv2,
    load_scenes,
    normals_from_depth,
    read_cifar10_batches,
    read_cifar10_jpeg,
    read_idx,
    rotate,
    rotation_task,
    rotations,
    semi_supervised_split,
    split_indices,
    task_datasets,
    verify_sha256,
)
from auxilia.data.cifar import JPEG_ARCHIVE, PERMUTATIONS
from auxilia.training.data import TaskDataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real datasets not found at {DATA}")


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cifar_image = _fixture_module().cifar_image


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# --- locations, checksums, splits -------------------------------------------------------------


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_missing_files_name_the_file_where_it_was_looked_for_and_where_to_get_it(tmp_path):
    cases = [
        (lambda: load_mnist(tmp_path, "train"), "train-images-idx3-ubyte.gz", "mnist", "lecun"),
        (lambda: load_adult(tmp_path), "adult.csv.gz", "tabular", "uci"),
        (lambda: load_movielens_100k(tmp_path), "ratings.csv.gz", "ml-100k", "grouplens"),
        (lambda: load_movielens_1m(tmp_path), "users.dat", "ml-1m", "grouplens"),
        (lambda: load_cifar10(tmp_path), "cifar10-jpg-q75.tar.xz", "cifar10", "toronto"),
        (lambda: NYUv2(tmp_path), "image", "nyuv2", "mtan"),
    ]
    for load, name, folder, source in cases:
        with pytest.raises(DatasetMissing) as info:
            load()
        message = str(info.value)
        assert name in message and str(tmp_path / folder) in message and source in message.lower(), message
        assert isinstance(info.value, FileNotFoundError) and info.value.filename.startswith(str(tmp_path))
        assert str(pickle.loads(pickle.dumps(info.value))) == message  # survives DataLoader workers


def test_checksum_mismatch_is_reported(tmp_path):
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(1))
    with pytest.raises(DatasetCorrupt, match="t10k-images.*SHA-256"):
        load_mnist(tmp_path, "test")
    images, labels = load_mnist(tmp_path, "test", verify=False)
    assert images.shape == (1, 28, 28) and labels.tolist() == [0]
    with pytest.raises(DatasetCorrupt, match="expected 0000"):
        verify_sha256(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "0" * 64)
    with pytest.raises(DatasetMissing):
        verify_sha256(tmp_path / "nothing.gz", "0" * 64)


def test_default_data_dir_prefers_the_environment_then_data_then_shared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUXILIA_DATA", raising=False)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_data_dir() == Path("data")  # nothing exists: the conventional place
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()
    (tmp_path / "work" / "data").mkdir()
    assert default_data_dir() == Path("data")
    monkeypatch.setenv("AUXILIA_DATA", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"


def test_cache_dir_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("AUXILIA_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_dir(cache=tmp_path / "explicit") == tmp_path / "explicit"


def test_splits_are_disjoint_seeded_and_complete():
    a = split_indices(100, {"train": 0.6, "aux": 5, "val": -1}, seed=3)
    b = split_indices(100, {"train": 0.6, "aux": 5, "val": -1}, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in a] == [60, 5, 35]
    assert len(torch.cat(list(a.values())).unique()) == 100
    c = split_indices(100, {"train": 0.6, "aux": 5, "val": -1}, seed=4)
    assert not torch.equal(a["train"], c["train"])
    middle = split_indices(10, {"train": -1, "test": 3}, seed=0)
    assert [len(v) for v in middle.values()] == [7, 3]
    with pytest.raises(ValueError, match="only 10 exist"):
        split_indices(10, {"train": 20}, seed=0)
    with pytest.raises(ValueError, match="only one split"):
        split_indices(10, {"a": -1, "b": -1}, seed=0)


def test_task_datasets_index_inputs_targets_and_masks():
    x = torch.arange(10.0)[:, None]
    split = split_indices(10, {"train": 6, "val": -1}, seed=0)
    sets = task_datasets(x, {"t": torch.arange(10)}, split, {"t": torch.arange(10) % 2 == 0})
    assert isinstance(sets["train"], TaskDataset) and len(sets["val"]) == 4
    assert torch.equal(sets["train"].targets["t"], split["train"])
    assert torch.equal(sets["train"].masks["t"], split["train"] % 2 == 0)


# --- MNIST and Multi-MNIST -------------------------------------------------------------------


def test_multi_mnist_is_deterministic_and_labels_follow_the_digits():
    n = 60
    digits = torch.zeros(n, 28, 28, dtype=torch.uint8)
    digits[:, 10:18, 10:18] = 255  # a centred square in every image
    labels = torch.arange(n)  # unique labels identify the partner
    x1, left1, right1 = compose_multi_mnist(digits, labels, seed=1)
    x2, _, right2 = compose_multi_mnist(digits, labels, seed=1)
    assert torch.equal(x1, x2) and torch.equal(right1, right2)
    assert not torch.equal(compose_multi_mnist(digits, labels, seed=2)[0], x1)
    assert x1.shape == (n, 1, 28, 28) and x1.dtype == torch.float32 and 0 <= x1.min() and x1.max() <= 1
    assert torch.equal(left1, labels)

    # only image 0 is non-blank: an output shows a digit iff its left or right digit is image 0
    lone = torch.zeros(n, 28, 28, dtype=torch.uint8)
    lone[0, 10:18, 10:18] = 255
    x, left, right = compose_multi_mnist(lone, labels, seed=2)
    shows = x.flatten(1).amax(1) > 0
    assert torch.equal(shows, (left == 0) | (right == 0))
    # as the left digit it lands up-left of the centre (shift 0..4 px on the 36 canvas, scaled by 28/36)
    ys, xs = torch.nonzero(x[0, 0] > 0.5, as_tuple=True)
    centre = 18.0  # the square's centre before shifting, in continuous canvas coordinates
    assert right[0] != 0
    for mean in (ys.float().mean(), xs.float().mean()):
        shift = centre - (mean + 0.5) * 36 / 28
        assert -0.1 <= shift <= 4.1
    partners = torch.nonzero((right == 0) & (left != 0)).flatten()
    assert len(partners) > 0
    ys, xs = torch.nonzero(x[int(partners[0]), 0] > 0.5, as_tuple=True)
    for mean in (ys.float().mean(), xs.float().mean()):
        shift = (mean + 0.5) * 36 / 28 - centre
        assert -0.1 <= shift <= 4.1


def test_multi_mnist_rejects_shifts_beyond_the_canvas():
    with pytest.raises(ValueError, match="max_shift"):
        compose_multi_mnist(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.arange(2), seed=0, max_shift=5)


@needs_data
def test_mnist_real_files():
    images, labels = load_mnist(DATA, "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist()[:2] == [980, 1135]
    train_images, train_labels = load_mnist(DATA, "train")
    assert train_images.shape == (60_000, 28, 28) and torch.bincount(train_labels).tolist()[:2] == [5923, 6742]


@needs_data
def test_multi_mnist_from_real_mnist_is_cached_under_its_parameters(tmp_path):
    x, left, right = load_multi_mnist(DATA, "test", seed=0, cache=tmp_path)
    assert x.shape == (10_000, 1, 28, 28) and 0 <= x.min() and x.max() == 1
    assert torch.equal(left, load_mnist(DATA, "test")[1])
    assert torch.equal(torch.round(x * 255), x * 255)  # 8-bit pixels
    files = list(tmp_path.glob("multi_mnist-*.pt"))
    assert len(files) == 1
    again = load_multi_mnist(DATA, "test", seed=0, cache=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip((x, left, right), again))
    fresh = load_multi_mnist(DATA, "test", seed=0, cache=False)
    assert all(torch.equal(a, b) for a, b in zip((x, left, right), fresh))
    load_multi_mnist(DATA, "test", seed=0, cache=tmp_path, max_shift=2)
    assert len(list(tmp_path.glob("multi_mnist-*.pt"))) == 2


# --- Adult -----------------------------------------------------------------------------------


@needs_data
def test_adult_has_no_target_leakage_and_standardizes_on_train():
    data = load_adult(DATA, auxiliary=("relationship", "age", "education"), seed=0)
    n = len(data.inputs)
    assert n == 48_842 and data.inputs.dtype == torch.float32
    for column in ("relationship", "age", "education", "educational-num"):  # educational-num encodes education
        assert not any(name == column or name.startswith(column + "=") for name in data.feature_names)
        assert column not in data.categorical_names
    assert set(data.targets) == {"income", "relationship", "age", "education"}
    assert data.targets["income"].float().mean().item() == pytest.approx(0.239, abs=0.01)
    assert data.classes["relationship"][:2] == ["Husband", "Not-in-family"] and data.targets["relationship"].max() == 5
    assert data.classes["age"] == []
    assert sum(len(v) for v in data.splits.values()) == n
    assert len(torch.cat(list(data.splits.values())).unique()) == n
    train = data.splits["train"]
    assert abs(float(data.targets["age"][train].mean())) < 1e-4
    assert data.inputs[train, : data.feature_names.index("hours-per-week") + 1].mean(0).abs().max() < 1e-4
    assert data.inputs.shape[1] == len(data.feature_names)
    assert data.categorical.shape == (n, len(data.categorical_names))
    assert data.categorical.max(0).values.add(1).tolist() == data.cardinalities
    sets = data.datasets()
    assert set(sets) == {"train", "aux", "val", "test"} and len(sets["train"]) == len(train)
    with pytest.raises(ValueError, match="unknown Adult column"):
        load_adult(DATA, auxiliary=("salary",))


@needs_data
def test_adult_unknown_categories_can_be_masked():
    data = load_adult(DATA, auxiliary=("occupation",), unknown="mask", sizes={"train": 0.8, "test": -1})
    assert "?" not in data.classes["occupation"]
    mask = data.masks["occupation"]
    assert 0 < (~mask).sum() < 0.1 * len(mask)
    assert data.targets["occupation"].max() == len(data.classes["occupation"]) - 1
    assert data.datasets()["train"].masks["occupation"].dtype == torch.bool


# --- MovieLens -------------------------------------------------------------------------------


@needs_data
def test_movielens_100k_fields():
    data = load_movielens_100k(DATA)
    assert data.fields.shape == (100_000, 7) and data.fields.dtype == torch.long
    offsets = data.offsets + [data.num_embeddings]
    for f in range(7):
        column = data.fields[:, f]
        assert offsets[f] <= column.min() and column.max() < offsets[f + 1]
    assert data.field_sizes[:2] == [943, 1682]
    assert 1 <= data.ratings.min() and data.ratings.max() <= 5
    assert data.ratings.mean().item() == pytest.approx(3.53, abs=0.01)
    sets = data.datasets()
    assert sum(len(s) for s in sets.values()) == 100_000 and set(sets["train"].targets) == {"rating"}


def test_movielens_1m_layout_fixture():
    data = load_movielens_1m(FIXTURES, sizes={"train": 4, "test": -1})
    assert data.fields.shape == (6, 7)
    assert data.ratings.tolist() == [5.0, 3.0, 4.0, 1.0, 2.0, 4.0]
    assert data.field_sizes == [3, 3, 3, 2, 3, 3, 3]
    assert data.levels[6] == ["Adventure", "Animation", "Drama"]  # first listed genre
    movie_field = data.fields[:, 1] - data.offsets[1]
    assert movie_field.tolist() == [0, 2, 0, 1, 2, 1]
    assert "Misérables" in (FIXTURES / "ml-1m" / "movies.dat").read_bytes().decode("latin-1")
    assert data.levels[2] == ["1", "25", "56"]  # ML-1M ages are already bucketed


def test_movielens_1m_reports_malformed_and_missing_files(tmp_path):
    shutil.copytree(FIXTURES / "ml-1m", tmp_path / "ml-1m")
    with (tmp_path / "ml-1m" / "ratings.dat").open("a") as f:
        f.write("1::2::3\n")
    with pytest.raises(DatasetCorrupt, match="ratings.dat:7"):
        load_movielens_1m(tmp_path)
    (tmp_path / "ml-1m" / "users.dat").unlink()
    with pytest.raises(DatasetMissing, match="users.dat"):
        load_movielens_1m(tmp_path)


# --- CIFAR-10 --------------------------------------------------------------------------------


def test_cifar10_python_batches_fixture():
    images, labels = load_cifar10(FIXTURES, "train")
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(10)]
    for i in range(10):
        assert torch.equal(images[i], torch.from_numpy(cifar_image(i)))
    test_images, test_labels = load_cifar10(FIXTURES, "test")
    assert test_labels.tolist() == [0, 1]
    assert test_images.shape == (2, 3, 32, 32) and torch.equal(test_images[1], torch.from_numpy(cifar_image(11)))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_cifar10(FIXTURES, "val")


def test_cifar10_python_batches_from_the_original_archive(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURES / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    images, labels = load_cifar10(tmp_path, "train")
    expected_images, expected_labels = read_cifar10_batches(FIXTURES / "cifar-10-batches-py", "train")
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    broken = tmp_path / "broken" / "cifar-10-batches-py"
    shutil.copytree(FIXTURES / "cifar-10-batches-py", broken)
    with (broken / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetCorrupt, match="data_batch_3"):
        read_cifar10_batches(broken)
    (broken / "data_batch_3").unlink()
    with pytest.raises(DatasetMissing, match="data_batch_3"):
        read_cifar10_batches(broken)


class _RunsCode:
    """Unpickling this writes ``marker``: what a crafted batch could do with any callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("layout", ["folder", "tar.gz"])
def test_a_cifar10_batch_that_would_run_code_is_refused_naming_the_file(tmp_path, layout):
    marker = tmp_path / "marker"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    shutil.copytree(FIXTURES / "cifar-10-batches-py", folder)
    with (folder / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_RunsCode(marker)]}, f, protocol=2)
    if layout == "tar.gz":
        with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        shutil.rmtree(folder)
    with pytest.raises(DatasetCorrupt, match=r"data_batch_2: refused, not a plain CIFAR-10 batch \(it names "):
        load_cifar10(tmp_path / "data", "train")
    assert not marker.exists()
    load_cifar10(tmp_path / "data", "test")  # the other batches are still read


def test_cifar10_batches_of_any_pickle_protocol_are_read(tmp_path):
    expected = read_cifar10_batches(FIXTURES / "cifar-10-batches-py", "test")
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "test_batch").write_bytes(pickle.dumps(
            {b"data": expected[0].reshape(2, -1).numpy(), b"labels": expected[1].tolist()}, protocol=protocol))
        images, labels = read_cifar10_batches(tmp_path, "test")
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]), protocol


def test_cifar10_jpeg_tree_fixture_is_decoded_and_cached(tmp_path):
    root = FIXTURES / "cifar10-jpg"
    with pytest.raises(DatasetCorrupt, match="SHA-256"):
        load_cifar10(root, "train", cache=tmp_path)
    images, labels = load_cifar10(root, "train", verify=False, cache=tmp_path)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 3, 3]  # by class, then file name
    expected = torch.tensor([220, 120, 150])  # class 3, second file: (40 + 60 * 3, 120, 200 - 50)
    assert (images[3].float().mean((1, 2)) - expected).abs().max() < 3
    assert len(list(tmp_path.glob("*.pt"))) == 1
    cached_images, _ = load_cifar10(root, "train", cache=tmp_path)  # from the cache: no decode, no check
    assert torch.equal(cached_images, images)
    assert load_cifar10(root, "test", cache=tmp_path)[1].tolist() == [0, 3]
    assert read_cifar10_jpeg(root / JPEG_ARCHIVE, limit=1)["train"][0].shape == (1, 3, 32, 32)


def test_cifar10_jpeg_decoding_names_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"auxilia\[data\]"):
        read_cifar10_jpeg(FIXTURES / "cifar10-jpg" / JPEG_ARCHIVE)


@needs_data
def test_cifar10_real_archive_first_members():
    archive = DATA / JPEG_ARCHIVE
    verify_sha256(archive, "6254f53a1bc70afc08c46178959354e8597763b03706815cc50b5e2cdff16569")
    decoded = read_cifar10_jpeg(archive, limit=16)
    images, labels = decoded["train"]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.unique().numel() == 1  # the archive is grouped by class
    assert images.float().std() > 20  # real pictures, not blanks


def test_balanced_subsets_are_balanced_seeded_and_avoid_excluded_indices():
    labels = torch.arange(1000) % 10
    excluded = torch.arange(0, 1000, 3)
    subset = balanced_subset(labels, 100, seed=0, exclude=excluded)
    assert torch.bincount(labels[subset]).tolist() == [10] * 10
    assert not set(subset.tolist()) & set(excluded.tolist())
    assert torch.equal(subset, balanced_subset(labels, 100, seed=0, exclude=excluded))
    assert not torch.equal(subset, balanced_subset(labels, 100, seed=1, exclude=excluded))
    with pytest.raises(ValueError, match="evenly"):
        balanced_subset(labels, 105, seed=0)
    with pytest.raises(ValueError, match="only"):
        balanced_subset(labels, 1000, seed=0, exclude=excluded)


def test_semi_supervised_split_keeps_val_and_test_out():
    labels = torch.arange(2000) % 10
    split = split_indices(2000, {"val": 200, "train": -1}, seed=0)
    labelled, unlabelled = semi_supervised_split(labels, 500, seed=0, pool=split["train"])
    assert torch.bincount(labels[labelled]).tolist() == [50] * 10
    assert not set(labelled.tolist()) & set(unlabelled.tolist())
    assert set(labelled.tolist()) | set(unlabelled.tolist()) == set(split["train"].tolist())
    assert not set(split["val"].tolist()) & (set(labelled.tolist()) | set(unlabelled.tolist()))


def test_rotations_follow_rot90():
    x = torch.tensor([[1, 2], [3, 4]]).view(1, 1, 2, 2)
    assert rotate(x, 1)[0, 0].tolist() == [[2, 4], [1, 3]]  # 90 degrees counter-clockwise
    batch = torch.randint(0, 255, (8, 3, 5, 5), dtype=torch.uint8)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    rotated = rotate(batch, k)
    for i in range(8):
        assert torch.equal(rotated[i], torch.rot90(batch[i], int(k[i]), dims=(-2, -1)))
    assert torch.equal(rotate(rotated, (4 - k) % 4), batch)
    assert torch.equal(rotate(batch, k + 4), rotated)
    four = rotations(batch)
    assert four.shape == (32, 3, 5, 5) and torch.equal(four[8:16], rotate(batch, 1)) and torch.equal(four[:8], batch)
    images, labels = rotation_task(batch, torch.Generator().manual_seed(0))
    assert torch.equal(images, rotate(batch, labels)) and labels.min() >= 0 and labels.max() <= 3
    with pytest.raises(ValueError, match="square"):
        rotate(torch.zeros(2, 1, 3, 4), torch.tensor([1, 2]))


def test_channel_permutation():
    x = torch.arange(3).view(1, 3, 1, 1).expand(len(PERMUTATIONS), 3, 2, 2)
    out = channel_permutation(x, torch.arange(len(PERMUTATIONS)))
    assert [out[i, :, 0, 0].tolist() for i in range(6)] == [list(p) for p in PERMUTATIONS]


# --- scenes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(64, seed=7, size=48)


def test_scenes_shapes_ranges_and_determinism(scenes):
    assert scenes.images.shape == (64, 3, 48, 48) and scenes.images.dtype == torch.float32
    assert scenes.segmentation.shape == (64, 48, 48) and scenes.segmentation.dtype == torch.long
    assert scenes.depth.shape == (64, 1, 48, 48) and scenes.normals.shape == (64, 3, 48, 48)
    assert 0 <= scenes.images.min() and scenes.images.max() <= 1
    assert set(scenes.segmentation.unique().tolist()) == set(range(len(SCENE_CLASSES)))
    assert (scenes.depth > 0).all() and torch.isfinite(scenes.depth).all()
    again = generate_scenes(64, seed=7, size=48)
    for a, b in zip(scenes.targets().values(), again.targets().values()):
        assert torch.equal(a, b)
    assert torch.equal(again.images, scenes.images)
    assert not torch.equal(generate_scenes(4, seed=8, size=48).images, scenes.images[:4])
    window = generate_scenes(5, seed=7, size=48, start=10, chunk=2)  # scene i depends on (seed, i) only
    for a, b in zip((window.images, window.instances, *window.targets().values()),
                    (scenes.images, scenes.instances, *scenes.targets().values())):
        assert torch.equal(a, b[10:15])
    assert torch.equal(torch.tensor([0, 1, 2, 2, 3, 3])[scenes.instances], scenes.segmentation)  # 2 boxes, 2 spheres


def test_scene_normals_are_unit_and_face_the_camera(scenes):
    assert torch.allclose(scenes.normals.norm(dim=1), torch.ones(1), atol=1e-5)
    points = backproject(scenes.depth, scenes.focal)
    assert ((scenes.normals * points).sum(1) < 0).all()


def test_scene_segmentation_agrees_with_the_geometry(scenes):
    L = scenes.layout
    points = backproject(scenes.depth, scenes.focal).permute(0, 2, 3, 1)  # (N, H, W, 3)
    normals = scenes.normals.permute(0, 2, 3, 1)
    seg = scenes.segmentation
    for i in range(len(scenes)):
        floor, wall = seg[i] == 0, seg[i] == 1
        # the floor lies `height` below the camera and faces up; the wall is a plane facing the camera
        assert torch.allclose(points[i][floor] @ L["up"][i], -L["height"][i].expand(int(floor.sum())), atol=2e-3)
        assert torch.allclose(normals[i][floor], L["up"][i].expand(int(floor.sum()), 3), atol=1e-4)
        assert torch.allclose(points[i][wall] @ -L["wall_normal"][i], L["wall_distance"][i].expand(int(wall.sum())),
                              rtol=1e-4)
        assert torch.allclose(normals[i][wall], L["wall_normal"][i].expand(int(wall.sum()), 3), atol=1e-4)
        # sphere pixels lie on a present sphere, with the radial normal
        p, n = points[i][seg[i] == 3], normals[i][seg[i] == 3]
        if len(p):
            centers, radii = L["sphere_center"][i], L["sphere_radius"][i]
            gap = ((p[:, None] - centers[None]).norm(dim=-1) - radii).abs()
            gap[:, ~L["sphere_present"][i]] = float("inf")
            best = gap.argmin(1)
            assert gap.min(1).values.max() < 2e-3
            assert torch.allclose(n, (p - centers[best]) / radii[best, None], atol=5e-3)
        # box pixels lie inside a present box, with a normal along one of its axes
        p, n = points[i][seg[i] == 2], normals[i][seg[i] == 2]
        if len(p):
            local = torch.einsum("kij,pkj->pki", L["box_axes"][i], p[:, None] - L["box_center"][i][None])
            inside = (local.abs() <= L["box_half"][i] + 2e-3).all(-1) & L["box_present"][i]
            assert inside.any(1).all()
            along_axis = torch.einsum("kij,pj->pki", L["box_axes"][i], n).abs().amax(-1)  # |cos| to the nearest axis
            assert ((along_axis > 1 - 1e-4) & inside).any(1).all()


def test_normals_from_depth_match_the_rendered_normals_on_planes(scenes):
    estimated = normals_from_depth(scenes.depth, scenes.focal)
    n, seg = scenes.normals, scenes.instances
    # interior pixels: all 3x3 neighbours show the same surface (object) with the same normal
    same = torch.ones_like(seg, dtype=torch.bool)[:, 1:-1, 1:-1]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = n[:, :, 1 + dy : n.shape[2] - 1 + dy, 1 + dx : n.shape[3] - 1 + dx]
            same &= (shifted * n[:, :, 1:-1, 1:-1]).sum(1) > 1 - 1e-6
            same &= seg[:, 1 + dy : seg.shape[1] - 1 + dy, 1 + dx : seg.shape[2] - 1 + dx] == seg[:, 1:-1, 1:-1]
    planar = same & (scenes.segmentation[:, 1:-1, 1:-1] != 3)
    cosine = (estimated[:, :, 1:-1, 1:-1] * n[:, :, 1:-1, 1:-1]).sum(1)[planar]
    assert planar.float().mean() > 0.5 and cosine.min() > 0.99


def test_scene_shading_is_lambertian_in_the_normals(scenes):
    flat = generate_scenes(8, seed=7, size=48, shading=False).images
    shaded, L = scenes.images[:8], scenes.layout
    cosine = torch.einsum("nchw,nc->nhw", scenes.normals[:8], L["light"][:8]).clamp(min=0)
    ambient = L["ambient"][:8, None, None]
    expected = flat * (ambient + (1 - ambient) * cosine)[:, None]
    assert torch.allclose(shaded, expected, atol=1e-5)
    assert (cosine > 0.1).any() and (cosine < 0.9).any()


def test_scene_splits_are_disjoint_scenes():
    sets = load_scenes({"train": 6, "val": 3}, seed=1, size=16)
    assert len(sets["train"]) == 6 and len(sets["val"]) == 3
    assert set(sets["train"].targets) == {"segmentation", "depth", "normals"}
    assert torch.equal(sets["val"].inputs, generate_scenes(3, seed=1, size=16, start=6).images)
    with pytest.raises(ValueError, match="max_boxes"):
        generate_scenes(2, max_boxes=0)


# --- NYUv2 -----------------------------------------------------------------------------------


def test_nyuv2_mtan_layout_fixture():
    dataset = NYUv2(FIXTURES, "train")
    assert len(dataset) == 3
    image, targets = dataset[1]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    raw = np.load(FIXTURES / "nyuv2" / "train" / "image" / "1.npy")
    assert torch.equal(image, torch.from_numpy(raw).permute(2, 0, 1))
    assert targets["segmentation"].shape == (6, 8) and targets["segmentation"].dtype == torch.long
    assert targets["segmentation"].min() == -1 and targets["segmentation"].max() == 12
    assert targets["depth"].shape == (1, 6, 8) and (targets["depth"] > 0).all()
    assert targets["normals"].shape == (3, 6, 8)
    assert torch.allclose(targets["normals"].norm(dim=0), torch.ones(1), atol=1e-5)
    val = load_nyuv2(FIXTURES / "nyuv2", "val", tasks=("segmentation", "depth"))
    assert val.inputs.shape == (2, 3, 6, 8) and set(val.targets) == {"segmentation", "depth"}
    assert torch.equal(val.targets["depth"][0], NYUv2(FIXTURES, "val")[0][1]["depth"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 6, 8) and y["normals"].shape == (2, 3, 6, 8)


def test_nyuv2_missing_files_are_named(tmp_path):
    shutil.copytree(FIXTURES / "nyuv2", tmp_path / "nyuv2")
    (tmp_path / "nyuv2" / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(DatasetMissing, match=r"depth/2\.npy"):
        NYUv2(tmp_path, "train")
    assert len(NYUv2(tmp_path, "train", tasks=("segmentation",))) == 3
    (tmp_path / "nyuv2" / "val" / "image" / "0.npy").unlink()
    with pytest.raises(DatasetMissing, match=r"image/0\.npy"):
        NYUv2(tmp_path, "val")
    with pytest.raises(ValueError, match="unknown NYUv2 task"):
        NYUv2(tmp_path, "train", tasks=("edges",))
