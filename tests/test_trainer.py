from functools import partial

import pytest
import torch
from torch import nn

from auxilia import NonFiniteLossError, Task, methods
from auxilia.training import TaskDataset, Trainer, TrainerConfig, read_checkpoint


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({"main": nn.Linear(8, 3), "aux": nn.Linear(8, 1)})

    def forward_with_representation(self, x):
        rep = self.encoder(x)
        return rep, {"main": self.heads["main"](rep), "aux": self.heads["aux"](rep).squeeze(-1)}

    def forward(self, x):
        return self.forward_with_representation(x)[1]

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def _datasets(n=96):
    g = torch.Generator().manual_seed(0)
    def split(m):
        x = torch.randn(m, 4, generator=g)
        return TaskDataset(x, {"main": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "aux": x.sum(1)})
    return {"train": split(n), "val": split(40), "test": split(40)}


TASKS = [Task.classification("main", "primary"), Task.regression("aux")]


HYPERPARAMETERS = {"auxinash": {"hypergrad_every": 4}}


def _trainer(method="uncertainty", epochs=3, log_dir=None, **config):
    torch.manual_seed(0)
    model = TwoHeads()
    m = methods.create(method, TASKS, **HYPERPARAMETERS.get(method, {}))
    cfg = TrainerConfig(epochs=epochs, batch_size=16, seed=3, log_every=1, **config)
    return Trainer(model, m, _datasets(), partial(torch.optim.Adam, lr=1e-2), cfg, log_dir=log_dir,
                   scheduler=lambda opt, total: torch.optim.lr_scheduler.StepLR(opt, 5, 0.5))


