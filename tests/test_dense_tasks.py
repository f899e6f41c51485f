"""Dense-prediction tasks: losses skip unlabelled pixels, metrics match hand computations."""

import math

import numpy as np
import pytest
import torch

from auxilia.data import generate_scenes
from auxilia.dense_tasks import MeanIoU, depth_task, normals_task, segmentation_task
from auxilia.experiments import get
from auxilia.tasks import TaskError


def _logits(prediction: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(prediction, classes).permute(0, 3, 1, 2).float() * 10


def test_miou_from_the_confusion_matrix_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 2, -1]]])
    prediction = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    metric = MeanIoU()
    metric.update(_logits(prediction, 4)[:, :, :1], target[:, :1])  # two batches accumulate
    metric.update(_logits(prediction, 4)[:, :, 1:], target[:, 1:])
    # class 0: I=1, U=|pred 0 ∪ true 0| = 3 (pixels (0,0),(0,1),(1,2)); class 1: I=2, U=3; class 2: I=2, U=3;
    # class 3 absent everywhere; the ignored pixel (1,3) predicted 0 does not count.
    assert metric.compute() == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


def test_segmentation_loss_and_accuracy_ignore_unlabelled_pixels():
    task = segmentation_task(role="primary")
    target = torch.tensor([[[1, -1]]])
    good = _logits(torch.tensor([[[1, 0]]]), 3)
    assert float(task.compute_loss(good, target)) < 1e-3
    accuracy = task.new_metrics()["pixel_accuracy"]
    accuracy.update(good, target)
    assert accuracy.compute() == 1.0


def test_depth_counts_only_measured_pixels():
    task = depth_task()
    target = torch.tensor([[[[2.0, 0.0]]]])
    output = torch.tensor([[[[2.5, 100.0]]]])
    assert float(task.per_sample_loss(output, target).sum()) == pytest.approx(0.5)
    metrics = task.new_metrics()
    for metric in metrics.values():
        metric.update(output, target)
    assert metrics["abs_err"].compute() == pytest.approx(0.5)
    assert metrics["rel_err"].compute() == pytest.approx(0.25)


def test_normals_angle_error_of_a_known_rotation():
    task = normals_task()
    angle = math.radians(30)
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    output = torch.tensor([math.sin(angle), 0.0, math.cos(angle)]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    target[..., 0, 0] = 0  # one pixel without a label
    metrics = task.new_metrics()
    for metric in metrics.values():
        metric.update(output, target)
    assert metrics["angle_err"].compute() == pytest.approx(30.0, abs=1e-3)
    assert metrics["within_11.25"].compute() == 0.0
    assert float(task.compute_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    expected = (1 - math.cos(angle)) * 3 / 4  # three labelled pixels of four
    assert float(task.compute_loss(output, target)) == pytest.approx(expected, rel=1e-5)


def test_a_shape_mismatch_names_the_task():
    with pytest.raises(TaskError, match="'segmentation'"):
        segmentation_task().compute_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 7, 7, dtype=torch.long))


def test_perfect_predictions_of_rendered_scenes_score_perfectly():
    scenes = generate_scenes(4, seed=3, size=24)
    seg = segmentation_task().new_metrics()
    for metric in seg.values():
        metric.update(_logits(scenes.segmentation, 4), scenes.segmentation)
    assert seg["miou"].compute() == pytest.approx(1.0) and seg["pixel_accuracy"].compute() == 1.0
    normals = normals_task().new_metrics()["angle_err"]
    normals.update(scenes.normals, scenes.normals)
    assert normals.compute() < 0.05


def test_scenes_splits_are_disjoint_and_the_pairing_is_configurable():
    setup = get("scenes").setup(0, budget=0.1, size=16, train_size=10, widths=[4, 8],
                                primary="normals", auxiliaries=["segmentation"])
    assert [t.name for t in setup.tasks] == ["normals", "segmentation"] and setup.tasks[0].is_primary
    images = {name: d.inputs.reshape(len(d.inputs), -1).numpy() for name, d in setup.datasets.items()}
    seen = set()
    for name, x in images.items():
        rows = {r.tobytes() for r in np.ascontiguousarray(x)}
        assert not rows & seen, f"split {name} repeats a scene of another split"
        seen |= rows
    outputs = setup.model(setup.datasets["train"].inputs[:2])
    assert outputs["normals"].shape == (2, 3, 16, 16) and outputs["segmentation"].shape == (2, 4, 16, 16)


@pytest.mark.parametrize(
    "make, output, target",
    [
        (depth_task, torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4) + 0.1),  # broadcasts to (2, 2, 4, 4)
        (depth_task, torch.rand(2, 1, 4, 4), torch.rand(2, 3, 4, 4) + 0.1),
        (normals_task, torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)),
        (normals_task, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 4)),
        (segmentation_task, torch.randn(2, 4, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long)),
        (segmentation_task, torch.randn(2, 4, 4, 4), torch.zeros(2, 4, 1, dtype=torch.long)),
    ],
)
def test_dense_shape_mismatches_are_refused_by_loss_and_metrics(make, output, target):
    task = make()
    with pytest.raises(TaskError, match=rf"task '{task.name}'.*\(2, .*\).*\(2, .*\)"):
        task.compute_loss(output, target)
    for metric in task.new_metrics().values():
        with pytest.raises(TaskError, match=r"\(2, .*\).*\(2, .*\)"):
            metric.update(output, target)


def test_depth_with_a_channel_dimension_on_both_sides_matches_the_hand_value():
    task = depth_task()
    output, target = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), 1.0)
    assert float(task.compute_loss(output, target)) == pytest.approx(2.0)
