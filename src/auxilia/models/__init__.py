"""Models: the multi-task contract and the backbones the experiments use."""

from .backbones import (
    FieldEmbedding,
    SelfAttentionBlock,
    Squeeze,
    autoint_encoder,
    lenet_encoder,
    lenet_head,
    maoal_convnet,
    mlp_encoder,
    mlp_head,
)
from .multitask import MultiTaskModel

__all__ = [
    "FieldEmbedding",
    "MultiTaskModel",
    "SelfAttentionBlock",
    "Squeeze",
    "autoint_encoder",
    "lenet_encoder",
    "lenet_head",
    "maoal_convnet",
    "mlp_encoder",
    "mlp_head",
]
