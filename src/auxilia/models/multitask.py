"""The model contract the Trainer and the methods use: a shared encoder and one head per task."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """``encoder`` maps inputs to a representation; ``heads[name]`` maps it to task ``name``'s output.

    * ``forward(x)`` -> ``{task: output}``;
    * ``forward_with_representation(x)`` -> ``(representation, {task: output})``, for methods
      working on gradients with respect to the representation;
    * ``shared_parameters()``: the encoder's trainable parameters; ``task_parameters()``: the
      heads'. Together they are every trainable parameter, with no overlap (a parameter tied between
      the encoder and a head is rejected at construction).

    >>> import torch
    >>> model = MultiTaskModel(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})
    >>> {k: tuple(v.shape) for k, v in model(torch.zeros(3, 4)).items()}
    {'a': (3, 2), 'b': (3, 1)}
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("a MultiTaskModel needs at least one head")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        shared = {id(p) for p in encoder.parameters()}
        for name, head in self.heads.items():
            if any(id(p) in shared for p in head.parameters()):
                raise ValueError(f"head {name!r} shares parameters with the encoder; shared and task parameters must be disjoint")

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward_with_representation(self, x) -> tuple[Tensor, dict[str, Tensor]]:
        representation = self.encoder(x)
        return representation, {name: head(representation) for name, head in self.heads.items()}

    def forward(self, x) -> dict[str, Tensor]:
        return self.forward_with_representation(x)[1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]
