"""Learned auxiliary labels (AuxiLearn): a generator network invents the auxiliary task.

For a primary classification task with C classes, the generator maps each sample to a soft label
over C·ψ sub-classes with all of its mass on the ψ sub-classes of the sample's *true* class
(:func:`masked_softmax`). The primary network gets a C·ψ-way auxiliary head trained on these soft
labels; the generator is a meta-parameter, updated by the ``auxilearn`` method's hypergradient so that
the auxiliary task it defines lowers the primary loss on held-out data.

Wiring, with any backbone:

* :class:`LabelGenerator` (``backbone`` -> features -> C·ψ logits) and the primary network
  (``encoder`` -> primary head and auxiliary head) live in one :class:`LearnedAuxiliaryModel`. Its
  auxiliary output stacks the auxiliary head's logits with the generator's logits, (B, 2, C·ψ),
  and the auxiliary task's loss (:func:`learned_label_task`) masks the generator's logits with the
  target (the primary label) and takes the soft cross-entropy. The data therefore needs no
  generated targets: both tasks' targets are the primary labels.
* The generator's parameters never require grad outside a meta step, so no model optimizer trains
  them; ``auxilearn`` (``label_generator=model.generator``) turns them on for its meta step only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import Task, TaskError


def masked_softmax(logits: Tensor, labels: Tensor, num_classes: int, psi: int) -> Tensor:
    """Soft labels (B, C·ψ): a softmax over the ψ sub-classes of each sample's class, exact zeros
    elsewhere. Sub-class j of class c is column c·ψ + j."""
    if logits.dim() != 2 or logits.shape[1] != num_classes * psi:
        raise ValueError(
            f"masked_softmax: expected logits of shape (B, {num_classes * psi}) for {num_classes} classes "
            f"x psi={psi}, got {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"masked_softmax: expected labels of shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    labels = labels.long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"masked_softmax: labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    grouped = logits.view(-1, num_classes, psi)
    own = grouped[torch.arange(len(labels), device=logits.device), labels]  # (B, ψ)
    soft = torch.softmax(own, dim=1)
    out = torch.zeros_like(grouped)
    out[torch.arange(len(labels), device=logits.device), labels] = soft
    return out.view(-1, num_classes * psi)


class LearnedLabelLoss:
    """Per-sample soft cross-entropy of the auxiliary head against the generator's masked labels.

    ``output`` is (B, 2, C·ψ): auxiliary-head logits, then generator logits; ``target`` the primary
    labels (B,).
    """

    def __init__(self, num_classes: int, psi: int):
        self.num_classes, self.psi = num_classes, psi

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        width = self.num_classes * self.psi
        if output.dim() != 3 or output.shape[1:] != (2, width):
            raise ValueError(
                f"expected (B, 2, {width}) outputs (auxiliary logits, generator logits), got {tuple(output.shape)}"
            )
        labels = masked_softmax(output[:, 1], target, self.num_classes, self.psi)
        return -(labels * F.log_softmax(output[:, 0], dim=1)).sum(dim=1)

    def __repr__(self) -> str:
        return f"LearnedLabelLoss(num_classes={self.num_classes}, psi={self.psi})"


def learned_label_task(name: str, num_classes: int, psi: int = 5) -> Task:
    """The auxiliary task whose labels the generator produces (its target is the primary label)."""
    _check(num_classes, psi)
    return Task(name, LearnedLabelLoss(num_classes, psi), "auxiliary")


def _check(num_classes: int, psi: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(psi, int) or psi < 1:
        raise ValueError(f"psi must be a positive integer, got {psi!r}")


class LabelGenerator(nn.Module):
    """``backbone`` (inputs -> (B, features)) followed by a linear layer to C·ψ logits.

    ``forward(x)`` gives the logits; ``labels(x, y)`` the masked soft labels.
    """

    def __init__(self, backbone: nn.Module, features: int, num_classes: int, psi: int = 5):
        super().__init__()
        _check(num_classes, psi)
        self.backbone = backbone
        self.head = nn.Linear(features, num_classes * psi)
        self.num_classes, self.psi = num_classes, psi

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def labels(self, x: Tensor, y: Tensor) -> Tensor:
        return masked_softmax(self(x), y, self.num_classes, self.psi)


def small_cnn(in_channels: int = 3, width: int = 16) -> tuple[nn.Module, int]:
    """A cheap default generator backbone for images: two conv layers and global average pooling."""
    body = nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        conv2=nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU()),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ))
    return body, 2 * width


def small_mlp(in_features: int, hidden: int = 64) -> tuple[nn.Module, int]:
    """A cheap default generator backbone for flat inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU()), hidden


class LearnedAuxiliaryModel(nn.Module):
    """Primary network (``encoder`` + primary head + C·ψ auxiliary head) and the label generator.

    ``forward(x)`` -> ``{primary: (B, C) logits, auxiliary: (B, 2, C·ψ)}``; ``shared_parameters``
    are the encoder's, ``task_parameters`` the two heads'; the generator is neither (it is frozen
    outside meta steps). ``normalize`` (optional) is applied to the inputs of both networks.
    :meth:`primary_network` is the deployable single-task model.
    """

    def __init__(
        self,
        encoder: nn.Module,
        width: int,
        num_classes: int,
        generator: LabelGenerator,
        primary: str = "label",
        auxiliary: str = "learned",
        normalize: nn.Module | None = None,
    ):
        super().__init__()
        if generator.num_classes != num_classes:
            raise ValueError(f"the generator has {generator.num_classes} classes, the primary task {num_classes}")
        if primary == auxiliary:
            raise TaskError(f"the primary and auxiliary tasks need different names, both are {primary!r}")
        self.encoder = encoder
        self.heads = nn.ModuleDict({primary: nn.Linear(width, num_classes), auxiliary: nn.Linear(width, num_classes * generator.psi)})
        self.generator = generator
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.primary, self.auxiliary = primary, auxiliary
        shared = {id(p) for p in encoder.parameters()}
        if any(id(p) in shared for p in generator.parameters()):
            raise ValueError("the generator shares parameters with the encoder; they must be separate networks")
        generator.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.normalize(x)
        representation = self.encoder(x)
        aux_logits = self.heads[self.auxiliary](representation)
        generated = self.generator(x)
        return {
            self.primary: self.heads[self.primary](representation),
            self.auxiliary: torch.stack([aux_logits, generated.to(aux_logits.dtype)], dim=1),
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def primary_network(self) -> nn.Module:
        """The model to deploy: normalization, encoder and primary head (no generator, no auxiliary head)."""
        return nn.Sequential(self.normalize, self.encoder, self.heads[self.primary])
