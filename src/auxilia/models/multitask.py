"""The model contract the Trainer and the methods use: a shared encoder and one head per task."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """``encoder`` maps inputs to a representation; ``heads[name]`` maps it to task ``name``'s output.

    Shared parameters are the encoder's, task parameters the heads'; methods working in
    ``representation`` mode get the encoder's output from :meth:`forward_with_representation`.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("a MultiTaskModel needs at least one head")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    def forward_with_representation(self, x) -> tuple[Tensor, dict[str, Tensor]]:
        representation = self.encoder(x)
        return representation, {name: head(representation) for name, head in self.heads.items()}

    def forward(self, x) -> dict[str, Tensor]:
        return self.forward_with_representation(x)[1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]
