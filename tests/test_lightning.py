"""auxilia.lightning: the Lightning path takes auxilia's steps, on one process and under 2-process DDP.

* one process: parameters and method state equal those of auxilia's own Trainer on the same batches;
* two gloo processes (one spawn, launched as torchrun would, running several fits): parameters equal
  those of one process on the global batch, for a loss weighting, gradient methods and a meta-learned
  method, with auxilia's strategy, with plain ``strategy="ddp"`` and with Lightning's own
  DistributedSampler;
* a small Multi-MNIST-style CNN trains under Lightning's own spawn launcher, logs weights through the
  logger and ends where one process ends.

Models that are compared across process counts run in float64, so that a wrong reduction shows as an
O(1) difference while a sharded batch's different summation order stays at rounding level.
"""

from __future__ import annotations

import csv
import math
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

pl = pytest.importorskip("lightning.pytorch")

from auxilia import distributed, methods
from auxilia.experiments.toy import TASKS as TOY_TASKS
from auxilia.experiments.toy import SharedLinear
from auxilia.lightning import AuxiliaryDDPStrategy, AuxiliaryModule, GlobalBatchSampler, collate
from auxilia.models import MultiTaskModel
from auxilia.tasks import NonFiniteLossError, Task
from auxilia.training import Trainer, TrainerConfig
from auxilia.training.data import TaskDataset, epoch_batches

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]
QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
SGD = partial(torch.optim.SGD, lr=0.02, momentum=0.9)


def cosine(optimizer: torch.optim.Optimizer, total: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)


def halving(optimizer: torch.optim.Optimizer, total: int):
    """A schedule that does not depend on the run's length (a resumed run is given a longer one)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)


# ---------------------------------------------------------------------------------------- the toy
def toy_tasks(names=("main", "helpful", "harmful")) -> list[Task]:
    return [Task.regression(n, role="primary" if n == "main" else "auxiliary") for n in names]


def toy_data(n: int, seed: int, dtype=torch.float64, names=("main", "helpful", "harmful")) -> TaskDataset:
    """The toy's regression (experiments/toy.py): y_k = W_k·x + σ_k noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    targets = {}
    for name in names:
        w, sigma = TOY_TASKS[name]
        targets[name] = x @ torch.tensor(w, dtype=dtype) + sigma * torch.randn(n, generator=g, dtype=dtype)
    return TaskDataset(x, targets)


def toy_model(names=("main", "helpful", "harmful"), dtype=torch.float64) -> SharedLinear:
    torch.manual_seed(0)
    return SharedLinear(list(names)).to(dtype)


def state(module_or_trainer) -> dict[str, torch.Tensor]:
    """model.* and method.* tensors, for either training loop."""
    out = {f"model.{k}": v.detach().clone() for k, v in module_or_trainer.model.state_dict().items()}
    out.update({f"method.{k}": v.detach().clone() for k, v in module_or_trainer.method.state_dict().items()})
    return out


def assert_same(got: dict, expected: dict, what: str, rtol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=1e-7, msg=lambda m, key=key: f"{what}, {key}: {m}")


