"""The toy's ``main_labels`` option: how many training samples carry the primary label.

It masks exactly that many, the same ones for the same seed, changes nothing at its default, and
every registered method trains on batches that hold no primary label at all without failing or
leaving finite numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from auxilia import methods
from auxilia.experiments import get
from auxilia.experiments.toy import SIZES, primary_label_mask
from auxilia.training import Trainer, TrainerConfig

TOY = get("toy")


def _mask(setup) -> torch.Tensor:
    return setup.datasets["train"].masks["main"]


@pytest.mark.parametrize("n", [1, 50, 200, 999])
def test_main_labels_masks_exactly_that_many_primary_labels(n):
    setup = TOY.setup(seed=0, main_labels=n)
    train = setup.datasets["train"]
    mask = _mask(setup)
    assert len(train) == SIZES["train"] and mask.dtype == torch.bool and int(mask.sum()) == n
    assert set(train.masks) == {"main"}  # the auxiliary tasks stay labelled everywhere
    assert torch.all(train.targets["main"][~mask] == 0)  # unlabelled targets carry nothing
    # the held-out splits are never larger than the labelled part of train; test is untouched
    assert len(setup.datasets["aux"]) == min(SIZES["aux"], n)
    assert len(setup.datasets["val"]) == min(SIZES["val"], n)
    assert len(setup.datasets["test"]) == SIZES["test"]
    # the data themselves are those of the default setup
    default = TOY.setup(seed=0)
    assert torch.equal(train.inputs, default.datasets["train"].inputs)
    for task in ("helpful", "harmful"):
        assert torch.equal(train.targets[task], default.datasets["train"].targets[task])
    assert torch.equal(train.targets["main"][mask], default.datasets["train"].targets["main"][mask])
    for split in ("aux", "val"):
        size = len(setup.datasets[split])
        assert torch.equal(setup.datasets[split].inputs, default.datasets[split].inputs[:size])
        assert torch.equal(setup.datasets[split].targets["main"], default.datasets[split].targets["main"][:size])


def test_the_labelled_samples_are_fixed_by_the_seed_and_nested():
    a, b = TOY.setup(seed=3, main_labels=50), TOY.setup(seed=3, main_labels=50)
    assert torch.equal(_mask(a), _mask(b))
    assert torch.equal(a.datasets["train"].targets["main"], b.datasets["train"].targets["main"])
    assert not torch.equal(_mask(a), _mask(TOY.setup(seed=4, main_labels=50)))
    assert torch.all(_mask(TOY.setup(seed=3, main_labels=200))[_mask(a)])  # the 50 are among the 200


def test_the_default_masks_nothing():
    assert TOY.options() == {"main_labels": SIZES["train"]}
    plain, full = TOY.setup(seed=1), TOY.setup(seed=1, main_labels=SIZES["train"])
    for setup in (plain, full):
        assert setup.datasets["train"].masks == {}
        assert {k: len(v) for k, v in setup.datasets.items()} == SIZES
    for split in SIZES:
        p, f = plain.datasets[split], full.datasets[split]
        assert torch.equal(p.inputs, f.inputs)
        assert all(torch.equal(p.targets[t], f.targets[t]) for t in p.targets)
    assert bool(primary_label_mask(1, SIZES["train"]).all())
    # the full-data method defaults stay; the low-data ones apply only below 1000 labels
    assert plain.method_defaults == full.method_defaults == {
        "auxilearn": {"meta_every": 5},
        "auxinash": {"hypergrad_every": 1, "meta_lr": 1.0, "meta_source": "train"},
    }
    assert TOY.setup(seed=1, main_labels=999).method_defaults["auxinash"]["meta_source"] == "aux"


@pytest.mark.parametrize("n", [0, 1001, 2.5, True])
def test_main_labels_out_of_range_is_an_error(n):
    with pytest.raises(ValueError, match="main_labels"):
        TOY.setup(seed=0, main_labels=n)


# meta steps at every step, so that the few steps below take several of them
SHORT_META = {
    "auxilearn": {"meta_every": 1, "meta_lr": 0.1},
    "auxinash": {"hypergrad_every": 1, "meta_lr": 1.0},
    "maoal": {"meta_every": 1, "look_back": 1},
}
CASES = {name: (name, SHORT_META.get(name, {})) for name in methods.available()}
CASES.update({
    # L_V drawn from `train` batches, which hold no primary label either
    "auxilearn@train-source": ("auxilearn", {"meta_every": 1, "meta_lr": 0.1, "meta_source": "train"}),
    "auxilearn@nonlinear": ("auxilearn", {"combiner": "nonlinear", "meta_every": 1, "meta_lr": 0.1}),
    "auxinash@aux-source": ("auxinash", {"hypergrad_every": 1, "meta_lr": 1.0, "meta_source": "aux"}),
    "maoal@train-source": ("maoal", {"meta_every": 1, "look_back": 1, "meta_source": "train"}),
    "nash-mtl@representation": ("nash-mtl", {"mode": "representation"}),
    "mgda@batched": ("mgda", {"mode": "batched"}),
})
# with a zero primary gradient these rightly take no step: stl trains the primary task only, GCS keeps
# an auxiliary gradient only where its cosine with the primary one is positive, and MGDA's min-norm
# point of a hull that contains the zero vector is zero
STILL = {"stl", "gcs", "mgda", "mgda@batched"}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_steps_on_batches_without_a_primary_label(case):
    name, hp = CASES[case]
    setup = TOY.setup(seed=0, main_labels=20)
    train = setup.datasets["train"]
    unlabelled = torch.nonzero(~train.masks["main"]).squeeze(1)[:24]
    datasets = {"train": train.subset(unlabelled), "aux": setup.datasets["aux"], "val": setup.datasets["val"]}
    assert not bool(datasets["train"].masks["main"].any())
    before = [p.detach().clone() for p in setup.model.parameters()]
    config = TrainerConfig(epochs=2, batch_size=8, seed=0, log_every=1)  # nonfinite="raise"
    trainer = Trainer(setup.model, methods.create(name, setup.tasks, **hp), datasets, setup.optimizer, config,
                      scheduler=setup.scheduler, metrics_fn=setup.metrics_fn)
    result = trainer.fit()
    assert result.steps == 6 and result.skipped_steps == 0
    after = list(setup.model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    moved = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert moved == (case not in STILL)  # elsewhere the auxiliary tasks still train the model
    if name in SHORT_META:
        assert result.skipped_meta_steps == 0
    assert all(bool(torch.isfinite(v).all()) for v in trainer.method.state_dict().values() if v.is_floating_point())
    for entry in result.weights_history:
        for key, value in entry.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, entry)
    assert all(math.isfinite(v) for v in (result.weights or {}).values())
    assert all(math.isfinite(v) for v in result.metrics["val"].values())
