import pytest
import torch
from torch import nn

from auxilia.models import (
    AutoInt,
    DenseEncoderDecoder,
    DepthHead,
    MultiTaskModel,
    NormalsHead,
    SegmentationHead,
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

ENCODERS = {
    "lenet": (lambda: lenet_encoder(), lambda: torch.randn(3, 1, 28, 28), 50),
    "maoal": (lambda: maoal_convnet(), lambda: torch.randn(3, 3, 32, 32), 32 * 8 * 8),
    "resnet18": (lambda: resnet18_cifar(width=8), lambda: torch.randn(3, 3, 32, 32), 64),
    "mlp": (lambda: mlp_encoder(12), lambda: torch.randn(3, 12), 128),
    "autoint-encoder": (lambda: autoint_encoder(50), lambda: torch.randint(0, 50, (3, 7)), 16 * 7),
    "autoint": (lambda: AutoInt(50, num_fields=7), lambda: torch.randint(0, 50, (3, 7)), 16),
}


def _assert_partition(model: MultiTaskModel) -> None:
    shared, heads = [id(p) for p in model.shared_parameters()], [id(p) for p in model.task_parameters()]
    assert len(set(shared)) == len(shared) and len(set(heads)) == len(heads)
    assert not set(shared) & set(heads)
    assert set(shared) | set(heads) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoders_heads_and_the_parameter_partition(name):
    make, inputs, width = ENCODERS[name]
    torch.manual_seed(0)
    x = inputs()
    model = MultiTaskModel(make(), {"a": nn.Linear(width, 4), "b": nn.Sequential(mlp_head(width, 1), Squeeze())})
    model.eval()
    rep, outputs = model.forward_with_representation(x)
    assert rep.shape == (3, width)
    assert outputs["a"].shape == (3, 4) and outputs["b"].shape == (3,)
    plain = model(x)
    assert plain.keys() == outputs.keys()
    for task, out in plain.items():
        torch.testing.assert_close(out, outputs[task], rtol=0, atol=0)
    _assert_partition(model)
    # every top-level child of an encoder holds parameters: module-level methods map by child name
    assert all(any(True for _ in child.parameters()) for child in model.encoder.children())


def test_gradients_reach_every_parameter():
    model = MultiTaskModel(maoal_convnet(), {"label": nn.Linear(2048, 10), "rotation": nn.Linear(2048, 4)})
    outputs = model(torch.randn(4, 3, 32, 32))
    (outputs["label"].sum() + outputs["rotation"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_encoders_expose_named_modules():
    assert [n for n, _ in maoal_convnet().named_children()] == ["conv1", "conv2", "conv3", "conv4"]
    assert [n for n, _ in lenet_encoder().named_children()] == ["conv1", "conv2", "fc"]
    assert [n for n, _ in resnet18_cifar(width=8).named_children()] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert [n for n, _ in autoint_encoder(10).named_children()] == ["embedding", "block1", "block2", "block3", "block4"]
    assert [n for n, _ in AutoInt(10, num_fields=3).named_children()] == ["embedding", "blocks", "head"]
    assert [n for n, _ in mlp_encoder(5, (8, 4)).named_children()] == ["layer1", "layer2"]
    assert lenet_head()(torch.randn(2, 50)).shape == (2, 10)


def test_maoal_convnet_layout():
    net = maoal_convnet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 32 and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    pools = [name for name, child in net.named_children() if any(isinstance(m, nn.MaxPool2d) for m in child.modules())]
    assert pools == ["conv2", "conv4"]


def test_resnet18_has_the_standard_depth_and_size():
    net = resnet18_cifar()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 17  # stem + 8 blocks x 2
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_autoint_configuration_and_input_check():
    net = AutoInt(100, num_fields=5)
    assert net.embedding.embedding.embedding_dim == 16 and len(net.blocks) == 4
    assert all(block.attention.num_heads == 4 for block in net.blocks)
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16] and net.out_features == 16
    with pytest.raises(ValueError, match=r"\(batch, 5\)"):
        net(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        AutoInt(10, num_fields=2, dim=10, heads=4)


def test_dense_model_outputs_per_pixel_predictions():
    torch.manual_seed(0)
    model = dense_model(num_classes=4, widths=(8, 16, 32)).eval()
    x = torch.randn(2, 3, 20, 28)  # not a multiple of 4: the decoder resizes to the skips
    rep, outputs = model.forward_with_representation(x)
    assert rep.shape == (2, 8, 20, 28)
    assert outputs["segmentation"].shape == (2, 4, 20, 28)
    assert outputs["depth"].shape == (2, 1, 20, 28)
    assert outputs["normals"].shape == (2, 3, 20, 28)
    torch.testing.assert_close(outputs["normals"].norm(dim=1), torch.ones(2, 20, 28))
    for task, out in model(x).items():
        torch.testing.assert_close(out, outputs[task], rtol=0, atol=0)
    _assert_partition(model)
    assert [n for n, _ in model.encoder.named_children()] == ["down1", "down2", "down3", "up2", "up1"]
    assert (DepthHead(8, positive=True)(rep) > 0).all()
    with pytest.raises(ValueError, match="no pixel head"):
        dense_model(4, tasks=("edges",))
    with pytest.raises(ValueError, match="too small"):
        DenseEncoderDecoder(widths=(4, 8, 16))(torch.randn(1, 3, 3, 3))


def test_dense_model_trains_on_scenes():
    from auxilia.data import generate_scenes

    torch.manual_seed(0)
    scenes = generate_scenes(8, seed=0, size=32)
    encoder = DenseEncoderDecoder(widths=(8, 16))
    model = MultiTaskModel(encoder, {"segmentation": SegmentationHead(8, 4), "normals": NormalsHead(8)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        outputs = model(scenes.images)
        loss = nn.functional.cross_entropy(outputs["segmentation"], scenes.segmentation) + (
            1 - (outputs["normals"] * scenes.normals).sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_self_supervised_views_keep_the_backbone_as_the_encoder():
    model = SelfSupervisedViews(maoal_convnet(), {"label": nn.Linear(2048, 10), "rotation": nn.Linear(2048, 4)},
                                "label").eval()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    rep, outputs = model.forward_with_representation(x)
    assert rep.shape == (8, 2048) and outputs["label"].shape == (2, 10) and outputs["rotation"].shape == (2, 4, 4)
    assert [n for n, _ in model.encoder.named_children()] == ["conv1", "conv2", "conv3", "conv4"]
    _assert_partition(model)
    with pytest.raises(ValueError, match="primary task"):
        SelfSupervisedViews(maoal_convnet(), {"rotation": nn.Linear(2048, 4)}, "label")


def test_a_model_needs_heads_and_disjoint_parameters():
    with pytest.raises(ValueError, match="at least one head"):
        MultiTaskModel(nn.Identity(), {})
    encoder = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shares parameters"):
        MultiTaskModel(encoder, {"tied": encoder})
    assert MultiTaskModel(nn.Identity(), {"a": nn.Linear(2, 2)}).tasks == ["a"]
