"""Defining properties of every gradient-aggregation method over generated Jacobians, including
degenerate families (zero rows, collinear and exactly opposed gradients, K = 1) and entries scaled
from 1e-15 to 1e15."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auxilia import gradients, methods
from auxilia.methods.aggregation import cagrad_dual, min_norm_weights
from auxilia.solvers import nash_bargaining, nash_sensitivity

AGGREGATORS = ["pcgrad", "pcgrad-aux", "gcs", "mgda", "cagrad"]
SCALES = [1e-15, 1e-6, 1.0, 1e6, 1e15]
FAMILIES = ["random", "conflicting", "collinear", "opposed", "zero_rows", "low_rank"]


def family(kind: str, K: int, P: int, scale: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    G = g.standard_normal((K, P))
    if kind == "conflicting" and K > 1:
        G[1:] = -0.7 * G[0] + 0.3 * G[1:]
    elif kind == "collinear" and K > 1:
        G[1:] = g.uniform(0.1, 3, (K - 1, 1)) * G[0]
    elif kind == "opposed" and K > 1:
        G[1] = -G[0]
    elif kind == "zero_rows":
        G[g.integers(0, K)] = 0
        G[-1] = 0
    elif kind == "low_rank":
        G = g.standard_normal((K, 2)) @ g.standard_normal((2, P))
    return torch.tensor(G * scale, dtype=torch.float64)


matrices = st.builds(
    family,
    st.sampled_from(FAMILIES),
    st.integers(1, 10),
    st.integers(1, 40),
    st.sampled_from(SCALES),
    st.integers(0, 10_000),
)


def _create(name, K, **hp):
    return methods.create(name, [f"t{k}" for k in range(K)], primary="t0", **hp)


@settings(max_examples=150, deadline=None)
@given(G=matrices, name=st.sampled_from(AGGREGATORS))
def test_finite_direction_and_weights(G, name):
    method = _create(name, G.shape[0])
    d = method.aggregate(G)
    assert d.shape == (G.shape[1],)
    assert torch.isfinite(d).all()
    assert torch.isfinite(method.last_weights).all()
    # the reported weights reproduce the direction
    torch.testing.assert_close(method.last_weights.double() @ G, d, rtol=1e-5, atol=1e-5 * float(G.abs().max()) + 1e-300)


@settings(max_examples=150, deadline=None)
@given(G=matrices)
def test_pcgrad_aux_keeps_the_primary_gradient_and_removes_conflicts(G):
    method = _create("pcgrad-aux", G.shape[0])
    d = method.aggregate(G)
    g0 = G[0]
    tol = 1e-9 * float((G.norm(dim=1).max()) ** 2) + 1e-300
    aux_part = d - g0
    modified = []
    for k in range(1, G.shape[0]):
        gk = G[k]
        dot = float(gk @ g0)
        fixed = gk - (dot / float(g0 @ g0)) * g0 if dot < 0 and float(g0 @ g0) > 0 else gk
        assert float(fixed @ g0) >= -tol  # no auxiliary part left conflicting with the primary
        modified.append(fixed)
    expected = sum(modified) if modified else torch.zeros_like(g0)
    torch.testing.assert_close(aux_part, expected, rtol=1e-6, atol=1e-6 * float(G.abs().max()) + 1e-300)
    assert method.last_weights[0] >= 1.0 - 1e-12  # the primary's own coefficient is never reduced


def test_pcgrad_two_tasks_matches_the_hand_formula():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    method = _create("pcgrad", 2)
    d = method.aggregate(torch.stack([g1, g2]))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(d, p1 + p2)
    assert float(p1 @ g2) == pytest.approx(0.0) and float(p2 @ g1) == pytest.approx(0.0)
    # no conflict: plain sum
    torch.testing.assert_close(method.aggregate(torch.stack([g1, g1 + g2 * 0.1])), g1 + g1 + g2 * 0.1)


@settings(max_examples=60, deadline=None)
@given(G=matrices, seed=st.integers(0, 100))
def test_pcgrad_is_reproducible_from_seed_and_step(G, seed):
    a, b = _create("pcgrad", G.shape[0], seed=seed), _create("pcgrad", G.shape[0], seed=seed)
    torch.testing.assert_close(a.aggregate(G), b.aggregate(G))


@settings(max_examples=150, deadline=None)
@given(G=matrices, weighted=st.booleans())
def test_gcs_keeps_exactly_the_auxiliaries_that_agree(G, weighted):
    method = _create("gcs", G.shape[0], weighted=weighted)
    method.aggregate(G)
    c = method.last_weights.double()
    assert c[0] == 1.0
    norms = G.norm(dim=1)
    for k in range(1, G.shape[0]):
        denominator = float(norms[0] * norms[k])
        cosine = float(G[0] @ G[k]) / denominator if denominator > 0 else 0.0
        if cosine < -1e-9:
            assert c[k] == 0.0
        elif cosine > 1e-9:
            assert c[k] == pytest.approx(cosine if weighted else 1.0, rel=1e-6)


def _kkt_simplex(M, w, gradient):
    """KKT of min over the simplex: w ≥ 0, Σw = 1, ∇_k ≥ wᵀ∇ for all k (equality on the support)."""
    level = float(w @ gradient)
    assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9
    return float(level - gradient.min())


@settings(max_examples=150, deadline=None)
@given(G=matrices)
def test_mgda_returns_the_min_norm_point(G):
    M = (G @ G.T).numpy()
    scale = max(float(M.diagonal().max()), 1e-300)
    method = _create("mgda", G.shape[0])
    method.aggregate(G)
    w = method.last_weights.double().numpy()
    gap = _kkt_simplex(M, w, M @ w)
    assert gap <= 1e-9 * scale
    # never worse than a long projected-gradient reference
    A = M / scale
    v = np.full(len(M), 1 / len(M))
    L = max(np.linalg.eigvalsh(A).max(), 1e-12)
    for _ in range(3000):
        v = project_simplex(v - A @ v / L)
    assert w @ A @ w <= v @ A @ v + 1e-9


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, Σ w = 1} (sort-based, exact): the reference's only tool."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    rho = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def _cagrad_value(M, w, c):
    K = len(M)
    b = np.full(K, 1 / K)
    return float(w @ M @ b) + c * np.sqrt(max(b @ M @ b, 0)) * np.sqrt(max(w @ M @ w, 0))


@settings(max_examples=100, deadline=None)
@given(G=matrices, c=st.sampled_from([0.1, 0.4, 0.9]))
def test_cagrad_solves_its_dual(G, c):
    scale = max(float((G @ G.T).diagonal().max()), 1e-300)
    M = (G @ G.T).numpy() / scale
    solution = cagrad_dual(M, c)
    w = solution.w
    assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9
    value = _cagrad_value(M, w, c)
    rng = np.random.default_rng(0)
    candidates = [np.eye(len(M))[k] for k in range(len(M))] + list(rng.dirichlet(np.full(len(M), 0.5), 300))
    assert value <= min(_cagrad_value(M, v, c) for v in candidates) + 1e-8
    norm = np.sqrt(max(w @ M @ w, 0))
    if norm > 1e-6:  # smooth point: the Frank-Wolfe gap certifies optimality
        gradient = M.mean(axis=1) + c * np.sqrt(max(M.mean(), 0)) * (M @ w) / norm
        assert float(gradient @ w - gradient.min()) <= 1e-7


@pytest.mark.parametrize("rescale, divisor", [(0, 1.0), (1, 1.16), (2, 1.4)])
def test_cagrad_with_identical_gradients_rescales_the_common_gradient(rescale, divisor):
    g = torch.tensor([3.0, -4.0], dtype=torch.float64)
    method = _create("cagrad", 3, c=0.4, rescale=rescale)
    d = method.aggregate(torch.stack([g, g, g]))
    torch.testing.assert_close(d, g * 1.4 / divisor)
    single = _create("cagrad", 1, c=0.4, rescale=rescale)
    torch.testing.assert_close(single.aggregate(g[None]), g * 1.4 / divisor)


@settings(max_examples=150, deadline=None)
@given(K=st.integers(1, 10), P=st.integers(1, 40), scale=st.sampled_from(SCALES), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["random", "conflicting"]))
def test_nash_bargaining_kkt_residual(K, P, scale, seed, kind):
    G = family(kind, K, max(P, K), scale, seed).numpy()
    M = G @ G.T
    p = np.random.default_rng(seed).uniform(0.1, 3.0, K)
    solution = nash_bargaining(M, p)
    alpha = solution.alpha
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    residual = np.abs(alpha * (M @ alpha) - p) / p
    assert residual.max() < 1e-6


@pytest.mark.parametrize("kind", ["zero_rows", "collinear", "opposed", "low_rank"])
@pytest.mark.parametrize("scale", SCALES)
def test_nash_bargaining_is_finite_on_degenerate_gram(kind, scale):
    G = family(kind, 5, 8, scale, 3).numpy()
    alpha = nash_bargaining(G @ G.T, np.ones(5)).alpha
    assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0)
    assert np.all(np.isfinite(G.T @ alpha))


def test_nash_sensitivity_matches_finite_differences():
    rng = np.random.default_rng(1)
    G = rng.standard_normal((4, 12))
    M, p = G @ G.T, rng.uniform(0.5, 2, 4)
    alpha = nash_bargaining(M, p, tol=1e-14).alpha
    J = nash_sensitivity(M, p, alpha)
    eps = 1e-6
    for j in range(4):
        e = np.eye(4)[j] * eps
        fd = (nash_bargaining(M, p + e, tol=1e-14).alpha - nash_bargaining(M, p - e, tol=1e-14).alpha) / (2 * eps)
        np.testing.assert_allclose(J[:, j], fd, rtol=1e-4, atol=1e-8)


def test_min_norm_point_of_opposed_gradients_is_zero():
    G = np.array([[1.0, 2.0], [-1.0, -2.0], [5.0, 0.0]])
    w = min_norm_weights(G @ G.T)
    assert np.linalg.norm(G.T @ w) < 1e-12


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])

    def losses(self, x, y):
        rep = self.encoder(x)
        return rep, {f"t{k}": ((h(rep).squeeze(-1) - y[:, k]) ** 2).mean() for k, h in enumerate(self.heads)}


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("mode", ["loop", "batched", "representation"])
def test_backward_writes_the_aggregated_direction(name, mode):
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    net = _Net()
    shared = list(net.encoder.parameters())
    rep, losses = net.losses(x, y)
    reference_method = _create(name, 3)
    if mode == "representation":
        G = gradients.jacobian(list(losses.values()), [rep])
        d = reference_method.aggregate(G)
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(rep, shared, d.view_as(rep), retain_graph=True)])
    else:
        G = gradients.jacobian(list(losses.values()), shared)
        expected = reference_method.aggregate(G)
    head_expected = torch.autograd.grad(sum(losses.values()), list(net.heads.parameters()))

    net2 = _Net()
    rep2, losses2 = net2.losses(x, y)
    method = _create(name, 3, mode=mode)
    info = method.backward(losses2, shared_parameters=net2.encoder.parameters(),
                           representation=rep2 if mode == "representation" else None)
    got = torch.cat([p.grad.reshape(-1) for p in net2.encoder.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for p, g in zip(net2.heads.parameters(), head_expected):
        torch.testing.assert_close(p.grad, g)
    assert set(info["weights"]) == {"t0", "t1", "t2"}


@pytest.mark.parametrize("name, hp, message", [
    ("cagrad", {"c": -1}, "c must be"), ("cagrad", {"rescale": 3}, "rescale"),
    ("mgda", {"normalization": "loss"}, "normalization"), ("gcs", {"weighted": 1}, "weighted"),
    ("pcgrad", {"mode": "vmap"}, "unknown gradient mode"), ("pcgrad", {"chunk_size": 0}, "chunk_size"),
])
def test_bad_hyperparameters(name, hp, message):
    with pytest.raises(ValueError, match=message):
        _create(name, 2, **hp)


def test_representation_mode_needs_the_representation():
    net = _Net()
    _, losses = net.losses(torch.randn(3, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match="representation="):
        _create("mgda", 3, mode="representation").backward(losses, shared_parameters=net.encoder.parameters())


def test_aggregate_checks_the_shape():
    with pytest.raises(ValueError, match=r"expected a \(3, P\) matrix"):
        _create("gcs", 3).aggregate(torch.zeros(2, 5))
