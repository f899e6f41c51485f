"""Backbones of the experiments.

Encoders are built from named top-level children, each holding parameters, so that module-level
methods (MAOAL's per-module weights, Aux-NAS's per-layer fusion) can map parameters to modules by
child name: LeNet ``conv1, conv2, fc``; MAOAL's ConvNet ``conv1 .. conv4``; ResNet-18 ``stem,
stage1 .. stage4``; :class:`AutoInt` ``embedding, blocks, head``; MLP ``layer1 ..``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def lenet_encoder() -> nn.Sequential:
    """The Multi-MNIST encoder of MGDA / Nash-MTL: two 5x5 convolutions (10 and 20 channels, each
    max-pooled) and a 50-unit layer; (B, 1, 28, 28) -> (B, 50)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU()),
        conv2=nn.Sequential(nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU()),
        fc=nn.Sequential(nn.Flatten(), nn.Linear(320, 50), nn.ReLU()),
    ))


def lenet_head(classes: int = 10) -> nn.Sequential:
    """The matching task head: 50 -> 50 -> ``classes``."""
    return nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, classes))


def maoal_convnet(channels: int = 32, in_channels: int = 3) -> nn.Sequential:
    """MAOAL's CIFAR ConvNet: 4 x (Conv3x3-BN-ReLU), 32 channels, max-pool after the 2nd and 4th;
    four children ``conv1 .. conv4``, the last one ending in the flatten (output channels x 8 x 8
    for 32 x 32 inputs)."""

    def block(cin: int, pool: bool, flatten: bool = False) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        if flatten:
            layers.append(nn.Flatten())
        return nn.Sequential(*layers)

    return nn.Sequential(OrderedDict(
        conv1=block(in_channels, False), conv2=block(channels, True),
        conv3=block(channels, False), conv4=block(channels, True, flatten=True),
    ))


def mlp_encoder(in_features: int, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0) -> nn.Sequential:
    """Tabular encoder: children ``layer1 ..``, each Linear-ReLU (then Dropout if ``dropout``);
    output ``hidden[-1]`` features."""
    if not hidden:
        raise ValueError("an MLP encoder needs at least one hidden layer")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_features
    for i, h in enumerate(hidden):
        parts: list[nn.Module] = [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            parts.append(nn.Dropout(dropout))
        layers[f"layer{i + 1}"] = nn.Sequential(*parts)
        width = h
    return nn.Sequential(layers)


class SelfAttentionBlock(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention over fields with a residual
    projection, ReLU; (B, F, dim) -> (B, F, dim), or (B, F * dim) with ``flatten=True``."""

    def __init__(self, dim: int, heads: int, flatten: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.residual = nn.Linear(dim, dim, bias=False)
        self.flatten = flatten

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        out = torch.relu(attended + self.residual(x))
        return out.flatten(1) if self.flatten else out


class FieldEmbedding(nn.Module):
    """One embedding table shared by all fields (indices already offset per field):
    (B, F) long -> (B, F, dim)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(self.embedding.weight, std=0.01)

    def forward(self, fields: Tensor) -> Tensor:
        return self.embedding(fields)


def autoint_encoder(num_embeddings: int, dim: int = 16, blocks: int = 4, heads: int = 4) -> nn.Sequential:
    """AutoInt's embedding and attention blocks without the MLP: children ``embedding, block1 ..``,
    output the flattened field representation (B, F * dim). :class:`AutoInt` adds the MLP head."""
    if blocks < 1:
        raise ValueError("AutoInt needs at least one attention block")
    layers: OrderedDict[str, nn.Module] = OrderedDict(embedding=FieldEmbedding(num_embeddings, dim))
    for i in range(blocks):
        layers[f"block{i + 1}"] = SelfAttentionBlock(dim, heads, flatten=i == blocks - 1)
    return nn.Sequential(layers)


class AutoInt(nn.Module):
    """AutoInt (Song et al. 2019) as configured in MAOAL: field embeddings of size ``dim`` (16),
    ``blocks`` (4) multi-head self-attention blocks of ``heads`` (4) heads with residual
    connections, and an MLP ``head`` (16, 16) on the flattened field representation.

    Children ``embedding``, ``blocks``, ``head``; (B, num_fields) long -> (B, hidden[-1]). Put the
    output layer (e.g. ``nn.Linear(16, 1)``) in the task heads of a :class:`MultiTaskModel`.
    """

    def __init__(
        self,
        num_embeddings: int,
        num_fields: int,
        dim: int = 16,
        blocks: int = 4,
        heads: int = 4,
        hidden: tuple[int, ...] = (16, 16),
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} heads")
        self.num_fields = num_fields
        self.embedding = FieldEmbedding(num_embeddings, dim)
        self.blocks = nn.Sequential(*[SelfAttentionBlock(dim, heads) for _ in range(blocks)])
        layers: list[nn.Module] = [nn.Flatten()]
        width = num_fields * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        self.head = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, fields: Tensor) -> Tensor:
        if fields.dim() != 2 or fields.shape[1] != self.num_fields:
            raise ValueError(f"AutoInt expects (batch, {self.num_fields}) field indices, got {tuple(fields.shape)}")
        return self.head(self.blocks(self.embedding(fields)))


def mlp_head(in_features: int, out_features: int, hidden: int = 16) -> nn.Sequential:
    """A two-layer head: ``in_features`` -> ``hidden`` -> ``out_features``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class Squeeze(nn.Module):
    """Drops the last dimension of a (N, 1) regression output."""

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_cifar(in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """ResNet-18 for 32 x 32 inputs (3x3 stem, no max-pool; He et al. 2016, CIFAR variant):
    children ``stem, stage1 .. stage4`` of two basic blocks each, the last ending in global average
    pooling; output 8 * ``width`` (512) features."""

    def stage(cin: int, cout: int, stride: int, pool: bool = False) -> nn.Sequential:
        layers: list[nn.Module] = [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        if pool:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers)

    model = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
        stage1=stage(width, width, 1), stage2=stage(width, 2 * width, 2),
        stage3=stage(2 * width, 4 * width, 2), stage4=stage(4 * width, 8 * width, 2, pool=True),
    ))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model
