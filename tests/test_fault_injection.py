"""The fault-injection harness (benchmarks/fault_injection.py) in its quick form: every registered
method meets bad inputs, extreme loss scales, non-finite values and kill/resume, and no case may
crash or go silently wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "fault_injection.py"


def _load():
    spec = importlib.util.spec_from_file_location("fault_injection", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_injection", module)
    spec.loader.exec_module(module)
    return module


fault_injection = _load()


@pytest.fixture(scope="module")
def outcomes():
    threads = torch.get_num_threads()
    try:
        return fault_injection.run(quick=True)
    finally:
        torch.set_num_threads(threads)


def test_the_fixture_has_an_agreeing_and_a_conflicting_auxiliary_task():
    _, agree, conflict = fault_injection.fixture_cosines()
    assert 0.3 < agree < 0.95 and -0.95 < conflict < -0.3  # promises are tested away from degenerate cases


def test_every_method_and_category_is_tried(outcomes):
    from auxilia import methods

    tried = {(o.category, o.method) for o in outcomes}
    for name in methods.available():
        for category in ("bad-input", "scale", "nonfinite"):
            assert (category, name) in tried
    assert sum(o.category == "resume" for o in outcomes) >= 6


@pytest.mark.parametrize("category", fault_injection.CATEGORIES)
def test_no_case_crashes_or_is_silently_wrong(outcomes, category):
    failing = [o for o in outcomes if o.category == category and o.status != fault_injection.HANDLED]
    assert not failing, "\n".join(f"{o.status}: {o.method} / {o.case}: {o.detail}" for o in failing)


def test_the_classification_tells_the_three_outcomes_apart():
    model, method = fault_injection.build("equal")
    snapshot = fault_injection.Snapshot(model, method)
    handled = fault_injection.expect_error(lambda: method.tasks.get("nope"), snapshot)
    assert handled[0] == fault_injection.HANDLED
    raw = fault_injection.expect_error(lambda: torch.ones(2) @ torch.ones(3), snapshot)
    assert raw[0] == fault_injection.CRASHED and "RuntimeError" in raw[1]
    assert fault_injection.expect_error(lambda: {}["key"], snapshot)[0] == fault_injection.CRASHED

    def change_then_fail():
        with torch.no_grad():
            model.encoder[0].weight.add_(1.0)
        method.tasks.get("nope")
    late = fault_injection.expect_error(change_then_fail, snapshot)
    assert late[0] == fault_injection.SILENT and "encoder.0.weight" in late[1]
    assert fault_injection.expect_error(lambda: None, snapshot)[0] == fault_injection.SILENT


def test_a_wrong_update_breaks_the_promise_check():
    model, method = fault_injection.build("pcgrad-aux")
    _, losses = fault_injection.compute_losses(model, method, fault_injection.make_data(8, 0))
    G = fault_injection.task_jacobian(losses, fault_injection.NAMES, model.shared_parameters())
    method.aggregate(G.float())
    right = method.last_weights.double() @ G
    assert fault_injection.check_direction(method, G, right, model) is None
    assert "differs" in fault_injection.check_direction(method, G, G.sum(dim=0), model)  # the plain sum keeps the conflict
