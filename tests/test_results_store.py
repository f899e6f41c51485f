"""``results.jsonl``: tolerant reading, each run counted once, rows per configuration, provenance
in every record, run keys that hold every setting, no writes through links inside ``--out``."""

from __future__ import annotations

import datetime
import fcntl
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

import auxilia
from auxilia.cli import main
from auxilia.experiments import get
from auxilia.experiments.results import append_record, finished_runs, read_records
from auxilia.experiments.runner import provenance, run_key, run_one
from auxilia.report import format_table, load_results, summarize

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run", "toy", "--method", "stl", "--seeds", "1", "--max-steps", "1", "--no-plots"]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_bad_line_is_skipped_with_a_warning_naming_the_file_and_line(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    path = tmp_path / "results.jsonl"
    good = path.read_text()
    path.write_text(good + '{"experiment": "toy", "meth\n' + "[1, 2]\n")
    with pytest.warns(UserWarning, match=r"results\.jsonl:2: skipped") as caught:
        assert len(read_records(path)) == 1
    assert any("results.jsonl:3: skipped" in str(w.message) for w in caught)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"{path}:2: skipped" in err and f"{path}:3: skipped" in err
    assert main([*TINY, "--seeds", "2", "--out", str(tmp_path)]) == 0  # resumes past the bad lines
    with pytest.warns(UserWarning, match="skipped"):
        assert [r["seed"] for r in read_records(path)] == [0, 1]


def test_a_run_recorded_twice_is_written_and_counted_once(tmp_path):
    kwargs = {"out": tmp_path, "trainer_overrides": {"max_steps": 1}}
    run_one(get("toy"), "stl", 0, **kwargs)
    with pytest.warns(UserWarning, match="recorded meanwhile"):
        run_one(get("toy"), "stl", 0, **kwargs)  # as a second `auxilia run` on the same --out would
    assert len(_lines(tmp_path)) == 1
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text() * 2)  # e.g. two files concatenated
    with pytest.warns(UserWarning, match="counted once"):
        (row,) = summarize(load_results(tmp_path), "toy")
    assert row["n"] == 1


def test_appending_waits_for_the_lock_of_another_writer(tmp_path):
    record = {"run_key": "k", "experiment": "toy"}
    path = tmp_path / "results.jsonl"
    path.touch()
    with path.open("rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        writer = threading.Thread(target=append_record, args=(tmp_path, record))
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive() and path.read_text() == ""
    writer.join(5)
    assert not writer.is_alive() and json.loads(path.read_text()) == record


def test_the_table_keeps_different_configurations_apart_and_says_how_they_differ(tmp_path, capsys):
    for extra in (["--max-steps", "1"], ["--max-steps", "2"], ["--max-steps", "1", "--budget", "0.5"]):
        assert main(["run", "toy", "--method", "stl", "--seeds", "2", *extra, "--out", str(tmp_path),
                     "--no-plots"]) == 0
    assert main(["run", "toy", "--method", "hpo-random", "--hp", "trials=1", "--seeds", "1", "--max-steps", "1",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    rows = summarize(load_results(tmp_path), "toy")
    assert [(row["method"], row["n"], row["settings"]) for row in rows] == [
        ("stl", 2, {"budget": "1.0", "max_steps": "1"}),
        ("stl", 2, {"budget": "1.0", "max_steps": "2"}),
        ("stl", 2, {"budget": "0.5", "max_steps": "1"}),
        ("hpo-random", 1, {"budget": "1.0", "max_steps": "1", "hp:trials": "1"}),
    ]
    table = format_table(rows, "test/main/mse")
    assert "| settings |" in table and "| stl | budget=0.5 max_steps=1 | 2 |" in table
    assert "Rows are configurations" in table
    # Δp compares a row with stl of the same settings (hyperparameters aside): 0 for every stl row
    assert [round(row["delta_p"], 9) for row in rows[:3]] == [0.0, 0.0, 0.0]
    assert rows[3]["delta_p"] == pytest.approx(
        (rows[0]["primary"][0] - rows[3]["primary"][0]) / rows[0]["primary"][0] * 100)


def test_every_record_carries_version_commit_device_start_and_wall_time(tmp_path, monkeypatch):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    (record,) = _lines(tmp_path)
    assert record["auxilia_version"] == auxilia.__version__
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        head = None
    assert record["git_commit"] == (head or None)
    assert record["config"]["device"] == "cpu" and record["config"]["device_name"]
    started = datetime.datetime.fromisoformat(record["started_at"])
    assert started.utcoffset() == datetime.timedelta(0) and before <= started <= before + datetime.timedelta(60)
    assert record["wall_time_s"] > 0

    provenance.cache_clear()  # no git on the PATH: no commit, and no failure
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    try:
        assert provenance()["git_commit"] is None and provenance()["auxilia_version"] == auxilia.__version__
    finally:
        provenance.cache_clear()


def test_the_run_key_holds_every_setting_that_changes_the_result():
    base = {"experiment": "toy", "method": "pcgrad", "seed": 0, "budget": 1.0, "hyperparameters": {}, "trainer_overrides": {}}
    key = run_key(**base)
    changed = [
        {"device": "cuda"}, {"budget": 0.5}, {"seed": 1},
        {"hyperparameters": {"mode": "batched"}}, {"options": {"main_labels": 50}},
        *({"trainer_overrides": {name: value}} for name, value in
          (("amp", True), ("batch_size", 10), ("epochs", 3), ("max_steps", 7))),
    ]
    keys = {run_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)
    # what does not change the result does not change the key
    assert run_key(**base, device="cuda:1") == run_key(**base, device="cuda")
    assert run_key(**{**base, "trainer_overrides": {"progress": True, "epochs": None}}) == key
    assert run_key(**{**base, "method": "stl", "hyperparameters": {"mode": "batched"}}) == run_key(
        **{**base, "method": "stl"})  # stl has no gradient mode


def test_records_with_run_keys_of_the_earlier_layout_still_resume(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    (record,) = _lines(tmp_path)
    record["run_key"] = json.dumps(["toy", "stl", 0, 1.0, {"trials": 3}, {"max_steps": 1}])
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    assert finished_runs(tmp_path) == {run_key("toy", "stl", 0, 1.0, {}, {"max_steps": 1})}
    capsys.readouterr()
    assert main([*TINY, "--hp", "trials=3", "--method", "hpo-random", "--out", str(tmp_path)]) == 0
    assert "stl          seed 0: already in" in capsys.readouterr().out
    assert [r["method"] for r in _lines(tmp_path)] == ["stl", "hpo-random"]


@pytest.mark.parametrize("link", ["results.jsonl", "runs", "runs/toy", "toy_table.md"])
def test_links_inside_out_are_not_written_through(tmp_path, capsys, link):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    target = elsewhere / "target"
    if link.endswith((".jsonl", ".md")):
        target.write_text("")
    else:
        target.mkdir()
    (out / link).symlink_to(target)
    assert main([*TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("auxilia: error: refusing to write through") and str(out / link) in err
    assert err.count("\n") == 1
    assert not any(p.stat().st_size for p in elsewhere.rglob("*") if p.is_file())
    assert not list(elsewhere.rglob("*.csv")) and not list(elsewhere.rglob("seed0"))
