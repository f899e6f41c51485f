"""Dense prediction: a small encoder-decoder shared by all tasks and per-task pixel heads.

The encoder-decoder is U-Net-shaped: ``down1 .. downN`` (two Conv3x3-BN-ReLU each, a 2x2 max-pool
before every stage but the first) and ``up{N-1} .. up1`` (bilinear upsampling to the skip's size,
concatenation with the skip, two Conv3x3-BN-ReLU). Its output, the shared representation, is a
full-resolution feature map (B, widths[0], H, W); any input size works.

Heads map that map to one output per pixel: :class:`SegmentationHead` (class logits),
:class:`DepthHead` (1 channel), :class:`NormalsHead` (3 channels, unit length).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .multitask import MultiTaskModel


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.convs = nn.Sequential(*conv_bn_relu(cin + cskip, cout), *conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class DenseEncoderDecoder(nn.Module):
    """(B, in_channels, H, W) -> (B, widths[0], H, W). Children ``down1 .. downN``,
    ``up{N-1} .. up1`` in the order they run, so module-level methods can address each stage."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if len(widths) < 2:
            raise ValueError("an encoder-decoder needs at least two widths (one downsampling)")
        self.widths = tuple(widths)
        self.out_channels = widths[0]
        cin = in_channels
        for i, w in enumerate(widths):
            layers = ([nn.MaxPool2d(2)] if i else []) + conv_bn_relu(cin, w) + conv_bn_relu(w, w)
            self.add_module(f"down{i + 1}", nn.Sequential(*layers))
            cin = w
        for i in reversed(range(len(widths) - 1)):
            self.add_module(f"up{i + 1}", _Up(cin, widths[i], widths[i]))
            cin = widths[i]

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 2 ** (len(self.widths) - 1):
            raise ValueError(f"inputs of size {tuple(x.shape[-2:])} are too small for {len(self.widths) - 1} poolings")
        skips = []
        for i in range(len(self.widths)):
            x = getattr(self, f"down{i + 1}")(x)
            skips.append(x)
        for i in reversed(range(len(self.widths) - 1)):
            x = getattr(self, f"up{i + 1}")(x, skips[i])
        return x


class PixelHead(nn.Module):
    """Conv3x3-BN-ReLU then a 1x1 convolution to ``out_channels``: one prediction per pixel."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        self.features = nn.Sequential(*conv_bn_relu(in_channels, hidden))
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


class SegmentationHead(PixelHead):
    """Per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = None):
        super().__init__(in_channels, num_classes, hidden)


class DepthHead(PixelHead):
    """Per-pixel depth (B, 1, H, W); ``positive=True`` passes it through a softplus."""

    def __init__(self, in_channels: int, hidden: int | None = None, positive: bool = False):
        super().__init__(in_channels, 1, hidden)
        self.positive = positive

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return F.softplus(out) if self.positive else out


class NormalsHead(PixelHead):
    """Per-pixel unit surface normals (B, 3, H, W)."""

    def __init__(self, in_channels: int, hidden: int | None = None):
        super().__init__(in_channels, 3, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(super().forward(x), dim=1, eps=1e-6)


def dense_model(
    num_classes: int,
    tasks: Sequence[str] = ("segmentation", "depth", "normals"),
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128),
) -> MultiTaskModel:
    """A :class:`MultiTaskModel` for dense prediction: a :class:`DenseEncoderDecoder` and one
    pixel head per task (``segmentation``: ``num_classes`` logits, ``depth``: 1 channel,
    ``normals``: 3 unit channels)."""
    encoder = DenseEncoderDecoder(in_channels, widths)
    makers = {
        "segmentation": lambda: SegmentationHead(encoder.out_channels, num_classes),
        "depth": lambda: DepthHead(encoder.out_channels),
        "normals": lambda: NormalsHead(encoder.out_channels),
    }
    unknown = [t for t in tasks if t not in makers]
    if unknown:
        raise ValueError(f"no pixel head for task {unknown[0]!r}; known: {list(makers)}")
    return MultiTaskModel(encoder, {t: makers[t]() for t in tasks})
