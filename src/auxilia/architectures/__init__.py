"""Architecture methods: two-branch networks whose auxiliary branch helps the primary one through
fused layers, and the standalone primary network they export (Aux-G, Aux-NAS).

================================ =================================================================
two-branch network               :class:`AuxNAS` (``connections``: ``aux-nas``, ``aux-g-layer``,
                                 ``aux-g-stage``), :class:`SingleTaskNetwork`
fusion                           :class:`Layer`, :class:`Projection`, :class:`ChannelAffine`
λ schedule of the α penalty      :class:`PenaltySchedule`
converged α                      :func:`alpha_table`, :func:`alpha_summary`, :func:`plot_alpha`
backbones                        :func:`dense_chain_blocks`, :class:`TokenBlock`,
                                 :class:`PatchEmbed`, :func:`dense_architecture`
================================ =================================================================
"""

from .analysis import alpha_metrics, alpha_summary, alpha_table, plot_alpha, rows_from_metrics
from .auxnas import (
    AUXILIARY_TO_PRIMARY,
    CONNECTIONS,
    PRIMARY_TO_AUXILIARY,
    AuxNAS,
    Connection,
    PenaltySchedule,
    SingleTaskNetwork,
    plan_connections,
)
from .backbones import (
    ARCHITECTURES,
    PatchEmbed,
    TokenBlock,
    TokenDenseHead,
    dense_architecture,
    dense_chain_blocks,
)
from .fusion import ChannelAffine, Layer, Projection, split_block

__all__ = [
    "ARCHITECTURES",
    "AUXILIARY_TO_PRIMARY",
    "CONNECTIONS",
    "PRIMARY_TO_AUXILIARY",
    "AuxNAS",
    "ChannelAffine",
    "Connection",
    "Layer",
    "PatchEmbed",
    "PenaltySchedule",
    "Projection",
    "SingleTaskNetwork",
    "TokenBlock",
    "TokenDenseHead",
    "alpha_metrics",
    "alpha_summary",
    "alpha_table",
    "dense_architecture",
    "dense_chain_blocks",
    "plan_connections",
    "plot_alpha",
    "rows_from_metrics",
    "split_block",
]
