import json
from functools import partial

import pytest
import torch
from torch import nn

from auxilia import cli, experiments
from auxilia.experiments import pareto
from auxilia.experiments.base import Experiment, Setup, register
from auxilia.tasks import Task
from auxilia.training.data import TaskDataset
from auxilia.training.trainer import TrainerConfig

NAME = "pareto-test-two-tasks"


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"left": nn.Linear(8, 3), "right": nn.Linear(8, 3)})

    def forward(self, x):
        rep = self.encoder(x)
        return {name: head(rep) for name, head in self.heads.items()}

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def _build(seed, data_dir=None, budget=1.0):
    g = torch.Generator().manual_seed(123)
    W = torch.randn(4, 2, generator=g)

    def split(n):
        x = torch.randn(n, 4, generator=g)
        z = x @ W
        return TaskDataset(x, {"left": torch.bucketize(z[:, 0].contiguous(), torch.tensor([-0.5, 0.5])),
                               "right": torch.bucketize(z[:, 1].contiguous(), torch.tensor([-0.5, 0.5]))})

    datasets = {"train": split(64), "val": split(32), "test": split(32)}
    torch.manual_seed(seed)
    return Setup(model=_TwoHeads(), tasks=[Task.classification("left", role="primary"), Task.classification("right")],
                 datasets=datasets, optimizer=partial(torch.optim.SGD, lr=0.1),
                 config=TrainerConfig(epochs=max(1, round(2 * budget)), batch_size=16, seed=seed))


@pytest.fixture(scope="module")
def experiment():
    """A two-task experiment, registered for these tests only."""
    from auxilia.experiments import base

    registered = register(Experiment(name=NAME, description="two tiny classification tasks", build=_build))
    yield registered
    del base._EXPERIMENTS[NAME]


def test_preference_grid_spans_both_ends_and_sums_to_one():
    grid = pareto.preference_grid(11, margin=0.02)
    assert len(grid) == 11
    assert grid[0] == (0.02, 0.98) and grid[-1] == (0.98, 0.02) and grid[5] == (0.5, 0.5)
    assert all(abs(a + b - 1) < 1e-12 and a > 0 and b > 0 for a, b in grid)
    with pytest.raises(ValueError, match="points"):
        pareto.preference_grid(1)
    with pytest.raises(ValueError, match="margin"):
        pareto.preference_grid(5, margin=0.5)


def test_sweep_runs_fixed_preferences_with_one_seed_and_the_reference_over_seeds():
    runs = pareto.sweep_runs(points=4, seed=7)
    fixed = [r for r in runs if r[0] == "auxinash"]
    reference = [r for r in runs if r[0] == "nash-mtl"]
    assert len(fixed) == 4 and {s for _, s, _ in fixed} == {7}
    assert all(hp["learn_preferences"] is False and len(hp["preferences"]) == 2 for _, _, hp in fixed)
    assert [s for _, s, _ in reference] == [7, 8, 9, 10]


def test_sweep_records_both_fronts_resumes_and_reports(tmp_path, experiment):
    lines = []
    records = pareto.run_sweep(experiment, tmp_path, points=3, trainer_overrides={"max_steps": 3}, log=lines.append)
    assert len(records) == 6
    assert sum(r["method"] == "auxinash" for r in records) == 3
    for r in records:
        assert {"left/accuracy", "right/accuracy"} <= set(r["metrics"]["test"])
    fixed = [r for r in records if r["method"] == "auxinash"]
    # the preferences were used as given (renormalized to Σp = K = 2), and never learned
    for r, (t, u) in zip(fixed, pareto.preference_grid(3)):
        assert r["weights"]["left"] == pytest.approx(2 * t) and r["weights"]["right"] == pytest.approx(2 * u)
    # a second call trains nothing
    again = []
    pareto.run_sweep(experiment, tmp_path, points=3, trainer_overrides={"max_steps": 3}, log=again.append)
    assert len(again) == 6 and all("skipped" in line for line in again)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6

    table = pareto.report_sweep(tmp_path, NAME, plots=True)
    assert (tmp_path / "pareto_front.png").stat().st_size > 0
    assert "test/left/accuracy" in table and "test/right/accuracy" in table
    assert table.count("| auxinash | p=") == 3 and table.count("| nash-mtl | seed") == 3


def test_front_points_and_dominance():
    records = [
        {"method": "auxinash", "seed": 0, "config": {"hyperparameters": {"preferences": [0.2, 0.8]}},
         "metrics": {"test": {"left/accuracy": 0.5, "right/accuracy": 0.9}}},
        {"method": "nash-mtl", "seed": 0, "config": {"hyperparameters": {}},
         "metrics": {"test": {"left/accuracy": 0.4, "right/accuracy": 0.8}}},
        {"method": "nash-mtl", "seed": 1, "config": {"hyperparameters": {}},
         "metrics": {"test": {"left/accuracy": 0.6, "right/accuracy": 0.7}}},
    ]
    fronts = pareto.front_points(records, ("left/accuracy", "right/accuracy"))
    assert fronts["auxinash"][0] == {"x": 0.5, "y": 0.9, "label": "p=0.20,0.80"}
    table = pareto.format_sweep(fronts, ("left/accuracy", "right/accuracy"))
    summary = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.splitlines()
               if line.startswith("| ") and line.count("|") == 6 and "±" in line}
    assert summary == {"auxinash": "1", "nash-mtl": "1"}  # (0.4, 0.8) is dominated by (0.5, 0.9)
    with pytest.raises(KeyError, match="right/accuracy"):
        pareto.front_points([{**records[0], "metrics": {"test": {"left/accuracy": 1.0}}}], ("left/accuracy", "right/accuracy"))


def test_three_task_experiments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected 3 preferences"):
        pareto.run_sweep(experiments.get("toy"), tmp_path, points=2, trainer_overrides={"max_steps": 1}, log=lambda s: None)


def test_cli_pareto(tmp_path, capsys, experiment):
    assert cli.main(["pareto", NAME, "--points", "2", "--max-steps", "2", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "non-dominated" in out
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["auxinash", "auxinash", "nash-mtl", "nash-mtl"]