def _state(trainer):
    return {**{f"m.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"x.{k}": v for k, v in trainer.method.state_dict().items()}}


def test_cpu_runs_repeat_exactly():
    a, b = _trainer(), _trainer()
    ra, rb = a.fit(), b.fit()
    assert ra.metrics == rb.metrics
    for k, v in _state(a).items():
        assert torch.equal(v, _state(b)[k]), k


@pytest.mark.parametrize("method", ["uncertainty", "dwa", "pcgrad", "auxinash"])
def test_resume_mid_epoch_gives_the_same_run(tmp_path, method):
    reference = _trainer(method, log_dir=tmp_path / "ref")
    expected = reference.fit()
    first = _trainer(method, log_dir=tmp_path / "run")
    partial_result = first.fit(checkpoint=tmp_path / "ckpt.pt", checkpoint_every=4, stop_at=9)
    assert partial_result.stopped_early and first.step == 9
    resumed = _trainer(method, log_dir=tmp_path / "run")  # a fresh process would build it the same way
    result = resumed.fit(checkpoint=tmp_path / "ckpt.pt", checkpoint_every=4)
    assert result.steps == expected.steps
    assert result.metrics == expected.metrics
    for k, v in _state(reference).items():
        assert torch.equal(v, _state(resumed)[k]), k
    # the training losses logged after resumption match the uninterrupted run's
    def losses(path):
        rows = [line.split(",") for line in (path / "log.csv").read_text().splitlines()[1:]]
        return {(r[0], r[3]): r[4] for r in rows if r[2] == "train" and r[3].startswith("loss/")}
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer = _trainer(epochs=1)
    trainer.fit(checkpoint=tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["counters"]["step"] == trainer.step and raw["format"] == "auxilia.training.Trainer"
    state = read_checkpoint(tmp_path / "c.pt")  # the same, its checksum verified
    assert state["counters"]["step"] == trainer.step and "sha256" not in state
    assert state["settings"] == {"total_steps": 6, "steps_per_epoch": 6, "batch_size": 16, "seed": 3}


def test_selection_on_val_never_reads_test(monkeypatch):
    trainer = _trainer(epochs=2)
    seen = []
    original = trainer.evaluate
    def spy(split):
        seen.append((trainer.epoch, split))
        return original(split)
    monkeypatch.setattr(trainer, "evaluate", spy)
    trainer.fit()
    assert [s for _, s in seen] == ["val", "val", "val", "test"]


class Exploding(TwoHeads):
    """Produces a NaN auxiliary output on the batches where ``trigger`` says so."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward_with_representation(self, x):
        rep, out = super().forward_with_representation(x)
        self.calls += 1
        if self.training and self.calls % 3 == 0:
            out["aux"] = out["aux"] * float("nan")
        return rep, out


def test_skip_policy_never_applies_a_nonfinite_update():
    torch.manual_seed(0)
    model = Exploding()
    method = methods.create("uncertainty", TASKS)
    trainer = Trainer(model, method, _datasets(), partial(torch.optim.SGD, lr=0.1),
                      TrainerConfig(epochs=1, batch_size=16, nonfinite="skip"))
    batches = list(__import__("auxilia").training.epoch_batches(trainer.datasets["train"], 16, seed=0, epoch=0))
    for i, batch in enumerate(batches):
        before_model = {k: v.clone() for k, v in model.state_dict().items()}
        before_method = {k: v.clone() for k, v in method.state_dict().items()}
        info = trainer.train_step(batch)
        if (i + 1) % 3 == 0:
            assert info is None
            for k, v in model.state_dict().items():
                assert torch.equal(v, before_model[k])
            for k, v in method.state_dict().items():
                assert torch.equal(v, before_method[k])
        else:
            assert info is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.skipped == 2


def test_raise_policy_names_the_task():
    torch.manual_seed(0)
    trainer = Trainer(Exploding(), methods.create("equal", TASKS), _datasets(), partial(torch.optim.SGD, lr=0.1),
                      TrainerConfig(epochs=1, batch_size=16))
    with pytest.raises(NonFiniteLossError, match="'aux'"):
        trainer.fit()


def test_model_contract_errors_are_clear():
    class NoAux(TwoHeads):
        def forward(self, x):
            return {"main": super().forward(x)["main"]}
    trainer = Trainer(NoAux(), methods.create("equal", TASKS), _datasets(), partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(KeyError, match="no output for task 'aux'"):
        trainer.fit()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        Trainer(TwoHeads(), methods.create("equal", TASKS), {"train": _datasets()["train"], "dev": None},
                partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="nonfinite"):
        TrainerConfig(nonfinite="ignore")


def test_logs_hold_losses_metrics_and_weights(tmp_path):
    trainer = _trainer(epochs=1, log_dir=tmp_path)
    trainer.fit()
    names = {line.split(",")[3] for line in (tmp_path / "log.csv").read_text().splitlines()[1:]}
    assert {"loss/main", "loss/aux", "weights/main", "weights/aux", "main/accuracy", "aux/mse"} <= names


def test_bfloat16_autocast_trains_on_cpu():
    trainer = _trainer(epochs=1, amp=True)
    result = trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert 0.0 <= result.metrics["test"]["main/accuracy"] <= 1.0


def test_tensorboard_logs_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = _trainer(epochs=1, log_dir=tmp_path, tensorboard=True)
    trainer.fit()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_meta_steps_run_and_are_logged(tmp_path):
    trainer = _trainer("auxinash", epochs=1, log_dir=tmp_path)
    trainer.fit()
    names = {line.split(",")[3] for line in (tmp_path / "log.csv").read_text().splitlines()[1:]}
    assert "meta/val_loss" in names
    assert trainer.method.preferences.sum().item() == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["auxinash", "auxilearn", "maoal"])
def test_meta_learned_methods_share_one_rule_for_the_validation_batch(name):
    from auxilia import methods
    from auxilia.methods.base import MetaContext

    with pytest.raises(ValueError, match=f"{name}: meta_source must be 'aux' or 'train', got 'val'"):
        methods.create(name, ["main", "aux"], primary="main", meta_source="val")
    drawn = []
    context = MetaContext(losses=lambda batch: {}, train_batch=lambda: drawn.append("train") or "t",
                          aux_batch=None, shared=[], heads=[], learning_rate=0.1)
    assert context.validation_batch("train", name) == "t" and drawn == ["train"]
    with pytest.raises(ValueError, match=f"{name}: meta_source='aux' needs an 'aux' split"):
        context.validation_batch("aux", name)
    context.aux_batch = lambda: "a"
    assert context.validation_batch("aux", name) == "a"


def test_dwa_weights_move_over_epochs_because_the_trainer_ends_each_epoch():
    trainer = _trainer("dwa", epochs=3)
    ends = []
    original = trainer.method.epoch_end
    trainer.method.epoch_end = lambda: ends.append(trainer.epoch) or original()
    trainer.fit()
    assert ends == [0, 1, 2]
    first, last = trainer.weights_history[0], trainer.weights_history[-1]
    assert first["main"] == first["aux"]  # no loss history yet: equal weights
    assert last["main"] != pytest.approx(first["main"]) and last["main"] + last["aux"] == pytest.approx(2.0)


def test_model_selection_keeps_the_best_val_epoch():
    trainer = _trainer(epochs=6)
    trainer.optimizer.param_groups[0]["lr"] = 0.2  # val accuracy peaks at epoch 2, then ties it later
    per_epoch = []
    original = trainer.evaluate

    def spy(split):
        values = original(split)
        if split == "val":
            per_epoch.append((trainer.epoch, dict(values)))
        return values
    trainer.evaluate = spy
    result = trainer.fit()
    selections, final = per_epoch[:-1], per_epoch[-1][1]
    accuracies = [values["main/accuracy"] for _, values in selections]
    best = accuracies.index(max(accuracies))  # the first of equals: a later tie is not better
    assert best < len(selections) - 1  # the setup must make selection matter
    assert result.best_epoch == selections[best][0] == best
    assert final == selections[best][1] == result.metrics["val"]
