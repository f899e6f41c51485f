"""MAOAL (Chen et al. 2022): a learned weight for every auxiliary loss in every module of the shared network.

The shared parameters are split into M modules. The meta-parameters w ∈ R^{(K-1) x M} (one row per
auxiliary task, initialized to 1) enter the lower step through relu(w): a shared parameter θ_j of
module m(j) receives

    g_j = ∂ℓ_0/∂θ_j + s · Σ_k relu(w_{k, m(j)}) ∂ℓ_k/∂θ_j,

and every head its own loss's gradient. That takes the K per-task gradients (one backward each, no
second-order graph). Every ``meta_every`` steps w moves to lower the primary loss on the ``aux``
split: its gradient goes through the best-response approximation of M_lb = ``look_back`` unrolled
lower steps of size η (the model's learning rate),

    dL_V/dw ≈ −η g_Vᵀ Σ_{τ < M_lb} (I − η H)^τ ∂g/∂w,

i.e. the shared :func:`auxilia.hypergrad.hypergradient` with ``terms = M_lb − 1``,
``scale_by_step=True`` and the module-weighted direction g as ``train_grads`` (it is not the
gradient of one scalar). The vector v = η Σ_τ (I − ηH)^τ g_V comes from the shared
:func:`auxilia.hypergrad.neumann_vector`; the mixed derivative needs no backward pass, since
∂g_j/∂w_{k,m(j)} = s·1[w > 0]·∂ℓ_k/∂θ_j is already at hand: the meta step makes K + M_lb autograd
calls (K graph-building per-task gradients, g_V, M_lb − 1 Hessian-vector products), one fewer
than the generic routine. Only this meta step builds a second-order graph. The upper optimizer (Adam or SGD with
momentum) is written out here so that its state lives in buffers: w and the optimizer state travel
in ``state_dict`` and load with ``torch.load(weights_only=True)``. w is a buffer, not a parameter,
so the model's optimizer never trains it.

The module map (``modules``):

* ``"children"`` (default): the top-level children of the shared network. Shared parameter names
  are stripped of their longest common dotted prefix (``encoder.``) and grouped by the next
  component (``conv1`` .. ``conv4``);
* ``"parameter"``: one module per shared parameter tensor (the paper's Parameter-L variant);
* a mapping from parameter names, or dotted prefixes of them, to module names (longest prefix
  wins); every shared parameter must be covered.

Names come from :meth:`MAOAL.attach_model` (the Trainer calls it with the model and its shared
parameters before training; a hand-written loop calls it once) or :meth:`MAOAL.attach` with
``(name, tensor)`` pairs. ``"parameter"`` needs no names and binds itself on the first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..gradients import as_parameter_list, jacobian, other_parameters, write_gradient
from ..hypergrad import neumann_vector
from ..tasks import NonFiniteLossError, Task
from .base import MetaContext, Method, check_meta_source
from .registry import register

__all__ = ["MAOAL", "module_map", "plot_module_weights", "read_module_weights"]

ModuleSpec = str | Mapping[str, str]


def _common_prefix(names: Sequence[str]) -> list[str]:
    """The longest dotted prefix shared by all names that still leaves each name one component."""
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for column in zip(*[p[:-1] for p in parts]):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return prefix


def module_map(names: Sequence[str], modules: ModuleSpec = "children") -> list[str]:
    """The module name of each parameter name under ``modules`` (see the module docstring).

    >>> module_map(["encoder.conv1.0.weight", "encoder.conv1.0.bias", "encoder.conv2.0.weight"])
    ['conv1', 'conv1', 'conv2']
    """
    names = list(names)
    if not names:
        raise ValueError("maoal: no shared parameters to split into modules")
    if isinstance(modules, str):
        if modules == "parameter":
            return list(names)
        if modules != "children":
            raise ValueError(
                f"maoal: modules must be 'children', 'parameter' or a mapping from parameter names to "
                f"module names, got {modules!r}"
            )
        depth = len(_common_prefix(names))
        return [n.split(".")[depth] for n in names]
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError(f"maoal: modules must be 'children', 'parameter' or a non-empty mapping, got {modules!r}")
    for key, value in modules.items():
        if not isinstance(key, str) or not isinstance(value, str) or not value:
            raise ValueError(f"maoal: the module map must map parameter names to module names, got {key!r}: {value!r}")
    out, used = [], set()
    for name in names:
        matches = [k for k in modules if name == k or name.startswith(k + ".")]
        if not matches:
            raise ValueError(
                f"maoal: shared parameter {name!r} is in no module of the module map; map it (or a dotted "
                f"prefix of it) to a module. Mapped: {sorted(modules)}"
            )
        key = max(matches, key=len)
        used.add(key)
        out.append(modules[key])
    unused = sorted(set(modules) - used)
    if unused:
        raise ValueError(
            f"maoal: module-map entry {unused[0]!r} matches no shared parameter (misspelled?); shared "
            f"parameters are {names}"
        )
    return out


@register("maoal")
class MAOAL(Method):
    """Module-aware auxiliary weights learned by bilevel optimization (see the module docstring).

    Hyperparameters: ``modules`` (the module map), ``scale`` (s), ``meta_every`` (T), ``look_back``
    (M_lb), ``upper`` (``"adam"`` or ``"sgd"``), ``upper_lr``, ``upper_momentum`` (SGD only),
    ``init`` (initial w), ``meta_source`` (``"aux"``, the held-out split, or ``"train"``), ``mode``
    (``"loop"`` or ``"batched"`` per-task gradients), ``chunk_size``.
    """

    def __init__(
        self,
        tasks: Iterable[Task | str],
        primary: str | None = None,
        modules: ModuleSpec = "children",
        scale: float = 1.0,
        meta_every: int = 20,
        look_back: int = 3,
        upper: str = "adam",
        upper_lr: float = 1e-2,
        upper_momentum: float = 0.9,
        init: float = 1.0,
        meta_source: str = "aux",
        mode: str = "loop",
        chunk_size: int | None = None,
    ):
        super().__init__(tasks, primary)
        if self.num_tasks < 2:
            raise ValueError(f"{self.name}: needs at least one auxiliary task; tasks are {self.task_names}")
        if isinstance(modules, str):
            module_map(["probe"], modules)  # validates the keyword
        elif not isinstance(modules, Mapping) or not modules:
            raise ValueError(f"{self.name}: modules must be 'children', 'parameter' or a non-empty mapping, got {modules!r}")
        for label, value in (("scale", scale), ("upper_lr", upper_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{self.name}: {label} must be finite and > 0, got {value!r}")
        for label, value in (("meta_every", meta_every), ("look_back", look_back)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {label} must be a positive integer, got {value!r}")
        if upper not in ("adam", "sgd"):
            raise ValueError(f"{self.name}: upper must be 'adam' or 'sgd', got {upper!r}")
        if not 0 <= upper_momentum < 1:
            raise ValueError(f"{self.name}: upper_momentum must be in [0, 1), got {upper_momentum}")
        if not math.isfinite(init):
            raise ValueError(f"{self.name}: init must be finite, got {init}")
        check_meta_source(meta_source, self.name)
        if mode not in ("loop", "batched"):
            raise ValueError(f"{self.name}: mode must be 'loop' or 'batched' (per-module weights need parameter gradients), got {mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{self.name}: chunk_size must be a positive integer, got {chunk_size}")
        self.modules_spec = modules if isinstance(modules, str) else dict(modules)
        self.scale, self.meta_every, self.look_back = float(scale), meta_every, look_back
        self.upper, self.upper_lr, self.upper_momentum = upper, float(upper_lr), float(upper_momentum)
        self.init, self.meta_source, self.mode, self.chunk_size = float(init), meta_source, mode, chunk_size
        self.betas, self.eps = (0.9, 0.999), 1e-8
        A = self.num_tasks - 1
        # shapes are set by attach(); a checkpoint of an attached method restores them
        self.register_buffer("w", torch.empty(A, 0))
        self.register_buffer("module_of", torch.empty(0, dtype=torch.long))
        self.register_buffer("upper_m", torch.empty(A, 0))
        self.register_buffer("upper_v", torch.empty(A, 0))
        self.register_buffer("upper_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_meta_grad_norm", torch.zeros(()))
        self.module_names: list[str] = []
        self._bound: list[Tensor] = []  # the shared tensors the map was built for, in order

    # ------------------------------------------------------------------ module map
    @property
    def num_modules(self) -> int:
        return self.w.shape[1]

    def attach_model(self, model: nn.Module, shared_parameters: Iterable[Tensor] | None = None) -> MAOAL:
        """Build the module map from ``model``'s parameter names. ``shared_parameters`` default to
        ``model.shared_parameters()`` (else every parameter)."""
        if shared_parameters is None:
            shared_parameters = model.shared_parameters() if hasattr(model, "shared_parameters") else model.parameters()
        shared = as_parameter_list(shared_parameters)
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(shared) if id(p) not in names]
        if missing:
            raise ValueError(f"{self.name}: shared parameter #{missing[0]} (shape {tuple(shared[missing[0]].shape)}) is not a parameter of the model")
        return self.attach([(names[id(p)], p) for p in shared])

    def attach(self, named_parameters: Iterable[tuple[str, Tensor]]) -> MAOAL:
        """Build the module map from ``(name, tensor)`` pairs of the shared parameters, in the order
        ``backward`` will receive them. Keeps w when the map is unchanged (e.g. after loading a
        checkpoint); a different map after training has started is an error."""
        pairs = list(named_parameters)
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate shared parameter names in {names}")
        per_parameter = module_map(names, self.modules_spec)
        module_names = list(dict.fromkeys(per_parameter))
        index = torch.tensor([module_names.index(m) for m in per_parameter], dtype=torch.long)
        device = pairs[0][1].device
        dtype = torch.float64 if pairs[0][1].dtype == torch.float64 else torch.float32
        same = self.num_modules == len(module_names) and torch.equal(self.module_of.cpu(), index)
        if not same:
            if int(self.steps) > 0 or int(self.upper_steps) > 0:
                raise ValueError(
                    f"{self.name}: the module map changed after training started ({self.num_modules} modules "
                    f"before, {len(module_names)} now: {module_names})"
                )
            A, M = self.num_tasks - 1, len(module_names)
            self.w = torch.full((A, M), self.init, device=device, dtype=dtype)
            self.upper_m = torch.zeros(A, M, device=device, dtype=dtype)
            self.upper_v = torch.zeros(A, M, device=device, dtype=dtype)
            self.module_of = index.to(device)
        self.module_names = module_names
        self._bound = [p for _, p in pairs]
        return self

    def _check_bound(self, shared: Sequence[Tensor]) -> list[int]:
        """The module of each of ``shared`` (the attached tensors; frozen ones may be left out)."""
        if not self._bound:
            if self.modules_spec == "parameter":
                self.attach([(f"param{i}", p) for i, p in enumerate(shared)])
            elif self.num_modules > 0 and len(self.module_of) == len(shared):
                # restored from a checkpoint without attach: the map is in ``module_of``, the names are not
                self._bound = list(shared)
                self.module_names = [f"module{m}" for m in range(self.num_modules)]
            else:
                raise ValueError(
                    f"{self.name}: the module map is unknown; call method.attach_model(model) (the Trainer "
                    f"does) or method.attach(named_shared_parameters), or use modules='parameter'"
                )
        expected = [id(p) for p in self._bound if p.requires_grad]
        if [id(p) for p in shared if p.requires_grad] != expected:
            raise ValueError(
                f"{self.name}: the shared parameters differ from those the module map was built for "
                f"({len(self._bound)} tensors attached, {len(shared)} given); call attach again"
            )
        module_of = dict(zip((id(p) for p in self._bound), self.module_of.tolist()))
        return [module_of[id(p)] for p in shared]

    def coefficients(self) -> Tensor:
        """(K, M) weights applied per task and module: 1 for the primary, s·relu(w) for the rest."""
        ones = torch.ones(1, self.num_modules, dtype=self.w.dtype, device=self.w.device)
        return torch.cat([ones, self.scale * torch.relu(self.w)])

    # ------------------------------------------------------------------ lower step
    def aggregate(self, G: Tensor, sizes: Sequence[int], modules: Sequence[int] | None = None) -> Tensor:
        """(K, P) Jacobian on the shared tensors (``sizes`` numels) -> (P,) direction; ``modules`` is
        each tensor's module (default: all attached tensors, in attach order)."""
        if G.dim() != 2 or G.shape[0] != self.num_tasks:
            raise ValueError(f"{self.name}: expected a ({self.num_tasks}, P) matrix for tasks {self.task_names}, got {tuple(G.shape)}")
        modules = self.module_of.tolist() if modules is None else list(modules)
        if len(sizes) != len(modules) or sum(sizes) != G.shape[1]:
            raise ValueError(f"{self.name}: {len(sizes)} tensors of {sum(sizes)} entries do not match the module map ({len(modules)} tensors) or G ({G.shape[1]} columns)")
        C = self.coefficients().to(G.dtype)
        out = G.new_empty(G.shape[1])
        for piece, rows, m in zip(torch.split(out, list(sizes)), torch.split(G, list(sizes), dim=1), modules):
            torch.mv(rows.T, C[:, m], out=piece)
        return out

    def _backward(self, losses, shared, heads, representation):
        modules = self._check_bound(shared)
        sizes = [p.numel() for p in shared]
        width = sum(sizes)
        full = distributed.average(jacobian(losses, [*shared, *heads], self.mode, self.chunk_size, retain_graph=False))
        direction = self.aggregate(full[:, :width], sizes, modules)
        head_gradient = full[:, width:].sum(dim=0)
        if not bool(torch.isfinite(direction.sum() + head_gradient.sum())):
            rows = torch.isfinite(full).all(dim=1)
            bad = self.task_names[int((~rows).nonzero()[0])] if not bool(rows.all()) else "combined"
            raise NonFiniteLossError(bad, f"{self.name}: the gradient of task {bad!r} is not finite")
        if heads:
            write_gradient(head_gradient, heads)
        write_gradient(direction, shared)
        return {"weights": self.weights(), "module_weights": self.module_weights()}

    # ------------------------------------------------------------------ meta step
    def meta_due(self) -> bool:
        return int(self.steps) > 0 and int(self.steps) % self.meta_every == 0

    def meta_gradient(self, context: MetaContext) -> tuple[Tensor, dict[str, Any]]:
        """dL_V/dw at the current parameters through the look-back approximation (no state changes).

        The forward passes run with the math attention kernel: the fused CPU/CUDA attention kernels
        have no double backward, which the Hessian-vector products need."""
        with sdpa_kernel([SDPBackend.MATH]):
            return self._meta_gradient(context)

    def _meta_gradient(self, context: MetaContext) -> tuple[Tensor, dict[str, Any]]:
        shared = as_parameter_list(context.shared)
        modules = self._check_bound(shared)
        train = self.tasks.ordered(context.losses(context.train_batch()))
        heads = list(context.heads) or other_parameters(train, shared)
        params = [*shared, *heads]
        active = [p for p in params if p.requires_grad]
        index = {id(p): i for i, p in enumerate(active)}
        C = self.coefficients().detach()
        per_task = [torch.autograd.grad(loss, active, create_graph=True, allow_unused=True) for loss in train]
        # the lower-step direction g(θ) with the graph kept for Hessian-vector products
        train_grads: list[Tensor | None] = []
        for j, p in enumerate(params):
            pieces = [(k, g[index[id(p)]]) for k, g in enumerate(per_task)] if id(p) in index else []
            pieces = [(k, g) for k, g in pieces if g is not None]
            if not pieces:
                train_grads.append(None)
            elif j < len(shared):
                train_grads.append(sum(C[k, modules[j]].to(g.dtype) * g for k, g in pieces))
            else:
                train_grads.append(sum(g for _, g in pieces))
        val_batch = context.validation_batch(self.meta_source, self.name)
        val_loss = self.tasks.ordered(context.losses(val_batch))[0]
        found = distributed.average_all(torch.autograd.grad(val_loss, active, allow_unused=True))
        g_val = [torch.zeros_like(p) if id(p) not in index or found[index[id(p)]] is None else found[index[id(p)]] for p in params]
        v, hvps = neumann_vector(train_grads, params, g_val, self.look_back - 1, context.learning_rate, scale_by_step=True)
        # the mixed derivative in closed form: ∂g_j/∂w_{k,m(j)} = s·1[w > 0]·∂ℓ_k/∂θ_j, so
        # ∂(gᵀv)/∂w_{k,m} = s·1[w_{k,m} > 0]·Σ_{j in m} ∂ℓ_k/∂θ_jᵀ v_j (no further backward pass)
        mixed = torch.zeros(self.num_tasks, self.num_modules, dtype=torch.float64, device=self.w.device)
        for j, p in enumerate(shared):
            if id(p) not in index:
                continue
            for k, g in enumerate(per_task):
                if k > 0 and g[index[id(p)]] is not None:
                    mixed[k, modules[j]] += (g[index[id(p)]].detach().double() * v[j].double()).sum()
        mixed = distributed.average(mixed)  # each process dotted its own per-task gradients with v
        grad = -(self.scale * (self.w > 0).double() * mixed[1:]).to(self.w.dtype)
        info = {"val_loss": float(distributed.average(val_loss.detach())), "backward_calls": float(len(train) + 1 + hvps)}
        return grad, info

    def _upper_step(self, grad: Tensor) -> None:
        """One step of the upper optimizer on w (same update rules as torch.optim.Adam / SGD)."""
        self.upper_steps += 1
        if self.upper == "adam":
            b1, b2 = self.betas
            t = int(self.upper_steps)
            self.upper_m.mul_(b1).add_(grad, alpha=1 - b1)
            self.upper_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (self.upper_v / (1 - b2**t)).sqrt().add_(self.eps)
            self.w.addcdiv_(self.upper_m, denom, value=-self.upper_lr / (1 - b1**t))
        else:
            if int(self.upper_steps) == 1:
                self.upper_m.copy_(grad)
            else:
                self.upper_m.mul_(self.upper_momentum).add_(grad)
            self.w.add_(self.upper_m, alpha=-self.upper_lr)

    def meta_step(self, context: MetaContext) -> dict[str, Any]:
        if not context.learning_rate > 0:
            # a lower step of size 0 does not depend on w: the look-back gradient is exactly zero
            return {"skipped": 1.0}
        with self.restored_on_failure():
            grad, info = self.meta_gradient(context)
            if not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(f"{self.name}: the gradient of the module weights is not finite")
            self._upper_step(grad.to(self.w.dtype))
            self.last_meta_grad_norm = grad.norm().to(self.last_meta_grad_norm)
        return {**info, "grad_norm": float(self.last_meta_grad_norm), "module_weights": self.module_weights()}

    # ------------------------------------------------------------------ reporting
    def weights(self) -> dict[str, float]:
        """The primary's 1 and, per auxiliary task, s · the mean of relu(w) over modules."""
        if self.num_modules == 0:
            return {name: 1.0 for name in self.task_names}
        values = self.coefficients().mean(dim=1)
        return self._as_dict(values)

    def module_weights(self) -> dict[str, dict[str, float]]:
        """relu(w) · s per auxiliary task and module: ``{task: {module: weight}}``."""
        C = self.coefficients()[1:].detach().cpu().tolist()
        names = self.module_names or [f"module{m}" for m in range(self.num_modules)]
        return {task: dict(zip(names, row)) for task, row in zip(self.task_names[1:], C)}

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}, modules={self.module_names or self.modules_spec!r}, meta_every={self.meta_every}, look_back={self.look_back}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # an unattached method takes its shapes from the checkpoint; an attached one must match
        if self.num_modules == 0:
            for key in ("w", "module_of", "upper_m", "upper_v"):
                value = state_dict.get(prefix + key)
                if value is not None and value.shape != getattr(self, key).shape:
                    setattr(self, key, torch.empty_like(value, device=getattr(self, key).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


# ---------------------------------------------------------------------- module-importance figures
def read_module_weights(log_csv: str | Path) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """``{task: [(step, {module: weight}), ...]}`` from a run's ``log.csv``: the ``module_weights/``
    rows of ordinary steps, and at meta steps the ``meta/module_weights/`` rows (after the update)."""
    import csv

    series: dict[str, dict[int, dict[str, float]]] = {}
    after_meta: set[tuple[str, int, str]] = set()
    with Path(log_csv).open() as f:
        for row in csv.DictReader(f):
            name, step = row["name"], int(row["step"])
            meta = name.startswith("meta/module_weights/")
            if row["split"] != "train" or not (meta or name.startswith("module_weights/")):
                continue
            task, module = name.split("/")[-2:]
            if not meta and (task, step, module) in after_meta:
                continue
            if meta:
                after_meta.add((task, step, module))
            series.setdefault(task, {}).setdefault(step, {})[module] = float(row["value"])
    return {task: sorted(steps.items()) for task, steps in series.items()}


def plot_module_weights(log_csvs: Sequence[str | Path], path: str | Path, stages: int = 4, title: str = "") -> Path:
    """Each auxiliary loss's weight per module at the end of each of ``stages`` equal training
    stages (mean over the given runs, e.g. seeds), as grouped bars: one panel per auxiliary task."""
    from ..report import _pyplot, save_figure

    runs = [read_module_weights(p) for p in log_csvs]
    runs = [r for r in runs if r]
    if not runs:
        raise ValueError("no module_weights rows in the given logs (not a maoal run?)")
    plt = _pyplot()
    tasks = list(runs[0])
    modules = list(runs[0][tasks[0]][-1][1])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.9 * len(modules) + 2) * len(tasks), 3.2), squeeze=False)
    width = 0.8 / stages
    for ax, task in zip(axes.flat, tasks):
        for s in range(stages):
            values = []
            for run in runs:
                history = run[task]
                last = history[-1][0]
                end = last * (s + 1) / stages
                point = [h for step, h in history if step <= end] or [history[0][1]]
                values.append([point[-1].get(m, math.nan) for m in modules])
            mean = torch.tensor(values, dtype=torch.float64).nanmean(dim=0).tolist()
            ax.bar([i + (s - (stages - 1) / 2) * width for i in range(len(modules))], mean, width,
                   label=f"end of stage {s + 1}/{stages}")
        ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("s·relu(w)")
        ax.set_title(f"weight of {task!r} per module", fontsize=9)
    axes.flat[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
