"""What every method refuses or survives at ``backward``: empty, repeated or frozen parameters,
detached losses, non-finite gradients of finite losses (raised before any ``.grad`` or state
changes), compiled models; and the K x K solvers over gradient scales from 1e-30 to 1e30."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auxilia import NonFiniteLossError, gradients, methods
from auxilia.methods.aggregation import normalized_gram

NAMES = methods.available()
TASKS = ["main", "a", "b"]
OPTIONS = {"maoal": {"modules": "parameter"}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in TASKS])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


class Infinite(torch.autograd.Function):
    """The identity with an infinite derivative: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def create(name: str, **hp):
    return methods.create(name, TASKS, primary="main", **{**OPTIONS.get(name, {}), **hp})


def forward(net: nn.Module, infinite: str | None = None):
    torch.manual_seed(1)
    z, outs = net(torch.randn(8, 4))
    losses = {}
    for name, out in zip(TASKS, outs):
        losses[name] = ((Infinite.apply(out) if name == infinite else out) - 1).pow(2).mean()
    return z, losses


def step(method, net: nn.Module, shared, heads=None, infinite: str | None = None):
    z, losses = forward(net, infinite)
    return method.backward(losses, shared, heads, z if method.needs_representation else None)


def grads(net: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


# ------------------------------------------------------------------------------------------------
# Parameters and losses that would silently give a wrong update


@pytest.mark.parametrize("name", NAMES)
def test_an_exhausted_generator_of_shared_parameters_is_refused(name):
    net, method = Net(), create(name)
    shared = net.encoder.parameters()
    list(shared)  # the state of a generator made once and reused on the second step
    with pytest.raises(ValueError, match="exhausted generator"):
        step(method, net, shared)
    with pytest.raises(ValueError, match="shared_parameters is empty"):
        step(method, net, [])
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_given_twice_is_refused(name):
    net, method = Net(), create(name)
    shared = list(net.encoder.parameters())
    heads = list(net.heads.parameters())
    with pytest.raises(ValueError, match="given twice"):
        step(method, net, [*shared, shared[0]], heads)
    with pytest.raises(ValueError, match=r"task_parameters\[0\].*also in shared_parameters"):
        step(method, net, shared, [shared[0], *heads])
    assert all(p.grad is None for p in net.parameters())
    assert int(method.steps) == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("named_heads", [False, True])
def test_a_frozen_shared_parameter_is_skipped(name, named_heads):
    net, method = Net(), create(name)
    frozen = net.encoder[0].bias
    frozen.requires_grad_(False)
    step(method, net, list(net.encoder.parameters()), list(net.heads.parameters()) if named_heads else None)
    assert frozen.grad is None
    assert net.encoder[0].weight.grad is not None and torch.isfinite(net.encoder[0].weight.grad).all()
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every shared parameter is frozen"):
        step(create(name), net, list(net.encoder.parameters()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("named_heads", [False, True])
def test_a_loss_reaching_no_trainable_tensor_is_refused_naming_its_task(name, named_heads):
    net, method = Net(), create(name)
    shared, heads = list(net.encoder.parameters()), list(net.heads.parameters()) if named_heads else None
    z, losses = forward(net)
    detached = dict(losses, main=losses["main"].detach())
    with pytest.raises(ValueError, match="task 'main'.*detached"):
        method.backward(detached, shared, heads, z if method.needs_representation else None)
    # computed from frozen tensors only: on a graph, but nothing trainable reaches it
    for p in [*net.encoder.parameters(), *net.heads[2].parameters()]:
        p.requires_grad_(False)
    _, frozen_b = forward(net)
    for p in net.encoder.parameters():
        p.requires_grad_(True)
    z, losses = forward(net)
    mixed = dict(losses, b=frozen_b["b"] + 0 * net.heads[2].weight.detach().sum())
    if name != "stl":  # stl never reads an auxiliary loss: it may be anything
        with pytest.raises(ValueError, match="task 'b'"):
            method.backward(mixed, shared, heads, z if method.needs_representation else None)
    assert all(p.grad is None for p in net.parameters())
    assert int(method.steps) == 0


def test_stl_accepts_detached_auxiliary_losses():
    net, method = Net(), create("stl")
    _, losses = forward(net)
    method.backward(dict(losses, a=losses["a"].detach()), list(net.encoder.parameters()))
    assert net.heads[0].weight.grad is not None and net.heads[1].weight.grad is None


# ------------------------------------------------------------------------------------------------
# Non-finite gradients of finite losses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("task", ["main", "b"])
def test_a_non_finite_gradient_raises_before_anything_is_written(name, task):
    net, method = Net(), create(name)
    shared = list(net.encoder.parameters())
    step(method, net, shared)  # a first step, so that warm starts and histories are set
    net.zero_grad(set_to_none=False)
    before_grads = grads(net)
    before_state = {k: v.clone() for k, v in method.state_dict().items()}
    if name == "stl" and task != "main":
        step(method, net, shared, infinite=task)  # not read: no effect on the update
        return
    with pytest.raises(NonFiniteLossError):
        step(method, net, shared, infinite=task)
    for got, expected in zip(grads(net), before_grads):
        assert (got is None and expected is None) or torch.equal(got, expected)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before_state[k]), k


@pytest.mark.parametrize("name", ["pcgrad-aux", "nash-mtl", "mgda"])
def test_a_non_finite_pull_back_in_representation_mode_raises_before_anything_is_written(name):
    net, method = Net(), create(name, mode="representation")
    torch.manual_seed(1)
    z = Infinite.apply(net.encoder(torch.randn(8, 4)))  # the encoder's backward is infinite
    losses = {t: (h(z).squeeze(-1) - 1).pow(2).mean() for t, h in zip(TASKS, net.heads)}
    with pytest.raises(NonFiniteLossError):
        method.backward(losses, list(net.encoder.parameters()), None, z)
    assert all(p.grad is None for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# Gradients that should exist are never zero-filled


def test_a_representation_the_loss_bypasses_is_an_error_not_a_zero():
    x = torch.randn(5, 3)
    w = nn.Parameter(torch.randn(3, 3))
    representation, other = (x @ w).split([2, 1], dim=1)
    loss = other.sum()  # reaches the representation's node, not the representation
    with pytest.raises(TypeError, match="no gradient reaches the representation"):
        gradients.jacobian([loss], [representation, w])
    unrelated = (x @ nn.Parameter(torch.randn(3, 3))).sum()  # a loss not on that graph: zeros
    assert torch.equal(gradients.jacobian([unrelated], [representation])[0], torch.zeros(10))


@pytest.mark.slow
def test_torch_compile_loop_mode_matches_eager_and_representation_mode_is_refused():
    eager_net, compiled_net = Net(), Net()
    compiled = torch.compile(compiled_net)
    for net, model in ((eager_net, eager_net), (compiled_net, compiled)):
        step(create("pcgrad-aux"), model, list(net.encoder.parameters()))
    for p, q in zip(eager_net.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    compiled_net.zero_grad(set_to_none=True)
    method = create("pcgrad-aux", mode="representation")
    with pytest.raises(TypeError, match="torch.compile"):
        step(method, compiled, list(compiled_net.encoder.parameters()))
    assert all(p.grad is None for p in compiled_net.parameters())


# ------------------------------------------------------------------------------------------------
# Reported weights


def test_uncertainty_reports_exp_of_minus_its_log_variances():
    net, method = Net(), create("uncertainty")
    s = torch.tensor([0.7, -1.3, 2.1])
    with torch.no_grad():
        method.log_vars.copy_(s)
    info = step(method, net, list(net.encoder.parameters()))
    expected = dict(zip(TASKS, torch.exp(-s).tolist()))
    assert info["weights"] == pytest.approx(expected, rel=1e-6)
    assert method.weights() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The K x K solvers over gradient scales from 1e-30 to 1e30

EXPONENTS = st.integers(-30, 30)


def base(K: int, P: int, seed: int, conflict: float = 0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, P))
    G[1:] -= conflict * G[0]
    return torch.tensor(G)


def scaled(G: torch.Tensor, scales, dtype) -> torch.Tensor:
    return (G * torch.tensor(scales, dtype=torch.float64)[:, None]).to(dtype)


def test_gram_is_accumulated_in_float64():
    G = torch.tensor([[1e-25, 0.0], [0.0, 3e20]], dtype=torch.float32)
    M = gradients.gram(G)
    assert M[0, 0] == pytest.approx(1e-50, rel=1e-6) and M[1, 1] == pytest.approx(9e40, rel=1e-6)
    wide = torch.randn(3, 200_000) * 1e-3
    torch.testing.assert_close(gradients.gram(wide), wide.double() @ wide.double().T, rtol=1e-12, atol=0)


def test_combine_keeps_extreme_coefficients():
    G = torch.tensor([[1e-30, 2e-30], [1e30, -1e30]], dtype=torch.float32)
    c = torch.tensor([1e30, 1e-30], dtype=torch.float64)
    torch.testing.assert_close(gradients.combine(c, G), torch.tensor([2.0, 1.0]), rtol=1e-6, atol=0)


def nash_residual(method, G: torch.Tensor) -> float:
    """max_k |α_k (Mα)_k − p_k| / p_k on the float64 Gram matrix of the (rounded) G, for the
    un-normalized game (``gram_normalization="none"``)."""
    A, top = normalized_gram(G)
    alpha = method.alpha.numpy() * top  # α on the normalized matrix A = M / top²
    p = method.preferences.numpy()
    return float(np.max(np.abs(alpha * (A @ alpha) - p) / p))


@settings(max_examples=60, deadline=None)
@given(common=EXPONENTS, task=EXPONENTS, seed=st.integers(0, 2**20), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_nash_solves_the_bargaining_at_any_scale(common, task, seed, dtype):
    G0 = base(3, 7, seed, conflict=0.3)
    scales = [10.0**common] * 3
    scales[1] = 10.0 ** max(-30, min(30, common + task))
    G = scaled(G0, scales, dtype)
    for name in ("nash-mtl", "auxinash"):
        method = methods.create(name, TASKS, primary="main", max_norm=0.0, gram_normalization="none")
        d = method.aggregate(G)
        assert torch.isfinite(d).all() and torch.isfinite(method.alpha).all()
        assert nash_residual(method, G) < 1e-6
        # α_k scales as 1/‖g_k‖: against the unscaled game, exactly
        reference = methods.create(name, TASKS, primary="main", max_norm=0.0, gram_normalization="none")
        reference.aggregate(G0)
        np.testing.assert_allclose(method.alpha.numpy() * np.array(scales), reference.alpha.numpy(), rtol=1e-4)
        # the default (Frobenius-normalized) α is invariant to a common scale, and never zero
        default = methods.create(name, TASKS, primary="main")
        default.aggregate(scaled(G0, [10.0**common] * 3, dtype))
        unit = methods.create(name, TASKS, primary="main")
        unit.aggregate(G0.to(dtype))
        np.testing.assert_allclose(default.alpha.numpy(), unit.alpha.numpy(), rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-30, 1e-21, 1e20, 1e30])
def test_nash_float32_extreme_scales_give_the_unit_scale_update(scale):
    G = base(3, 7, 0, conflict=0.3)
    for name in ("nash-mtl", "auxinash"):
        unit = methods.create(name, TASKS, primary="main", max_norm=0.0)
        expected = unit.aggregate(G.float()).double()
        method = methods.create(name, TASKS, primary="main", max_norm=0.0)
        d = method.aggregate((G * scale).float())
        assert torch.isfinite(d).all() and float(d.abs().max()) > 0
        torch.testing.assert_close(d.double() / scale, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


VARIANTS = [("pcgrad", {}), ("pcgrad-aux", {}), ("gcs", {}), ("gcs", {"weighted": True}), ("mgda", {}),
            ("mgda", {"normalization": "l2"}), ("cagrad", {})]


@settings(max_examples=80, deadline=None)
@given(common=EXPONENTS, seed=st.integers(0, 2**20), variant=st.sampled_from(VARIANTS),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_aggregation_directions_scale_with_a_common_scale(common, seed, variant, dtype):
    name, hp = variant
    G0 = base(3, 7, seed, conflict=0.4).to(dtype)
    s = 10.0**common
    d0 = methods.create(name, TASKS, primary="main", **hp).aggregate(G0).double()
    d = methods.create(name, TASKS, primary="main", **hp).aggregate((G0.double() * s).to(dtype)).double()
    expected = d0 if hp.get("normalization") == "l2" else d0 * s
    peak = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(d / peak, expected / peak, rtol=1e-4, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(exponent=EXPONENTS, row=st.integers(0, 2), seed=st.integers(0, 2**20),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_per_task_scale_keeps_each_rule(exponent, row, seed, dtype):
    """One task's gradient scaled by s: GCS keeps its decisions and cosines, PCGrad-Aux still
    removes exactly the conflicting component, and (for s within 1e±6) MGDA's point is still the
    min-norm point to 1e-5 of each ‖g_k‖‖d‖: beyond that, a task's weight on the simplex is known
    only to ε/s of itself, so its share of d is not resolved to that precision."""
    G0 = base(3, 7, seed, conflict=0.4)
    scales = [1.0, 1.0, 1.0]
    scales[row] = 10.0**exponent
    G = scaled(G0, scales, dtype)
    Gd = G.double()
    for hp in ({}, {"weighted": True}):
        method = methods.create("gcs", TASKS, primary="main", **hp)
        reference = methods.create("gcs", TASKS, primary="main", **hp)
        method.aggregate(G)
        reference.aggregate(G0)
        torch.testing.assert_close(method.last_weights, reference.last_weights, rtol=1e-5, atol=1e-6)
    method = methods.create("pcgrad-aux", TASKS, primary="main")
    d = method.aggregate(G).double()
    g0 = Gd[0]
    for k in (1, 2):  # each auxiliary part, after the projection, does not oppose the primary
        dot = float(Gd[k] @ g0)
        part = Gd[k] - (dot / float(g0 @ g0)) * g0 if dot < 0 else Gd[k]
        assert float(part @ g0) >= -1e-5 * float(part.norm() * g0.norm())
    torch.testing.assert_close(method.last_weights[1:], torch.ones(2, dtype=torch.float64))
    if abs(exponent) > 6:
        return
    method = methods.create("mgda", TASKS, primary="main")
    d = method.aggregate(G).double()
    w = method.last_weights
    assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-9)
    norms = Gd.norm(dim=1)
    for k in range(3):  # KKT: every gradient's projection on d is at least ‖d‖²
        assert float(Gd[k] @ d) >= float(d @ d) - 1e-5 * float(norms[k] * d.norm())


@settings(max_examples=80, deadline=None)
@given(exponent=st.integers(-6, 6), seed=st.integers(0, 2**20), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_cagrad_improves_a_tiny_or_huge_task(exponent, seed, dtype):
    """A task up to 1e6 times smaller or larger than the other still improves (CAGrad's
    tolerances are relative to the largest gradient, which bounds the ratio it resolves)."""
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal(7), rng.standard_normal(7)
    u /= np.linalg.norm(u)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    g1 = -0.2 * u + math.sqrt(1 - 0.04) * v  # cos(g0, g1) = -0.2 > -c: both can improve
    G = scaled(torch.tensor(np.stack([u, g1])), [1.0, 10.0**exponent], dtype)
    method = methods.create("cagrad", ["main", "a"], primary="main")
    d = method.aggregate(G).double()
    Gd = G.double()
    for k in range(2):
        assert float(Gd[k] @ d) > 0, f"task {k} would rise at first order"


def test_cagrad_keeps_a_task_1000_times_smaller():
    G = torch.tensor([[1.0, 0.0], [-2e-4, 1e-3]], dtype=torch.float32)
    d = methods.create("cagrad", ["main", "a"], primary="main").aggregate(G).double()
    assert float(G[1].double() @ d) > 0


def test_mgda_resolves_a_task_1e30_times_smaller_than_the_others():
    """The min-norm test is relative to each task's own norm: with a tiny task whose gradient
    conflicts with a large one, d must still not point against the large one (an absolute
    tolerance stops at the tiny gradient alone, which the large task opposes)."""
    G = torch.tensor([[1.0, 0.0, 0.0], [-0.5e-30, 1e-30, 0.0], [0.0, 0.3, 1.0]], dtype=torch.float64)
    d = methods.create("mgda", TASKS, primary="main").aggregate(G)
    norms = G.norm(dim=1)
    for k in range(3):
        assert float(G[k] @ d - d @ d) >= -1e-9 * float(norms[k] * d.norm())


def test_gradnorm_takes_a_step_on_losses_of_scale_1e30():
    """Its per-task gradient norms are formed in float64: in float32 the squares of gradients of
    scale 1e19 and more overflow, which made a finite step look non-finite."""
    torch.manual_seed(0)
    encoder, heads = nn.Linear(4, 8), nn.ModuleList(nn.Linear(8, 1) for _ in TASKS)
    x = torch.randn(16, 4)
    z = encoder(x)
    losses = {name: 1e30 * head(z).pow(2).mean() for name, head in zip(TASKS, heads)}
    method = methods.create("gradnorm", TASKS, primary="main")
    method.backward(losses, list(encoder.parameters()))
    assert all(bool(torch.isfinite(p.grad).all()) for p in encoder.parameters())
    assert bool(torch.isfinite(method.loss_weights.grad).all())
