"""Lightning integration: train a multi-task ``LightningModule`` with any auxilia method, on one process
or under Lightning's DDP.

:class:`AuxiliaryModule` is a ``LightningModule`` with manual optimization: every method writes
``.grad`` itself (one backward for a loss weighting, K per-task gradients for an aggregation), so
Lightning's automatic ``loss.backward()`` cannot drive it. A training step is the step of auxilia's
:class:`~auxilia.training.Trainer` — forward, per-task losses in the method's ``loss_reduction``,
``method.backward``, optional clipping, ``optimizer.step()``, scheduler step, then the meta step when
``method.meta_due()`` — and the method's weights go to Lightning's logger as ``weight/<task>``.

Several processes. Use :class:`AuxiliaryDDPStrategy` (Lightning's ``DDPStrategy`` minus the
``DistributedDataParallel`` wrapper). Its process group is the one :mod:`auxilia.distributed` sees, so
each step runs inside :func:`auxilia.distributed.sharded` and the methods all-reduce exactly what
they need (the global batch's losses, per-task gradients or ``.grad``); every process ends the step
with the same parameters as one process on the whole global batch. Meta steps share their seeded
meta batches out the same way (:class:`~auxilia.training.data.MetaBatches`), after which rank 0's
method state is broadcast. Plain ``strategy="ddp"`` also trains correctly (Lightning keeps the
wrapper's reducer idle under manual optimization unless ``manual_backward`` is called, which this
module never does), but pays for the wrapper's buckets and per-forward buffer broadcasts.

:class:`GlobalBatchSampler` gives each process a contiguous shard of the same global batches that
auxilia's Trainer draws (its per-epoch permutation), for any number of processes; see
``docs/lightning.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler, default_collate

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as error:  # pragma: no cover - exercised only without the package
    raise ImportError("auxilia.lightning needs Lightning: pip install 'lightning>=2.2'") from error

from . import distributed
from .methods import create as create_method
from .methods.base import MetaContext, Method
from .tasks import NonFiniteLossError, Task
from .training.data import Batch, MetaBatches, as_batch, to_device
from .training.trainer import losses_on_every_process, unchanged_on_error

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


def collate(samples: Any) -> Batch:
    """``collate_fn`` for auxilia batches: a :class:`~auxilia.training.data.TaskDataset` hands the
    DataLoader a whole batch (``__getitems__``), which must pass through untouched; a list of
    per-sample ``(x, targets[, masks])`` items is stacked by ``default_collate``."""
    if isinstance(samples, tuple) and len(samples) in (2, 3) and isinstance(samples[1], Mapping):
        return as_batch(samples)
    return as_batch(default_collate(samples))


class _EpochOrder(Sampler[int]):
    """The Trainer's order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""

    def __init__(self, size: int, shuffle: bool, seed: int):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` samples *in total over all processes*; each process gets its
    contiguous shard (:func:`auxilia.distributed.shard_bounds`).

    The global batches are those of auxilia's Trainer with the same ``seed`` (``shuffle=True``) or
    consecutive ranges (``shuffle=False``), whatever the number of processes, so a run on W processes
    takes the same steps as one on a single process. The rank is read when iteration starts, after
    Lightning has created the process group. Use it as ``DataLoader(dataset,
    batch_sampler=GlobalBatchSampler(...), collate_fn=collate)`` with
    ``Trainer(use_distributed_sampler=False)``: Lightning would otherwise shard the data a second time.
    """

    def __init__(self, data_source: Sized | int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(data_source, Sampler):
            # Lightning rebuilds a batch sampler around its DistributedSampler: that would shard twice
            raise TypeError(
                "GlobalBatchSampler shards the data itself: use Trainer(use_distributed_sampler=False) so "
                "that Lightning does not wrap it in a DistributedSampler"
            )
        size = data_source if isinstance(data_source, int) else len(data_source)
        # ``sampler`` is where Lightning looks for set_epoch on a batch sampler
        self.sampler = _EpochOrder(size, shuffle, seed)
        self.batch_size, self.drop_last = batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.sampler.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        if self.drop_last:
            order = order[: len(order) - len(order) % self.batch_size]
        rank, world = distributed.rank(), distributed.world_size()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < world:
                # every process must take part in each step's reductions with at least one sample
                raise ValueError(
                    f"a global batch of {len(batch)} samples cannot be shared by {world} processes; "
                    "use drop_last=True or a dataset size whose remainder is 0 or at least the world size"
                )
            lo, hi = distributed.shard_bounds(len(batch), rank, world)
            yield batch[lo:hi]


class AuxiliaryDDPStrategy(DDPStrategy):
    """Lightning's DDP (process group, launchers, samplers, metric syncing) without the
    ``DistributedDataParallel`` wrapper.

    The wrapper all-reduces ``.grad`` through hooks during ``backward``; auxilia's methods take
    per-task gradients with ``torch.autograd.grad``, which those hooks do not see, and reduce
    explicitly (:mod:`auxilia.distributed`). Instead of wrapping, the replicas are made equal once
    (rank 0's parameters and buffers), as the wrapper does at construction.
    """

    def configure_ddp(self) -> None:
        distributed.broadcast_state(self.model)  # type: ignore[arg-type]


class AuxiliaryModule(pl.LightningModule):
    """A ``LightningModule`` that trains ``model`` on several task losses with an auxilia method.

    ``model(x)`` returns ``{task: output}``; optional ``shared_parameters()``, ``task_parameters()``
    and ``forward_with_representation(x)`` as for auxilia's Trainer. ``method`` is a
    :class:`~auxilia.methods.Method` or a registered name (then ``tasks`` and ``hyperparameters``
    build it). ``optimizer(param_groups)`` and ``scheduler(optimizer, total_steps)`` are factories as
    in the Trainer (the scheduler steps every step); under a spawning launcher they must pickle
    (``functools.partial``, not a lambda).

    Meta steps draw ``meta_batch_size`` samples (default: the step's global batch size) from
    ``meta_datasets["train"]`` (default: the training dataloader's dataset) and ``["aux"]``, seeded by
    (``seed``, step) exactly as the Trainer does, so every process draws the same batch.
    ``nonfinite="skip"`` drops a step (or meta step) whose loss or gradient is not finite instead of
    raising; as in the Trainer, a dropped step leaves the parameters, the optimizer, the scheduler,
    the method's state and every model buffer (BatchNorm statistics) as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method | str,
        optimizer: OptimizerFactory,
        *,
        tasks: Iterable[Task | str] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | None = None,
        meta_datasets: Mapping[str, Dataset] | None = None,
        meta_batch_size: int | None = None,
        seed: int = 0,
        max_grad_norm: float | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        if isinstance(method, str):
            if tasks is None:
                raise ValueError(f"method {method!r} given by name: pass tasks= as well")
            method = create_method(method, tasks, **dict(hyperparameters or {}))
        elif tasks is not None or hyperparameters:
            raise ValueError("tasks= and hyperparameters= build a method given by name; this method is already built")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if method.needs_representation and not hasattr(model, "forward_with_representation"):
            raise TypeError(f"{method.name}: mode='representation' needs model.forward_with_representation(x)")
        if hasattr(model, "own_step"):
            raise TypeError(
                f"{type(model).__name__} trains some parameters by its own rule (own_step, e.g. Aux-NAS's "
                "architecture weights), which AuxiliaryModule does not drive: train it with auxilia's Trainer"
            )
        unknown = sorted(set(meta_datasets or {}) - {"train", "aux"})
        if unknown:
            raise ValueError(f"meta_datasets takes 'train' and 'aux', got {unknown[0]!r}")
        self.automatic_optimization = False
        self.model = model
        self.method = method  # a submodule: its parameters and buffers travel in the checkpoint
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.meta_datasets = dict(meta_datasets or {})
        self.meta_batch_size, self.seed = meta_batch_size, seed
        self.max_grad_norm, self.nonfinite = max_grad_norm, nonfinite
        attach = getattr(method, "attach_model", None)
        if callable(attach):
            attach(model, self.shared_parameters())

    # ------------------------------------------------------------------ the model contract
    def forward(self, inputs: Any) -> Mapping[str, Tensor]:
        return self.model(inputs)

    def shared_parameters(self) -> list[Tensor]:
        model = self.model
        return list(model.shared_parameters()) if hasattr(model, "shared_parameters") else list(model.parameters())

    def task_parameters(self) -> list[Tensor] | None:
        return list(self.model.task_parameters()) if hasattr(self.model, "task_parameters") else None

    def forward_tasks(self, inputs: Any) -> tuple[Tensor | None, Mapping[str, Tensor]]:
        """(representation or ``None``, outputs): the representation only when the method needs it."""
        if self.method.needs_representation:
            return self.model.forward_with_representation(inputs)  # type: ignore[operator]
        return None, self.model(inputs)

    def compute_losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's loss, reduced as the method asks (``method.loss_reduction``)."""
        reduction = self.method.loss_reduction
        losses = {}
        for task in self.method.tasks:
            if task.name not in outputs:
                raise KeyError(f"the model produced no output for task {task.name!r}; it returned {sorted(outputs)}")
            if task.name not in targets:
                raise KeyError(f"the batch has no targets for task {task.name!r}")
            losses[task.name] = task.compute_loss(_full_precision(outputs[task.name]), targets[task.name], masks.get(task.name), reduction)
        return losses

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise TypeError(f"AuxiliaryModule runs on one device or under DDP, not {type(strategy).__name__}")
        if str(self.trainer.precision) in ("16-mixed", "16"):
            raise ValueError("float16 needs loss scaling, which auxilia's methods do not apply; use '32-true' or 'bf16-mixed'")

    def configure_optimizers(self) -> Any:
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        own = [p for p in self.method.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer, total), "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets, masks = as_batch(batch)
        n_local = len(next(iter(targets.values())))
        optimizer = self.optimizers()
        step = self.global_step  # before optimizer.step() advances it: the Trainer's step index
        optimizer.zero_grad(set_to_none=True)
        with distributed.sharded(n_local):
            n_global = round(n_local / distributed.fraction())
            try:
                with unchanged_on_error(self.model, self.method):
                    representation, outputs = self.forward_tasks(inputs)
                    losses = losses_on_every_process(lambda: self.compute_losses(outputs, targets, masks), self.method)
                    info = self.method.backward(losses, self.shared_parameters(), self.task_parameters(), representation)
                    self._check_gradients(optimizer)
            except NonFiniteLossError:
                optimizer.zero_grad(set_to_none=True)
                if self.nonfinite == "raise":
                    raise
                self.log_event({"train/skipped_step": 1.0}, step)
                return
            # the global batch's mean losses, for the log (one all-reduce of K floats)
            names = list(losses)
            means = distributed.average(torch.stack([losses[k].detach().float().mean() for k in names]))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.max_grad_norm)
        optimizer.step()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        logged = {f"train/{k}/loss": float(v) for k, v in zip(names, means.tolist())}
        logged.update(_numbers("train/", info))
        if self.method.meta_due():
            try:
                # equal shares of each meta batch
                with unchanged_on_error(self.model, self.method), distributed.sharded(1, distributed.world_size()):
                    meta = self.method.meta_step(self.meta_context(step, n_global))
            except FloatingPointError:  # the method's state and the model's buffers are as they were
                if self.nonfinite == "raise":
                    raise
                meta = {"skipped": 1.0}
            distributed.broadcast_state(self.method)  # replicas bit for bit equal again
            self.log_event(_numbers("meta/", meta), step)
        weights = self.method.weights()
        if weights is not None:
            logged.update({f"weight/{k}": float(v) for k, v in weights.items()})
        # the same value on every process (already global): no sync needed
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=n_local)

    def on_train_epoch_end(self) -> None:
        self.method.epoch_end()  # methods with epoch-level state (DWA), as auxilia's Trainer does

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------------ helpers
    def log_event(self, values: Mapping[str, float], step: int) -> None:
        """Write values that exist only on some steps (a meta step, a skipped step) straight to the
        loggers (rank 0 only, as Lightning's loggers do): through ``self.log`` Lightning would repeat
        the last value on every later step of the epoch."""
        if values:
            for logger in self.loggers:
                logger.log_metrics(dict(values), step=step)

    def meta_context(self, step: int, default_size: int) -> MetaContext:
        """The meta step's data, drawn as auxilia's Trainer draws it
        (:class:`~auxilia.training.data.MetaBatches`), so every process, and a single-process run,
        draws the same global batch."""
        splits = {"train": self._meta_dataset("train"), **({"aux": self.meta_datasets["aux"]} if "aux" in self.meta_datasets else {})}
        draws = MetaBatches(splits, self.meta_batch_size or default_size, seed=self.seed, step=step)

        def losses(batch: Batch) -> dict[str, Tensor]:
            inputs, targets, masks = to_device(as_batch(batch), self.device)
            self.model.train()
            _, outputs = self.forward_tasks(inputs)
            return losses_on_every_process(lambda: self.compute_losses(outputs, targets, masks), self.method)

        heads = self.task_parameters()
        return MetaContext(
            losses=losses,
            train_batch=lambda: draws.draw("train"),
            aux_batch=(lambda: draws.draw("aux")) if "aux" in splits else None,
            shared=self.shared_parameters(),
            heads=heads if heads is not None else [],
            learning_rate=float(self.optimizers().param_groups[0]["lr"]),
        )

    def _meta_dataset(self, split: str) -> Dataset:
        if split in self.meta_datasets:
            return self.meta_datasets[split]
        loader = self.trainer.train_dataloader if split == "train" else None
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(f"{self.method.name}: its meta step needs meta_datasets[{split!r}]")
        return dataset

    def _check_gradients(self, optimizer: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise NonFiniteLossError("gradient", f"a gradient of shape {tuple(p.shape)} is not finite")

    def _evaluate(self, batch: Any, split: str) -> None:
        """Log each task's loss and metrics; Lightning averages them over batches weighted by batch
        size and, with ``sync_dist``, over processes: exact for per-sample metrics (accuracy, MSE)."""
        inputs, targets, masks = as_batch(batch)
        outputs = self.model(inputs)
        n = len(next(iter(targets.values())))
        for task in self.method.tasks:
            output, target, mask = _full_precision(outputs[task.name]), targets[task.name], masks.get(task.name)
            self.log(f"{split}/{task.name}/loss", task.compute_loss(output, target, mask), on_epoch=True, sync_dist=True, batch_size=n)
            if mask is not None:
                keep = mask.bool()
                output, target = output[keep], target[keep]
            for name, metric in task.new_metrics().items():
                if len(target):
                    metric.update(output, target)
                    value = float(metric.compute())
                else:  # logged anyway (with no weight) so that every process syncs the same keys
                    value = 0.0
                self.log(f"{split}/{task.name}/{name}", value, on_epoch=True, sync_dist=True, batch_size=len(target))


def _full_precision(output: Tensor) -> Tensor:
    """Losses of half-precision (autocast) outputs are taken in float32; float64 stays float64."""
    return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output


def _numbers(prefix: str, info: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a method's step info, for the logger."""
    return {prefix + k: float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


__all__ = ["AuxiliaryDDPStrategy", "AuxiliaryModule", "GlobalBatchSampler", "collate"]
