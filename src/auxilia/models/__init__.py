"""Models: the multi-task contract and the backbones the experiments use.

============================= ===============================================================
contract                      :class:`MultiTaskModel` (``encoder`` + ``heads``)
Multi-MNIST                   :func:`lenet_encoder`, :func:`lenet_head`
CIFAR                         :func:`maoal_convnet`, :func:`resnet18_cifar`, :class:`SelfSupervisedViews`
recommendation                :class:`AutoInt`, :func:`autoint_encoder`
tabular                       :func:`mlp_encoder`, :func:`mlp_head`
dense prediction              :class:`DenseEncoderDecoder`, :class:`SegmentationHead`,
                              :class:`DepthHead`, :class:`NormalsHead`, :func:`dense_model`
============================= ===============================================================
"""

from .backbones import (
    AutoInt,
    BasicBlock,
    FieldEmbedding,
    SelfAttentionBlock,
    Squeeze,
    autoint_encoder,
    lenet_encoder,
    lenet_head,
    maoal_convnet,
    mlp_encoder,
    mlp_head,
    resnet18_cifar,
)
from .dense import (
    DenseEncoderDecoder,
    DepthHead,
    NormalsHead,
    PixelHead,
    SegmentationHead,
    dense_model,
)
from .multitask import MultiTaskModel
from .selfsupervised import Normalize, SelfSupervisedViews

__all__ = [
    "AutoInt",
    "BasicBlock",
    "DenseEncoderDecoder",
    "DepthHead",
    "FieldEmbedding",
    "MultiTaskModel",
    "Normalize",
    "NormalsHead",
    "PixelHead",
    "SegmentationHead",
    "SelfAttentionBlock",
    "SelfSupervisedViews",
    "Squeeze",
    "autoint_encoder",
    "dense_model",
    "lenet_encoder",
    "lenet_head",
    "maoal_convnet",
    "mlp_encoder",
    "mlp_head",
    "resnet18_cifar",
]
