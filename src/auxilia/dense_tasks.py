"""Tasks for dense (per-pixel) prediction: semantic segmentation, depth and surface normals.

The losses and metrics are the ones NYUv2-style experiments report (MTAN, AuxiLearn, Nash-MTL,
Aux-NAS): pixel-wise cross-entropy with mIoU and pixel accuracy; L1 depth with absolute and
relative error; cosine normal loss with the mean angle error and the fraction of pixels within
11.25°. Pixels without a label (segmentation ``-1``, depth ``0``, a zero normal) count in neither
the loss nor the metrics. Targets have the output's shape (depth (B, 1, H, W), normals
(B, 3, H, W)) or, for segmentation, its shape without the class dimension (B, H, W); any other
shape is refused rather than broadcast. Losses are returned per pixel, so methods that weigh pixels (AuxiLearn's
convolutional combiner) receive them unreduced from :meth:`Task.per_sample_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import Role, Task, TaskError, check_target_shape

IGNORE_INDEX = -1


def _valid_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Per-sample mean over the valid pixels (0 where an image has none)."""
    values = (values * valid).reshape(len(values), -1).sum(dim=1)
    return values / valid.reshape(len(valid), -1).sum(dim=1).clamp(min=1)


def _check_indices(what: str, output: Tensor, target: Tensor) -> None:
    """Segmentation metrics count class indices: (B, C, ...) logits against (B, ...) integer labels."""
    check_target_shape(what, output, target, "class_dim")
    if target.is_floating_point():
        raise TaskError(f"{what}: expected integer class labels, got a {target.dtype} target of shape {tuple(target.shape)}")


def segmentation_loss(output: Tensor, target: Tensor) -> Tensor:
    """(B, C, H, W) logits, (B, H, W) labels -> (B, H, W) cross-entropy, 0 on unlabelled pixels."""
    return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="none")


def depth_valid(target: Tensor) -> Tensor:
    return (target > 0).to(target.dtype)


def depth_loss(output: Tensor, target: Tensor) -> Tensor:
    """L1 on pixels with a measured depth; (B, 1, H, W)."""
    return (output - target).abs() * depth_valid(target)


def normals_valid(target: Tensor) -> Tensor:
    return (target.abs().sum(dim=1, keepdim=True) > 0).to(target.dtype)


def normals_loss(output: Tensor, target: Tensor) -> Tensor:
    """1 − cos(angle) between predicted and true unit normals; (B, 1, H, W)."""
    cosine = F.cosine_similarity(output, target, dim=1, eps=1e-8).unsqueeze(1)
    return (1 - cosine) * normals_valid(target)


class MeanIoU:
    """Mean intersection over union across classes from a confusion matrix accumulated over the
    split (the standard definition, not a mean of per-image IoUs). Classes absent from both the
    labels and the predictions are left out of the mean."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.confusion: Tensor | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        _check_indices("miou", output, target)
        classes = output.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(classes, classes, dtype=torch.long)
        prediction = output.argmax(dim=1).reshape(-1).cpu()
        truth = target.reshape(-1).cpu()
        keep = truth != IGNORE_INDEX
        index = truth[keep] * classes + prediction[keep]
        self.confusion += torch.bincount(index, minlength=classes * classes).reshape(classes, classes)

    def compute(self) -> float:
        if self.confusion is None:
            return math.nan
        confusion = self.confusion.double()
        intersection = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        present = union > 0
        return float((intersection[present] / union[present]).mean()) if bool(present.any()) else math.nan


def pixel_accuracy(output: Tensor, target: Tensor) -> Tensor:
    _check_indices("pixel_accuracy", output, target)
    valid = (target != IGNORE_INDEX).float()
    return _valid_mean((output.argmax(dim=1) == target).float(), valid)


def depth_absolute_error(output: Tensor, target: Tensor) -> Tensor:
    check_target_shape("depth abs_err", output, target, "same")
    valid = depth_valid(target)
    return _valid_mean((output - target).abs(), valid)


def depth_relative_error(output: Tensor, target: Tensor) -> Tensor:
    check_target_shape("depth rel_err", output, target, "same")
    valid = depth_valid(target)
    return _valid_mean((output - target).abs() / target.clamp(min=1e-6), valid)


def _angles(output: Tensor, target: Tensor) -> Tensor:
    check_target_shape("normals angle", output, target, "same")
    cosine = F.cosine_similarity(output, target, dim=1, eps=1e-8).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cosine)).unsqueeze(1)


def normals_angle_error(output: Tensor, target: Tensor) -> Tensor:
    return _valid_mean(_angles(output, target), normals_valid(target))


def normals_within_11(output: Tensor, target: Tensor) -> Tensor:
    return _valid_mean((_angles(output, target) < 11.25).float(), normals_valid(target))


def segmentation_task(name: str = "segmentation", role: Role = "auxiliary") -> Task:
    """Headline metric mIoU (higher is better), then pixel accuracy."""
    metrics = {"miou": MeanIoU, "pixel_accuracy": pixel_accuracy}
    return Task(name, segmentation_loss, role, metrics, higher_is_better=True, target_shape="class_dim")


def depth_task(name: str = "depth", role: Role = "auxiliary") -> Task:
    """Headline metric absolute error (lower is better), then relative error."""
    metrics = {"abs_err": depth_absolute_error, "rel_err": depth_relative_error}
    return Task(name, depth_loss, role, metrics, target_shape="same")


def normals_task(name: str = "normals", role: Role = "auxiliary") -> Task:
    """Headline metric mean angle error in degrees (lower is better), then the share within 11.25°."""
    metrics = {"angle_err": normals_angle_error, "within_11.25": normals_within_11}
    return Task(name, normals_loss, role, metrics, target_shape="same")


DENSE_TASKS = {"segmentation": segmentation_task, "depth": depth_task, "normals": normals_task}

__all__ = [
    "DENSE_TASKS",
    "MeanIoU",
    "depth_task",
    "normals_task",
    "segmentation_task",
]
