import pytest
import torch
from torch import nn

from auxilia import gradients


def _model(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    return encoder, heads


def _losses(encoder, heads, x, y):
    rep = encoder(x)
    return rep, [((h(rep).squeeze(-1) - y[:, k]) ** 2).mean() for k, h in enumerate(heads)]


def test_loop_and_batched_agree_and_match_autograd():
    encoder, heads = _model()
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    shared = list(encoder.parameters())
    _, losses = _losses(encoder, heads, x, y)
    loop = gradients.jacobian(losses, shared, "loop")
    batched = gradients.jacobian(losses, shared, "batched")
    chunked = gradients.jacobian(losses, shared, "batched", chunk_size=2)
    torch.testing.assert_close(loop, batched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loop, chunked, rtol=1e-5, atol=1e-6)
    for k in range(3):
        _, fresh = _losses(encoder, heads, x, y)
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(fresh[k], shared)])
        torch.testing.assert_close(loop[k], expected)


def test_representation_chain_rule():
    """Pulling a direction back from the representation equals Jᵀ applied to it."""
    encoder, heads = _model()
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    shared = list(encoder.parameters())
    rep, losses = _losses(encoder, heads, x, y)
    G_rep = gradients.jacobian(losses, [rep])
    coefficients = torch.tensor([1.0, 0.5, -0.25])
    direction = coefficients @ G_rep
    pulled = torch.autograd.grad(rep, shared, direction.view_as(rep), retain_graph=True)
    # the same thing from the parameter-space losses: d/dθ Σ c_k ℓ_k
    expected = torch.autograd.grad(sum(c * l for c, l in zip(coefficients, losses)), shared)
    for a, b in zip(pulled, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unused_inputs_give_zero_rows_and_constant_losses_are_allowed():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    losses = [(a**2).sum(), torch.tensor(1.0)]
    for mode in ("loop", "batched"):
        G = gradients.jacobian(losses, [a, b], mode)
        assert G.shape == (2, 5)
        torch.testing.assert_close(G[0, :3], 2 * a.detach())
        assert torch.count_nonzero(G[0, 3:]) == 0 and torch.count_nonzero(G[1]) == 0


def test_batched_falls_back_cleanly_when_vmap_has_no_rule():
    class NoVmap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (_x,) = ctx.saved_tensors
            scale = 2.0 if grad.sum().item() == grad.sum().item() else 0.0  # data-dependent: no vmap rule
            return grad * scale

    w = torch.randn(4, requires_grad=True)
    losses = [NoVmap.apply(w).sum(), (NoVmap.apply(w) ** 2).sum()]
    gradients._fallback_warned = False
    with pytest.warns(RuntimeWarning, match="falling back"):
        G = gradients.jacobian(losses, [w], "batched")
    torch.testing.assert_close(G, gradients.jacobian(losses, [w], "loop"))


def test_gram_is_float64_and_symmetric():
    G = torch.randn(4, 30)
    M = gradients.gram(G)
    assert M.dtype == torch.float64
    torch.testing.assert_close(M, M.T)
    torch.testing.assert_close(M, G.double() @ G.double().T, rtol=1e-5, atol=1e-5)  # float32 product
    G64 = G.double()
    torch.testing.assert_close(gradients.gram(G64), G64 @ G64.T, rtol=0, atol=0)


def test_write_gradient_accumulates_and_checks_size():
    p = nn.Parameter(torch.zeros(2, 3))
    q = nn.Parameter(torch.zeros(4))
    d = torch.arange(10.0)
    gradients.write_gradient(d, [p, q])
    gradients.write_gradient(d, [p, q])
    torch.testing.assert_close(p.grad.reshape(-1), 2 * d[:6])
    torch.testing.assert_close(q.grad, 2 * d[6:])
    with pytest.raises(ValueError, match="entries"):
        gradients.write_gradient(torch.zeros(11), [p, q])


def test_heads_are_found_by_graph_walk():
    encoder, heads = _model()
    _, losses = _losses(encoder, heads, torch.randn(4, 5), torch.randn(4, 3))
    found = {id(p) for p in gradients.other_parameters(losses, list(encoder.parameters()))}
    assert found == {id(p) for p in heads.parameters()}


def test_generators_are_materialized_once():
    encoder, _ = _model()
    params = gradients.as_parameter_list(p for p in encoder.parameters())
    assert len(params) == 4
    with pytest.raises(ValueError, match="unknown gradient mode"):
        gradients.check_mode("vmap")
