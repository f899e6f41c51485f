"""A training loop over the four splits that any method plugs into without special cases.

The Trainer is a convenience on top of ``method.backward(losses, ...)``: it owns the data order,
evaluation, model selection on ``val``, logging, checkpoints and the non-finite policy, and asks the
method nothing but what :class:`~auxilia.methods.Method` declares. The model contract:

* ``model(x)`` returns a mapping task name -> output;
* ``model.shared_parameters()`` (optional; default: every parameter) are the parameters per-task
  gradients are taken on; ``model.task_parameters()`` (optional) the heads;
* ``model.forward_with_representation(x) -> (representation, outputs)`` for methods whose
  ``needs_representation`` is true;
* ``model.own_step(losses, step=, total_steps=, batch_in_epoch=)`` (optional) for a model that trains
  ``model.own_parameters()`` by its own rule (e.g. Aux-NAS's architecture weights): called on every
  batch after the losses; a non-``None`` result means the batch was spent there and no weight step
  follows. ``own_parameters()`` are left out of the optimizer.

Non-finite steps (``nonfinite="skip"``). A training step, an architecture step (``own_step``) or a
meta step that meets a non-finite loss or gradient changes nothing: no ``.grad`` survives it, the
optimizer and scheduler do not step, the method's whole state and every model buffer (BatchNorm
running statistics and ``num_batches_tracked`` included) are restored to their values before the
forward. The step still counts in ``Trainer.step`` (the data order and the random streams advance
as if it had been taken, so a run with skips repeats and resumes exactly) and in ``skipped`` (or
``skipped_meta``). A run with some skipped steps succeeds and reports them in
:class:`FitResult`; a run whose every step was skipped raises :class:`AllStepsSkippedError`.

Logs and checkpoints. ``log.csv`` is flushed at every log call. A checkpoint holds the model,
method, optimizer, scheduler, counters, selection state and random streams, with a SHA-256 checksum
of them and the settings that define the run's schedule (:data:`RUN_SETTINGS`); loading verifies
both and raises :class:`CheckpointError` naming the file on any mismatch, damage or foreign file
(checkpoints of the earlier format, without checksum, are refused). Resuming truncates ``log.csv``
to the rows the checkpoint covers (see :meth:`Trainer.fit`).

Under ``torchrun`` (a process group of more than one process) each process trains on its contiguous
part of every global batch and the method averages what it needs (see :mod:`auxilia.distributed`),
so every process takes the step one process would take on the whole batch; meta batches are shared
out the same way. Only rank 0 evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import distributed
from ..methods.base import MetaContext, Method
from ..tasks import NonFiniteLossError, TaskSet
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .data import Batch, MetaBatches, batch_length, epoch_batches, num_batches, to_device
from .logging import RunLogger

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]
SPLITS = ("train", "aux", "val", "test")
# what fixes a run's schedule (the scheduler's total, the data order): a resumed run must agree
RUN_SETTINGS = ("total_steps", "steps_per_epoch", "batch_size", "seed")


class AllStepsSkippedError(RuntimeError):
    """Every training step of a run was skipped as non-finite: the model was never trained."""


@dataclass
class FitResult:
    """What a run produced: metrics per split of the model selected on ``val``, and its cost."""

    metrics: dict[str, dict[str, float]]
    primary_metric: str
    weights: dict[str, float] | None
    weights_history: list[dict[str, Any]]
    steps: int
    skipped_steps: int
    best_epoch: int
    time_per_step_s: float
    peak_memory_bytes: int
    stopped_early: bool = False
    skipped_meta_steps: int = 0

    @property
    def primary_value(self) -> float:
        return self.metrics["test"][self.primary_metric] if "test" in self.metrics else math.nan


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    max_steps: int | None = None
    device: str = "cpu"
    amp: bool = False
    nonfinite: Literal["raise", "skip"] = "raise"
    seed: int = 0
    max_grad_norm: float | None = None
    log_every: int = 10
    evaluate_train: bool = False
    progress: bool = False
    tensorboard: bool = False
    drop_last: bool = False
    meta_batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")


def seed_everything(seed: int) -> None:
    """Seed every RNG a CPU run draws from, so that it repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train ``model`` with ``method`` on ``datasets`` (a mapping over ``train``/``aux``/``val``/``test``).

    ``optimizer`` builds the optimizer from parameter groups (the model's, then the method's own
    learnable parameters, e.g. uncertainty's log-variances). ``metrics_fn(model) -> dict`` adds
    model-level metrics (e.g. distance to known true weights) to every evaluation.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        datasets: Mapping[str, Dataset],
        optimizer: OptimizerFactory,
        config: TrainerConfig | None = None,
        *,
        scheduler: SchedulerFactory | None = None,
        log_dir: str | Path | None = None,
        metrics_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    ):
        self.config = config or TrainerConfig()
        unknown = sorted(set(datasets) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split {unknown[0]!r}; splits are {SPLITS}")
        if "train" not in datasets:
            raise ValueError("datasets needs a 'train' split")
        self.datasets = dict(datasets)
        self.device = torch.device(self.config.device)
        self.model = model.to(self.device)
        self.method = method.to(self.device)
        self.tasks: TaskSet = method.tasks
        self.metrics_fn = metrics_fn
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.method.needs_representation and not hasattr(model, "forward_with_representation"):
            raise TypeError(
                f"{method.name}: mode='representation' needs model.forward_with_representation(x) "
                "returning (representation, outputs)"
            )
        self.world = distributed.world_size()
        self.main = distributed.is_main()
        distributed.broadcast_state(self.model, self.method)  # identical replicas, whatever each process built
        self.shared = list(model.shared_parameters()) if hasattr(model, "shared_parameters") else list(model.parameters())
        self.heads = list(model.task_parameters()) if hasattr(model, "task_parameters") else None
        # methods that need the model's structure (parameter names, modules) declare attach_model
        attach = getattr(self.method, "attach_model", None)
        if callable(attach):
            attach(self.model, self.shared)
        # a model that trains some parameters by its own rule (own_parameters/own_step) keeps them out
        self._own_step = getattr(model, "own_step", None)
        separate = {id(p) for p in model.own_parameters()} if hasattr(model, "own_parameters") else set()
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in separate]}]
        own = [p for p in method.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own})
        self.optimizer = optimizer(groups)
        self.steps_per_epoch = num_batches(self.datasets["train"], self.config.batch_size, self.config.drop_last)
        self._check_shardable()
        total = self.config.epochs * self.steps_per_epoch
        if self.config.max_steps is not None:
            total = min(total, self.config.max_steps)
        self.total_steps = total
        self.scheduler = scheduler(self.optimizer, total) if scheduler is not None else None
        # counters and selection state: everything a checkpoint must carry
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        self.skipped_meta = 0
        self.skipped_tasks: list[str] = []  # what was non-finite in the skipped steps, in order met
        self.best_value: float | None = None
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None
        self.weights_history: list[dict[str, Any]] = []
        self._train_time = 0.0
        self._logger: RunLogger | None = None

    # ------------------------------------------------------------------ one step
    def _forward(self, inputs: Any) -> tuple[Tensor | None, Mapping[str, Tensor]]:
        if self.method.needs_representation:
            representation, outputs = self.model.forward_with_representation(inputs)  # type: ignore[operator]
            return representation, outputs
        return None, self.model(inputs)

    def compute_losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [t for t in self.tasks.names if t not in outputs]
        if missing:
            raise KeyError(f"the model produced no output for task {missing[0]!r}; it returned {sorted(outputs)}")
        losses = {}
        reduction = self.method.loss_reduction  # per-sample or per-pixel for combiners that need them
        for task in self.tasks:
            if task.name not in targets:
                raise KeyError(f"the batch has no targets for task {task.name!r}")
            losses[task.name] = task.compute_loss(outputs[task.name].float(), targets[task.name], masks.get(task.name), reduction)
        return losses

    def train_step(self, batch: Batch) -> dict[str, Any] | None:
        """One optimizer step on ``batch`` (this process's part of the global batch under torchrun);
        ``None`` when the step was skipped (non-finite)."""
        with distributed.sharded(batch_length(batch), self._global_batch_size()):
            return self._train_step(batch)

    def _global_batch_size(self) -> int:
        """The size of the global batch at ``batch_in_epoch`` (only the last of an epoch is short)."""
        size = self.config.batch_size
        return min(size, len(self.datasets["train"]) - self.batch_in_epoch * size)  # type: ignore[arg-type]

    def _train_step(self, batch: Batch) -> dict[str, Any] | None:
        inputs, targets, masks = to_device(batch, self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with unchanged_on_error(self.model, self.method):
                with self._autocast():
                    representation, outputs = self._forward(inputs)
                losses = self._losses_everywhere(outputs, targets, masks)
                if self._own_step is not None:
                    own = self._own_step(losses, step=self.step, total_steps=self.total_steps, batch_in_epoch=self.batch_in_epoch)
                    if own is not None:  # the model spent this batch on its own parameters: no weight step
                        return {"losses": {k: float(v.detach().mean()) for k, v in losses.items()}, "own": own}
                info = self.method.backward(losses, self.shared, self.heads, representation)
                self._check_gradients()
        except NonFiniteLossError as error:
            self.optimizer.zero_grad(set_to_none=True)
            if self.config.nonfinite == "raise":
                raise
            self.skipped += 1
            if error.task not in self.skipped_tasks:
                self.skipped_tasks.append(error.task)
            task = float(self.tasks.names.index(error.task)) if error.task in self.tasks.names else -1.0
            # logged under the step count this step ends at, as a step that is taken is (_record)
            self._log("train", {"skipped_step": 1.0, "skipped_task": task}, step=self.step + 1)
            return None
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.config.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        info = dict(info)
        values = torch.stack([losses[name].detach().float().mean() for name in self.tasks.names])
        meta_due = self.method.meta_due()
        if meta_due or (self.step + 1) % self.config.log_every == 0 or self.step == 0:  # this step is logged
            values = distributed.average(values)
        info["losses"] = dict(zip(self.tasks.names, values.tolist()))
        if meta_due:
            info["meta"] = self._meta_step()
        return info

    def _meta_step(self) -> dict[str, Any]:
        """The method's meta step; one that meets a non-finite loss or gradient leaves the method
        and the model's buffers as they were and, under ``nonfinite="skip"``, is skipped and counted."""
        try:
            # equal shares of each meta batch (MetaBatches)
            with unchanged_on_error(self.model, self.method), distributed.sharded(1, self.world):
                info = self.method.meta_step(self._meta_context())
        except FloatingPointError:  # NonFiniteLossError included
            if self.config.nonfinite == "raise":
                raise
            self.skipped_meta += 1
            return {"skipped": 1.0}
        # bit-identical replicas even where kernels are not deterministic (a label generator is the model's)
        distributed.broadcast_state(self.model, self.method)
        return info

    def _losses_everywhere(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return losses_on_every_process(lambda: self.compute_losses(outputs, targets, masks), self.method)

    def _check_shardable(self) -> None:
        if self.world == 1:
            return
        if self.config.batch_size < self.world:
            raise ValueError(f"batch_size {self.config.batch_size} is smaller than the {self.world} processes")
        tail = len(self.datasets["train"]) % self.config.batch_size  # type: ignore[arg-type]
        if 0 < tail < self.world and not self.config.drop_last:
            raise ValueError(
                f"the last training batch of each epoch has {tail} samples, fewer than the {self.world} "
                "processes: use drop_last=True or another batch size"
            )

    def _meta_context(self) -> MetaContext:
        """The meta step's data (:class:`~auxilia.training.data.MetaBatches`) and model access."""
        draws = MetaBatches(self.datasets, self.config.meta_batch_size or self.config.batch_size, seed=self.config.seed, step=self.step)

        def losses(batch):
            inputs, targets, masks = to_device(batch, self.device)
            self.model.train()
            with self._autocast():
                _, outputs = self._forward(inputs)
            return self._losses_everywhere(outputs, targets, masks)

        return MetaContext(
            losses=losses,
            train_batch=lambda: draws.draw("train"),
            aux_batch=(lambda: draws.draw("aux")) if "aux" in self.datasets else None,
            shared=self.shared,
            heads=self.heads if self.heads is not None else [],
            learning_rate=float(self.optimizer.param_groups[0]["lr"]),
        )

    def _check_gradients(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise NonFiniteLossError("gradient", f"a gradient of shape {tuple(p.shape)} is not finite")

    def _autocast(self):
        if not self.config.amp:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss and metrics of every task on ``split``, as ``task/metric`` -> value."""
        dataset = self.datasets[split]
        self.model.eval()
        metrics = {task.name: task.new_metrics() for task in self.tasks}
        loss_sums = {task.name: 0.0 for task in self.tasks}
        count = 0
        for batch in epoch_batches(dataset, self.config.eval_batch_size, seed=0, epoch=0, shuffle=False):
            inputs, targets, masks = to_device(batch, self.device)
            with self._autocast():
                _, outputs = self._forward(inputs)
            n = len(next(iter(targets.values())))
            for task in self.tasks:
                output = outputs[task.name].float()
                target = targets[task.name]
                mask = masks.get(task.name)
                loss_sums[task.name] += float(task.compute_loss(output, target, mask)) * n
                if mask is not None:
                    keep = mask.bool()
                    output, target = output[keep], target[keep]
                if len(target):
                    for metric in metrics[task.name].values():
                        metric.update(output, target)
            count += n
        out: dict[str, float] = {}
        for task in self.tasks:
            out[f"{task.name}/loss"] = loss_sums[task.name] / max(count, 1)
            for name, metric in metrics[task.name].items():
                out[f"{task.name}/{name}"] = metric.compute()
        if self.metrics_fn is not None:
            out.update({k: float(v) for k, v in self.metrics_fn(self.model).items()})
        return out

    @property
    def primary_metric(self) -> str:
        primary = self.tasks.primary
        names = list(primary.metrics)
        return f"{primary.name}/{names[0]}" if names else f"{primary.name}/loss"

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        higher = self.tasks.primary.higher_is_better and bool(self.tasks.primary.metrics)
        return value > self.best_value if higher else value < self.best_value

    def _select(self) -> None:
        if not self.main:  # selection is rank 0's: only it evaluates and writes results
            return
        if "val" not in self.datasets:
            self.best_epoch = self.epoch
            return
        values = self.evaluate("val")
        self._log("val", values)
        value = values[self.primary_metric]
        if self._better(value):
            self.best_value, self.best_epoch = value, self.epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ the loop
    def fit(self, *, checkpoint: str | Path | None = None, checkpoint_every: int | None = None, stop_at: int | None = None) -> FitResult:
        """Train to the end (or to step ``stop_at``, for tests of resumption), select on ``val``, test once.

        With ``checkpoint``, state is saved there every ``checkpoint_every`` steps and at each
        epoch's end; if the file exists the run resumes from it (:meth:`load_checkpoint`), and
        ``log.csv`` is cut back to the rows written before that checkpoint, so that a run killed at
        any point and resumed ends with the rows of an uninterrupted run, once each. Raises
        :class:`AllStepsSkippedError` when every step of the finished run was skipped as non-finite.
        """
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        resumed = checkpoint is not None and checkpoint.exists()
        if resumed:
            self.load_checkpoint(checkpoint)
        else:
            seed_everything(self.config.seed)
        self._logger = RunLogger(self.log_dir if self.main else None, tensorboard=self.config.tensorboard and self.main,
                                 keep=self._logged_before_checkpoint if resumed else None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        progress = self._progress()
        stopped = False
        try:
            # an epoch whose last step is taken but whose end (selection) is not, e.g. resumed from a
            # checkpoint of that step, still ends
            while self.epoch < self.config.epochs and (self.step < self.total_steps or self.batch_in_epoch > 0):
                start = time.perf_counter()
                batches = epoch_batches(
                    self.datasets["train"], self.config.batch_size, seed=self.config.seed, epoch=self.epoch,
                    skip=self.batch_in_epoch, drop_last=self.config.drop_last,
                    shard=(distributed.rank(), self.world) if self.world > 1 else None,
                ) if self.step < self.total_steps else []
                for batch in batches:
                    info = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if progress is not None:
                        progress.update(1)
                    if info is not None and (self.step % self.config.log_every == 0 or self.step == 1 or "meta" in info):
                        self._record(info)
                    if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                        self._train_time += time.perf_counter() - start
                        start = time.perf_counter()
                        self.save_checkpoint(checkpoint)
                    if stop_at is not None and self.step >= stop_at:
                        stopped = True
                        break
                    if self.step >= self.total_steps:
                        break
                self._train_time += time.perf_counter() - start
                if stopped:
                    break
                if self.batch_in_epoch >= self.steps_per_epoch or self.step >= self.total_steps:
                    self.method.epoch_end()
                    self._select()
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if checkpoint is not None:
                        self.save_checkpoint(checkpoint)
            if not stopped and self.step > 0 and self.skipped >= self.step:
                seen = ", ".join(repr(t) for t in self.skipped_tasks)
                raise AllStepsSkippedError(
                    f"all {self.step} training steps were skipped as non-finite (seen in: {seen}); the model "
                    "was never updated, so no result is reported: check the data, the learning rate or amp"
                )
            return self._result(stopped)
        finally:
            if progress is not None:
                progress.close()
            self._logger.close()

    def _logged_before_checkpoint(self, step: int, split: str) -> bool:
        """Whether a ``log.csv`` row was written before the checkpoint just loaded was saved.

        At a step count S the loop logs, in order: the step's ``train`` rows; a mid-epoch checkpoint;
        at an epoch's end the ``val`` rows, then the epoch-end checkpoint (``batch_in_epoch`` back to
        0); after the last epoch the ``*/final`` rows, which no checkpoint covers.
        """
        if step != self.step:
            return step < self.step
        return split == "train" or (split == "val" and self.batch_in_epoch == 0)

    def _result(self, stopped: bool) -> FitResult:
        metrics: dict[str, dict[str, float]] = {}
        if not stopped and self.main:
            if self.best_state is not None:
                self.model.load_state_dict(self.best_state)
            splits = [s for s in ("val", "test") if s in self.datasets]
            if self.config.evaluate_train:
                splits.insert(0, "train")
            for split in splits:
                metrics[split] = self.evaluate(split)
                self._log(split + "/final", metrics[split])
        done = max(self.step - self.skipped, 1)
        return FitResult(
            metrics=metrics,
            primary_metric=self.primary_metric,
            weights=self.method.weights(),
            weights_history=self.weights_history,
            steps=self.step,
            skipped_steps=self.skipped,
            best_epoch=self.best_epoch,
            time_per_step_s=self._train_time / done,
            peak_memory_bytes=peak_memory_bytes(self.device),
            stopped_early=stopped,
            skipped_meta_steps=self.skipped_meta,
        )

    def _record(self, info: Mapping[str, Any]) -> None:
        values: dict[str, Any] = {"loss": info.get("losses", {})}
        if info.get("weights") is not None:
            values["weights"] = info["weights"]
            self.weights_history.append({"step": self.step, **info["weights"]})
        for key, value in info.items():
            if key not in ("losses", "weights"):
                values[key] = value
        self._log("train", values)

    def _log(self, split: str, values: Mapping[str, Any], step: int | None = None) -> None:
        if self._logger is not None:
            self._logger.log(self.step if step is None else step, self.epoch, split, values)

    def _progress(self):
        if not self.config.progress or not self.main:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as error:
            raise ImportError("the progress display needs the 'progress' extra: pip install 'auxilia[progress]'") from error
        return tqdm(total=self.total_steps, initial=self.step, desc=self.method.name, leave=False)

    # ------------------------------------------------------------------ checkpoints
    def run_settings(self) -> dict[str, int]:
        """The settings a checkpoint must share with the run resuming from it (:data:`RUN_SETTINGS`)."""
        values = {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                  "batch_size": self.config.batch_size, "seed": self.config.seed}
        return {name: int(values[name]) for name in RUN_SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.run_settings(),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "counters": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped": self.skipped,
                         "skipped_meta": self.skipped_meta, "skipped_tasks": list(self.skipped_tasks)},
            "selection": {"best_value": self.best_value, "best_epoch": self.best_epoch, "best_state": self.best_state},
            "weights_history": self.weights_history,
            "train_time": self._train_time,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state(),
                "python": _python_state(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`CheckpointError` when it was taken under other
        :meth:`run_settings` (resuming would silently follow the old schedule)."""
        saved = state.get("settings")
        if not isinstance(saved, Mapping):
            raise CheckpointError("the state holds no run settings; it is not a Trainer state_dict")
        ours = self.run_settings()
        differ = [f"{name}={saved.get(name)!r} there, {ours[name]!r} here" for name in RUN_SETTINGS if saved.get(name) != ours[name]]
        if differ:
            raise CheckpointError(
                "it was written by a run with other settings (" + "; ".join(differ) + "): resume with the "
                "settings it was written with (epochs, max_steps, batch_size, drop_last, seed, training set) "
                "or start a new run"
            )
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        counters = state["counters"]
        self.step, self.epoch = counters["step"], counters["epoch"]
        self.batch_in_epoch, self.skipped = counters["batch_in_epoch"], counters["skipped"]
        self.skipped_meta = counters["skipped_meta"]
        self.skipped_tasks = list(counters["skipped_tasks"])
        selection = state["selection"]
        self.best_value, self.best_epoch, self.best_state = selection["best_value"], selection["best_epoch"], selection["best_state"]
        self.weights_history = list(state["weights_history"])
        self._train_time = state["train_time"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_numpy_restore(rng["numpy"]))
        random.setstate(_python_restore(rng["python"]))

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` with its checksum (:func:`write_checkpoint`), atomically: a run
        killed mid-write leaves the previous checkpoint intact. Under torchrun only rank 0 writes
        (every process holds the same state); any number of processes can resume from it."""
        if self.main:
            write_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``path``: its checksum is verified and its run settings must equal this run's;
        any failure raises :class:`CheckpointError` naming the file, before the trainer is changed
        (except for a model, method or optimizer state that does not fit, found while loading)."""
        state = read_checkpoint(path, map_location=self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this trainer: {error}") from error


@contextmanager
def unchanged_on_error(model: nn.Module, method: Method) -> Iterator[None]:
    """Put ``model``'s buffers and ``method``'s whole state back as they were if the block raises.

    A forward in train mode updates BatchNorm running statistics (and ``num_batches_tracked``)
    before any loss is known to be non-finite, so a step that is then abandoned must undo them; the
    buffers are small next to the parameters, which a failed step never changes. The method's part
    is :meth:`Method.restored_on_failure`.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with method.restored_on_failure():
            yield
    except Exception:
        with torch.no_grad():
            for name, saved in buffers.items():
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                current = getattr(module, leaf, None)
                if isinstance(current, Tensor) and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:  # replaced by the block with a tensor of another shape or type
                    setattr(module, leaf, saved)
        raise


def losses_on_every_process(compute: Callable[[], dict[str, Tensor]], method: Method) -> dict[str, Tensor]:
    """``compute()``'s task losses, failing on every process when one process's are not finite.

    A process raising alone would leave the others waiting in their next all-reduce, so under
    several processes the finiteness check the method makes later is made here, and agreed on.
    """
    error: NonFiniteLossError | None = None
    try:
        losses = compute()
        if distributed.active():
            method.tasks.ordered(losses, scalar=method.loss_reduction == "mean")
    except NonFiniteLossError as caught:
        error = caught
    if not distributed.all_agree(error is None):
        raise error or NonFiniteLossError("another process", "a loss on another process is not finite")
    return losses


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on GPU; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_restore(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["cached"])


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_restore(state: Mapping[str, Any]) -> tuple:
    return (state["version"], tuple(state["internal"]), state["gauss"])


__all__ = [
    "AllStepsSkippedError",
    "FitResult",
    "Trainer",
    "TrainerConfig",
    "losses_on_every_process",
    "peak_memory_bytes",
    "seed_everything",
    "unchanged_on_error",
]
