import json
import re
from pathlib import Path

import pytest

from auxilia import methods
from auxilia.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.split() == methods.available()


def test_run_toy_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["run", "toy", "--method", "stl", "--method", "equal", "--method", "hpo-random", "--hp", "trials=2",
            "--seeds", "2", "--epochs", "2", "--out", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in records] == [
        ("stl", 0), ("stl", 1), ("equal", 0), ("equal", 1), ("hpo-random", 0), ("hpo-random", 1)]
    for r in records:
        for key in ("experiment", "method", "seed", "primary_metric", "metrics", "weights", "steps",
                    "time_per_step_s", "peak_memory_bytes", "config"):
            assert key in r
        assert set(r["metrics"]) == {"val", "test"} and "w_dist" in r["metrics"]["test"]
        assert r["steps"] == 2 * 20
    assert len(records[-1]["config"]["search"]) == 2
    printed = capsys.readouterr().out
    assert re.search(r"\| equal \| 2 \| [\d.e+-]+ ± ", printed)
    assert (out / "toy_table.md").exists()


def test_bad_arguments_fail_before_training(tmp_path, capsys):
    for argv, message in ((["run", "toy", "--method", "nope"], "unknown method 'nope'"),
                          (["run", "toy", "--method", "equal", "--hp", "zzz=1"], "accepts hyperparameter 'zzz'"),
                          (["run", "nowhere"], "unknown experiment")):
        assert main([*argv, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_readme_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "auxilia run" in commands[0]
    assert "pytest" in commands[1]
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"datasets not found at {DATA}")
@pytest.mark.parametrize("experiment", ["adult", "movielens", "multimnist"])
def test_real_data_experiments_run_end_to_end(tmp_path, experiment, monkeypatch):
    monkeypatch.setenv("AUXILIA_CACHE", str(tmp_path.parent / "auxilia-cache"))
    out = tmp_path / "results"
    assert main(["run", experiment, "--method", "equal", "--method", "pcgrad-aux", "--seeds", "1",
                 "--max-steps", "3", "--data-dir", str(DATA), "--out", str(out), "--no-plots"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["equal", "pcgrad-aux"]
    assert all(r["steps"] == 3 and set(r["metrics"]) == {"val", "test"} for r in records)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"datasets not found at {DATA}")
@pytest.mark.parametrize("experiment, options", [
    ("cifar10-rotation", ["train_size=256", "eval_size=200"]),
    ("cifar10-ssl", ["train_size=256", "eval_size=200", "labels=100", 'backbone="convnet"']),
])
def test_cifar_experiments_run_end_to_end(tmp_path, experiment, options, monkeypatch):
    monkeypatch.setenv("AUXILIA_CACHE", str(tmp_path.parent / "auxilia-cache"))
    out = tmp_path / "results"
    args = ["run", experiment, "--method", "gcs", "--seeds", "1", "--max-steps", "2", "--data-dir", str(DATA),
            "--out", str(out), "--no-plots"]
    for option in options:
        args += ["--option", option]
    assert main(args) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["steps"] == 2 and record["primary_metric_name"] == "test/label/accuracy"
    assert 0.0 <= record["primary_metric"] <= 1.0


@pytest.mark.skipif(not DATA.is_dir(), reason=f"datasets not found at {DATA}")
def test_cifar_eval_size_keeps_every_class_of_the_sorted_test_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AUXILIA_CACHE", str(tmp_path.parent / "auxilia-cache"))
    from auxilia.experiments import get

    setup = get("cifar10-rotation").setup(0, DATA, train_size=64, eval_size=200)
    for split in ("val", "test"):
        labels = setup.datasets[split].targets["label"]
        assert len(labels) == 200 and len(labels.unique()) == 10, split


def test_scenes_runs_end_to_end_with_its_options(tmp_path):
    out = tmp_path / "results"
    assert main(["run", "scenes", "--method", "stl", "--method", "pcgrad-aux", "--seeds", "1", "--max-steps", "2",
                 "--option", "size=16", "--option", "train_size=8", "--option", "widths=[4, 8]",
                 "--option", 'auxiliaries=["normals"]', "--out", str(out), "--no-plots"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["stl", "pcgrad-aux"]
    for record in records:
        assert record["primary_metric_name"] == "test/segmentation/miou"
        assert set(record["metrics"]["test"]) >= {"normals/angle_err", "segmentation/pixel_accuracy"}
        assert "depth/loss" not in record["metrics"]["test"]
    assert main(["run", "scenes", "--method", "stl", "--option", 'auxiliaries=["height"]', "--out", str(out)]) == 2


def test_batch_size_and_epochs_override_the_experiment(tmp_path):
    assert main(["run", "toy", "--method", "equal", "--seeds", "1", "--epochs", "2", "--batch-size", "250",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["steps"] == 2 * 1000 // 250 and record["config"]["batch_size"] == 250


def test_a_grid_resumes_without_rerunning_finished_runs(tmp_path, capsys):
    args = ["run", "toy", "--method", "stl", "--seeds", "2", "--epochs", "1", "--out", str(tmp_path), "--no-plots"]
    main(args)
    main(args + ["--seeds", "3"])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [0, 1, 2]
    assert "already in" in capsys.readouterr().out


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_a_search_keeps_the_trial_best_on_val_never_on_test(tmp_path, monkeypatch, higher_is_better):
    from types import SimpleNamespace

    from auxilia.experiments import get
    from auxilia.experiments.runner import run_one
    from auxilia.training.trainer import FitResult

    # trial i's val and test values: the best on val (trial 2 or 1) is never the best on test
    val = [3.0, 1.0, 0.5, 2.0] if not higher_is_better else [0.5, 3.0, 1.0, 2.0]
    test = [0.1, 9.0, 5.0, 0.2] if not higher_is_better else [9.0, 0.5, 4.0, 8.0]
    trials: list[dict] = []

    def train(setup, method_name, hp, *, device, log_dir, trainer_overrides):
        index = len(trials)
        trials.append(hp)
        result = FitResult(metrics={"val": {"m": val[index]}, "test": {"m": test[index]}}, primary_metric="m",
                           weights=None, weights_history=[], steps=1, skipped_steps=0, best_epoch=0,
                           time_per_step_s=0.0, peak_memory_bytes=0)
        primary = SimpleNamespace(higher_is_better=higher_is_better, metrics=("m",))
        return result, SimpleNamespace(config=setup.config, tasks=SimpleNamespace(primary=primary))

    monkeypatch.setattr("auxilia.experiments.runner._train", train)
    record = run_one(get("toy"), "hpo-random", 0, out=tmp_path, hyperparameters={"trials": 4})
    best = (max if higher_is_better else min)(range(4), key=lambda i: val[i])
    assert [entry["val"] for entry in record["config"]["search"]] == val
    assert record["config"]["hyperparameters"] == json.loads(json.dumps(trials[best]))
    assert record["primary_metric"] == test[best]
