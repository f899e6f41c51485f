import pytest
import torch
from torch import nn

from auxilia.models import MultiTaskModel, autoint_encoder, lenet_encoder, lenet_head, maoal_convnet, mlp_encoder, mlp_head


@pytest.mark.parametrize("encoder, x, width", [
    (lenet_encoder(), torch.randn(3, 1, 28, 28), 50),
    (maoal_convnet(), torch.randn(3, 3, 32, 32), 32 * 8 * 8),
    (mlp_encoder(12), torch.randn(3, 12), 128),
    (autoint_encoder(50), torch.randint(0, 50, (3, 7)), 16 * 7),
])
def test_encoders_heads_and_the_parameter_partition(encoder, x, width):
    model = MultiTaskModel(encoder, {"a": nn.Linear(width, 4), "b": mlp_head(width, 1)})
    model.eval()
    rep, outputs = model.forward_with_representation(x)
    assert rep.shape == (3, width)
    assert outputs["a"].shape == (3, 4) and outputs["b"].shape == (3, 1)
    for name, out in model(x).items():
        torch.testing.assert_close(out, outputs[name])
    shared, heads = {id(p) for p in model.shared_parameters()}, {id(p) for p in model.task_parameters()}
    assert not shared & heads and shared | heads == {id(p) for p in model.parameters()}


def test_encoders_expose_named_modules():
    assert [n for n, _ in maoal_convnet().named_children()][:4] == ["conv1", "conv2", "conv3", "conv4"]
    assert [n for n, _ in autoint_encoder(10).named_children()][:5] == ["embedding", "block1", "block2", "block3", "block4"]
    assert lenet_head()(torch.randn(2, 50)).shape == (2, 10)


def test_a_model_needs_heads():
    with pytest.raises(ValueError, match="at least one head"):
        MultiTaskModel(nn.Identity(), {})
