"""Backbones of the experiments. Encoders are ``nn.Sequential``s of named top-level children, so that
module-level methods (MAOAL) can map parameters to modules by child name."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def lenet_encoder() -> nn.Sequential:
    """The Multi-MNIST encoder of MGDA / Nash-MTL: two 5x5 convolutions and a 50-unit layer."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU()),
        conv2=nn.Sequential(nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU()),
        fc=nn.Sequential(nn.Flatten(), nn.Linear(320, 50), nn.ReLU()),
    ))


def lenet_head(classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, classes))


def maoal_convnet(channels: int = 32, in_channels: int = 3) -> nn.Sequential:
    """MAOAL's CIFAR ConvNet: 4 x (Conv3x3-BN-ReLU), 32 channels, max-pool after the 2nd and 4th;
    output flattened (channels x 8 x 8 for 32 x 32 inputs)."""

    def block(cin: int, pool: bool) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers)

    return nn.Sequential(OrderedDict(
        conv1=block(in_channels, False), conv2=block(channels, True),
        conv3=block(channels, False), conv4=block(channels, True),
        flatten=nn.Flatten(),
    ))


def mlp_encoder(in_features: int, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0) -> nn.Sequential:
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
    """AutoInt's interacting layer: multi-head self-attention over fields with a residual projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.residual = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        return torch.relu(attended + self.residual(x))


class FieldEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(self.embedding.weight, std=0.01)

    def forward(self, fields: Tensor) -> Tensor:
        return self.embedding(fields)


def autoint_encoder(num_embeddings: int, dim: int = 16, blocks: int = 4, heads: int = 4) -> nn.Sequential:
    """AutoInt (Song et al. 2019) as in MAOAL: field embeddings of size 16 and 4 self-attention blocks
    of 4 heads; the output is the flattened field representation."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(embedding=FieldEmbedding(num_embeddings, dim))
    for i in range(blocks):
        layers[f"block{i + 1}"] = SelfAttentionBlock(dim, heads)
    layers["flatten"] = nn.Flatten()
    return nn.Sequential(layers)


def mlp_head(in_features: int, out_features: int, hidden: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class Squeeze(nn.Module):
    """Drops the last dimension of a (N, 1) regression output."""

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)
