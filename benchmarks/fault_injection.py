"""Fault injection: every registered method under bad inputs, extreme loss scales, non-finite
values and a kill/resume, each case classified as handled, crashed or silently wrong.

Categories (the model is a two-layer encoder, optionally with BatchNorm, and one linear head per
task: ``main`` (primary), ``agree`` (its gradient agrees with the primary one) and ``conflict`` (a
negated head, so that its gradient on the encoder opposes the primary one)):

* ``bad-input``: empty or exhausted ``shared_parameters``, a duplicated or frozen shared parameter,
  detached losses, a missing, unknown, non-tensor or non-scalar loss, targets of the wrong shape or
  batch size, a missing representation, a meta step without an ``aux`` split.
* ``scale``: losses multiplied by 1e-30 .. 1e30, all in common and each task alone. The update must
  be finite and equal, in float64 from independently computed per-task gradients G, to the one the
  method defines: ``cᵀG`` with the weights it reports; pcgrad-aux ``g₀ + Σ_k (g_k − min(g₀·g_k, 0)
  g₀/‖g₀‖²)`` (the primary component never reduced); gcs ``g₀ + Σ_{cos(g₀, g_k) > 0} g_k``; mgda a
  point of the simplex whose direction d meets the min-norm optimality condition g_k·d ≥ ‖d‖²;
  nash-mtl and auxinash α_k (Mα)_k = p_k on the Frobenius-normalized Gram matrix (relative residual
  below 1e-3). Meta steps at 1e-30 and 1e30 must leave the method's state finite.
* ``nonfinite``: a NaN or infinite loss, a finite loss with a NaN gradient, the same in a meta
  step, and a Trainer run (``nonfinite="skip"``) whose training set holds a NaN sample: the step on
  that batch changes no parameter, BatchNorm buffer or method state, and the run ends with finite
  metrics and buffers.
* ``resume``: a Trainer run with checkpoints is killed by SIGKILL in a subprocess and resumed; its
  final parameters, method state and ``log.csv`` must equal an uninterrupted run's. Corrupted,
  truncated, empty and foreign checkpoints, and one written under other run settings, must be
  refused with an error naming the file.

Classification:

* **handled**: the correct result, or a clear error (``ValueError``, ``TypeError``,
  ``FloatingPointError`` or ``RuntimeError``, subclasses included, raised by auxilia's own code:
  ``TaskError``, ``NonFiniteLossError``, ``CheckpointError``, ...) before any ``.grad``,
  parameter, buffer or method state changed (checked against a snapshot);
* **crashed**: any other exception (a raw torch ``RuntimeError``, an ``IndexError`` or ``KeyError``
  from internals, ...), or an error where the inputs were valid;
* **silently wrong**: no error but a wrong or non-finite result, or an error raised after the state
  had changed.

    python benchmarks/fault_injection.py                 # everything, writes benchmarks/results/fault_injection.{md,json}
    python benchmarks/fault_injection.py --quick --no-write --methods pcgrad-aux gcs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import auxilia
from auxilia import Task, methods
from auxilia.methods.base import GradientAggregation, LossWeighting, MetaContext, Method
from auxilia.training import Trainer, TrainerConfig
from auxilia.training.data import TaskDataset

HANDLED, CRASHED, SILENT = "handled", "crashed", "silently wrong"
CATEGORIES = ("bad-input", "scale", "nonfinite", "resume")
NAMES = ("main", "agree", "conflict")
SCALES = (1e-30, 1e-15, 1.0, 1e15, 1e30)
TASK_SCALES = (1e-30, 1e30)
QUICK_SCALES = (1e-30, 1.0, 1e30)
# meta steps every 2 steps, so that short runs take some
TRAINER_HP = {"auxilearn": {"meta_every": 2}, "auxinash": {"hypergrad_every": 2}, "maoal": {"meta_every": 2}}
PACKAGE = Path(auxilia.__file__).resolve().parent
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    category: str
    method: str
    case: str
    status: str
    detail: str


# ---------------------------------------------------------------------------------------------- setup
class Net(nn.Module):
    """Encoder shared by every task, one linear head per task; ``conflict``'s head is ``main``'s
    negated and ``agree``'s a copy, each perturbed, so that the encoder gradients of those tasks
    oppose or follow ``main``'s without being collinear with it (see :func:`fixture_cosines`)."""

    def __init__(self, batch_norm: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(4, 6)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(6))
        layers.append(nn.Tanh())
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(6, 1) for name in NAMES})
        with torch.no_grad():
            main = self.heads["main"]
            for name, sign in (("agree", 1.0), ("conflict", -1.0)):
                self.heads[name].weight.copy_(sign * main.weight + 0.4 * torch.randn_like(main.weight))
                self.heads[name].bias.copy_(sign * main.bias)

    def forward_with_representation(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        representation = self.encoder(x)
        return representation, {name: head(representation) for name, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_representation(x)[1]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def fixture_cosines() -> list[float]:
    """Cosine of each task's encoder gradient with the primary one on the standard batch."""
    model, method = build("equal")
    _, losses = compute_losses(model, method, make_data(8, 0))
    G = task_jacobian(losses, NAMES, model.shared_parameters())
    return ((G @ G[0]) / (G.norm(dim=1) * G[0].norm())).tolist()


def make_tasks() -> list[Task]:
    return [Task.regression("main", "primary"), Task.regression("agree"), Task.regression("conflict")]


def make_data(n: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Targets of shape (n, 1), the heads' shape; large enough (|y| > |output|) that ``conflict``
    pulls against ``main``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = 3 * (x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    return x, {"main": y, "agree": y + 0.1 * torch.randn(n, 1, generator=g), "conflict": y}


def build(name: str, batch_norm: bool = False, **hp: Any) -> tuple[Net, Method]:
    model = Net(batch_norm)
    method = methods.create(name, make_tasks(), **hp)
    attach = getattr(method, "attach_model", None)
    if callable(attach):
        attach(model, model.shared_parameters())
    return model, method


def compute_losses(model: Net, method: Method, batch, scales: dict[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    x, targets = batch
    representation, outputs = model.forward_with_representation(x)
    losses = {}
    for task in method.tasks:
        loss = task.compute_loss(outputs[task.name], targets[task.name], reduction=method.loss_reduction)
        losses[task.name] = loss * (scales or {}).get(task.name, 1.0)
    return representation, losses


def backward(model: Net, method: Method, losses, representation: Tensor | None, shared=None) -> Any:
    shared = model.shared_parameters() if shared is None else shared
    return method.backward(losses, shared, model.task_parameters(),
                           representation if method.needs_representation else None)


def has_meta_step(method: Method) -> bool:
    return type(method).meta_step is not Method.meta_step


def meta_context(model: Net, method: Method, losses: Callable | None = None, aux: bool = True) -> MetaContext:
    train, held_out = make_data(16, 1), make_data(16, 2)
    return MetaContext(
        losses=losses or (lambda batch: compute_losses(model, method, batch)[1]),
        train_batch=lambda: train, aux_batch=(lambda: held_out) if aux else None,
        shared=model.shared_parameters(), heads=model.task_parameters(), learning_rate=0.05,
    )


# ---------------------------------------------------------------------------------------------- checks
class Snapshot:
    """Every parameter, ``.grad``, buffer and state entry of some modules, to tell what a failing
    call changed."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.saved = [self._take(m) for m in modules]

    @staticmethod
    def _take(module: nn.Module) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        for name, p in module.named_parameters():
            out[f"param {name}"] = p.detach().clone()
            out[f"grad {name}"] = None if p.grad is None else p.grad.detach().clone()
        for name, value in module.state_dict().items():
            out[f"state {name}"] = value.detach().clone()
        return out

    def changed(self) -> list[str]:
        found = []
        for module, before in zip(self.modules, self.saved):
            after = self._take(module)
            for key in sorted(set(before) | set(after)):
                a, b = before.get(key), after.get(key)
                if a is None and b is None:
                    continue
                if a is None or b is None or a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
                    found.append(f"{type(module).__name__}: {key}")
        return found


def is_clear_error(error: BaseException) -> bool:
    """An error of an expected type raised by auxilia's own code."""
    if not isinstance(error, (ValueError, TypeError, FloatingPointError, RuntimeError)):
        return False
    if type(error).__module__.startswith("auxilia"):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


def describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def classify_error(error: BaseException, snapshot: Snapshot) -> tuple[str, str]:
    """Handled when the error is clear and nothing changed before it."""
    if not is_clear_error(error):
        return CRASHED, describe(error)
    changed = snapshot.changed()
    if changed:
        return SILENT, f"{describe(error)}; but it changed {', '.join(changed[:3])}"
    return HANDLED, describe(error)


def expect_error(call: Callable[[], Any], snapshot: Snapshot, accept: Callable[[Any], str | None] | None = None) -> tuple[str, str]:
    """Run a call that must fail clearly before changing anything; ``accept(result)`` (``None``
    when correct) allows a correct result instead."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 (classifying any exception is the point)
        return classify_error(error, snapshot)
    if accept is None:
        return SILENT, "no error"
    problem = accept(result)
    return (HANDLED, "correct result") if problem is None else (SILENT, f"no error, {problem}")


def flat_grads(parameters: Iterable[Tensor]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().reshape(-1) for p in parameters])


def all_grads(*modules: nn.Module) -> dict[str, Tensor | None]:
    return {f"{type(m).__name__}.{n}": (None if p.grad is None else p.grad.detach().double().clone())
            for m in modules for n, p in m.named_parameters()}


def same_grads(got: dict[str, Tensor | None], want: dict[str, Tensor | None], rtol: float = 1e-4) -> str | None:
    """``None`` when the two gradient sets agree (a missing gradient counts as zero)."""
    scale = max([float(g.abs().max()) for g in want.values() if g is not None and g.numel()] + [1e-300])
    for key, b in want.items():
        a = got.get(key)
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if not bool(torch.isfinite(a).all()):
            return f"gradient of {key} is not finite"
        if float((a - b).abs().max()) > rtol * scale:
            return f"gradient of {key} differs from the reference by {float((a - b).abs().max()):.3g} (scale {scale:.3g})"
    return None


def task_jacobian(losses: dict[str, Tensor], names: Sequence[str], shared: Sequence[Tensor]) -> Tensor:
    """(K, P) float64 per-task gradients on ``shared``, each from its own backward."""
    rows = []
    for name in names:
        loss = losses[name].mean()
        grads = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).double().reshape(-1) for g, p in zip(grads, shared)]))
    return torch.stack(rows)


def check_direction(method: Method, G: Tensor, d: Tensor, model: Net) -> str | None:
    """``None`` when the shared update ``d`` is the one the method defines for Jacobian ``G``."""
    if not bool(torch.isfinite(d).all()):
        return "the update is not finite"
    norms = G.norm(dim=1)

    def close(reference: Tensor, coefficients: Tensor, what: str) -> str | None:
        tol = 1e-4 * float((coefficients.abs() * norms).sum()) + 1e-300
        error = float((d - reference).norm())
        return None if error <= tol else f"update differs from {what} by {error:.3g} (tolerance {tol:.3g})"

    name = method.name
    if isinstance(method, LossWeighting):
        c = method.task_weights().double()
        return close(c @ G, c, "Σ w_k g_k with the reported weights")
    if name == "auxilearn":
        c = method.last_weights.double()
        return close(c @ G, c, "Σ w_k g_k with the combiner's weights")
    if name == "maoal":
        C = method.coefficients().double()
        sizes = [p.numel() for p in model.shared_parameters()]
        pieces = [C[:, int(m)] @ block for m, block in zip(method.module_of.tolist(), torch.split(G, sizes, dim=1))]
        return close(torch.cat(pieces), C.max(dim=1).values, "Σ_k C[k, module] g_k")
    if not isinstance(method, GradientAggregation):
        return None
    c = method.last_weights.double()
    if not bool(torch.isfinite(c).all()):
        return f"reported weights {c.tolist()} are not finite"
    problem = close(c @ G, c, "Σ c_k g_k with the reported coefficients")
    if problem:
        return problem
    g0 = G[0]
    if name == "pcgrad-aux":
        dots = G[1:] @ g0
        ref = torch.ones(len(G), dtype=torch.float64)
        if float(g0 @ g0) > 0:
            ref[0] -= float(torch.clamp(dots, max=0).sum()) / float(g0 @ g0)
        return close(ref @ G, ref, "g₀ + Σ aux projected off g₀ where they conflict")
    if name == "gcs" and not method.weighted:
        cosine = (G[1:] @ g0) / (norms[1:] * norms[0]).clamp(min=1e-300)
        ref = torch.cat([torch.ones(1, dtype=torch.float64), (cosine > 0).double()])
        return close(ref @ G, ref, "g₀ + the auxiliary gradients of positive cosine")
    if name == "mgda":
        if float(c.min()) < -1e-9 or abs(float(c.sum()) - 1) > 1e-6:
            return f"weights {c.tolist()} are not on the simplex"
        slack = G @ d - float(d @ d)
        bound = 1e-3 * float(d.norm()) * (norms + d.norm())
        if bool((slack < -bound).any()):
            return f"not the min-norm point: g_k·d − ‖d‖² = {slack.tolist()}"
        return None
    if name in ("nash-mtl", "auxinash"):
        alpha, p = method.alpha.double(), method.preferences.double()
        M = G @ G.T
        M = M / torch.linalg.matrix_norm(M) if method.gram_normalization == "frobenius" else M
        active = alpha > 0
        residual = (alpha * (M @ alpha) - p).abs() / p
        worst = float(residual[active].max()) if bool(active.any()) else 0.0
        if not math.isfinite(worst) or worst > 1e-3:
            return f"α_k (Mα)_k = p_k fails: relative residual {worst:.3g} (α = {alpha.tolist()})"
    return None


def finite_state(method: Method) -> str | None:
    for key, value in method.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"method state {key} is not finite"
    return None


# ---------------------------------------------------------------------------------------------- bad inputs
def reference_run(name: str, hp: dict, prepare: Callable[[Net, Method], tuple[dict, Tensor, list]]) -> dict:
    model, method = build(name, **hp)
    losses, representation, shared = prepare(model, method)
    attach = getattr(method, "attach_model", None)
    if callable(attach):
        attach(model, shared)
    backward(model, method, losses, representation, shared)
    return all_grads(model, method)


def bad_input_cases(name: str) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    batch = make_data(8, 0)
    cases: list[tuple[str, Callable[[], tuple[str, str]]]] = []

    def fault(case: str, mutate: Callable[[Net, Method, dict, Tensor], tuple[dict, Tensor | None, Any]],
              reference: Callable[[Net, Method], tuple[dict, Tensor, list]] | None = None, hp: dict | None = None,
              setup: Callable[[Net], None] | None = None) -> None:
        def run() -> tuple[str, str]:
            model, method = build(name, **(hp or {}))
            if setup:
                setup(model)
            representation, losses = compute_losses(model, method, batch)
            losses, representation, shared = mutate(model, method, losses, representation)
            snapshot = Snapshot(model, method)
            accept = None
            if reference is not None:
                def prep(m, meth):
                    if setup:
                        setup(m)
                    return reference(m, meth)
                want = reference_run(name, hp or {}, prep)
                accept = lambda _: same_grads(all_grads(model, method), want)
            return expect_error(lambda: backward(model, method, losses, representation, shared), snapshot, accept)
        cases.append((case, run))

    def plain(model, method):
        representation, losses = compute_losses(model, method, batch)
        return losses, representation, model.shared_parameters()

    fault("empty shared_parameters", lambda m, meth, l, r: (l, r, []))

    def exhausted(m, meth, l, r):
        generator = (p for p in m.shared_parameters())
        list(generator)
        return l, r, generator
    fault("exhausted shared_parameters generator", exhausted)

    def duplicated(m, meth, l, r):
        shared = m.shared_parameters()
        return l, r, [shared[0], *shared]
    fault("duplicated shared parameter", duplicated, reference=plain)

    def freeze(model):
        model.encoder[0].bias.requires_grad_(False)

    def frozen_reference(model, method):
        representation, losses = compute_losses(model, method, batch)
        return losses, representation, [p for p in model.shared_parameters() if p.requires_grad]
    fault("frozen shared parameter", lambda m, meth, l, r: (l, r, m.shared_parameters()), reference=frozen_reference, setup=freeze)

    def zero_gradient(model, method):  # the reference: the same value, attached, with zero gradient
        representation, losses = compute_losses(model, method, batch)
        losses["conflict"] = losses["conflict"].detach() + 0 * sum(p.sum() for p in model.parameters())
        return losses, representation, model.shared_parameters()
    fault("auxiliary loss detached from every parameter",
          lambda m, meth, l, r: ({**l, "conflict": l["conflict"].detach()}, r, m.shared_parameters()), reference=zero_gradient)
    fault("every loss detached from every parameter",
          lambda m, meth, l, r: ({k: v.detach() for k, v in l.items()}, r, m.shared_parameters()))
    fault("missing task loss", lambda m, meth, l, r: ({k: v for k, v in l.items() if k != "agree"}, r, m.shared_parameters()))
    fault("unknown task loss", lambda m, meth, l, r: ({**l, "agre": l["agree"]}, r, m.shared_parameters()))
    fault("loss that is not a tensor", lambda m, meth, l, r: ({**l, "agree": float(l["agree"].detach().mean())}, r, m.shared_parameters()))

    def mean_reference(model, method):
        representation, losses = compute_losses(model, method, batch)
        return losses, representation, model.shared_parameters()

    def unreduced(m, meth, l, r):
        x, targets = batch
        per_sample = meth.tasks.get("agree").compute_loss(m(x)["agree"], targets["agree"], reduction="sample")
        return {**l, "agree": per_sample}, r, m.shared_parameters()
    # refused, or (for a method that takes unreduced losses) the same as the mean
    fault("non-scalar loss (per-sample)", unreduced, reference=mean_reference)

    for case, output, target in (("target (B,) for output (B, 1)", (8, 1), (8,)),
                                 ("target of another batch size", (8, 1), (5, 1))):
        def shape_run(output=output, target=target) -> tuple[str, str]:
            model, method = build(name)
            snapshot = Snapshot(model, method)
            task = method.tasks.get("main")
            values = torch.randn(*output, requires_grad=True)
            return expect_error(lambda: task.compute_loss(values, torch.randn(*target), reduction=method.loss_reduction), snapshot)
        cases.append((f"Task loss: {case}", shape_run))

    def mask_run() -> tuple[str, str]:
        model, method = build(name)
        task = method.tasks.get("main")
        return expect_error(lambda: task.compute_loss(torch.randn(8, 1), torch.randn(8, 1), torch.ones(7), method.loss_reduction),
                            Snapshot(model, method))
    cases.append(("Task loss: mask of another batch size", mask_run))

    if "mode" in methods.hyperparameters(name):
        try:
            methods.create(name, make_tasks(), mode="representation")
        except ValueError:
            pass
        else:
            def no_representation(m, meth, l, r):
                return l, None, m.shared_parameters()

            def run_representation() -> tuple[str, str]:
                model, method = build(name, mode="representation")
                _, losses = compute_losses(model, method, batch)
                snapshot = Snapshot(model, method)
                return expect_error(lambda: method.backward(losses, model.shared_parameters(), model.task_parameters(), None), snapshot)
            cases.append(("mode='representation' without a representation", run_representation))

    if has_meta_step(methods.create(name, make_tasks())):
        def no_aux() -> tuple[str, str]:
            hp = {"meta_source": "aux"} if "meta_source" in methods.hyperparameters(name) else {}
            model, method = build(name, **hp)
            context = meta_context(model, method, aux=False)
            snapshot = Snapshot(model, method)
            return expect_error(lambda: method.meta_step(context), snapshot)
        cases.append(("meta step with meta_source='aux' and no aux split", no_aux))
    return cases


# ---------------------------------------------------------------------------------------------- scales
def scale_case(name: str, scales: dict[str, float]) -> tuple[str, str]:
    model, method = build(name)
    representation, losses = compute_losses(model, method, make_data(8, 0), scales)
    shared = model.shared_parameters()
    G = task_jacobian(losses, method.task_names, shared)
    raw_finite = bool(torch.isfinite(G).all()) and all(bool(torch.isfinite(v.detach()).all()) for v in losses.values())
    snapshot = Snapshot(model, method)
    try:
        backward(model, method, losses, representation)
    except Exception as error:  # noqa: BLE001
        if raw_finite:
            return CRASHED, f"raised on finite losses with finite per-task gradients: {describe(error)}"
        return classify_error(error, snapshot)
    if not raw_finite:
        return SILENT, "no error although a task gradient is not finite in float32"
    for key, grad in all_grads(model, method).items():
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return SILENT, f"gradient of {key} is not finite"
    problem = check_direction(method, G, flat_grads(shared), model) or finite_state(method)
    return (SILENT, problem) if problem else (HANDLED, "finite, promise holds")


def meta_scale_case(name: str, scale: float) -> tuple[str, str]:
    model, method = build(name)
    scales = dict.fromkeys(NAMES, scale)
    context = meta_context(model, method, losses=lambda batch: compute_losses(model, method, batch, scales)[1])
    snapshot = Snapshot(model, method)
    try:
        method.meta_step(context)
    except Exception as error:  # noqa: BLE001
        # a Neumann series at a fixed step size may overflow float32 with the losses: a clear
        # FloatingPointError that changed nothing is the documented outcome
        return classify_error(error, snapshot)
    problem = finite_state(method)
    for p in model.parameters():
        if not bool(torch.isfinite(p).all()):
            problem = problem or "a model parameter is not finite"
    return (SILENT, problem) if problem else (HANDLED, "finite")


def scale_cases(name: str, quick: bool) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    cases = []
    for s in (QUICK_SCALES if quick else SCALES):
        cases.append((f"all losses x{s:g}", lambda s=s: scale_case(name, dict.fromkeys(NAMES, s))))
    for task in NAMES:
        for s in TASK_SCALES:
            cases.append((f"{task} loss x{s:g}", lambda s=s, task=task: scale_case(name, {task: s})))
    if has_meta_step(methods.create(name, make_tasks())):
        for s in TASK_SCALES:
            cases.append((f"meta step, losses x{s:g}", lambda s=s: meta_scale_case(name, s)))
    return cases


# ---------------------------------------------------------------------------------------------- non-finite
def nan_gradient(loss: Tensor, output: Tensor) -> Tensor:
    """``loss`` plus sqrt(0²): the value is unchanged, the gradient is 0/0 = NaN."""
    return loss + ((output - output.detach()) ** 2).sum().sqrt()


def trainer_setup(name: str, nan_sample: int | None, epochs: int = 2, log_dir: Path | None = None,
                  **config: Any) -> tuple[Trainer, dict]:
    model, method = build(name, batch_norm=True, **TRAINER_HP.get(name, {}))
    datasets = {}
    for split, (n, seed) in {"train": (32, 0), "aux": (16, 1), "val": (16, 2), "test": (16, 3)}.items():
        x, targets = make_data(n, seed)
        if split == "train" and nan_sample is not None:
            x = x.clone()
            x[nan_sample, 0] = float("nan")
        datasets[split] = TaskDataset(x, targets)
    settings = {"epochs": epochs, "batch_size": 8, "log_every": 1, "seed": 0, **config}
    trainer = Trainer(model, method, datasets, lambda groups: torch.optim.SGD(groups, lr=0.02, momentum=0.9),
                      TrainerConfig(**settings), log_dir=log_dir)
    return trainer, datasets


def skip_case(name: str) -> tuple[str, str]:
    try:
        trainer, datasets = trainer_setup(name, nan_sample=3, nonfinite="skip")
        train = datasets["train"]
        batch = train.__getitems__(list(range(8)))
        snapshot = Snapshot(trainer.model, trainer.method)
        if trainer.train_step(batch) is not None:
            return SILENT, "the step on the batch with a NaN sample was not skipped"
        changed = snapshot.changed()
        if changed:
            return SILENT, f"the skipped step changed {', '.join(changed[:3])}"
        trainer, _ = trainer_setup(name, nan_sample=3, nonfinite="skip")
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001
        return CRASHED, describe(error)
    if result.skipped_steps != 2:
        return SILENT, f"{result.skipped_steps} steps skipped, expected 2 (one batch per epoch holds the NaN sample)"
    for key, value in trainer.model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return SILENT, f"model state {key} is not finite after the run"
    bad = [k for k, v in result.metrics.get("test", {}).items() if not math.isfinite(v)]
    if bad or "test" not in result.metrics:
        return SILENT, f"test metrics not finite: {bad or 'missing'}"
    return HANDLED, "skipped, unchanged, finite"


def nonfinite_cases(name: str) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    batch = make_data(8, 0)

    def injected(transform: Callable[[Net, dict, Tensor], dict], task: str | None = None) -> Callable[[], tuple[str, str]]:
        """The step must fail clearly; only a task the method gives weight 0 (stl's auxiliaries) may
        instead be ignored, with every gradient finite."""
        def run() -> tuple[str, str]:
            model, method = build(name)
            x, _ = batch
            representation, losses = compute_losses(model, method, batch)
            losses = transform(model, losses, x)
            snapshot = Snapshot(model, method)

            def unused(_: Any) -> str | None:
                weights = method.weights() or {}
                if task is None or weights.get(task) != 0:
                    return f"a non-finite gradient of task {task or 'main'!r} went unreported"
                bad = [k for k, g in all_grads(model, method).items() if g is not None and not bool(torch.isfinite(g).all())]
                return f"gradient of {bad[0]} is not finite" if bad else None
            return expect_error(lambda: backward(model, method, losses, representation), snapshot, unused)
        return run

    cases = [
        ("NaN primary loss", injected(lambda m, l, x: {**l, "main": l["main"] * float("nan")})),
        ("infinite auxiliary loss", injected(lambda m, l, x: {**l, "agree": l["agree"] * float("inf")})),
        ("finite auxiliary loss with a NaN gradient",
         injected(lambda m, l, x: {**l, "conflict": nan_gradient(l["conflict"], m(x)["conflict"])}, "conflict")),
        ("finite primary loss with a NaN gradient",
         injected(lambda m, l, x: {**l, "main": nan_gradient(l["main"], m(x)["main"])})),
    ]
    if has_meta_step(methods.create(name, make_tasks())):
        def meta(kind: str) -> Callable[[], tuple[str, str]]:
            def run() -> tuple[str, str]:
                model, method = build(name)

                def losses(b):
                    _, values = compute_losses(model, method, b)
                    if kind == "nan":
                        return {**values, "main": values["main"] * float("nan")}
                    return {**values, "main": nan_gradient(values["main"], model(b[0])["main"])}
                context = meta_context(model, method, losses=losses)
                snapshot = Snapshot(model, method)
                return expect_error(lambda: method.meta_step(context), snapshot)
            return run
        cases += [("meta step: NaN loss", meta("nan")), ("meta step: finite loss with a NaN gradient", meta("grad"))]
    cases.append(("Trainer nonfinite='skip': NaN input sample with BatchNorm", lambda: skip_case(name)))
    return cases


# ---------------------------------------------------------------------------------------------- kill / resume
def log_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def resume_worker(name: str, folder: Path, kill_at: int) -> None:
    """Train with a checkpoint every 2 steps and SIGKILL this process in the first training forward
    after ``kill_at`` steps (a checkpoint behind, with ``log.csv`` rows past it)."""
    torch.set_num_threads(1)
    trainer, _ = trainer_setup(name, nan_sample=None, epochs=3, log_dir=folder)

    def hook(module, inputs):
        if module.training and trainer.step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.model.encoder.register_forward_pre_hook(hook)
    trainer.fit(checkpoint=folder / "state.pt", checkpoint_every=2)


def resume_case(name: str, folder: Path) -> tuple[str, str]:
    try:
        whole, _ = trainer_setup(name, nan_sample=None, epochs=3, log_dir=folder / "whole")
        expected = whole.fit()
        killed = folder / "killed"
        killed.mkdir()
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(killed), "7"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != -signal.SIGKILL:
            return CRASHED, f"the worker was not killed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        if not (killed / "state.pt").exists():
            return CRASHED, "the killed run left no checkpoint"
        resumed, _ = trainer_setup(name, nan_sample=None, epochs=3, log_dir=killed)
        got = resumed.fit(checkpoint=killed / "state.pt", checkpoint_every=2)
    except Exception as error:  # noqa: BLE001
        return CRASHED, describe(error)
    for label, a, b in (("model", whole.model, resumed.model), ("method", whole.method, resumed.method)):
        sa, sb = a.state_dict(), b.state_dict()
        differ = [k for k in sa if k not in sb or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
        if differ:
            return SILENT, f"{label} state differs after resuming: {differ[:3]}"
    if expected.metrics != got.metrics:
        return SILENT, "final metrics differ after resuming"
    want, have = log_rows(folder / "whole" / "log.csv"), log_rows(killed / "log.csv")
    if want != have:
        extra = len(have) - len(want)
        first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        return SILENT, f"log.csv differs from the uninterrupted run's ({extra:+d} rows; first difference at row {first})"
    return HANDLED, "identical parameters, method state, metrics and log.csv"


def corrupt_cases(folder: Path) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """Damaged checkpoints: each must be refused with an error naming the file, the trainer untouched."""
    source = folder / "good.pt"

    def good() -> bytes:
        if not source.exists():
            trainer, _ = trainer_setup("equal", nan_sample=None, epochs=1)
            trainer.fit(checkpoint=source, checkpoint_every=2)
        return source.read_bytes()

    def damaged(kind: str) -> Callable[[], tuple[str, str]]:
        def run() -> tuple[str, str]:
            path = folder / f"{kind.replace(' ', '_')}.pt"
            data = good()
            if kind == "truncated":
                path.write_bytes(data[: len(data) // 2])
            elif kind == "bytes flipped":
                middle = bytearray(data)
                for i in range(len(middle) // 2, len(middle) // 2 + 64):
                    middle[i] ^= 0xFF
                path.write_bytes(bytes(middle))
            elif kind == "empty":
                path.write_bytes(b"")
            elif kind == "foreign torch file":
                torch.save({"weights": torch.ones(3)}, path)
            elif kind == "text file":
                path.write_text("not a checkpoint\n")
            epochs = 2 if kind == "other run length" else 1
            if kind == "other run length":
                path.write_bytes(data)
            trainer, _ = trainer_setup("equal", nan_sample=None, epochs=epochs)
            snapshot = Snapshot(trainer.model, trainer.method)
            status, detail = expect_error(lambda: trainer.fit(checkpoint=path, checkpoint_every=2), snapshot)
            if status == HANDLED and path.name not in detail:
                return CRASHED, f"the error does not name the file: {detail}"
            return status, detail
        return run

    kinds = ("truncated", "bytes flipped", "empty", "foreign torch file", "text file", "other run length")
    return [(f"checkpoint: {kind}", damaged(kind)) for kind in kinds]


# ---------------------------------------------------------------------------------------------- driver
def run(categories: Sequence[str] = CATEGORIES, names: Sequence[str] | None = None, quick: bool = False,
        progress: bool = False) -> list[Outcome]:
    """Every case of ``categories`` for the methods ``names`` (default: all registered)."""
    torch.set_num_threads(1)
    names = list(names or methods.available())
    outcomes: list[Outcome] = []

    def record(category: str, method: str, case: str, call: Callable[[], tuple[str, str]]) -> None:
        try:
            status, detail = call()
        except Exception as error:  # noqa: BLE001 (a broken case is reported, not fatal)
            status, detail = CRASHED, f"(in the case set-up) {describe(error)}"
        outcomes.append(Outcome(category, method, case, status, detail))
        if progress and status != HANDLED:
            print(f"  {status}: {category} / {method} / {case}: {detail}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in names:
            if progress:
                print(f"{name} ...", flush=True)
            if "bad-input" in categories:
                for case, call in bad_input_cases(name):
                    record("bad-input", name, case, call)
            if "scale" in categories:
                for case, call in scale_cases(name, quick):
                    record("scale", name, case, call)
            if "nonfinite" in categories:
                for case, call in nonfinite_cases(name):
                    record("nonfinite", name, case, call)
            if "resume" in categories and (not quick or name in ("equal", "pcgrad", "auxinash")):
                folder = root / name
                folder.mkdir()
                record("resume", name, "SIGKILL mid-run, then resume", lambda name=name, folder=folder: resume_case(name, folder))
        if "resume" in categories:
            folder = root / "corrupt"
            folder.mkdir()
            for case, call in corrupt_cases(folder):
                record("resume", "(any)", case, call)
    return outcomes


def table(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Counts per (category, method): tried / handled / crashed / silently wrong."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for o in outcomes:
        row = rows.setdefault((o.category, o.method), {"category": o.category, "method": o.method, "tried": 0,
                                                      HANDLED: 0, CRASHED: 0, SILENT: 0})
        row["tried"] += 1
        row[o.status] += 1
    return list(rows.values())


def totals(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return {"tried": len(outcomes), **{s: sum(o.status == s for o in outcomes) for s in (HANDLED, CRASHED, SILENT)}}


def render(outcomes: Sequence[Outcome], machine: dict[str, Any], command: str) -> str:
    lines = ["# Fault injection", "",
             f"Command: `{command}` (commit `{machine['commit']}`{', with uncommitted changes' if machine['dirty'] else ''}).",
             (f"Machine: {machine['processor']}, {machine['threads']} torch thread, torch {machine['torch']}, "
              f"Python {machine['python']}, {machine['platform']}; {machine['seconds']:.0f} s."), "",
             "Classification and cases: see the docstring of `benchmarks/fault_injection.py`.", ""]
    t = totals(outcomes)
    lines += [f"**Total: {t['tried']} tried, {t[HANDLED]} handled, {t[CRASHED]} crashed, {t[SILENT]} silently wrong.**", ""]
    for category in CATEGORIES:
        rows = [r for r in table(outcomes) if r["category"] == category]
        if not rows:
            continue
        lines += [f"## {category}", "", "| method | tried | handled | crashed | silently wrong |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['tried']} | {r[HANDLED]} | {r[CRASHED]} | {r[SILENT]} |" for r in rows]
        lines.append("")
    failing = [o for o in outcomes if o.status != HANDLED]
    lines += ["## Cases not handled", ""]
    if not failing:
        lines.append("None.")
    else:
        lines += ["| category | method | case | status | observation |", "|---|---|---|---|---|"]
        lines += [f"| {o.category} | {o.method} | {o.case} | {o.status} | {o.detail.replace('|', '/')} |" for o in failing]
    return "\n".join(lines) + "\n"


def machine_info(seconds: float) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    processor = platform.processor() or "unknown CPU"
    try:
        processor = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "processor": processor, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=methods.available(), help="default: every registered method")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    parser.add_argument("--quick", action="store_true", help="fewer scales; kill/resume for three methods only")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_injection"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DIR", "KILL_AT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        resume_worker(args.worker[0], Path(args.worker[1]), int(args.worker[2]))
        return 0
    start = time.perf_counter()
    outcomes = run(args.categories, args.methods, args.quick, progress=True)
    machine = machine_info(time.perf_counter() - start)
    command = "python benchmarks/fault_injection.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = render(outcomes, machine, command)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        payload = {"machine": machine, "command": command, "totals": totals(outcomes), "table": table(outcomes),
                   "cases": [asdict(o) for o in outcomes]}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
