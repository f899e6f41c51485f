"""The command line refuses a mistake before anything trains: one line on stderr, status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import auxilia
from auxilia import experiments
from auxilia.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("auxilia: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("argv, message", [
    (["--method", "stl", "--method", "hpo-random", "--hp", "trials=0"], "trials must be a positive integer"),
    (["--method", "equal", "--hp", "zzz=1"], "accepts hyperparameter 'zzz'"),
    (["--method", "stl", "--mode", "batched"], "accepts hyperparameter 'mode'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--option", "main_labels=abc"], "option main_labels must be int, got 'abc'"),
    (["--option", "main_labels=0"], "main_labels must be an integer in 1..1000"),
    (["--option", "labels=10"], "has no option 'labels'"),
    (["--option", "labels"], "expected NAME=VALUE"),
    (["--arch", "shared"], "no architecture choice"),
    (["--nproc", "0"], "--nproc: must be at least 1"),
    (["--nproc", "-1"], "--nproc: must be at least 1"),
    (["--seeds", "0"], "--seeds: must be at least 1"),
    (["--first-seed", "-1"], "--first-seed: must be at least 0"),
    (["--budget", "-1"], "--budget: must be above 0"),
    (["--budget", "nan"], "--budget: must be above 0"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--max-steps", "x"], "--max-steps: expected int"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--timeout", "0"], "--timeout: must be above 0"),
    (["--device", "toaster"], "is not a device"),
])
def test_a_mistake_in_a_toy_run_is_refused_before_training(tmp_path, capsys, argv, message):
    err = _refused(["run", "toy", *argv, "--out", str(tmp_path)], capsys)
    assert message in err
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "runs").exists()


def test_scenes_options_are_checked_before_any_scene_is_rendered(tmp_path, capsys, monkeypatch):
    def render(*args, **kwargs):
        raise AssertionError("rendered before the options were checked")

    monkeypatch.setattr("auxilia.experiments.scenes.load_scenes", render)
    for option, message in (("size=abc", "option size must be int, got 'abc'"),
                            ("widths=4", "option widths must be Sequence[int]"),
                            ('auxiliaries="depth"', "option auxiliaries must be Sequence[str]")):
        assert message in _refused(["run", "scenes", "--method", "stl", "--option", option, "--out", str(tmp_path)],
                                   capsys)


def test_every_option_the_builder_refuses_is_refused_before_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr("auxilia.experiments.runner._train", lambda *a, **k: trained.append(a))
    err = _refused(["run", "scenes", "--method", "stl", "--option", "size=8", "--option", "train_size=2",
                    "--option", 'auxiliaries=["height"]', "--out", str(tmp_path)], capsys)
    assert "unknown task 'height'" in err and not trained


def test_other_commands_refuse_mistakes_too(tmp_path, capsys):
    assert "no results file" in _refused(["report", str(tmp_path / "nowhere")], capsys)
    assert "unknown experiment 'nowhere'" in _refused(["run", "nowhere", "--out", str(tmp_path)], capsys)
    assert "--points: must be at least 2" in _refused(["pareto", "--points", "1", "--out", str(tmp_path)], capsys)
    assert "invalid choice" in _refused(["frobnicate"], capsys)


def test_a_fault_during_training_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("auxilia.experiments.runner._train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", "toy", "--method", "stl", "--seeds", "1", "--out", str(tmp_path), "--no-plots"])
    assert "auxilia: error" not in capsys.readouterr().err
    # and the checks up front are what makes the difference: a bad --hp never reaches training
    assert "trials must be" in _refused(["run", "toy", "--method", "hpo-random", "--hp", "trials=-1", "--out",
                                         str(tmp_path)], capsys)


def test_version_is_the_package_version():
    result = subprocess.run([sys.executable, "-m", "auxilia.cli", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"auxilia {auxilia.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "auxilia.__version__" }' in pyproject


def _actions(parser: argparse.ArgumentParser, prefix: str = "auxilia"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield prefix, action
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_every_option_of_every_command_has_help():
    missing = [f"{where}: {action.dest}" for where, action in _actions(build_parser())
               if not action.help or action.help == argparse.SUPPRESS]
    assert not missing
    commands = next(a for _, a in _actions(build_parser()) if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in commands._choices_actions)


def test_every_experiment_declares_the_type_of_each_option():
    untyped = [f"{name}.{option}" for name in experiments.available()
               for option, hint in experiments.get(name).option_types().items() if hint is typing.Any]
    assert not untyped
