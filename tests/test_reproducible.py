"""Every registered experiment gives the same record, to the bit, when its command runs again.

Two fresh processes run one tiny ``auxilia run`` per experiment, in opposite orders, so a result
that depends on the process (an unseeded draw) or on what ran before it in the process shows as a
difference. The experiments' data are small stand-ins written here in each dataset's on-disk
layout; the processes accept their SHA-256 digests in place of the standard files' ones (and
nothing else differs from a plain ``auxilia run``).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auxilia import experiments
from auxilia.data import adult, movielens

COMMON = ["--method", "equal", "--seeds", "1", "--max-steps", "2", "--batch-size", "16", "--no-plots"]
OPTIONS = {
    "adult": [],
    "cifar10-rotation": ["train_size=8", "eval_size=20"],
    "cifar10-ssl": ["train_size=20", "eval_size=20", "labels=20", "backbone=convnet"],
    "learned-aux": ["train_size=8", "eval_size=20"],
    "many-aux": [],
    "movielens": [],
    "multimnist": [],
    "scenes": ["size=16", "train_size=8", "widths=[4, 8]", 'auxiliaries=["normals"]'],
    "toy": [],
}
# how long a run takes or how much memory its process holds is not a result
VOLATILE = ("wall_time_s", "time_per_step_s", "started_at", "peak_memory_bytes")

DRIVER = """
import hashlib, json, sys
from pathlib import Path
from auxilia.data import adult, mnist, movielens
root = Path(sys.argv[1])
digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
adult.SHA256 = digest(root / "tabular" / "adult.csv.gz")
movielens.SHA256.update({name: digest(root / "ml-100k" / name) for name in movielens.SHA256})
mnist.SHA256.update({name: digest(root / "mnist" / name) for name in mnist.SHA256})
from auxilia.cli import main
for argv in json.loads(sys.argv[2]):
    assert main(argv) == 0, argv
"""


def _gzip_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_data(root: Path) -> None:
    """Adult, ML-100K, MNIST and CIFAR-10 stand-ins, as large as the experiments' fixed splits need."""
    rng = np.random.default_rng(0)
    levels = {column: [f"{column[:3]}{i}" for i in range(3)] + ["?"] for column in adult.CATEGORICAL}
    rows = [[int(v) for v in rng.integers(17, 90, size=len(adult.NUMERIC))]
            + [levels[c][int(rng.integers(4))] for c in adult.CATEGORICAL] + [rng.choice(["<=50K", ">50K"])]
            for _ in range(200)]
    _gzip_csv(root / "tabular" / "adult.csv.gz", adult.NUMERIC + adult.CATEGORICAL + [adult.PRIMARY], rows)

    ml = root / "ml-100k"
    _gzip_csv(ml / "users.csv.gz", ["user_id", "age", "gender", "occupation", "zip_code"],
              [[u, 20 + u, "MF"[u % 2], f"job{u % 3}", f"{u}0000"] for u in range(1, 11)])
    _gzip_csv(ml / "items.csv.gz", ["movie_id", *movielens.GENRES_100K],
              [[m, *(int(g == m % len(movielens.GENRES_100K)) for g in range(len(movielens.GENRES_100K)))]
               for m in range(1, 21)])
    _gzip_csv(ml / "ratings.csv.gz", ["user_id", "movie_id", "rating"],
              [[int(rng.integers(1, 11)), int(rng.integers(1, 21)), int(rng.integers(1, 6))] for _ in range(300)])

    mnist = root / "mnist"
    mnist.mkdir()
    for prefix, n in (("train", 51_020), ("t10k", 30)):  # multimnist takes 50,000 + 1,000 before val
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 8:20, 8:20] = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
        _idx(mnist / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(mnist / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)

    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, [1002] * 5 + [20]):  # val and aux take 5,000 of the training images
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, list[dict]]:
    """Each experiment's record from each of the two processes."""
    root = tmp_path_factory.mktemp("reproducible")
    write_data(root / "data")
    processes = []
    for name, order in (("a", experiments.available()), ("b", experiments.available()[::-1])):
        commands = []
        for experiment in order:
            options = [arg for option in OPTIONS[experiment] for arg in ("--option", option)]
            commands.append(["run", experiment, *COMMON, *options, "--data-dir", str(root / "data"),
                             "--out", str(root / name / experiment)])
        env = {**os.environ, "AUXILIA_CACHE": str(root / f"cache-{name}"), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-c", DRIVER, str(root / "data"), json.dumps(commands)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in processes:
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output[-3000:]
    return {experiment: [json.loads((root / name / experiment / "results.jsonl").read_text())
                         for name in ("a", "b")]
            for experiment in experiments.available()}


def test_every_registered_experiment_is_covered():
    assert sorted(OPTIONS) == experiments.available()


@pytest.mark.parametrize("experiment", sorted(OPTIONS))
def test_a_command_run_twice_gives_the_same_record(records, experiment):
    first, second = ({k: v for k, v in record.items() if k not in VOLATILE} for record in records[experiment])
    assert first["steps"] == 2
    assert first == second


def test_setup_seeds_every_rng_before_the_builder_draws():
    def build(seed: int, data_dir=None, budget: float = 1.0):
        return torch.rand(3), np.random.rand(3), random.random()

    experiment = experiments.Experiment(name="draws", description="draws before seeding", build=build)
    torch.manual_seed(1)
    first = experiment.setup(0)
    torch.rand(5), np.random.rand(5), random.random()
    second = experiment.setup(0)
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
    assert not torch.equal(first[0], experiment.setup(1)[0])
