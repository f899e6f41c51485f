"""The pieces of a fused layer: a block's body, its closing norm and activation, and the projection.

A fused layer computes ``act(norm(x + project(concat_j α_j · y_j)))`` (Aux-NAS eqs. 13-14), where ``x``
is the branch's own block output and ``y_j`` the other branch's. For the two-branch network to start
as the two single-task networks *exactly*, the fusion's norm and activation are not added on top of a
block: they are the block's own closing norm and activation, split off it (``"split"``), so that with
the zero-initialised projection the layer is literally the original block. A block that does not end
in a norm (a transformer block ending in a residual sum, a bare conv) gets an identity-initialised
per-channel scale and shift instead (``"affine"``): two extra tensors, and only on layers that
receive connections.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureKind = Literal["conv", "token"]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.PReLU,
)


class ChannelAffine(nn.Module):
    """Per-channel ``x * scale + shift``, initialised to the identity (channels: dim 1 for ``conv``
    features (B, C, H, W), the last dim for ``token`` features (B, N, C))."""

    def __init__(self, channels: int, kind: FeatureKind = "conv"):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "conv":
            return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return x * self.weight + self.bias


class Layer(nn.Module):
    """One layer of a branch: ``act(norm(body(x)))``. Fusion inserts the cross-branch term between
    ``body`` and ``norm``; without it this is the original block."""

    def __init__(self, body: nn.Module, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.body = body
        self.norm = norm
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.body(x)))


def split_block(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """``(body, norm, act)`` when ``block`` is an ``nn.Sequential`` ending in a norm (optionally
    followed by an activation); ``None`` otherwise. The modules are the block's own (not copies)."""
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return None
    modules = list(block)
    if isinstance(modules[-1], ACTIVATIONS) and len(modules) >= 3 and isinstance(modules[-2], NORMS):
        return nn.Sequential(*modules[:-2]), modules[-2], modules[-1]
    if isinstance(modules[-1], NORMS):
        return nn.Sequential(*modules[:-1]), modules[-1], nn.Identity()
    return None


def output_channels(block: nn.Module) -> int | None:
    """The channel count a block most likely ends with: its last norm, conv or linear layer's width."""
    for module in reversed(list(block.modules())):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)):
            return int(module.num_features)
        if isinstance(module, nn.GroupNorm):
            return int(module.num_channels)
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            return int(module.out_channels)
        if isinstance(module, nn.Linear):
            return int(module.out_features)
    return None


def make_layer(block: nn.Module, channels: int, kind: FeatureKind, fused: bool, mode: str) -> Layer:
    """Wrap ``block`` as a :class:`Layer`; ``mode`` is ``"auto"`` (split when possible), ``"split"``
    (required) or ``"affine"``. Unfused layers in affine mode get no affine (no extra parameters)."""
    parts = split_block(block) if mode in ("auto", "split") else None
    if parts is None and mode == "split":
        raise ValueError(
            f"fusion_norm='split' needs every block to be an nn.Sequential ending in a norm (and optionally "
            f"an activation); got {type(block).__name__}"
        )
    if parts is not None:
        return Layer(*parts)
    return Layer(block, ChannelAffine(channels, kind) if fused else nn.Identity(), nn.Identity())


class Projection(nn.Module):
    """``concat_j α_j · y_j`` -> the target's channels: a zero-initialised 1x1 conv (``conv``) or
    linear map (``token``) without bias, so that at initialisation it adds exactly zero.

    Computed as Σ over source resolutions of resize(W_s · concat_{j at s} y_j) with α folded into
    the columns of W: the same linear map (1x1 convolution and bilinear resizing commute), with one
    resize per resolution instead of one per source and no scaled copy of each feature map.
    """

    def __init__(self, source_channels: list[int], out_channels: int, kind: FeatureKind):
        super().__init__()
        self.kind = kind
        self.source_channels = list(source_channels)
        in_channels = sum(self.source_channels)
        if kind == "conv":
            self.map: nn.Module = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.map = nn.Linear(in_channels, out_channels, bias=False)
        nn.init.zeros_(self.map.weight)

    def forward(self, sources: list[Tensor], weights: Tensor, like: Tensor) -> Tensor:
        if len(sources) != len(self.source_channels):
            raise ValueError(f"the projection expects {len(self.source_channels)} sources, got {len(sources)}")
        weight = self.map.weight
        columns = weight.split(self.source_channels, dim=1)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, y in enumerate(sources):
            if y.shape[1 if self.kind == "conv" else -1] != self.source_channels[k]:
                raise ValueError(f"source {k} has {tuple(y.shape)}; expected {self.source_channels[k]} channels")
            groups.setdefault(tuple(y.shape[2:]) if self.kind == "conv" else (), []).append(k)
        out: Tensor | None = None
        for members in groups.values():
            w = torch.cat([columns[k] * weights[k] for k in members], dim=1)
            if self.kind == "conv":
                z = F.conv2d(torch.cat([sources[k] for k in members], dim=1), w)
            else:
                z = F.linear(torch.cat([sources[k] for k in members], dim=-1), w)
            z = match(z, like, self.kind)
            out = z if out is None else out + z
        assert out is not None
        return out


def match(y: Tensor, like: Tensor, kind: FeatureKind) -> Tensor:
    """``y`` bilinearly resized to ``like``'s spatial size (conv features); token features must
    already have the same number of tokens."""
    if kind == "conv":
        if y.dim() != 4 or like.dim() != 4:
            raise ValueError(f"conv fusion expects (B, C, H, W) features, got {tuple(y.shape)} and {tuple(like.shape)}")
        if y.shape[-2:] != like.shape[-2:]:
            y = F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)
        return y
    if y.shape[:-1] != like.shape[:-1]:
        raise ValueError(f"token fusion needs features of the same (B, N) shape, got {tuple(y.shape)} and {tuple(like.shape)}")
    return y
