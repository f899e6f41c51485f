"""Data parallelism across processes (torchrun, DDP's process group) with the single-process step.

Every process holds the same model and method and takes its shard of each *global* batch. For a
method to take exactly the step one process would take on the whole batch, everything it computes
*linearly* from the batch — loss values, per-task gradients, the final ``.grad`` — must be the
global batch's value before anything nonlinear (a solver, a normalization, a softmax) reads it.
With mean-reduced losses the global value is a weighted mean over processes::

    x_global = Σ_r (n_r / N) · x_r        (n_r samples on process r, N in the global batch)

so a method calls :func:`average` exactly there, and the rest of its step runs identically on every
process. Meta steps shard their batches the same way: the hypergradient's products are averaged
where they are evaluated (:mod:`auxilia.hypergrad`). Outside :func:`sharded` (one process, or no step
under way) :func:`average` is the identity.

PyTorch's ``DistributedDataParallel`` wrapper is not used: it all-reduces inside ``backward`` once per
backward pass, which for a gradient-aggregation method would average each task's gradient separately
through hooks that ``torch.autograd.grad`` does not fire. Here the reductions are explicit, one per
quantity, and their sizes are documented per method in ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# n_local / n_global of the batch being stepped on; None outside ``sharded``
_fraction: float | None = None
# bytes sent by this process's all-reduces (for the overhead benchmark and the docs' table)
_traffic = {"calls": 0, "bytes": 0}


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only the main process (rank 0) writes logs, checkpoints and results."""
    return rank() == 0


def init_from_environment(device: str = "cpu", timeout: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment (NCCL for CUDA, gloo otherwise).

    ``timeout`` (seconds; default ``$AUXILIA_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`) bounds
    how long a collective waits for the other processes: a process that stops answering then
    fails the run within that time rather than after the backend's default of 30 minutes.
    Returns whether a group with more than one process is now running; a plain ``python`` launch
    (no ``WORLD_SIZE``) is left alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout(timeout)))
    return is_distributed()


DEFAULT_TIMEOUT_S = 300.0


def collective_timeout(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``$AUXILIA_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`; seconds."""
    if timeout is None:
        raw = os.environ.get("AUXILIA_DIST_TIMEOUT")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"AUXILIA_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not timeout > 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout}")
    return float(timeout)


# how gloo and NCCL word a collective that failed because another process stopped answering or left
_PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
              "communicator was aborted")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing for want of another process (a timeout, a closed
    connection), rather than a fault of this one."""
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _PEER_LOST)


def _scratch_device() -> torch.device:
    """Where small bookkeeping tensors (sizes, flags) must live for the group's backend: NCCL only
    reduces CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, op: Any = None) -> Tensor:
    _traffic["calls"] += 1
    _traffic["bytes"] += tensor.numel() * tensor.element_size()
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def traffic() -> dict[str, int]:
    """All-reduce calls and bytes this process has sent since the last :func:`reset_traffic`."""
    return dict(_traffic)


def reset_traffic() -> None:
    _traffic.update(calls=0, bytes=0)


def shard_bounds(n_global: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this process's rows of a global batch: contiguous, sizes differing by at most 1."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n_global, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


@contextmanager
def sharded(n_local: int, n_global: int | None = None) -> Iterator[None]:
    """Mark a step on this process's ``n_local`` samples of a global batch of ``n_global``: inside,
    :func:`average` returns global-batch values. Without ``n_global``, one small all-reduce finds it."""
    global _fraction
    if not is_distributed():
        yield
        return
    if n_global is None:
        n_global = int(_all_reduce(torch.tensor([float(n_local)], dtype=torch.float64, device=_scratch_device())).item())
    previous, _fraction = _fraction, n_local / float(n_global)
    try:
        yield
    finally:
        _fraction = previous


def active() -> bool:
    """Whether :func:`average` reduces across processes right now."""
    return _fraction is not None


def fraction() -> float:
    """n_local / n_global of the current sharded step (1 when none)."""
    return 1.0 if _fraction is None else _fraction


def average(tensor: Tensor) -> Tensor:
    """The global batch's value of a quantity that is a mean over this process's samples."""
    if _fraction is None:
        return tensor
    return _all_reduce(tensor.detach() * _fraction)


def average_all(tensors: Iterable[Tensor | None]) -> list[Tensor | None]:
    """:func:`average` of several tensors (``None`` kept) in one all-reduce."""
    tensors = list(tensors)
    if _fraction is None:
        return tensors
    present = [t for t in tensors if t is not None]
    if not present:
        return tensors
    dtype = torch.promote_types(present[0].dtype, torch.float32)
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = average(torch.cat([t.detach().reshape(-1).to(dtype) for t in present]))
    out: list[Tensor | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def all_agree(ok: bool) -> bool:
    """True only if ``ok`` on every process, so that a step fails everywhere or nowhere (a process
    raising alone would leave the others waiting in their next all-reduce)."""
    if _fraction is None:
        return ok
    flag = _all_reduce(torch.tensor([0.0 if ok else 1.0], device=_scratch_device()))
    return float(flag.item()) == 0.0


def average_gradients(parameters: Iterable[Tensor], scale: float | None = None) -> None:
    """Replace each ``.grad`` by its global-batch value, in one flat all-reduce.

    ``scale`` multiplies the local gradient before summing: by default n_local / N (gradients of
    this process's mean loss); 1 for gradients already scaled to the global batch. A parameter no
    process has a gradient for keeps ``None``; one only some have gets the others' as zeros.
    """
    if _fraction is None:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    weight = _fraction if scale is None else scale
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], dtype=torch.float64)
    flat = torch.cat([
        (torch.zeros(p.numel(), device=p.device, dtype=p.dtype) if p.grad is None else p.grad.reshape(-1) * weight)
        for p in params
    ])
    # the presence flags travel in the same call (as the buffer's dtype: 0/1 are exact)
    flat = _all_reduce(torch.cat([flat, present.to(flat)]))
    grads, flags = flat[: -len(params)], flat[-len(params) :]
    offset = 0
    for p, flag in zip(params, flags.tolist()):
        n = p.numel()
        if flag > 0:
            p.grad = grads[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def broadcast_state(*modules: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process (start of training, after a meta step),
    so that replicas that must be identical are, bit for bit."""
    if not is_distributed():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            with torch.no_grad():
                dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(local: Tensor, n_local: int) -> tuple[Tensor, int]:
    """Concatenate per-sample blocks across processes: ``local`` is (K, n_local·D) with samples in
    row-major blocks; returns (K, N·D) in rank order and this process's column offset. Done as one
    all-reduce of a zero-padded global matrix, which handles unequal shard sizes."""
    if _fraction is None:
        return local, 0
    K, width = local.shape
    per_sample = width // max(n_local, 1)
    counts = torch.zeros(world_size(), dtype=torch.float64, device=_scratch_device())
    counts[rank()] = float(n_local)
    counts = _all_reduce(counts)
    counts_list = [int(c) for c in counts.tolist()]
    offset = sum(counts_list[: rank()]) * per_sample
    full = local.new_zeros(K, sum(counts_list) * per_sample)
    full[:, offset : offset + width] = local.detach()
    return _all_reduce(full), offset


__all__ = [
    "active",
    "all_agree",
    "average",
    "average_all",
    "average_gradients",
    "barrier",
    "broadcast_state",
    "collective_timeout",
    "destroy",
    "fraction",
    "gather_rows",
    "init_from_environment",
    "is_distributed",
    "is_main",
    "lost_peer",
    "rank",
    "reset_traffic",
    "shard_bounds",
    "sharded",
    "traffic",
    "world_size",
]
