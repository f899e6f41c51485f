import numpy as np
import pytest
import torch
from torch import nn

from auxilia.hypergrad import HypergradientError, hypergradient, neumann_vector



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons need double precision; restored afterwards for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


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


def test_matches_the_closed_form_implicit_gradient_of_ridge_regression():
    X, y, Xv, yv, phi = _ridge_problem()
    with torch.no_grad():
        W_star, H = _ridge_solution(X, y, phi)
    W = W_star.clone().requires_grad_(True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    eta = 1.0 / float(torch.linalg.eigvalsh(H).max())
    result = hypergradient(train, val, [W], [phi], terms=400, step_size=eta, scale_by_step=True)
    g_val = Xv.T @ (Xv @ W_star - yv) / len(Xv)
    exact = -phi.exp().detach() * W_star * torch.linalg.solve(H, g_val)
    torch.testing.assert_close(result.grads[0], exact, rtol=1e-8, atol=1e-12)
    # and against finite differences of φ -> L_V(W*(φ))
    eps = 1e-6
    fd = []
    for j in range(len(phi)):
        e = torch.zeros_like(phi)
        e[j] = eps
        plus = _losses(X, y, Xv, yv, _ridge_solution(X, y, phi.detach() + e)[0], phi.detach())[1]
        minus = _losses(X, y, Xv, yv, _ridge_solution(X, y, phi.detach() - e)[0], phi.detach())[1]
        fd.append((plus - minus) / (2 * eps))
    torch.testing.assert_close(result.grads[0], torch.stack(fd), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("scale_by_step", [False, True])
def test_truncated_series_matches_an_independent_numpy_computation(scale_by_step):
    X, y, Xv, yv, phi = _ridge_problem(1)
    with torch.no_grad():
        W0 = torch.randn(4, generator=torch.Generator().manual_seed(5))
    W = W0.clone().requires_grad_(True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    eta = 0.3
    result = hypergradient(train, val, [W], [phi], terms=3, step_size=eta, scale_by_step=scale_by_step)
    Xn, Xvn, yvn, pn, Wn = X.numpy(), Xv.numpy(), yv.numpy(), phi.detach().numpy(), W0.numpy()
    H = Xn.T @ Xn / len(Xn) + np.diag(np.exp(pn))
    g = Xvn.T @ (Xvn @ Wn - yvn) / len(Xvn)
    v = sum(np.linalg.matrix_power(np.eye(4) - eta * H, i) @ g for i in range(4))
    if scale_by_step:
        v = eta * v
    expected = -np.exp(pn) * Wn * v
    np.testing.assert_allclose(result.grads[0].numpy(), expected, rtol=1e-10)
    assert result.backward_calls == 2 + 3 + 1


def test_finite_differences_through_a_small_network():
    torch.manual_seed(0)
    X, Xv = torch.randn(40, 3), torch.randn(20, 3)
    y, yv = torch.sin(X.sum(1)), torch.sin(Xv.sum(1))
    phi = torch.tensor([-1.0, -2.0], requires_grad=True)  # log penalties of the two layers
    init = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def train_loss(net, phi):
        fit = ((net(X).squeeze(-1) - y) ** 2).mean()
        return fit + phi[0].exp() * net[0].weight.pow(2).sum() + phi[1].exp() * net[2].weight.pow(2).sum()

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

    def val_loss(net):
        return ((net(Xv).squeeze(-1) - yv) ** 2).mean()

    net = solve(phi.detach())
    result = hypergradient(train_loss(net, phi), val_loss(net), net.parameters(), [phi],
                           terms=3000, step_size=0.05, scale_by_step=True)
    eps = 1e-5
    fd = []
    for j in range(2):
        e = torch.zeros(2)
        e[j] = eps
        fd.append((val_loss(solve(phi.detach() + e)) - val_loss(solve(phi.detach() - e))) / (2 * eps))
    torch.testing.assert_close(result.grads[0], torch.stack(fd).detach(), rtol=2e-3, atol=1e-7)


def test_generators_give_the_same_result_as_lists():
    X, y, Xv, yv, phi = _ridge_problem(2)
    W = torch.randn(4, requires_grad=True)
    a = hypergradient(*_losses(X, y, Xv, yv, W, phi), [W], [phi], terms=3, step_size=0.1)
    b = hypergradient(*_losses(X, y, Xv, yv, W, phi), (p for p in [W]), (m for m in [phi]), terms=3, step_size=0.1)
    torch.testing.assert_close(a.grads[0], b.grads[0])
    assert a.grads[0].abs().sum() > 0


def test_unreached_parameters_direct_terms_and_accumulation():
    X, y, Xv, yv, phi = _ridge_problem(3)
    W = torch.randn(4, requires_grad=True)
    outside = torch.randn(2, requires_grad=True)
    unused_meta = torch.randn(3, requires_grad=True)
    train, val = _losses(X, y, Xv, yv, W, phi)
    val = val + 0.5 * (phi**2).sum()  # φ also enters L_V directly
    base = hypergradient(*_losses(X, y, Xv, yv, W, phi), [W], [phi], terms=2, step_size=0.1)
    result = hypergradient(train, val, [W, outside], [phi, unused_meta], terms=2, step_size=0.1, accumulate=True)
    torch.testing.assert_close(result.grads[0], base.grads[0] + phi.detach())
    assert torch.count_nonzero(result.grads[1]) == 0
    assert torch.count_nonzero(result.vector[1]) == 0
    torch.testing.assert_close(phi.grad, result.grads[0])
    assert W.grad is None


def test_an_operation_without_double_backward_is_named():
    class FirstOrderOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    W = torch.randn(3, requires_grad=True)
    phi = torch.tensor(0.5, requires_grad=True)
    train = phi * FirstOrderOnly.apply(W).sum()
    val = (W**2).sum()
    with pytest.raises(HypergradientError, match="no double backward"):
        hypergradient(train, val, [W], [phi])


def test_bad_inputs_are_clear_errors():
    W = torch.randn(3, requires_grad=True)
    phi = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(HypergradientError, match="val_loss must be a scalar"):
        hypergradient((phi * W**2).sum(), W**2, [W], [phi])
    with pytest.raises(HypergradientError, match="no parameters"):
        hypergradient((phi * W**2).sum(), (W**2).sum(), iter([]), [phi])
    with pytest.raises(HypergradientError, match="does not require grad"):
        hypergradient(torch.tensor(1.0), (W**2).sum(), [W], [phi])
    with pytest.raises(ValueError, match="terms"):
        neumann_vector([W], [W], [W], terms=-1)