# ---------------------------------------------------------------- 1. one process = auxilia's Trainer
TRAINER_CASES = {
    "equal": ("equal", {}, ("main", "helpful", "harmful")),
    "uncertainty": ("uncertainty", {}, ("main", "helpful", "harmful")),  # learnable weights: a 2nd param group
    "dwa": ("dwa", {}, ("main", "helpful", "harmful")),  # epoch-level state (epoch_end)
    "pcgrad": ("pcgrad", {}, ("main", "helpful", "harmful")),
    # two tasks: with three gradients in R² the bargaining problem is singular
    "auxinash": ("auxinash", {"hypergrad_every": 2, "meta_lr": 1.0}, ("main", "harmful")),
    "auxilearn": ("auxilearn", {"combiner": "nonlinear", "meta_every": 2, "meta_lr": 0.05}, ("main", "helpful", "harmful")),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_one_process_takes_the_trainers_steps(case):
    name, hp, names = TRAINER_CASES[case]
    train, aux = toy_data(60, 1, torch.float32, names), toy_data(30, 2, torch.float32, names)
    config = TrainerConfig(epochs=3, batch_size=10, seed=3)
    reference = Trainer(toy_model(names, torch.float32), methods.create(name, toy_tasks(names), **hp),
                        {"train": train, "aux": aux}, SGD, config, scheduler=cosine)
    reference.fit()

    module = AuxiliaryModule(toy_model(names, torch.float32), name, SGD, tasks=toy_tasks(names), hyperparameters=hp,
                             scheduler=cosine, meta_datasets={"train": train, "aux": aux}, seed=3)
    loader = DataLoader(train, batch_sampler=GlobalBatchSampler(train, 10, seed=3), collate_fn=collate)
    pl.Trainer(max_epochs=3, devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False, **QUIET).fit(module, loader)

    assert module.global_step == reference.step == 18
    assert_same(state(module), state(reference), case)
    assert module.method.weights() == pytest.approx(reference.method.weights(), rel=1e-5)


# ------------------------------------------------------------ 2. two processes = one process, toy
# (method, hyperparameters, strategy, sampler): "global" = GlobalBatchSampler, global batch 7 of 42
# samples (shards of 4 and 3); "lightning" = Lightning's DistributedSampler, 5 per process of 40.
DDP_CASES = {
    "uncertainty": ("uncertainty", {}, "auxilia", "global"),
    "pcgrad": ("pcgrad", {}, "auxilia", "global"),
    "auxilearn": ("auxilearn", {"meta_every": 2, "meta_lr": 0.05}, "auxilia", "global"),
    "mgda@plain-ddp": ("mgda", {}, "ddp", "global"),
    "equal@distributed-sampler": ("equal", {}, "auxilia", "lightning"),
}


def fit_toy(case: str, devices: int) -> AuxiliaryModule:
    name, hp, strategy, sampling = DDP_CASES[case]
    train, aux = toy_data(42 if sampling == "global" else 40, 1), toy_data(20, 2)
    module = AuxiliaryModule(toy_model(), name, SGD, tasks=toy_tasks(), hyperparameters=hp, scheduler=cosine,
                             meta_datasets={"train": train, "aux": aux}, meta_batch_size=10, seed=3)
    if sampling == "global":
        loader = DataLoader(train, batch_sampler=GlobalBatchSampler(train, 7, seed=3), collate_fn=collate)
    elif devices == 1:
        # the single-process run with Lightning's global batches: its DistributedSampler's permutation
        # (seed 0, as Lightning's), cut into batches of 2 x 5
        loader = DataLoader(train, batch_size=10, sampler=DistributedSampler(train, num_replicas=1, rank=0, shuffle=True), collate_fn=collate)
    else:
        loader = DataLoader(train, batch_size=5, collate_fn=collate)  # Lightning shards (and shuffles) it
    if devices == 1:
        strategy_ = "auto"
    else:
        strategy_ = AuxiliaryDDPStrategy(process_group_backend="gloo") if strategy == "auxilia" else "ddp"
    trainer = pl.Trainer(max_epochs=2, devices=devices, strategy=strategy_, logger=False, enable_checkpointing=False,
                         use_distributed_sampler=sampling == "lightning", **QUIET)
    trainer.fit(module, loader)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_worker(rank: int, port: int, out: str) -> None:
    """One of two processes, started as torchrun would (Lightning then launches nothing itself)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    results = {case: state(fit_toy(case, devices=2)) for case in DDP_CASES}
    assert distributed.is_distributed() and distributed.world_size() == 2  # Lightning's group, seen by auxilia
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning-ddp")
    mp.start_processes(_toy_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_two_processes_take_the_single_process_steps(two_process_toy, case):
    expected = state(fit_toy(case, devices=1))
    assert not torch.equal(expected["model.encoder.weight"], toy_model().encoder.weight)  # it trained
    for rank in (0, 1):
        assert_same(two_process_toy[rank][case], expected, f"{case}, rank {rank}")


# ------------------------------------------------ 3. Multi-MNIST-style CNN under Lightning's spawn
def multi_mnist(n: int, seed: int) -> TaskDataset:
    """28x28 images with a class pattern in the upper-left and another in the lower-right (the
    patterns overlap in the middle, as overlaid digits do); labels ``left`` and ``right``."""
    patterns = torch.randn(10, 14, 14, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    x[:, 0, 1:15, 1:15] += patterns[left]
    x[:, 0, 12:26, 12:26] += patterns[right]
    return TaskDataset(x, {"left": left, "right": right})


def cnn() -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(4, 8, 5), nn.MaxPool2d(2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(128, 32), nn.ReLU())
    return MultiTaskModel(encoder, {"left": nn.Linear(32, 10), "right": nn.Linear(32, 10)}).double()


class SaveState(pl.Callback):
    """Every process writes where it ended (rank 0's also comes back to the launching process)."""

    def __init__(self, out: str):
        self.out = out

    def setup(self, trainer, module, stage):
        if trainer.world_size > 1:  # in the spawned processes: two of them share CI's two cores
            torch.set_num_threads(1)

    def on_train_end(self, trainer, module):
        torch.save(state(module), Path(self.out) / f"cnn-rank{trainer.global_rank}.pt")


def fit_cnn(devices: int, root: Path) -> tuple[AuxiliaryModule, pl.Trainer]:
    tasks = [Task.classification("left", role="primary"), Task.classification("right")]
    module = AuxiliaryModule(cnn(), "auxinash", partial(torch.optim.SGD, lr=0.05, momentum=0.9), tasks=tasks,
                             hyperparameters={"hypergrad_every": 4, "meta_lr": 0.5}, meta_batch_size=32, seed=1)
    train, val = multi_mnist(384, 1), multi_mnist(128, 2)
    loaders = (DataLoader(train, batch_sampler=GlobalBatchSampler(train, 16, seed=1), collate_fn=collate),
               DataLoader(val, batch_sampler=GlobalBatchSampler(val, 64, shuffle=False), collate_fn=collate))
    strategy = AuxiliaryDDPStrategy(start_method="spawn", process_group_backend="gloo") if devices > 1 else "auto"
    logger = pl.loggers.CSVLogger(root, name="cnn", version=devices)
    trainer = pl.Trainer(max_epochs=2, devices=devices, strategy=strategy, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, use_distributed_sampler=False, default_root_dir=root,
                         callbacks=[SaveState(str(root))], **QUIET)
    trainer.fit(module, *loaders)
    return module, trainer


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_a_multi_mnist_cnn_trains_on_two_processes(tmp_path):
    two, _ = fit_cnn(2, tmp_path)  # rank 0's parameters come back into this process
    rank1 = torch.load(tmp_path / "cnn-rank1.pt", weights_only=True)
    one, _ = fit_cnn(1, tmp_path)
    assert_same(state(two), state(one), "cnn, rank 0")
    assert_same(rank1, state(one), "cnn, rank 1")

    rows = read_log(tmp_path / "cnn" / "version_2" / "metrics.csv")
    steps = [r for r in rows if "train/left/loss" in r]
    assert len(steps) == 48  # 384 / 16 x 2 epochs, one row per step
    first, last = steps[0]["train/left/loss"], sum(r["train/left/loss"] for r in steps[-4:]) / 4
    assert last < 0.75 * first
    # AuxiNash's bargaining powers, moved by the meta steps (every 4 steps), sum to K = 2
    powers = [(r["weight/left"], r["weight/right"]) for r in steps]
    assert all(math.isclose(a + b, 2.0, rel_tol=1e-6) for a, b in powers) and powers[-1] != powers[0]
    assert sum("meta/val_loss" in r for r in rows) == 12  # one row per meta step
    val = [r for r in rows if "val/left/accuracy" in r]
    assert len(val) == 2 and val[-1]["val/left/accuracy"] > 0.3  # chance is 0.1
    assert two.method.weights() == pytest.approx({"left": powers[-1][0], "right": powers[-1][1]}, rel=1e-6)


# ---------------------------------------------------------------------- 4. logging, checkpoints
def test_weights_losses_and_metrics_reach_the_logger(tmp_path):
    train, val = toy_data(40, 1, torch.float32), toy_data(20, 2, torch.float32)
    module = AuxiliaryModule(toy_model(dtype=torch.float32), "uncertainty", SGD, tasks=toy_tasks())
    logger = pl.loggers.CSVLogger(tmp_path, name="toy", version=0)
    trainer = pl.Trainer(max_epochs=2, devices=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False, **QUIET)
    trainer.fit(module, DataLoader(train, batch_size=10, collate_fn=collate), DataLoader(val, batch_size=8, collate_fn=collate))
    rows = read_log(tmp_path / "toy" / "version_0" / "metrics.csv")
    steps = [r for r in rows if "weight/main" in r]
    assert len(steps) == 8
    assert {"train/main/loss", "train/harmful/loss", "train/objective", "weight/helpful", "weight/harmful"} <= steps[-1].keys()
    assert steps[-1]["weight/main"] != steps[0]["weight/main"]  # uncertainty learns its weights
    final = module.method.weights()
    assert {k: steps[-1][f"weight/{k}"] for k in final} == pytest.approx(final, rel=1e-6)
    epochs = [r for r in rows if "val/main/mse" in r]
    assert len(epochs) == 2 and {"val/main/loss", "val/main/mae", "val/harmful/mse"} <= epochs[-1].keys()
    # the logged validation loss is the mean over the whole split (batches of 8, 8 and 4)
    with torch.no_grad():
        full = ((module.model(val.inputs)["main"] - val.targets["main"]) ** 2).mean()
    assert epochs[-1]["val/main/loss"] == pytest.approx(float(full), rel=1e-5)


def test_a_checkpoint_resumes_the_same_run(tmp_path):
    train, aux = toy_data(40, 1), toy_data(20, 2)

    def run(epochs: int, resume: Path | None = None) -> tuple[AuxiliaryModule, pl.Trainer]:
        module = AuxiliaryModule(toy_model(), "auxilearn", SGD, tasks=toy_tasks(), scheduler=halving,
                                 hyperparameters={"meta_every": 3, "meta_lr": 0.05}, meta_datasets={"train": train, "aux": aux})
        loader = DataLoader(train, batch_sampler=GlobalBatchSampler(train, 8), collate_fn=collate)
        trainer = pl.Trainer(max_epochs=epochs, devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False, **QUIET)
        trainer.fit(module, loader, ckpt_path=resume)
        return module, trainer

    reference, _ = run(4)
    _, first = run(2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert any(k.startswith("method.") for k in saved["state_dict"]) and saved["optimizer_states"][0]["state"]
    assert saved["lr_schedulers"][0]["last_epoch"] == 10
    resumed, _ = run(4, tmp_path / "half.ckpt")
    assert resumed.global_step == reference.global_step == 20
    assert int(resumed.method.meta_steps) == 6
    assert_same(state(resumed), state(reference), "resumed")


# ---------------------------------------------------------------------- 5. smaller contracts
def test_a_nonfinite_step_is_skipped_or_raised():
    train = toy_data(10, 1, torch.float32)
    train.targets["helpful"][3] = float("nan")  # poisons the only batch
    for policy in ("skip", "raise"):
        module = AuxiliaryModule(toy_model(dtype=torch.float32), "pcgrad", SGD, tasks=toy_tasks(), nonfinite=policy)
        before = module.model.encoder.weight.detach().clone()
        trainer = pl.Trainer(max_epochs=1, devices=1, logger=False, enable_checkpointing=False, **QUIET)
        if policy == "raise":
            with pytest.raises(NonFiniteLossError):
                trainer.fit(module, DataLoader(train, batch_size=10, collate_fn=collate))
        else:
            trainer.fit(module, DataLoader(train, batch_size=10, collate_fn=collate))
            assert torch.equal(module.model.encoder.weight, before)
            assert int(module.method.steps) == 0 and module.global_step == 0


def test_a_skipped_step_and_meta_step_leave_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    names = ("main", "helpful")
    model = MultiTaskModel(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU()),
                           {name: nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)) for name in names})
    train, aux = toy_data(10, 1, torch.float32, names), toy_data(10, 2, torch.float32, names)
    train.inputs[3, 0] = aux.inputs[:, 0] = float("nan")  # the only batch, and every meta batch
    module = AuxiliaryModule(model, "auxilearn", SGD, tasks=toy_tasks(names), hyperparameters={"meta_every": 1},
                             meta_datasets={"aux": aux}, nonfinite="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pl.Trainer(max_epochs=1, devices=1, logger=False, enable_checkpointing=False, **QUIET).fit(
        module, DataLoader(train, batch_size=10, collate_fn=collate))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a clean step, then a meta step on the NaN meta batch: the meta step's forward is undone too
    train.inputs[3, 0] = 0.0
    pl.Trainer(max_epochs=1, devices=1, logger=False, enable_checkpointing=False, **QUIET).fit(
        module, DataLoader(train, batch_size=10, collate_fn=collate))
    assert int(model.encoder[1].num_batches_tracked) == 1
    assert torch.isfinite(model.encoder[1].running_mean).all()


