"""Chain backbones for two-branch networks, and the dense-prediction models the experiments build.

A branch is a chain of blocks, so the dense backbone here is an encoder-decoder without skip
connections (each block a Conv3x3-BN-ReLU, max-pooling before each encoder stage but the first,
bilinear 2x upsampling before each decoder stage): every block ends in BN-ReLU, which the fusion
takes over. :class:`TokenBlock` is a pre-norm transformer block for (B, N, C) tokens, with
:class:`PatchEmbed` and :class:`TokenDenseHead` to use it on images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.dense import DepthHead, NormalsHead, SegmentationHead
from ..models.multitask import MultiTaskModel
from .auxnas import CONNECTIONS, AuxNAS


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def dense_chain_blocks(in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)) -> tuple[list[nn.Module], list[int]]:
    """``(blocks, stages)``: two blocks per stage, ``2 * len(widths) - 1`` stages; the output has
    ``widths[0]`` channels at the input's resolution (sizes divisible by ``2 ** (len(widths) - 1)``)."""
    if len(widths) < 2:
        raise ValueError("a chain encoder-decoder needs at least two widths")
    blocks: list[nn.Module] = []
    cin = in_channels
    for k, w in enumerate(widths):
        first = conv_bn_relu(cin, w)
        blocks += [nn.Sequential(nn.MaxPool2d(2), *first) if k else first, conv_bn_relu(w, w)]
        cin = w
    for w in reversed(widths[:-1]):
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        blocks += [nn.Sequential(up, *conv_bn_relu(cin, w)), conv_bn_relu(w, w)]
        cin = w
    return blocks, [2] * (2 * len(widths) - 1)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), dim) tokens with a learned position embedding for a fixed grid."""

    def __init__(self, in_channels: int, dim: int, patch: int, grid: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class TokenBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)); (B, N, dim) -> same."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokenDenseHead(nn.Module):
    """Tokens of a ``grid`` x ``grid`` patch grid -> a feature map upsampled ``patch`` times -> ``head``."""

    def __init__(self, dim: int, grid: int, patch: int, head: nn.Module):
        super().__init__()
        self.grid = grid
        self.patch = patch
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        x = F.interpolate(x, scale_factor=float(self.patch), mode="bilinear", align_corners=False)
        return self.head(x)


ARCHITECTURES = ("shared", *CONNECTIONS)


def _pixel_head(task: str, channels: int, num_classes: int) -> nn.Module:
    makers = {
        "segmentation": lambda: SegmentationHead(channels, num_classes),
        "depth": lambda: DepthHead(channels),
        "normals": lambda: NormalsHead(channels),
    }
    if task not in makers:
        raise ValueError(f"no pixel head for task {task!r}; known: {list(makers)}")
    return makers[task]()


def dense_architecture(
    arch: str,
    tasks: Sequence[str],
    num_classes: int,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64),
    backbone: str = "conv",
    image_size: int = 64,
    patch: int = 8,
    **auxnas_options,
) -> nn.Module:
    """A dense-prediction model for ``tasks`` (primary first) on a chain backbone.

    ``arch="shared"``: one chain shared by every task plus a pixel head each (Aux-Head; with the
    ``stl`` method, the single-task network). ``aux-g-stage``, ``aux-g-layer``, ``aux-nas``: one chain
    per task joined by :class:`AuxNAS` connections. ``backbone="token"``: a patch embedding and
    ``len(widths)`` transformer blocks of width ``widths[-1]`` instead of the conv chain.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if backbone not in ("conv", "token"):
        raise ValueError(f"backbone must be 'conv' or 'token', got {backbone!r}")
    tasks = list(tasks)
    if len(tasks) < 2 and arch != "shared":
        raise ValueError(f"{arch} needs a primary task and at least one auxiliary task, got {tasks}")

    def chain() -> tuple[list[nn.Module], list[int], int]:
        if backbone == "conv":
            blocks, stages = dense_chain_blocks(in_channels, widths)
            return blocks, stages, widths[0]
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        dim, grid = widths[-1], image_size // patch
        blocks = [PatchEmbed(in_channels, dim, patch, grid), *(TokenBlock(dim) for _ in widths)]
        return blocks, [1, len(widths)], dim

    def head(task: str, channels: int) -> nn.Module:
        pixel = _pixel_head(task, channels, num_classes)
        if backbone == "token":
            return TokenDenseHead(channels, image_size // patch, patch, pixel)
        return pixel

    if arch == "shared":
        blocks, _, channels = chain()
        return MultiTaskModel(nn.Sequential(*blocks), {t: head(t, channels) for t in tasks})
    branches = {t: chain() for t in tasks}
    primary, auxiliaries = tasks[0], tasks[1:]
    blocks, stages, channels = branches[primary]
    return AuxNAS(
        blocks, {t: branches[t][0] for t in auxiliaries}, head(primary, channels),
        {t: head(t, branches[t][2]) for t in auxiliaries}, connections=arch, stages=stages,
        primary=primary, features="token" if backbone == "token" else "conv", **auxnas_options,
    )
