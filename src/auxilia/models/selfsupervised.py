"""Image classification with self-supervised auxiliary tasks computed inside the model.

``rotation``: each image is also seen rotated by 90, 180 and 270 degrees and a head predicts the
rotation of all four views (the 0-degree view is the primary task's input). ``colour``: the dataset
stores, next to each image, a copy with its colour channels permuted (one of 6 permutations, the
label); a head predicts the permutation. All views go through the encoder in one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..data.cifar import rotations
from .multitask import MultiTaskModel

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """uint8 (or [0, 1] float) images -> standardized float."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return (x - self.mean) / self.std


class SelfSupervisedViews(MultiTaskModel):
    """Heads: the primary classifier under ``primary``, and optionally ``rotation`` and ``colour``.

    Inputs are (B, 3, H, W) images, or (B, 2, 3, H, W) image pairs (original, channel-permuted) when
    a ``colour`` head is present. Images are standardized by ``normalize`` (default: CIFAR-10
    statistics, uint8 or [0, 1] inputs) before the encoder.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], primary: str, normalize: nn.Module | None = None):
        super().__init__(encoder, heads)
        if primary not in self.heads:
            raise ValueError(f"primary task {primary!r} has no head; heads: {list(self.heads)}")
        # outside the encoder, so that the encoder's top-level children are the backbone's stages
        self.normalize = normalize if normalize is not None else Normalize()
        self.primary = primary
        self.rotation = "rotation" in heads
        self.colour = "colour" in heads
        tied = {id(p) for p in self.normalize.parameters()} & {id(p) for p in self.heads.parameters()}
        if tied:
            raise ValueError("normalize shares parameters with a head; shared and task parameters must be disjoint")

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's and, when it learns any, ``normalize``'s: every view goes through both."""
        encoder = super().shared_parameters()
        seen = {id(p) for p in encoder}
        return encoder + [p for p in self.normalize.parameters() if p.requires_grad and id(p) not in seen]

    def forward_with_representation(self, x: Tensor):
        permuted = None
        if x.dim() == 5:
            x, permuted = x[:, 0], x[:, 1]
        B = x.shape[0]
        views = [rotations(x) if self.rotation else x]
        if self.colour:
            if permuted is None:
                raise ValueError("the colour task needs (B, 2, 3, H, W) inputs: original and permuted images")
            views.append(permuted)
        representation = self.encoder(self.normalize(torch.cat(views)))
        outputs = {self.primary: self.heads[self.primary](representation[:B])}
        if self.rotation:
            logits = self.heads["rotation"](representation[: 4 * B])  # (4B, 4), view k in block k
            outputs["rotation"] = logits.view(4, B, 4).permute(1, 2, 0)  # (B, classes, views)
        if self.colour:
            start = 4 * B if self.rotation else B
            outputs["colour"] = self.heads["colour"](representation[start:])
        return representation, outputs
