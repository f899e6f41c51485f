"""What the Trainer guarantees when things go wrong: non-finite steps change nothing (BatchNorm
statistics included), a run of only skipped steps fails, log.csv survives SIGKILL and resumption,
checkpoints are verified; and that amp really runs the forward in bfloat16."""

import math
import os
import signal
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from torch import nn

from auxilia import Task, methods
from auxilia.architectures import AuxNAS
from auxilia.training import (
    AllStepsSkippedError,
    CheckpointError,
    TaskDataset,
    Trainer,
    TrainerConfig,
    epoch_batches,
    read_checkpoint,
)

TASKS = [Task.classification("main", "primary"), Task.regression("aux")]


class NormNet(nn.Module):
    """An encoder with BatchNorm (running statistics in buffers) and two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.heads = nn.ModuleDict({"main": nn.Linear(8, 3), "aux": nn.Linear(8, 1)})

    def forward(self, x):
        rep = self.encoder(x)
        return {"main": self.heads["main"](rep), "aux": self.heads["aux"](rep).squeeze(-1)}

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def _split(n, seed, nan_rows=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    x[list(nan_rows), 0] = float("nan")
    return TaskDataset(x, {"main": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "aux": x[:, :3].sum(1)})


def _datasets(nan_rows=(), aux_nan=False):
    out = {"train": _split(96, 0, nan_rows), "val": _split(40, 1), "test": _split(40, 2)}
    if aux_nan:
        out["aux"] = _split(16, 3, range(16))
    return out


def _trainer(model=None, method="equal", datasets=None, hyperparameters=None, log_dir=None, **config):
    config = {"epochs": 2, "batch_size": 16, "seed": 3, "nonfinite": "skip", **config}
    return Trainer(model or NormNet(), methods.create(method, TASKS, **(hyperparameters or {})), datasets or _datasets(),
                   partial(torch.optim.SGD, lr=0.1, momentum=0.9), TrainerConfig(**config), log_dir=log_dir)


def _snapshot(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.method.state_dict().items()},
            repr(trainer.optimizer.state_dict()))


def _assert_unchanged(trainer, before):
    model, method, optimizer = before
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, model[k]), k
    for k, v in trainer.method.state_dict().items():
        assert torch.equal(v, method[k]), k
    assert repr(trainer.optimizer.state_dict()) == optimizer


# ---------------------------------------------------------------- non-finite steps
def test_a_skipped_step_leaves_batchnorm_statistics_and_counters_as_they_were():
    trainer = _trainer(datasets=_datasets(nan_rows=[5]))
    batches = list(epoch_batches(trainer.datasets["train"], 16, seed=0, epoch=0, shuffle=False))
    assert trainer.train_step(batches[1]) is not None  # a clean step first: momentum in the optimizer
    before = _snapshot(trainer)
    assert trainer.train_step(batches[0]) is None  # sample 5 is NaN
    _assert_unchanged(trainer, before)
    assert int(trainer.model.encoder[1].num_batches_tracked) == 1


def test_a_run_with_a_nan_sample_ends_with_finite_statistics_and_metrics():
    trainer = _trainer(datasets=_datasets(nan_rows=[5]))
    result = trainer.fit()
    assert result.skipped_steps == 2  # once per epoch: the run succeeds and reports them
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers())
    assert all(math.isfinite(v) for v in result.metrics["test"].values())


def test_a_skipped_meta_step_leaves_the_model_buffers_as_they_were():
    trainer = _trainer(method="auxilearn", datasets=_datasets(aux_nan=True), hyperparameters={"meta_every": 1})
    before = _snapshot(trainer)
    assert trainer._meta_step() == {"skipped": 1.0}
    assert trainer.skipped_meta == 1
    _assert_unchanged(trainer, before)


def _conv_auxnas():
    torch.manual_seed(0)

    def blocks():
        return [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())]

    def head():
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))

    return AuxNAS(blocks(), blocks(), head(), head(), primary="main", auxiliary="aux", fusion_norm="split")


@pytest.mark.parametrize("batch_in_epoch", [0, 1])  # a weight step, an architecture step (own_step)
def test_a_skipped_aux_nas_step_changes_no_buffer_alpha_or_moment(batch_in_epoch):
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[1, 0, 0, 0] = float("nan")
    data = TaskDataset(x, {"main": torch.randn(16, 1), "aux": torch.randn(16, 1)})
    tasks = [Task.regression("main", "primary"), Task.regression("aux")]
    trainer = Trainer(_conv_auxnas(), methods.create("equal", tasks), {"train": data},
                      partial(torch.optim.Adam, lr=0.1), TrainerConfig(epochs=1, batch_size=8, nonfinite="skip"))
    batch = next(iter(epoch_batches(data, 8, seed=0, epoch=0, shuffle=False)))
    trainer.batch_in_epoch = batch_in_epoch
    before = _snapshot(trainer)
    assert trainer.train_step(batch) is None
    _assert_unchanged(trainer, before)
    assert int(trainer.model.arch_steps) == 0


def test_a_run_whose_every_step_was_skipped_raises():
    trainer = _trainer(datasets=_datasets(nan_rows=range(96)))
    with pytest.raises(AllStepsSkippedError, match=r"all 12 training steps were skipped as non-finite \(seen in: 'main'\)"):
        trainer.fit()
    assert isinstance(AllStepsSkippedError("x"), RuntimeError)


# ---------------------------------------------------------------- log.csv, SIGKILL and resumption
SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from functools import partial
    import torch
    from torch import nn
    from auxilia import Task, methods
    from auxilia.training import TaskDataset, Trainer, TrainerConfig

    log_dir, checkpoint, kill_after, kill_at_save = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    calls = saves = 0
    write = Trainer.save_checkpoint

    def save_checkpoint(self, path):
        global saves
        saves += 1
        if saves == kill_at_save:  # killed as it starts writing a checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, path)

    Trainer.save_checkpoint = save_checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1))
            self.heads = nn.ModuleDict({"main": nn.Linear(8, 3), "aux": nn.Linear(8, 1)})

        def forward(self, x):
            global calls
            calls += 1
            if calls == kill_after:  # a kill -9 at an arbitrary point of the run
                os.kill(os.getpid(), signal.SIGKILL)
            rep = self.encoder(x)
            return {"main": self.heads["main"](rep), "aux": self.heads["aux"](rep).squeeze(-1)}

    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        return TaskDataset(x, {"main": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "aux": x.sum(1)})

    torch.manual_seed(0)
    tasks = [Task.classification("main", "primary"), Task.regression("aux")]
    trainer = Trainer(Net(), methods.create("dwa", tasks), {"train": split(80, 0), "val": split(30, 1), "test": split(30, 2)},
                      partial(torch.optim.Adam, lr=1e-2), TrainerConfig(epochs=3, batch_size=16, seed=1, log_every=2),
                      log_dir=log_dir, scheduler=lambda opt, total: torch.optim.lr_scheduler.StepLR(opt, 4, 0.5))
    trainer.fit(checkpoint=checkpoint, checkpoint_every=3)
''')


def _run(tmp_path, name, kill_after=0, kill_at_save=0):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arguments = [str(tmp_path / name), str(tmp_path / f"{name}.pt"), str(kill_after), str(kill_at_save)]
    return subprocess.run([sys.executable, str(script), *arguments], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def _rows(tmp_path, name):
    return (tmp_path / name / "log.csv").read_text().splitlines()


# forward calls: 5 training batches per epoch, then one val batch; the final val and test at 19, 20.
# checkpoints at steps 3, 5 (epoch end), 6, 9, 10 (epoch end), 12, 15 and 15 (epoch end): the 8th is
# written after the val rows of step 15, which the 7th (at the same step) does not cover
@pytest.mark.parametrize("kill_after, kill_at_save", [
    (5, 0),  # mid-epoch, rows logged since the last checkpoint
    (12, 0),  # in an epoch's validation
    (20, 0),  # in the final test, the final val rows written
    (0, 8),  # writing the epoch-end checkpoint at the step of the previous one
])
def test_log_csv_after_sigkill_and_resume_equals_an_uninterrupted_runs(tmp_path, kill_after, kill_at_save):
    reference = _run(tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr
    killed = _run(tmp_path, "run", kill_after, kill_at_save)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "run.pt").exists()
    resumed = _run(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr
    expected = _rows(tmp_path, "reference")
    assert any(r.split(",")[2] == "test/final" for r in expected)
    assert _rows(tmp_path, "run") == expected
    # a finished run resumed again adds no second set of final rows
    again = _run(tmp_path, "run")
    assert again.returncode == 0, again.stderr
    assert _rows(tmp_path, "run") == expected


def test_every_log_call_reaches_the_file_at_once(tmp_path):
    trainer = _trainer(log_dir=tmp_path)
    seen = []
    original = trainer._record

    def spy(info):
        original(info)
        seen.append(len((tmp_path / "log.csv").read_text().splitlines()))
    trainer._record = spy
    trainer.fit()
    assert seen[0] > 1 and seen == sorted(seen) and len(set(seen)) == len(seen)


# ---------------------------------------------------------------- checkpoints
def _checkpointed(tmp_path, **config):
    trainer = _trainer(**config)
    trainer.fit(checkpoint=tmp_path / "c.pt", stop_at=3, checkpoint_every=3)
    return tmp_path / "c.pt"


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "model state_dict", "old format", "empty"])
def test_an_unusable_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = _checkpointed(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif damage == "model state_dict":
        torch.save(NormNet().state_dict(), path)
    elif damage == "old format":
        torch.save(read_checkpoint(path), path)  # the state itself, as auxilia wrote it before checksums
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="c.pt"):
        _trainer().fit(checkpoint=path)


def test_a_flipped_byte_never_loads_a_changed_state(tmp_path):
    path = _checkpointed(tmp_path)
    original = read_checkpoint(path)
    data = bytearray(path.read_bytes())
    detected = 0
    for position in range(0, len(data), max(len(data) // 97, 1)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            state = read_checkpoint(path)
        except CheckpointError as error:
            assert "c.pt" in str(error)
            detected += 1
            continue
        # a byte the format ignores (zip padding): then nothing it holds changed
        assert repr(state["model"]) == repr(original["model"]) and state["counters"] == original["counters"]
    assert detected > 50


@pytest.mark.parametrize("change, setting", [
    ({"epochs": 4}, "total_steps"), ({"max_steps": 5}, "total_steps"),
    ({"batch_size": 32}, "steps_per_epoch"), ({"seed": 4}, "seed"),
])
def test_resuming_under_other_run_settings_is_refused(tmp_path, change, setting):
    path = _checkpointed(tmp_path)
    trainer = _trainer(**change)
    before = _snapshot(trainer)
    with pytest.raises(CheckpointError, match=rf"c\.pt.*{setting}="):
        trainer.fit(checkpoint=path)
    _assert_unchanged(trainer, before)
    assert trainer.step == 0


# ---------------------------------------------------------------- amp
class Recording(NormNet):
    """Records the dtype of its first Linear's output at every forward (and whether it trains)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((self.training, self.encoder[0](x).dtype))
        return super().forward(x)


@pytest.mark.parametrize("amp", [True, False])
def test_amp_runs_every_forward_in_bfloat16(amp):
    model = Recording()
    data = _datasets()
    data["aux"] = _split(32, 4)
    trainer = _trainer(model=model, method="auxinash", datasets=data, amp=amp, epochs=1,
                       hyperparameters={"hypergrad_every": 2})
    meta_forwards = []
    original = trainer.method.meta_step

    def meta_step(context):
        start = len(model.seen)
        info = original(context)
        meta_forwards.extend(model.seen[start:])
        return info
    trainer.method.meta_step = meta_step
    trainer.fit()
    expected = torch.bfloat16 if amp else torch.float32
    assert meta_forwards and any(training for training, _ in model.seen) and any(not t for t, _ in model.seen)
    assert {dtype for _, dtype in model.seen} == {expected}
