"""The parameter partition every model offers the Trainer and the methods: ``shared_parameters()``,
``task_parameters()`` and ``own_parameters()`` (where present) are pairwise disjoint and together hold
every trainable parameter exactly once, whatever the configuration and whichever parameters are frozen."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auxilia.architectures import AuxNAS, dense_architecture
from auxilia.models import (
    AutoInt,
    MultiTaskModel,
    SelfSupervisedViews,
    Squeeze,
    autoint_encoder,
    dense_model,
    lenet_encoder,
    lenet_head,
    maoal_convnet,
    mlp_encoder,
    mlp_head,
    resnet18_cifar,
)


def assert_partition(model: nn.Module) -> None:
    groups = {"shared": list(model.shared_parameters())}
    if hasattr(model, "task_parameters"):
        groups["task"] = list(model.task_parameters())
    if hasattr(model, "own_parameters"):
        groups["own"] = list(model.own_parameters())
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            assert id(p) not in seen, f"a parameter is in {seen[id(p)]} and in {name}"
            seen[id(p)] = name
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable, f"{len(trainable - set(seen))} trainable left out, {len(set(seen) - trainable)} frozen in"


def _multitask(kind: str) -> nn.Module:
    if kind == "lenet":
        return MultiTaskModel(lenet_encoder(), {"left": lenet_head(), "right": lenet_head()})
    if kind == "maoal":
        return MultiTaskModel(maoal_convnet(8), {"main": nn.Linear(8 * 8 * 8, 10), "aux": nn.Linear(8 * 8 * 8, 4)})
    if kind == "resnet":
        return MultiTaskModel(resnet18_cifar(width=4), {"main": nn.Linear(32, 10)})
    if kind == "mlp":
        return MultiTaskModel(mlp_encoder(6, (8, 4)), {"a": nn.Sequential(mlp_head(4, 1), Squeeze()), "b": mlp_head(4, 3)})
    if kind == "autoint":
        return MultiTaskModel(AutoInt(30, num_fields=3, dim=8, blocks=1, heads=2), {"ctr": nn.Linear(16, 1)})
    if kind == "autoint-encoder":
        return MultiTaskModel(autoint_encoder(30, dim=8, blocks=2, heads=2), {"ctr": nn.Linear(8, 1)})
    if kind == "dense":
        return dense_model(5, widths=(4, 8))
    if kind == "rotation":
        return SelfSupervisedViews(maoal_convnet(4), {"main": nn.Linear(256, 10), "rotation": nn.Linear(256, 4)}, "main")
    if kind == "learned-normalize":  # an input normalization with parameters, ahead of every task
        return SelfSupervisedViews(maoal_convnet(4), {"main": nn.Linear(256, 10), "colour": nn.Linear(256, 6)},
                                   "main", normalize=nn.BatchNorm2d(3))
    raise ValueError(kind)


def _token_blocks():
    return [nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]


def _auxnas(connections: str, auxiliaries: int, window: int, fusion_norm: str) -> nn.Module:
    heads = {f"aux{i}": nn.Linear(8, 1) for i in range(auxiliaries)}
    return AuxNAS(_token_blocks(), {name: _token_blocks() for name in heads}, nn.Linear(8, 2), heads,
                  connections, window=window, features="token", fusion_norm=fusion_norm)


MULTITASK = ["lenet", "maoal", "resnet", "mlp", "autoint", "autoint-encoder", "dense", "rotation", "learned-normalize"]
ARCHITECTURES = ["aux-nas", "aux-g-layer", "aux-g-stage"]


def _freeze(model: nn.Module, mask: list[bool]) -> None:
    for p, frozen in zip(model.parameters(), mask):
        p.requires_grad_(not frozen)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(MULTITASK), frozen=st.lists(st.booleans(), max_size=40))
def test_multitask_models_partition_their_trainable_parameters(kind, frozen):
    model = _multitask(kind)
    _freeze(model, frozen)
    assert_partition(model)


@settings(max_examples=30, deadline=None)
@given(connections=st.sampled_from(ARCHITECTURES), auxiliaries=st.integers(1, 2), window=st.integers(1, 2),
       fusion_norm=st.sampled_from(["auto", "affine"]), frozen=st.lists(st.booleans(), max_size=60))
def test_aux_nas_and_aux_g_partition_their_trainable_parameters(connections, auxiliaries, window, fusion_norm, frozen):
    model = _auxnas(connections, auxiliaries, window, fusion_norm)
    _freeze(model, frozen)
    assert_partition(model)


@pytest.mark.parametrize("arch", ["aux-nas", "aux-g-stage"])
@pytest.mark.parametrize("backbone", ["conv", "token"])
def test_dense_architectures_partition_their_parameters(arch, backbone):
    assert_partition(dense_architecture(arch, ["segmentation", "depth"], 3, widths=(4, 8), backbone=backbone,
                                        image_size=16, patch=4))


def test_a_frozen_alpha_is_not_trained_by_the_model():
    model = _auxnas("aux-nas", 1, 1, "auto")
    model.alpha_logits.requires_grad_(False)
    out = model(torch.randn(3, 4))
    losses = {k: v.pow(2).mean() for k, v in out.items()}
    assert model.own_step(losses, step=0, total_steps=4, batch_in_epoch=1) is None


def test_a_head_tied_to_a_shared_module_is_refused():
    blocks = _token_blocks()
    with pytest.raises(ValueError, match="share parameters"):
        AuxNAS(blocks, _token_blocks(), nn.Linear(8, 2), blocks[1][0], features="token")
    norm = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="normalize shares parameters with a head"):
        SelfSupervisedViews(nn.Identity(), {"main": norm}, "main", normalize=norm)
