"""Under 2 gloo processes every method takes the single-process step with the global batch.

This includes a step (or a meta step) whose batch holds a non-finite loss on one process only: every
process must fail it together, or the others would wait for that process in their next all-reduce.

One spawn of two processes trains every case below and saves what it ended with; the test trains the
same cases in this process and compares parameters and method state. The models run in float64 so
that a wrong reduction (a missing or double average, a local quantity where the global one belongs)
shows as an O(1) difference, far above the 1e-5 relative tolerance, while the different summation
order of a sharded batch stays at rounding level.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from auxilia import distributed, methods
from auxilia.architectures import AuxNAS
from auxilia.tasks import Task
from auxilia.training import Trainer, TrainerConfig
from auxilia.training.data import TaskDataset, epoch_batches

TASKS = [Task.regression("main", role="primary"), Task.regression("aux1"), Task.classification("aux2")]
# a meta step every 2 steps, so that the short runs below take several
SHORT_META = {
    "auxilearn": {"meta_every": 2, "meta_lr": 0.05},
    "auxinash": {"hypergrad_every": 2, "meta_lr": 0.05},
    "maoal": {"meta_every": 2, "look_back": 2},
}
EXTRA_CASES = {
    "pcgrad@representation": ("pcgrad", {"mode": "representation"}),
    "nash-mtl@representation": ("nash-mtl", {"mode": "representation"}),
    "mgda@batched": ("mgda", {"mode": "batched"}),
    "auxilearn@nonlinear": ("auxilearn", {"combiner": "nonlinear", "meta_every": 2, "meta_lr": 0.05}),
    "auxilearn@train-source": ("auxilearn", {"meta_every": 3, "meta_source": "train"}),
    # a model that does not name its heads: methods find them by walking the losses' graphs
    "uncertainty@undeclared-heads": ("uncertainty", {}),
    "auxilearn@undeclared-heads": ("auxilearn", {"meta_every": 2, "meta_lr": 0.05}),
    "pcgrad@undeclared-heads": ("pcgrad", {}),
    # a non-finite loss on one process's shard: every process skips the step, as one process would
    "equal@nan-sample": ("equal", {}),
    "mgda@nan-sample": ("mgda", {}),
    "auxilearn@nan-sample": ("auxilearn", {"meta_every": 2, "meta_lr": 0.05}),
}


def cases() -> dict[str, tuple[str, dict]]:
    out = {name: (name, SHORT_META.get(name, {})) for name in methods.available()}
    out.update(EXTRA_CASES)
    out["auxnas"] = ("equal", {})  # the Aux-NAS model's own architecture steps, with `equal`
    return out


class Net(nn.Module):
    """Shared encoder, one head per task; no dropout or batch statistics (they are per process)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleDict({"main": nn.Linear(6, 1), "aux1": nn.Linear(6, 1), "aux2": nn.Linear(6, 3)})

    def forward_with_representation(self, x):
        z = self.encoder(x)
        return z, {"main": self.heads["main"](z).squeeze(-1), "aux1": self.heads["aux1"](z).squeeze(-1), "aux2": self.heads["aux2"](z)}

    def forward(self, x):
        return self.forward_with_representation(x)[1]

    def shared_parameters(self):
        return list(self.encoder.parameters())


class NetWithHeads(Net):
    def task_parameters(self):
        return list(self.heads.parameters())


class NasNet(nn.Module):
    """A two-branch Aux-NAS model whose outputs match the task names above."""

    def __init__(self):
        super().__init__()
        blocks = lambda: [nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
        self.net = AuxNAS(blocks(), blocks(), nn.Linear(8, 1), nn.Linear(8, 1), primary="main", auxiliary="aux1",
                          features="token", window=1)

    def forward(self, x):
        out = self.net(x)
        return {"main": out["main"].squeeze(-1), "aux1": out["aux1"].squeeze(-1)}

    def shared_parameters(self):
        return self.net.shared_parameters()

    def own_parameters(self):
        return self.net.own_parameters()

    def own_step(self, losses, **kw):
        return self.net.own_step(losses, **kw)


def data(n: int, seed: int) -> TaskDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    targets = {
        "main": x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
        "aux1": x[:, 1] + x[:, 2],
        "aux2": (x[:, 3] > 0).long() + (x[:, 0] > 1).long(),
    }
    return TaskDataset(x, targets)


def build(case: str, checkpoint_steps: int | None = None) -> Trainer:
    name, hp = cases()[case]
    torch.manual_seed(0)
    nas = case == "auxnas"
    model = (NasNet() if nas else Net() if case.endswith("@undeclared-heads") else NetWithHeads()).double()
    tasks = TASKS[:2] if nas else TASKS
    datasets = {"train": data(42, 1), "aux": data(20, 2), "test": data(16, 3)}  # no val: no reload at the end
    if case.endswith("@nan-sample"):
        datasets["train"].targets["aux1"][5] = float("nan")
    if nas:
        datasets = {k: TaskDataset(v.inputs, {t: v.targets[t] for t in ("main", "aux1")}) for k, v in datasets.items()}
    # 42 samples in batches of 7: shards of 4 and 3, so the weighting of unequal shards is exercised
    config = TrainerConfig(epochs=2, batch_size=7, seed=3, meta_batch_size=10, log_every=1,
                           nonfinite="skip" if case.endswith("@nan-sample") else "raise")
    return Trainer(model, methods.create(name, tasks, **hp), datasets, partial(torch.optim.SGD, lr=0.05, momentum=0.9), config,
                   scheduler=lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total))


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {"skipped": torch.tensor(trainer.skipped), "skipped_meta": torch.tensor(trainer.skipped_meta)}
    state.update({f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()})
    state.update({f"method.{k}": v.detach().clone() for k, v in trainer.method.state_dict().items()})
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for case in cases():
            trainer = build(case)
            trainer.fit()
            results[case] = final_state(trainer)
        # a 2-process run checkpointed at step 5, for the 1-process resume below
        trainer = build("auxinash")
        trainer.fit(checkpoint=Path(out) / "resume.pt", checkpoint_every=5, stop_at=5)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out, {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.mark.parametrize("case", list(cases()))
def test_two_processes_take_the_single_process_steps(two_process_results, case):
    _, results = two_process_results
    trainer = build(case)
    trainer.fit()
    expected = final_state(trainer)
    for rank in (0, 1):
        got = results[rank][case]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            where = f"{case}, rank {rank}, {key}"
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-8, msg=lambda m, where=where: f"{where}: {m}")
    assert int(expected["skipped"]) == (2 if case.endswith("@nan-sample") else 0)  # once per epoch
    assert int(expected["skipped_meta"]) == (1 if case == "auxilearn@nan-sample" else 0)  # its meta batch met the NaN
    moved = build(case)
    assert any(not torch.equal(a, b) for a, b in zip(moved.model.state_dict().values(), trainer.model.state_dict().values()))


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_results):
    out, _ = two_process_results
    resumed = build("auxinash")
    resumed.fit(checkpoint=out / "resume.pt")
    reference = build("auxinash")
    reference.fit()
    assert resumed.step == reference.step == 12
    for key, value in final_state(reference).items():
        torch.testing.assert_close(final_state(resumed)[key], value, rtol=1e-5, atol=1e-8, msg=lambda m, key=key: f"{key}: {m}")


