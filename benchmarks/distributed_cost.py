"""What data parallelism costs each method: bytes all-reduced per step and time per step, 1 vs N processes.

Every method trains the same CNN (the step-cost benchmark's, K tasks) on the same global batch, once in
one process and once in ``--nproc`` processes (gloo, one thread each), through auxilia's Trainer. The
configurations are interleaved (one short run of each method, repeated) so that drift of a shared
machine hits them alike; medians are kept. Reported per method: the bytes this process sent in
all-reduces per step (measured by :func:`auxilia.distributed.traffic`) next to the formula in
``docs/distributed.md``, and time per step as ratios (N processes ÷ 1 process; method ÷ ``equal``).

    python benchmarks/distributed_cost.py --out benchmarks/results/distributed_cost_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from step_cost import CNN  # the same model as the step-cost benchmark

from auxilia import Task, distributed, methods
from auxilia.training import Trainer, TrainerConfig
from auxilia.training.data import TaskDataset

METHODS = ["equal", "uncertainty", "dwa", "gradnorm", "pcgrad", "mgda", "cagrad", "nash-mtl", "maoal", "auxilearn"]


class Net(CNN):
    def forward(self, x):
        return self.forward_with_representation(x)[1]

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def trainer(method: str, tasks: int, steps: int, batch: int) -> Trainer:
    names = [f"t{k}" for k in range(tasks)]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = batch * 4
    x = torch.randn(n, 3, 32, 32, generator=g)
    data = TaskDataset(x, {t: torch.randint(0, 10, (n,), generator=g) for t in names})
    task_list = [Task.classification(t, role="primary" if k == 0 else "auxiliary") for k, t in enumerate(names)]
    config = TrainerConfig(epochs=10_000, batch_size=batch, max_steps=steps, seed=0, log_every=10_000)
    return Trainer(Net(names), methods.create(method, task_list), {"train": data, "aux": data},
                   partial(torch.optim.SGD, lr=0.01), config)


def measure(tasks: int, steps: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    sent: dict[str, float] = {}
    for _ in range(repeats):
        for method in METHODS:
            t = trainer(method, tasks, steps, batch)
            distributed.reset_traffic()
            result = t.fit()
            sent[method] = distributed.traffic()["bytes"] / steps
            times[method].append(result.time_per_step_s)
    net = Net([f"t{k}" for k in range(tasks)])
    sizes = {"shared_parameters": sum(p.numel() for p in net.encoder.parameters()),
             "head_parameters": sum(p.numel() for p in net.heads.parameters())}
    return {m: {"time_per_step_s": statistics.median(times[m]), "bytes_per_step": sent[m], **sizes} for m in METHODS}


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = measure(**args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        distributed.destroy()


def run(world: int, args: dict, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = out / f"world{world}.json"
    mp.start_processes(_worker, args=(world, port, args, str(path)), nprocs=world, join=True, start_method="spawn")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/distributed_cost_cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp())  # the workers' reports
    settings = {"tasks": args.tasks, "steps": args.steps, "batch": args.batch, "repeats": args.repeats}
    one, many = run(1, settings, scratch), run(args.nproc, settings, scratch)
    P, H = one["equal"]["shared_parameters"], one["equal"]["head_parameters"]
    rows = [
        (f"# Data-parallel cost, CNN (P = {P:,} shared and H = {H:,} head parameters), K = {args.tasks}, "
         f"global batch {args.batch}"),
        "",
        (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}, gloo; "
         f"1 thread per process. Median of {args.repeats} interleaved runs of {args.steps} steps."),
        (f"Command: `python benchmarks/distributed_cost.py --nproc {args.nproc} --tasks {args.tasks} "
         f"--steps {args.steps} --batch {args.batch} --repeats {args.repeats}`"),
        "",
        f"| method | MB all-reduced / step / process | ÷ 4(P + H) bytes | step time {args.nproc} proc ÷ 1 proc | ÷ equal, 1 proc | ÷ equal, {args.nproc} proc |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        b = many[m]["bytes_per_step"]
        rows.append(
            f"| {m} | {b / 1e6:.3f} | {b / (4 * (P + H)):.2f} | "
            f"{many[m]['time_per_step_s'] / one[m]['time_per_step_s']:.2f} | "
            f"{one[m]['time_per_step_s'] / one['equal']['time_per_step_s']:.2f} | "
            f"{many[m]['time_per_step_s'] / many['equal']['time_per_step_s']:.2f} |"
        )
    text = "\n".join(rows) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "nproc": args.nproc, "one": one, "many": many}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