def test_the_global_batch_sampler_shards_the_trainers_batches(monkeypatch):
    dataset = toy_data(24, 0)  # the last global batch has 3 samples
    whole = [b[0] for b in epoch_batches(dataset, 7, seed=1, epoch=2)]
    for world in (1, 2, 3):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        parts = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            sampler = GlobalBatchSampler(dataset, 7, seed=1)
            sampler.set_epoch(2)
            parts.append([dataset.inputs[indices] for indices in sampler])
        assert [len(p) for p in parts] == [len(sampler)] * world == [4] * world
        for i, batch in enumerate(whole):
            torch.testing.assert_close(torch.cat([p[i] for p in parts]), batch)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="drop_last"):
        list(GlobalBatchSampler(toy_data(22, 0), 7))  # the last global batch has 1 sample for 3 processes
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        GlobalBatchSampler(DistributedSampler(dataset, num_replicas=2, rank=0), 7)


def test_a_method_by_name_needs_its_tasks():
    with pytest.raises(ValueError, match="tasks="):
        AuxiliaryModule(toy_model(), "equal", SGD)
    with pytest.raises(ValueError, match="already built"):
        AuxiliaryModule(toy_model(), methods.create("equal", toy_tasks()), SGD, tasks=toy_tasks())


def test_a_model_with_its_own_training_rule_is_refused_with_a_clear_error():
    class OwnRule(SharedLinear):
        def own_step(self, losses, **kw):
            return None

    with pytest.raises(TypeError, match="own_step.*auxilia's Trainer"):
        AuxiliaryModule(OwnRule([t for t in TOY_TASKS]), "equal", SGD, tasks=toy_tasks())


def test_masked_metrics_average_over_the_labelled_samples(tmp_path):
    val = toy_data(20, 2, torch.float32)
    labelled = torch.arange(20) < 5  # the second batch of 10 has no label for 'helpful'
    val = TaskDataset(val.inputs, val.targets, {"helpful": labelled})
    module = AuxiliaryModule(toy_model(dtype=torch.float32), "equal", SGD, tasks=toy_tasks())
    trainer = pl.Trainer(devices=1, logger=pl.loggers.CSVLogger(tmp_path, name="masked", version=0), **QUIET)
    trainer.validate(module, DataLoader(val, batch_size=10, collate_fn=collate))
    row = read_log(tmp_path / "masked" / "version_0" / "metrics.csv")[-1]
    with torch.no_grad():
        error = module.model(val.inputs[labelled])["helpful"] - val.targets["helpful"][labelled]
    assert row["val/helpful/mse"] == pytest.approx(float((error**2).mean()), rel=1e-5)
    assert row["val/helpful/mae"] == pytest.approx(float(error.abs().mean()), rel=1e-5)