def test_shards_partition_every_global_batch():
    dataset = data(23, 0)
    whole = [b[0] for b in epoch_batches(dataset, 7, seed=1, epoch=0)]
    for world in (1, 2, 3):
        parts = [[b[0] for b in epoch_batches(dataset, 7, seed=1, epoch=0, shard=(r, world))] for r in range(world)]
        for i, batch in enumerate(whole):
            torch.testing.assert_close(torch.cat([p[i] for p in parts]), batch)
            sizes = [len(p[i]) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_outside_a_process_group_nothing_is_reduced():
    x = torch.randn(3)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    with distributed.sharded(5):
        assert distributed.average(x) is x and distributed.all_agree(True) and not distributed.all_agree(False)
        assert not distributed.active()


def test_run_with_two_processes_writes_the_single_process_table(tmp_path):
    import json
    import subprocess
    import sys

    def run(nproc: int) -> list[dict]:
        out = tmp_path / f"nproc{nproc}"
        command = [sys.executable, "-m", "auxilia.cli", "run", "toy", "--method", "uncertainty", "--method", "gcs",
                   "--seeds", "1", "--max-steps", "60", "--out", str(out), "--no-plots", "--nproc", str(nproc)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    one, two = run(1), run(2)
    assert [r["method"] for r in two] == [r["method"] for r in one]  # rank 0 alone wrote, once per run
    for a, b in zip(one, two):
        for split in ("val", "test"):
            for key, value in a["metrics"][split].items():
                assert b["metrics"][split][key] == pytest.approx(value, rel=1e-4), (a["method"], split, key)


def test_nproc_relaunches_under_torchrun_without_the_flag(monkeypatch):
    from torch.distributed import run as torchrun

    from auxilia import cli

    seen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torchrun, "run", seen.append)
    for flag in (["--nproc", "3"], ["--nproc=3"]):
        assert cli.main(["run", "toy", *flag, "--seeds", "1"]) == 0
        launch = seen.pop()
        assert launch.standalone and launch.nproc_per_node == "3" and launch.module
        assert [launch.training_script, *launch.training_script_args] == ["auxilia.cli", "run", "toy", "--seeds", "1"]


def test_the_collective_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.append((backend, kwargs)))
    distributed.init_from_environment("cpu", timeout=7)
    monkeypatch.setenv("AUXILIA_DIST_TIMEOUT", "11")
    distributed.init_from_environment("cpu")
    monkeypatch.delenv("AUXILIA_DIST_TIMEOUT")
    distributed.init_from_environment("cpu")
    assert [kwargs["timeout"] for _, kwargs in seen] == [
        datetime.timedelta(seconds=s) for s in (7, 11, distributed.DEFAULT_TIMEOUT_S)]
    assert distributed.DEFAULT_TIMEOUT_S <= 600
    with pytest.raises(ValueError, match="positive"):
        distributed.collective_timeout(0)


# imported by every worker of the run below (PYTHONPATH): rank 1 stops answering at its first broadcast
STUCK = """
import os
if os.environ.get("RANK") == "1":
    import time
    import auxilia.distributed
    auxilia.distributed.broadcast_state = lambda *modules: time.sleep(120)
"""


def test_a_worker_that_stops_answering_fails_the_run_naming_its_rank(tmp_path):
    import subprocess
    import sys
    import time

    (tmp_path / "sitecustomize.py").write_text(STUCK)
    command = [sys.executable, "-m", "auxilia.cli", "run", "toy", "--method", "equal", "--seeds", "1",
               "--max-steps", "2", "--nproc", "2", "--timeout", "2", "--out", str(tmp_path / "out"), "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (
        str(tmp_path), os.environ.get("PYTHONPATH"))))}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 1 and time.monotonic() - started < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("auxilia: error: worker rank 1 of 2 stopped answering: rank 0 gave up"), done.stderr
    assert "--timeout 2 s" in last
