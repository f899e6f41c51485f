"""Aux-G and Aux-NAS: auxiliary help through the architecture, at single-task inference cost.

Two (or more) branches, each a full single-task network (a chain of blocks and a head), exchange
features through fused layers (see :mod:`.fusion`). Connections run from layer ``j`` of one branch
into layer ``i`` of another with ``i - window <= j <= i``; the feature a connection carries is the
source block's output *before* its own fusion, so connections with ``j = i`` are well defined.

* ``aux-g-layer`` / ``aux-g-stage``: primary -> auxiliary connections only (into every layer, or only
  into the last layer of each stage, from stage ends). The auxiliary branch reads primary features, so
  auxiliary gradients shape the primary branch, which runs alone at inference.
* ``aux-nas``: connections both ways, each scaled by α = sigmoid(logit) (initialised to 0.5). An L1
  penalty λ·Σ α^{aux→prim}, λ ramped up by a :class:`PenaltySchedule`, drives the auxiliary -> primary
  weights to zero; :meth:`AuxNAS.cut` then removes them for good and :meth:`AuxNAS.export_primary`
  returns the primary branch alone.

α is trained by the model itself (first-order, Adam with its moments in buffers) on every second
batch of each epoch: the Trainer calls :meth:`AuxNAS.own_step` generically and leaves
:meth:`AuxNAS.own_parameters` out of its optimizer, so the network weights and α are updated
alternately on two disjoint halves of each epoch's data, and any optimization method combines with
it for the weight steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import distributed
from ..tasks import NonFiniteLossError
from .fusion import ChannelAffine, FeatureKind, Layer, Projection, make_layer, output_channels

CONNECTIONS = ("aux-nas", "aux-g-layer", "aux-g-stage")
PRIMARY_TO_AUXILIARY = "primary->auxiliary"
AUXILIARY_TO_PRIMARY = "auxiliary->primary"


@dataclass(frozen=True)
class Connection:
    """Layer ``source_layer`` of branch ``source`` feeds the fusion of layer ``target_layer`` of ``target``."""

    source: str
    source_layer: int
    target: str
    target_layer: int
    direction: str

    @property
    def name(self) -> str:
        return f"{self.source}.{self.source_layer}->{self.target}.{self.target_layer}"


@dataclass(frozen=True)
class PenaltySchedule:
    """λ(progress): 0 until ``start``, linear to ``peak`` at ``end``, then held (progress in [0, 1]).

    ``official()`` is the official code's (0 until 50%, 1000 at 80%); ``paper()`` the paper's linear
    0 -> 100 over the whole run; ``constant(v)`` a fixed λ.
    """

    peak: float = 1000.0
    start: float = 0.5
    end: float = 0.8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.peak) and self.peak >= 0):
            raise ValueError(f"penalty peak must be finite and >= 0, got {self.peak}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"penalty schedule needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}")

    @classmethod
    def official(cls) -> PenaltySchedule:
        return cls(1000.0, 0.5, 0.8)

    @classmethod
    def paper(cls) -> PenaltySchedule:
        return cls(100.0, 0.0, 1.0)

    @classmethod
    def constant(cls, value: float) -> PenaltySchedule:
        return cls(float(value), 0.0, 0.0)

    def __call__(self, progress: float) -> float:
        if progress >= self.end:
            return self.peak
        if progress < self.start:
            return 0.0
        return self.peak * (progress - self.start) / (self.end - self.start)


def penalty_schedule(value: str | float | Mapping[str, float] | PenaltySchedule) -> PenaltySchedule:
    if isinstance(value, PenaltySchedule):
        return value
    if isinstance(value, str):
        presets = {"official": PenaltySchedule.official, "paper": PenaltySchedule.paper}
        if value not in presets:
            raise ValueError(f"unknown penalty schedule {value!r}; use 'official', 'paper', a number or a PenaltySchedule")
        return presets[value]()
    if isinstance(value, (int, float)):
        return PenaltySchedule.constant(float(value))
    if isinstance(value, Mapping):  # e.g. from a JSON option: {"peak": 1000, "start": 0.1, "end": 0.4}
        unknown = sorted(set(value) - {"peak", "start", "end"})
        if unknown:
            raise ValueError(f"penalty schedule has no field {unknown[0]!r}; fields are peak, start, end")
        return PenaltySchedule(**{k: float(v) for k, v in value.items()})
    raise TypeError(f"penalty must be a name, a number, a mapping or a PenaltySchedule, got {type(value).__name__}")


def plan_connections(
    kind: str, primary: str, auxiliaries: Sequence[str], layers: int, window: int, stage_ends: Sequence[int]
) -> list[Connection]:
    """Every connection of ``kind``; only between the primary and each auxiliary branch."""
    ends = set(stage_ends)
    out = []
    for aux in auxiliaries:
        for i in range(layers):
            if kind == "aux-g-stage" and i not in ends:
                continue
            for j in range(max(0, i - window), i + 1):
                if kind == "aux-g-stage" and j not in ends:
                    continue
                out.append(Connection(primary, j, aux, i, PRIMARY_TO_AUXILIARY))
                if kind == "aux-nas":
                    out.append(Connection(aux, j, primary, i, AUXILIARY_TO_PRIMARY))
    return out


class SingleTaskNetwork(nn.Module):
    """A chain of :class:`~.fusion.Layer` and a head: one branch of :class:`AuxNAS`, the single-task
    network it starts from, and what :meth:`AuxNAS.export_primary` returns. Same state-dict layout in
    all three roles, so checkpoints move between them."""

    def __init__(self, layers: Sequence[Layer], head: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    @classmethod
    def from_blocks(
        cls, blocks: Sequence[nn.Module], head: nn.Module, *, features: FeatureKind = "conv",
        fusion_norm: str = "auto", channels: Sequence[int] | None = None,
    ) -> SingleTaskNetwork:
        """The single-task network of ``blocks`` and ``head``, laid out as an :class:`AuxNAS` branch
        built with the same ``fusion_norm`` (train it, then :meth:`AuxNAS.load_branch` its state)."""
        widths = _channels("single-task", list(blocks), channels)
        return cls([make_layer(b, c, features, False, fusion_norm) for b, c in zip(blocks, widths)], head)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _channels(task: str, blocks: list[nn.Module], given: Sequence[int] | None) -> list[int]:
    if given is not None:
        widths = [int(c) for c in given]
        if len(widths) != len(blocks):
            raise ValueError(f"branch {task!r}: {len(widths)} channel counts given for {len(blocks)} blocks")
        return widths
    widths = []
    for i, block in enumerate(blocks):
        c = output_channels(block)
        if c is None:
            raise ValueError(f"branch {task!r}: cannot tell how many channels block {i} ({type(block).__name__}) "
                             "outputs; pass channels={task: [...]}")
        widths.append(c)
    return widths


class AuxNAS(nn.Module):
    """Two-branch (or multi-branch) network for a primary task and its auxiliaries.

    ``primary_blocks``: the primary branch's blocks (each maps a feature to the next);
    ``auxiliary_blocks``: a sequence of blocks (one auxiliary task, named ``auxiliary``) or a mapping
    task -> blocks (several); ``auxiliary_head`` likewise a module or a mapping task -> head. Every
    branch has the same number of blocks. ``stages``: the number of blocks in each stage (for
    ``aux-g-stage``; default one stage per block). ``features``: ``"conv"`` for (B, C, H, W) features
    (1x1 conv, bilinear resizing) or ``"token"`` for (B, N, C) (linear map). ``fusion_norm``: see
    :mod:`.fusion`. ``penalty``: the λ schedule of the L1 penalty on α^{aux→prim}. ``arch_lr``,
    ``arch_betas``: Adam for α. ``architecture_loss``: what α minimises besides the penalty, the sum
    of every task's loss (``"sum"``) or the primary loss (``"primary"``). With ``eval_exported``, the
    primary output in eval mode is the exported network's (auxiliary -> primary connections dropped),
    so that model selection and test metrics measure the model that is deployed.
    """

    def __init__(
        self,
        primary_blocks: Sequence[nn.Module],
        auxiliary_blocks: Sequence[nn.Module] | Mapping[str, Sequence[nn.Module]],
        primary_head: nn.Module,
        auxiliary_head: nn.Module | Mapping[str, nn.Module],
        connections: str = "aux-nas",
        window: int = 3,
        stages: Sequence[int] | None = None,
        *,
        primary: str = "primary",
        auxiliary: str = "auxiliary",
        features: FeatureKind = "conv",
        fusion_norm: Literal["auto", "split", "affine"] = "auto",
        channels: Mapping[str, Sequence[int]] | None = None,
        init_alpha: float = 0.5,
        penalty: str | float | Mapping[str, float] | PenaltySchedule = "official",
        arch_lr: float = 1e-2,
        arch_betas: tuple[float, float] = (0.9, 0.999),
        architecture_loss: Literal["sum", "primary"] = "sum",
        eval_exported: bool = True,
    ):
        super().__init__()
        if connections not in CONNECTIONS:
            raise ValueError(f"unknown connections {connections!r}; choose one of {CONNECTIONS}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (connections from layers i-window..i), got {window!r}")
        if features not in ("conv", "token"):
            raise ValueError(f"features must be 'conv' or 'token', got {features!r}")
        if fusion_norm not in ("auto", "split", "affine"):
            raise ValueError(f"fusion_norm must be 'auto', 'split' or 'affine', got {fusion_norm!r}")
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must lie in (0, 1) (α is a sigmoid), got {init_alpha}")
        if not (arch_lr > 0 and math.isfinite(arch_lr)):
            raise ValueError(f"arch_lr must be positive, got {arch_lr}")
        if not all(0.0 <= b < 1.0 for b in arch_betas) or len(arch_betas) != 2:
            raise ValueError(f"arch_betas must be two numbers in [0, 1), got {arch_betas}")
        if architecture_loss not in ("sum", "primary"):
            raise ValueError(f"architecture_loss must be 'sum' or 'primary', got {architecture_loss!r}")
        aux_blocks = dict(auxiliary_blocks) if isinstance(auxiliary_blocks, Mapping) else {auxiliary: auxiliary_blocks}
        aux_heads = dict(auxiliary_head) if isinstance(auxiliary_head, Mapping) else {auxiliary: auxiliary_head}
        if not aux_blocks:
            raise ValueError("AuxNAS needs at least one auxiliary branch")
        if set(aux_blocks) != set(aux_heads):
            raise ValueError(f"auxiliary blocks are given for {sorted(aux_blocks)} but heads for {sorted(aux_heads)}")
        if primary in aux_blocks:
            raise ValueError(f"task {primary!r} is both the primary task and an auxiliary task")
        blocks = {primary: list(primary_blocks), **{k: list(v) for k, v in aux_blocks.items()}}
        for task in blocks:
            if not task or "." in task:
                raise ValueError(f"task name {task!r} must be non-empty and contain no '.'")
        depth = len(blocks[primary])
        if depth == 0:
            raise ValueError("the primary branch has no blocks")
        for task, branch in blocks.items():
            if len(branch) != depth:
                raise ValueError(
                    f"branch {task!r} has {len(branch)} blocks and the primary branch {depth}: connections pair "
                    "layer i with layer i, so every branch needs the same number of blocks"
                )
            for i, block in enumerate(branch):
                if not isinstance(block, nn.Module):
                    raise TypeError(f"branch {task!r}: block {i} is a {type(block).__name__}, not an nn.Module")
        heads = {primary: primary_head, **aux_heads}
        # a parameter in two branches, or in a block and a head, would be both shared and a task's
        owner: dict[int, str] = {}
        for task, branch in blocks.items():
            for part, modules in (("blocks", branch), ("head", [heads[task]])):
                where = f"branch {task!r} ({part})"
                for p in (p for module in modules for p in module.parameters()):
                    if owner.setdefault(id(p), where) != where:
                        raise ValueError(f"{owner[id(p)]} and {where} share parameters: give each branch its own "
                                         "blocks and head")
        if stages is None:
            stage_lengths = [1] * depth
        else:
            stage_lengths = [int(s) for s in stages]
            if any(s < 1 for s in stage_lengths) or sum(stage_lengths) != depth:
                raise ValueError(f"stages must be positive block counts summing to {depth}, got {list(stages)}")
        stage_ends = [sum(stage_lengths[: k + 1]) - 1 for k in range(len(stage_lengths))]
        channels = dict(channels or {})
        unknown = sorted(set(channels) - set(blocks))
        if unknown:
            raise ValueError(f"channels given for unknown branch {unknown[0]!r}; branches are {sorted(blocks)}")

        self.primary = primary
        self.auxiliaries = list(aux_blocks)
        self.connections_kind = connections
        self.window = window
        self.stages = stage_lengths
        self.features = features
        self.depth = depth
        self.schedule = penalty_schedule(penalty)
        self.arch_lr = float(arch_lr)
        self.arch_betas = (float(arch_betas[0]), float(arch_betas[1]))
        self.architecture_loss = architecture_loss
        self.eval_exported = eval_exported
        self.connections = plan_connections(connections, primary, self.auxiliaries, depth, window, stage_ends)
        self.incoming: dict[tuple[str, int], list[int]] = {}
        for index, c in enumerate(self.connections):
            self.incoming.setdefault((c.target, c.target_layer), []).append(index)

        widths = {task: _channels(task, blocks[task], channels.get(task)) for task in blocks}
        self.branches = nn.ModuleDict({
            task: SingleTaskNetwork(
                [make_layer(b, widths[task][i], features, (task, i) in self.incoming, fusion_norm)
                 for i, b in enumerate(blocks[task])],
                heads[task],
            )
            for task in blocks
        })
        self.projections = nn.ModuleDict({task: nn.ModuleDict() for task in blocks})
        for (task, i), indices in self.incoming.items():
            source_widths = [widths[self.connections[k].source][self.connections[k].source_layer] for k in indices]
            self.projections[task][str(i)] = Projection(source_widths, widths[task][i], features)

        n = len(self.connections)
        self.register_buffer("to_primary", torch.tensor([c.direction == AUXILIARY_TO_PRIMARY for c in self.connections], dtype=torch.bool))
        self.register_buffer("cut_mask", torch.zeros(n, dtype=torch.bool))
        if connections == "aux-nas":
            logit = math.log(init_alpha / (1.0 - init_alpha))
            self.alpha_logits: nn.Parameter | None = nn.Parameter(torch.full((n,), logit))
            self.register_buffer("arch_exp_avg", torch.zeros(n))
            self.register_buffer("arch_exp_avg_sq", torch.zeros(n))
            self.register_buffer("arch_steps", torch.zeros((), dtype=torch.long))
        else:
            self.register_parameter("alpha_logits", None)

    # ------------------------------------------------------------------ the model contract
    @property
    def tasks(self) -> list[str]:
        return [self.primary, *self.auxiliaries]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Branch layers and fusion projections: more than one task's loss reaches them."""
        params = [p for b in self.branches.values() for p in b.layers.parameters()]
        params += list(self.projections.parameters())
        return [p for p in params if p.requires_grad]

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.branches.values() for p in b.head.parameters() if p.requires_grad]

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The α logits (``aux-nas``); Aux-G has none (its connections are fixed, α = 1)."""
        return [self.alpha_logits] if self.alpha_logits is not None else []

    def own_parameters(self) -> list[nn.Parameter]:
        """Parameters the model trains itself in :meth:`own_step`; the Trainer's optimizer skips them.
        Frozen α (``requires_grad=False``) is not trained: then there are none."""
        return [p for p in self.architecture_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ α
    def dropped(self) -> Tensor:
        """Which connections contribute nothing now: the cut ones, and in eval mode with
        ``eval_exported`` every auxiliary -> primary one."""
        if self.eval_exported and not self.training:
            return self.cut_mask | self.to_primary
        return self.cut_mask

    def alpha(self) -> Tensor:
        """The (n,) connection weights in use: sigmoid(logits) (``aux-nas``) or 1 (Aux-G), 0 where dropped."""
        if self.alpha_logits is None:
            values = torch.ones(len(self.connections), device=self.cut_mask.device)
        else:
            values = torch.sigmoid(self.alpha_logits)
        return values.masked_fill(self.dropped(), 0.0)

    @torch.no_grad()
    def cut(self) -> AuxNAS:
        """Force every auxiliary -> primary weight to 0 for good (kept in ``state_dict``)."""
        self.cut_mask |= self.to_primary
        return self

    def penalty(self) -> Tensor:
        """‖α^{aux→prim}‖₁ over the connections not cut (α > 0, so the plain sum)."""
        if self.alpha_logits is None:
            return torch.zeros((), device=self.cut_mask.device)
        alive = self.to_primary & ~self.cut_mask
        return torch.sigmoid(self.alpha_logits)[alive].sum()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        weights = self.alpha()
        dropped = self.dropped().tolist()
        tasks = self.tasks
        h = {t: x for t in tasks}
        pre: dict[str, list[Tensor]] = {t: [] for t in tasks}
        for i in range(self.depth):
            for t in tasks:
                pre[t].append(self.branches[t].layers[i].body(h[t]))
            for t in tasks:
                layer = self.branches[t].layers[i]
                z = pre[t][i]
                incoming = self.incoming.get((t, i), [])
                if incoming and not all(dropped[k] for k in incoming):
                    sources = [pre[self.connections[k].source][self.connections[k].source_layer] for k in incoming]
                    z = z + self.projections[t][str(i)](sources, weights[incoming], z)
                h[t] = layer.act(layer.norm(z))
        return {t: self.branches[t].head(h[t]) for t in tasks}

    # ------------------------------------------------------------------ training α
    def own_step(self, losses: Mapping[str, Tensor], *, step: int, total_steps: int, batch_in_epoch: int) -> dict[str, Any] | None:
        """On every second batch of an epoch, one Adam step of α on this batch's losses plus
        λ(step/total_steps)·‖α^{aux→prim}‖₁ and return what was done; otherwise ``None`` (the
        batch is the weights'; every batch is when α is frozen or absent). Raises before touching
        any state if the gradient is not finite."""
        if not self.own_parameters() or batch_in_epoch % 2 == 0:
            return None
        lam = self.schedule(step / max(total_steps, 1))
        if self.architecture_loss == "primary":
            task_loss = losses[self.primary].mean()
        else:
            task_loss = torch.stack([losses[t].mean() for t in self.tasks]).sum()
        penalty = self.penalty()
        objective = task_loss + lam * penalty
        (grad,) = torch.autograd.grad(objective, [self.alpha_logits], allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(self.alpha_logits)
        grad = distributed.average(grad)  # the global batch's gradient (the penalty's part is the same everywhere)
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteLossError("architecture", "the gradient of the architecture weights is not finite")
        self._adam(grad.detach())
        return {"lambda": lam, "objective": float(objective.detach()), "penalty": float(penalty.detach())}

    @torch.no_grad()
    def _adam(self, grad: Tensor) -> None:
        """torch.optim.Adam's update (no weight decay), with its moments in buffers."""
        assert self.alpha_logits is not None
        beta1, beta2 = self.arch_betas
        self.arch_steps += 1
        t = int(self.arch_steps)
        self.arch_exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.arch_exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (self.arch_exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(1e-8)
        self.alpha_logits.addcdiv_(self.arch_exp_avg, denominator, value=-self.arch_lr / (1 - beta1**t))

    # ------------------------------------------------------------------ export and initialisation
    def export_primary(self) -> SingleTaskNetwork:
        """The primary network alone: no auxiliary branch, no cross connection, a copy sharing no
        module with this model. Equals the primary output after :meth:`cut`."""
        return copy.deepcopy(self.branches[self.primary])

    def load_branch(self, task: str, source: nn.Module | Mapping[str, Tensor] | str | Path) -> None:
        """Initialise branch ``task`` from a trained :class:`SingleTaskNetwork` (module, state dict or
        file) built from the same blocks. Only the fused layers' identity-initialised affines (when
        ``fusion_norm`` gave some) may be missing from it."""
        if task not in self.branches:
            raise ValueError(f"no branch {task!r}; branches are {self.tasks}")
        if isinstance(source, (str, Path)):
            state = torch.load(source, map_location="cpu", weights_only=True)
        elif isinstance(source, nn.Module):
            state = source.state_dict()
        else:
            state = dict(source)
        branch = self.branches[task]
        allowed = {k for k in branch.state_dict() if ".norm." in k and isinstance(_module_at(branch, k), ChannelAffine)}
        result = branch.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in allowed]
        if missing or result.unexpected_keys:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {list(result.unexpected_keys)[:3]}"
            raise ValueError(f"branch {task!r}: the checkpoint does not match its single-task network ({detail})")

    def extra_repr(self) -> str:
        return (f"connections={self.connections_kind!r}, window={self.window}, tasks={self.tasks}, "
                f"n_connections={len(self.connections)}")


def _module_at(root: nn.Module, key: str) -> nn.Module:
    return root.get_submodule(key.rsplit(".", 1)[0])

