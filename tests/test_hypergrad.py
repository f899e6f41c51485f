import numpy as np
import pytest
import torch
from torch import nn

from auxilia.hypergrad import (
    Hypergradient,
    HypergradientError,
    hypergradient,
    mixed_product,
    neumann_vector,
    training_gradients,
)


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons need double precision; restored afterwards for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ridge regression with a learned log-penalty per feature: L_T = ½‖XW − y‖²/n + ½ Σ exp(φ_j) W_j²


def _ridge_problem(seed=0, n=60, d=4):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(30, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y, yv = X @ w_true + 0.3 * torch.randn(n, generator=g), Xv @ w_true + 0.3 * torch.randn(30, generator=g)
    phi = torch.tensor([-1.0, 0.0, 0.5, -0.3][:d], requires_grad=True)
    return X, y, Xv, yv, phi


def _ridge_solution(X, y, phi):
    H = X.T @ X / len(X) + torch.diag(phi.exp())
    return torch.linalg.solve(H, X.T @ y / len(X)), H


def _losses(X, y, Xv, yv, W, phi):
    train = 0.5 * ((X @ W - y) ** 2).mean() + 0.5 * (phi.exp() * W**2).sum()
    val = 0.5 * ((Xv @ W - yv) ** 2).mean()
    return train, val


def _central_difference(f, x, eps):
    out = []
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[j] = eps
        out.append((f(x + e) - f(x - e)) / (2 * eps))
    return torch.stack(out).reshape(x.shape)


def test_matches_the_closed_form_implicit_gradient_of_ridge_regression():
    X, y, Xv, yv, phi = _ridge_problem()
    with torch.no_grad():
        W_star, H = _ridge_solution(X, y, phi)
    W = W_star.clone().requires_grad_(True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    eta = 1.0 / float(torch.linalg.eigvalsh(H).max())
    result = hypergradient(train, val, [W], [phi], terms=400, step_size=eta, scale_by_step=True)
    # −(∂²L_T/∂φ∂W)ᵀ H⁻¹ ∇_W L_V with ∂²L_T/∂φ_j∂W_k = δ_jk exp(φ_j) W_j
    g_val = Xv.T @ (Xv @ W_star - yv) / len(Xv)
    exact = -phi.exp().detach() * W_star * torch.linalg.solve(H, g_val)
    torch.testing.assert_close(result[0], exact, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(result.vector[0], torch.linalg.solve(H, g_val), rtol=1e-8, atol=1e-12)
    # and the total derivative of φ -> L_V(W*(φ))
    fd = _central_difference(
        lambda p: _losses(X, y, Xv, yv, _ridge_solution(X, y, p)[0], p)[1], phi.detach(), 1e-6
    )
    torch.testing.assert_close(result[0], fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("scale_by_step", [False, True])
@pytest.mark.parametrize("terms", [0, 1, 3])
def test_truncated_series_matches_an_independent_numpy_computation(scale_by_step, terms):
    X, y, Xv, yv, phi = _ridge_problem(1)
    W0 = torch.randn(4, generator=torch.Generator().manual_seed(5))  # away from W*: the series is still exact
    W = W0.clone().requires_grad_(True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    eta = 0.3
    result = hypergradient(train, val, [W], [phi], terms=terms, step_size=eta, scale_by_step=scale_by_step)
    Xn, Xvn, yvn, pn, Wn = X.numpy(), Xv.numpy(), yv.numpy(), phi.detach().numpy(), W0.numpy()
    H = Xn.T @ Xn / len(Xn) + np.diag(np.exp(pn))
    g = Xvn.T @ (Xvn @ Wn - yvn) / len(Xvn)
    v = sum(np.linalg.matrix_power(np.eye(4) - eta * H, i) @ g for i in range(terms + 1))
    if scale_by_step:
        v = eta * v
    np.testing.assert_allclose(result.vector[0].numpy(), v, rtol=1e-10)
    np.testing.assert_allclose(result[0].numpy(), -np.exp(pn) * Wn * v, rtol=1e-10)
    assert result.backward_calls == terms + 3


def test_finite_differences_through_a_small_network():
    torch.manual_seed(0)
    X, Xv = torch.randn(40, 3), torch.randn(20, 3)
    y, yv = torch.sin(X.sum(1)), torch.sin(Xv.sum(1))
    phi = torch.tensor([-1.0, -2.0], requires_grad=True)  # log weight decay of the two layers
    init = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def train_loss(net, phi):
        fit = ((net(X).squeeze(-1) - y) ** 2).mean()
        return fit + phi[0].exp() * net[0].weight.pow(2).sum() + phi[1].exp() * net[2].weight.pow(2).sum()

    def val_loss(net):
        return ((net(Xv).squeeze(-1) - yv) ** 2).mean()

    def solve(phi_value):
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
        net.load_state_dict(init.state_dict())
        optimizer = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                                      tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = train_loss(net, phi_value)
            loss.backward()
            return loss

        for _ in range(5):
            optimizer.step(closure)
        return net

    net = solve(phi.detach())
    result = hypergradient(train_loss(net, phi), val_loss(net), net.parameters(), [phi],
                           terms=3000, step_size=0.05, scale_by_step=True)
    fd = _central_difference(lambda p: val_loss(solve(p)).detach(), phi.detach(), 1e-5)
    torch.testing.assert_close(result[0], fd, rtol=2e-3, atol=1e-7)
    assert result.backward_calls == 3003


def test_a_non_symmetric_update_direction_is_differentiated_through_its_transpose():
    """Module-wise weights (one per parameter block) give an update field that is not the gradient of
    any loss; its Jacobian J is not symmetric. dL_V/dw = −g_Vᵀ J⁻¹ ∂g/∂w at the field's zero."""
    g = torch.Generator().manual_seed(3)
    A0, A1 = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    A0, A1 = A0 @ A0.T / 6 + torch.eye(6), A1 @ A1.T / 6 + 0.5 * torch.eye(6)
    b0, b1, c = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    blocks = [slice(0, 3), slice(3, 6)]
    w = torch.tensor([0.7, 1.6], requires_grad=True)

    def field_matrix(w):
        scale = torch.cat([w[0].expand(3), w[1].expand(3)])
        return A0 + scale[:, None] * A1, b0 + scale * b1  # g(W) = J W − r

    def fixed_point(w):
        J, r = field_matrix(w)
        return torch.linalg.solve(J, r)

    def val(W):
        return 0.5 * ((W - c) ** 2).sum()

    with torch.no_grad():
        W_star = fixed_point(w)
        J = field_matrix(w)[0]
        assert (J - J.T).abs().max() > 0.1
    W1, W2 = W_star[blocks[0]].clone().requires_grad_(True), W_star[blocks[1]].clone().requires_grad_(True)
    W = torch.cat([W1, W2])
    l0 = 0.5 * W @ A0 @ W - b0 @ W
    l1 = 0.5 * W @ A1 @ W - b1 @ W
    field = []
    for k, Wk in enumerate((W1, W2)):
        (d0,) = torch.autograd.grad(l0, Wk, create_graph=True)
        (d1,) = torch.autograd.grad(l1, Wk, create_graph=True)
        field.append(d0 + w[k] * d1)
    step = 1.0 / float(torch.linalg.svdvals(J).max())
    result = hypergradient(None, val(torch.cat([W1, W2])), [W1, W2], [w], train_grads=field,
                           terms=300, step_size=step, scale_by_step=True)
    torch.testing.assert_close(torch.cat(result.vector), torch.linalg.solve(J.T, W_star - c), rtol=1e-8, atol=1e-10)
    fd = _central_difference(lambda p: val(fixed_point(p)).detach(), w.detach(), 1e-6)
    torch.testing.assert_close(result[0], fd, rtol=1e-6, atol=1e-9)
    assert result.backward_calls == 300 + 2  # g_V, the series, the mixed product


def test_building_blocks_compose_to_the_hypergradient():
    X, y, Xv, yv, phi = _ridge_problem(4)
    W = torch.randn(4, requires_grad=True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    full = hypergradient(*_losses(X, y, Xv, yv, W, phi), [W], [phi], terms=3, step_size=0.2)
    grads = training_gradients(train, [W])
    (g_val,) = torch.autograd.grad(val, [W])
    v, calls = neumann_vector(grads, [W], [g_val], terms=3, step_size=0.2)
    assert calls == 3
    torch.testing.assert_close(v[0], full.vector[0])
    torch.testing.assert_close(-mixed_product(grads, [phi], v)[0], full[0])


def test_generators_give_the_same_result_as_lists():
    X, y, Xv, yv, phi = _ridge_problem(2)
    W = torch.randn(4, requires_grad=True)
    a = hypergradient(*_losses(X, y, Xv, yv, W, phi), [W], [phi], terms=3, step_size=0.1)
    b = hypergradient(*_losses(X, y, Xv, yv, W, phi), (p for p in [W]), (m for m in [phi]), terms=3, step_size=0.1)
    c = hypergradient(*_losses(X, y, Xv, yv, W, phi), W, phi, terms=3, step_size=0.1)
    assert isinstance(a, Hypergradient) and isinstance(a, list) and len(a) == 1
    torch.testing.assert_close(a.grads[0], b[0])
    torch.testing.assert_close(a[0], c[0])
    assert a[0].abs().sum() > 0


def test_unreached_and_frozen_parameters_direct_terms_and_accumulation():
    X, y, Xv, yv, phi = _ridge_problem(3)
    W = torch.randn(4, requires_grad=True)
    outside = torch.randn(2, requires_grad=True)
    frozen = torch.randn(3)
    val_only = torch.tensor([0.3, -0.2], requires_grad=True)  # enters L_V only
    unused_meta = torch.randn(3, requires_grad=True)
    base = hypergradient(*_losses(X, y, Xv, yv, W, phi), [W], [phi], terms=2, step_size=0.1)

    W.grad = torch.full_like(W, 7.0)
    phi.grad = torch.ones_like(phi)
    train, val = _losses(X, y, Xv, yv, W, phi)
    val = val + 0.5 * (phi**2).sum() + (val_only**3).sum()  # φ also enters L_V directly
    result = hypergradient(train, val, [W, outside, frozen], [phi, val_only, unused_meta],
                           terms=2, step_size=0.1, accumulate=True)
    torch.testing.assert_close(result[0], base[0] + phi.detach())
    torch.testing.assert_close(result[1], 3 * val_only.detach() ** 2)
    assert torch.count_nonzero(result[2]) == 0
    assert torch.count_nonzero(result.vector[1]) == 0 and torch.count_nonzero(result.vector[2]) == 0
    torch.testing.assert_close(result.vector[0], base.vector[0])
    torch.testing.assert_close(phi.grad, 1 + result[0])
    torch.testing.assert_close(val_only.grad, result[1])
    assert torch.equal(W.grad, torch.full_like(W, 7.0)) and outside.grad is None
    assert all(not g.requires_grad for g in result) and all(not v.requires_grad for v in result.vector)


def test_graphs_are_released_unless_retained_and_shared_forward_passes_are_explained():
    X, y, Xv, yv, phi = _ridge_problem(5)
    W = torch.randn(4, requires_grad=True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    hypergradient(train, val, [W], [phi], terms=1)
    with pytest.raises(RuntimeError, match="second time"):
        train.backward()

    # L_V reusing L_T's forward pass: released by default, fine when retained
    out = X @ W
    train = 0.5 * ((out - y) ** 2).mean() + 0.5 * (phi.exp() * W**2).sum()
    val = 0.5 * ((out[:10] - y[:10]) ** 2).mean()
    with pytest.raises(HypergradientError, match="share a forward pass"):
        hypergradient(train, val, [W], [phi], terms=2, step_size=0.1)
    out = X @ W
    train = 0.5 * ((out - y) ** 2).mean() + 0.5 * (phi.exp() * W**2).sum()
    val = 0.5 * ((out[:10] - y[:10]) ** 2).mean()
    kept = hypergradient(train, val, [W], [phi], terms=2, step_size=0.1, retain_graph=True)
    separate = hypergradient(0.5 * ((X @ W - y) ** 2).mean() + 0.5 * (phi.exp() * W**2).sum(),
                             0.5 * ((X[:10] @ W - y[:10]) ** 2).mean(), [W], [phi], terms=2, step_size=0.1)
    torch.testing.assert_close(kept[0], separate[0])
    train.backward()  # still possible
    assert W.grad is not None


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize(
    "train_of",
    [
        lambda W, phi: phi * _FirstOrderOnly.apply(W).sum(),  # autograd would silently return None here
        lambda W, phi: (W * _FirstOrderOnly.apply(W)).sum() + phi * (W**2).sum(),
        lambda W, phi: torch.cdist(W.view(3, 1), phi.view(1, 1) * torch.ones(2, 1)).pow(2).sum(),
    ],
    ids=["once_differentiable_pruned", "once_differentiable", "cdist"],
)
def test_an_operation_without_double_backward_is_named(train_of):
    W = torch.randn(3, requires_grad=True)
    phi = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(HypergradientError, match="no double backward"):
        hypergradient(train_of(W, phi), (W**2).sum(), [W], [phi], terms=2)
    W = torch.randn(3, requires_grad=True)
    with pytest.raises(HypergradientError, match="no double backward"):
        neumann_vector(training_gradients(train_of(W, phi), [W]), [W], [torch.ones(3)], terms=2)


def test_meta_parameters_that_do_not_shape_training_are_an_error():
    W = torch.randn(3, requires_grad=True)
    phi = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(HypergradientError, match="do not influence the training loss"):
        hypergradient((W**2).sum() + phi, (W**2).sum(), [W], [phi])
    with pytest.raises(HypergradientError, match="depends neither on the parameters"):
        hypergradient((3 * W).sum(), (W**2).sum(), [W], [phi])


def test_bad_inputs_are_clear_errors():
    W = torch.randn(3, requires_grad=True)
    phi = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(HypergradientError, match=r"val_loss must be a scalar tensor, got shape \(3,\)"):
        hypergradient((phi * W**2).sum(), W**2, [W], [phi])
    with pytest.raises(HypergradientError, match="train_loss must be a scalar"):
        hypergradient(phi * W**2, (W**2).sum(), [W], [phi])
    with pytest.raises(HypergradientError, match="train_loss must be a scalar"):
        hypergradient(1.0, (W**2).sum(), [W], [phi])
    with pytest.raises(HypergradientError, match="no parameters"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), iter([]), [phi])
    params = (p for p in [W])
    list(params)
    with pytest.raises(HypergradientError, match="exhausted generator"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), params, [phi])
    with pytest.raises(HypergradientError, match="train_loss does not require grad"):
        hypergradient(torch.tensor(1.0), (W**2).sum(), [W], [phi])
    with torch.no_grad():
        val = (W**2).sum()
    with pytest.raises(HypergradientError, match="val_loss does not require grad"):
        hypergradient((phi * W**2).sum(), val, [W], [phi])
    with pytest.raises(HypergradientError, match="none of the meta_parameters requires grad"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), [W], [phi.detach()])
    with pytest.raises(ValueError, match="exactly one"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), [W], [phi], train_grads=[W])
    with pytest.raises(ValueError, match="terms"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), [W], [phi], terms=-1)
    with pytest.raises(ValueError, match="step_size"):
        neumann_vector([W], [W], [W], step_size=0.0)
