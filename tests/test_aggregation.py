"""Gradient-aggregation methods (pcgrad, pcgrad-aux, gcs, mgda, cagrad): each one's defining
property over generated Jacobians — random, conflicting, collinear, opposed, zero rows, low rank,
identical rows, K = 1, uniform scales from 1e-15 to 1e15 and rows of mixed scale — checked in
P-space against independent references; optimality of the MGDA and CAGrad solvers by their KKT
conditions and a primal-dual certificate; and the plumbing from ``backward`` to ``.grad`` in every
gradient mode."""

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auxilia import NonFiniteLossError, methods
from auxilia.methods.aggregation import cagrad_dual, min_norm_weights, normalized_gram

NAMES = ["pcgrad", "pcgrad-aux", "gcs", "mgda", "cagrad"]
VARIANTS = [
    ("pcgrad", {}),
    ("pcgrad", {"seed": 7}),
    ("pcgrad-aux", {}),
    ("gcs", {}),
    ("gcs", {"weighted": True}),
    ("mgda", {}),
    ("mgda", {"normalization": "l2"}),
    ("cagrad", {}),
    ("cagrad", {"c": 0.9, "rescale": 0}),
    ("cagrad", {"c": 0.1, "rescale": 2}),
]
SCALES = [1e-15, 1e-8, 1.0, 1e8, 1e15]
FAMILIES = [
    "random", "conflicting", "collinear", "opposed", "zero_rows", "low_rank", "identical", "mixed",
]
DEGENERATE = {"collinear", "opposed", "zero_rows", "low_rank", "identical"}
ZERO = torch.zeros(2, dtype=torch.float64)


def family(kind: str, K: int, P: int, scale: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, P))
    if kind == "conflicting" and K > 1:
        G[1:] = -0.8 * G[0] + 0.3 * G[1:]
    elif kind == "collinear" and K > 1:
        G[1:] = rng.uniform(-3, 3, (K - 1, 1)) * G[0]
    elif kind == "opposed" and K > 1:
        G[1] = -G[0]
    elif kind == "zero_rows":
        G[rng.integers(0, K)] = 0.0
        G[-1] = 0.0
    elif kind == "low_rank":
        G = rng.standard_normal((K, 2)) @ rng.standard_normal((2, P))
    elif kind == "identical":
        G[:] = G[0]
    elif kind == "mixed":
        G *= 10.0 ** rng.uniform(-4, 0, (K, 1))
    return torch.tensor(G * scale, dtype=torch.float64)


@st.composite
def jacobians(draw, families=FAMILIES, max_k=10):
    kind = draw(st.sampled_from(families))
    K = draw(st.integers(1, max_k))
    P = draw(st.integers(1, 50))
    return kind, family(kind, K, P, draw(st.sampled_from(SCALES)), draw(st.integers(0, 2**31)))


def create(name: str, K: int, **hyperparameters):
    return methods.create(name, [f"t{k}" for k in range(K)], primary="t0", **hyperparameters)


def unit(G: torch.Tensor) -> np.ndarray:
    """G in float64 numpy, divided by its largest row norm (so tolerances are relative)."""
    G = G.double().numpy()
    top = np.linalg.norm(G, axis=1).max()
    return G / top if top > 0 else G


# ------------------------------------------------------------------------------------------------
# Every method


def test_registered_with_their_defaults():
    assert set(NAMES) <= set(methods.available())
    assert methods.hyperparameters("pcgrad") == {"mode": "loop", "chunk_size": None, "seed": 0}
    assert methods.hyperparameters("pcgrad-aux") == {"mode": "loop", "chunk_size": None}
    assert methods.hyperparameters("gcs")["weighted"] is False
    assert methods.hyperparameters("mgda")["normalization"] == "none"
    assert methods.hyperparameters("cagrad") == {
        "mode": "loop", "chunk_size": None, "c": 0.4, "rescale": 1,
    }


@settings(max_examples=250, deadline=None)
@given(case=jacobians(), variant=st.sampled_from(VARIANTS))
def test_finite_direction_reproduced_by_the_weights(case, variant):
    _kind, G = case
    name, hp = variant
    method = create(name, G.shape[0], **hp)
    d = method.aggregate(G)
    assert d.shape == (G.shape[1],) and d.dtype == G.dtype
    assert torch.isfinite(d).all() and torch.isfinite(method.last_weights).all()
    scale = float(G.abs().max())
    expected = method.last_weights.double() @ G
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-9 * scale * G.shape[0])
    assert set(method.weights()) == {f"t{k}" for k in range(G.shape[0])}


@settings(max_examples=80, deadline=None)
@given(case=jacobians(), variant=st.sampled_from(VARIANTS))
def test_float32_and_bfloat16_jacobians_give_finite_directions(case, variant):
    _, G = case
    name, hp = variant
    for dtype in (torch.float32, torch.bfloat16):
        d = create(name, G.shape[0], **hp).aggregate(G.to(dtype))
        assert d.dtype == dtype and torch.isfinite(d).all()


@pytest.mark.parametrize("name, hp", VARIANTS)
@pytest.mark.parametrize("scale", [1e-200, 1e-40, 1e40, 1e200])
def test_extreme_scales_do_not_overflow(name, hp, scale):
    G = family("conflicting", 4, 9, 1.0, 3)
    reference = create(name, 4, **hp)
    expected = reference.aggregate(G)
    d = create(name, 4, **hp).aggregate(G * scale)
    assert torch.isfinite(d).all()
    if hp.get("normalization") == "l2":  # unit-norm gradients: the direction does not scale
        torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(d / scale, expected, rtol=1e-9, atol=1e-12)
    big = (G * 1e30).float()  # the float32 Gram product would overflow
    assert torch.isfinite(create(name, 4, **hp).aggregate(big)).all()


@settings(max_examples=100, deadline=None)
@given(case=jacobians(families=["random", "conflicting"]),
       variant=st.sampled_from([v for v in VARIANTS if v[1].get("normalization") != "l2"]),
       factor=st.sampled_from([1e-12, 1e-3, 7.0, 1e12]))
def test_directions_scale_with_the_gradients(case, variant, factor):
    _, G = case
    name, hp = variant
    d = create(name, G.shape[0], **hp).aggregate(G)
    scaled = create(name, G.shape[0], **hp).aggregate(G * factor)
    torch.testing.assert_close(scaled / factor, d, rtol=1e-7, atol=1e-9 * float(G.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_jacobian_gives_a_non_finite_direction(name):
    G = family("random", 3, 5, 1.0, 0)
    G[1, 2] = float("nan")
    assert not torch.isfinite(create(name, 3).aggregate(G)).all()
    G[1, 2] = float("inf")
    assert not torch.isfinite(create(name, 3).aggregate(G)).all()


def test_zero_jacobian_gives_a_zero_direction():
    for name, hp in VARIANTS:
        d = create(name, 3, **hp).aggregate(torch.zeros(3, 4, dtype=torch.float64))
        assert torch.equal(d, torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# pcgrad-aux


@settings(max_examples=250, deadline=None)
@given(case=jacobians())
def test_pcgrad_aux_keeps_the_primary_and_removes_conflicts_with_it(case):
    _, G = case
    method = create("pcgrad-aux", G.shape[0])
    d = method.aggregate(G)
    assert torch.all(method.last_weights[1:] == 1.0)  # only the primary's component is adjusted
    U = unit(G)
    top = float(np.linalg.norm(G.numpy(), axis=1).max()) or 1.0
    g0 = U[0]
    parts = []
    for gk in U[1:]:
        dot = float(gk @ g0)
        part = gk - dot / float(g0 @ g0) * g0 if dot < 0 else gk
        assert float(part @ g0) >= -1e-12  # no auxiliary part pushes against the primary task
        parts.append(part)
    expected = sum(parts) if parts else np.zeros_like(g0)
    # the direction is the untouched primary gradient plus the modified auxiliary parts
    np.testing.assert_allclose(d.numpy() / top - g0, expected, rtol=1e-9, atol=1e-11 * len(U))


def test_pcgrad_aux_by_hand():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    d = create("pcgrad-aux", 3).aggregate(G)
    # (-1, 1) conflicts with the primary (1, 0) and loses its component along it; (2, 3) agrees
    torch.testing.assert_close(d, torch.tensor([1.0 + 0.0 + 2.0, 0.0 + 1.0 + 3.0]).double())


# ------------------------------------------------------------------------------------------------
# pcgrad


def pcgrad_reference(G: np.ndarray, orders: np.ndarray) -> list[np.ndarray]:
    """The paper's algorithm in P-space: each task's projected gradient, visiting ``orders[i]``."""
    projected = []
    for i in range(len(G)):
        g = G[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            dot = float(g @ G[j])
            if dot < 0 and float(G[j] @ G[j]) > 0:
                before = np.linalg.norm(g)
                g = g - dot / float(G[j] @ G[j]) * G[j]
                # just projected: orthogonal to the gradient it conflicted with
                assert abs(float(g @ G[j])) <= 1e-12 * before * np.linalg.norm(G[j])
        projected.append(g)
    return projected


def test_pcgrad_two_tasks_matches_the_hand_formula():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    d = create("pcgrad", 2).aggregate(torch.stack([g1, g2]))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(d, p1 + p2, rtol=0, atol=1e-15)
    assert float(p1 @ g2) == 0.0 and float(p2 @ g1) == 0.0
    agreeing = torch.stack([g1, g1 + 0.1 * g2])
    torch.testing.assert_close(create("pcgrad", 2).aggregate(agreeing), agreeing.sum(0))
    opposed = torch.stack([g1, -g1])
    torch.testing.assert_close(create("pcgrad", 2).aggregate(opposed), ZERO)


@settings(max_examples=200, deadline=None)
@given(case=jacobians(), seed=st.integers(0, 2**20), step=st.integers(0, 10**6))
def test_pcgrad_matches_the_algorithm_in_parameter_space(case, seed, step):
    _, G = case
    K = G.shape[0]
    method = create("pcgrad", K, seed=seed)
    method.steps.fill_(step)
    d = method.aggregate(G)
    orders = method.orders().numpy()
    assert sorted(orders[0].tolist()) == list(range(K))
    U = unit(G)
    projected = pcgrad_reference(U, orders)
    top = float(np.linalg.norm(G.numpy(), axis=1).max()) or 1.0
    np.testing.assert_allclose(d.numpy() / top, sum(projected), rtol=1e-8, atol=1e-9 * K)
    for i, g in enumerate(projected):
        others = [j for j in orders[i] if j != i]
        if others:  # the last gradient visited is never conflicted with afterwards
            assert float(g @ U[others[-1]]) >= -1e-9


@settings(max_examples=60, deadline=None)
@given(case=jacobians(families=["conflicting", "random"]), seed=st.integers(0, 1000))
def test_pcgrad_is_reproducible_and_resumable(case, seed):
    _, G = case
    K = G.shape[0]
    a, b = create("pcgrad", K, seed=seed), create("pcgrad", K, seed=seed)
    torch.testing.assert_close(a.aggregate(G), b.aggregate(G), rtol=0, atol=0)
    a.steps.fill_(41)
    resumed = create("pcgrad", K, seed=seed)
    resumed.load_state_dict(a.state_dict())
    torch.testing.assert_close(resumed.aggregate(G), a.aggregate(G), rtol=0, atol=0)
    assert torch.equal(resumed.orders(), a.orders())


def test_pcgrad_orders_change_with_step_and_seed_and_leave_global_rng_alone():
    method = create("pcgrad", 6, seed=3)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = method.orders()
    method.steps += 1
    second = method.orders()
    other_seed = create("pcgrad", 6, seed=4).orders()
    assert not torch.equal(first, second) and not torch.equal(first, other_seed)
    method.aggregate(family("conflicting", 6, 10, 1.0, 0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


# ------------------------------------------------------------------------------------------------
# gcs


@settings(max_examples=250, deadline=None)
@given(case=jacobians(), weighted=st.booleans())
def test_gcs_keeps_exactly_the_auxiliaries_that_agree(case, weighted):
    _, G = case
    method = create("gcs", G.shape[0], weighted=weighted)
    method.aggregate(G)
    c = method.last_weights.numpy()
    assert c[0] == 1.0
    U = unit(G)
    norms = np.linalg.norm(U, axis=1)
    for k in range(1, len(U)):
        denominator = norms[0] * norms[k]
        cosine = float(U[0] @ U[k]) / denominator if denominator > 0 else 0.0
        if cosine < -1e-9 or denominator == 0:
            assert c[k] == 0.0
        elif cosine > 1e-9:
            assert c[k] == pytest.approx(cosine if weighted else 1.0, rel=1e-9)


def test_gcs_by_hand():
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.1], [0.0, 0.0]], dtype=torch.float64)
    binary, weighted = create("gcs", 4), create("gcs", 4, weighted=True)
    torch.testing.assert_close(binary.aggregate(G), G[0] + G[1])
    torch.testing.assert_close(weighted.aggregate(G), G[0] + G[1] / math.sqrt(2))
    assert binary.weights() == {"t0": 1.0, "t1": 1.0, "t2": 0.0, "t3": 0.0}
    no_primary = G.clone()
    no_primary[0] = 0.0  # nothing to agree with: every auxiliary is dropped
    torch.testing.assert_close(binary.aggregate(no_primary), torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# mgda


def frank_wolfe(A: np.ndarray, iterations: int = 3000) -> np.ndarray:
    """Frank–Wolfe with exact line search for min wᵀAw over the simplex."""
    K = len(A)
    w = np.full(K, 1.0 / K)
    for _ in range(iterations):
        Aw = A @ w
        j = int(np.argmin(Aw))
        d = -w.copy()
        d[j] += 1.0
        curvature = float(d @ A @ d)
        if curvature <= 0:
            break
        gamma = min(max(-float(d @ Aw) / curvature, 0.0), 1.0)
        w = w + gamma * d
    return w


def assert_simplex_kkt(A: np.ndarray, w: np.ndarray, tol: float) -> None:
    assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-12
    Aw = A @ w
    level = float(w @ Aw)
    assert np.all(Aw >= level - tol)
    assert np.all(np.abs(Aw[w > 0] - level) <= tol)


@settings(max_examples=200, deadline=None)
@given(case=jacobians())
def test_mgda_solves_the_min_norm_problem(case):
    _, G = case
    method = create("mgda", G.shape[0])
    d = method.aggregate(G)
    U = unit(G)
    A = U @ U.T
    w = method.last_weights.numpy()
    assert_simplex_kkt(A, w, tol=1e-9)
    reference = frank_wolfe(A)
    assert w @ A @ w <= reference @ A @ reference + 1e-12
    # the min-norm point is never longer than any task's gradient, nor than the mean
    top = float(np.linalg.norm(G.numpy(), axis=1).max()) or 1.0
    norm = float(np.linalg.norm(d.numpy())) / top
    assert norm <= np.linalg.norm(U, axis=1).min() + 1e-9
    assert norm <= np.linalg.norm(U.mean(axis=0)) + 1e-9


@settings(max_examples=100, deadline=None)
@given(case=jacobians())
def test_mgda_l2_uses_the_normalized_gradients(case):
    _, G = case
    method = create("mgda", G.shape[0], normalization="l2")
    d = method.aggregate(G)
    norms = G.norm(dim=1).numpy()
    c = method.last_weights.numpy()
    live = norms > 0
    w = c * norms
    assert np.all(c[~live] == 0)
    N = G.numpy()[live] / norms[live, None]  # unit gradients; the solver saw their Gram matrix
    if live.sum() < len(norms):  # a zero gradient is in the hull: the min-norm point is 0
        assert float(np.linalg.norm(d.numpy())) <= 1e-12
        return
    assert_simplex_kkt(N @ N.T, w, tol=1e-9)
    np.testing.assert_allclose(d.numpy(), N.T @ w, rtol=1e-9, atol=1e-12)


def test_mgda_by_hand():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(create("mgda", 2).aggregate(torch.stack([e1, e2])), (e1 + e2) / 2)
    torch.testing.assert_close(create("mgda", 2).aggregate(torch.stack([e1, -e1])), ZERO)
    torch.testing.assert_close(create("mgda", 2).aggregate(torch.stack([2 * e1, e1])), e1)
    # different lengths: the raw min-norm point leans to the short one, l2 treats them alike
    G = torch.stack([4 * e1, e2])
    expected = torch.tensor([1 / 17, 16 / 17], dtype=torch.float64) @ G
    torch.testing.assert_close(create("mgda", 2).aggregate(G), expected)
    torch.testing.assert_close(create("mgda", 2, normalization="l2").aggregate(G), (e1 + e2) / 2)


def test_mgda_and_cagrad_warm_start_is_state_and_does_not_change_the_answer():
    G0 = family("conflicting", 6, 20, 1.0, 5)
    for name in ("mgda", "cagrad"):
        method = create(name, 6)
        assert "_warm" in method.state_dict()
        for step in range(5):
            G = G0 + 0.2 * family("random", 6, 20, 1.0, 100 + step)
            warm = method.aggregate(G)
            cold = create(name, 6).aggregate(G)
            torch.testing.assert_close(warm, cold, rtol=1e-9, atol=1e-12)
        restored = create(name, 6)
        restored.load_state_dict(method.state_dict())
        torch.testing.assert_close(restored._warm, method._warm)


@settings(max_examples=150, deadline=None)
@given(case=jacobians(), start=st.integers(0, 1000))
def test_min_norm_weights_from_any_start(case, start):
    _, G = case
    A, _ = normalized_gram(G)
    w0 = np.random.default_rng(start).dirichlet(np.full(len(A), 0.5))
    assert_simplex_kkt(A, min_norm_weights(A, start=w0), tol=1e-9)
    assert_simplex_kkt(A, min_norm_weights(A), tol=1e-9)


# ------------------------------------------------------------------------------------------------
# cagrad


def cagrad_certificate(G: torch.Tensor, method) -> tuple[float, float, float]:
    """(F(w) − min_k g_k·d, ‖d − ḡ‖ − c‖ḡ‖, F(w)) in units of the largest squared row norm, for the
    method's dual weights w and its direction d before rescaling. Weak duality makes
    min_k g_k·d ≤ F* ≤ F(w) for any d in the ball, so a gap near 0 certifies both optimal."""
    c = method.c
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[method.rescale]
    top = float(np.linalg.norm(G.numpy(), axis=1).max())
    U = unit(G)
    d = method.last_weights.numpy() * divisor @ U
    w = method._warm.numpy()
    mean = U.mean(axis=0)
    radius = c * float(np.linalg.norm(mean))
    x = U.T @ w
    F = float(mean @ x) + radius * float(np.linalg.norm(x))
    assert top > 0
    return F - float((U @ d).min()), float(np.linalg.norm(d - mean)) - radius, F


def cagrad_reference(U: np.ndarray, c: float, iterations: int = 3000) -> float:
    """An upper bound on min F over the simplex from a first-order method: accelerated projected
    gradient on F with ‖x‖ smoothed to √(‖x‖² + μ²); the best true F over the iterates and the
    vertices is returned."""
    K = len(U)
    A = U @ U.T
    mean = U.mean(axis=0)
    a = U @ mean
    radius = c * float(np.linalg.norm(mean))

    def F(w):
        return float(a @ w) + radius * float(np.linalg.norm(U.T @ w))

    def project(v):
        u = np.sort(v)[::-1]
        cumulative = np.cumsum(u) - 1.0
        rho = np.nonzero(u - cumulative / np.arange(1, K + 1) > 0)[0][-1]
        return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)

    mu = 1e-4
    step = 1.0 / (max(np.linalg.eigvalsh(A)[-1], 1e-12) * (1.0 + radius / mu))
    w = y = np.full(K, 1.0 / K)
    t, best = 1.0, min(F(np.eye(K)[k]) for k in range(K))
    for _ in range(iterations):
        x = A @ y
        gradient = a + radius * x / math.sqrt(max(float(y @ x), 0.0) + mu * mu)
        nxt = project(y - step * gradient)
        t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        y = nxt + (t - 1) / t_next * (nxt - w)
        w, t = nxt, t_next
        best = min(best, F(w))
    return best


@settings(max_examples=200, deadline=None)
@given(case=jacobians(), c=st.sampled_from([0.1, 0.4, 0.9, 2.0]),
       rescale=st.sampled_from([0, 1, 2]))
def test_cagrad_solves_its_dual_and_primal(case, c, rescale):
    kind, G = case
    method = create("cagrad", G.shape[0], c=c, rescale=rescale)
    method.aggregate(G)
    if float(G.abs().max()) == 0.0:
        return
    w = method._warm.numpy()
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    gap, outside, _ = cagrad_certificate(G, method)
    tol = 1e-6 if kind in DEGENERATE or kind == "mixed" else 1e-10
    assert gap <= tol and outside <= tol


@settings(max_examples=80, deadline=None)
@given(case=jacobians(families=[f for f in FAMILIES if f != "mixed"]))
def test_mgda_and_cagrad_on_float32_gradients_are_optimal_to_float32_precision(case):
    _, G = case
    G = G.float()
    if float(G.abs().max()) == 0.0:
        return
    mgda = create("mgda", G.shape[0])
    mgda.aggregate(G)
    U = unit(G)
    assert_simplex_kkt(U @ U.T, mgda.last_weights.numpy(), tol=1e-5)
    cagrad = create("cagrad", G.shape[0])
    cagrad.aggregate(G)
    gap, outside, _ = cagrad_certificate(G, cagrad)
    # float32 Gram entries carry a relative error of about P·2⁻²⁴; near-cancelling rows leave ~1e-6
    assert gap <= 1e-4 and outside <= 1e-5


@settings(max_examples=40, deadline=None)
@given(case=jacobians(families=["random", "conflicting", "low_rank", "zero_rows"], max_k=6),
       c=st.sampled_from([0.4, 0.9]))
def test_cagrad_beats_a_long_first_order_reference(case, c):
    _, G = case
    method = create("cagrad", G.shape[0], c=c)
    method.aggregate(G)
    if float(G.abs().max()) == 0.0:
        return
    _, _, F = cagrad_certificate(G, method)
    assert F <= cagrad_reference(unit(G), c) + 1e-9


@pytest.mark.parametrize("rescale, divisor", [(0, 1.0), (1, 1.16), (2, 1.4)])
def test_cagrad_with_one_task_or_identical_gradients(rescale, divisor):
    g = torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64)
    single = create("cagrad", 1, rescale=rescale)
    torch.testing.assert_close(single.aggregate(g[None]), g * 1.4 / divisor)
    same = create("cagrad", 4, rescale=rescale)
    torch.testing.assert_close(same.aggregate(g.repeat(4, 1)), g * 1.4 / divisor)
    G = family("conflicting", 3, 5, 1.0, 0)
    torch.testing.assert_close(create("cagrad", 3, c=0.0).aggregate(G), G.mean(0))  # c = 0: ḡ


def test_cagrad_where_the_gradients_cancel_conflicts_with_no_task():
    # g and −g: ḡ = 0, the direction is 0
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(create("cagrad", 2).aggregate(torch.stack([g, -g])), ZERO)
    # a zero gradient puts 0 in the hull, where F = 0; here that is the optimum (the formula's 0/0),
    # and the direction returned is a primal solution: in the ball, conflicting with no task
    for G in (
        torch.tensor([[1.0, 0.0], [-0.2, 1.0], [0.0, 0.0]], dtype=torch.float64),
        torch.tensor([[0.8, -0.5], [-0.8, -0.4], [0.2, 0.1], [0.0, 0.0]], dtype=torch.float64),
    ):
        method = create("cagrad", G.shape[0], rescale=0)
        d = method.aggregate(G)
        mean = G.mean(0)
        assert float((G @ d).min()) >= -1e-12
        assert float((d - mean).norm()) <= 0.4 * float(mean.norm()) + 1e-12
        gap, _, F = cagrad_certificate(G, method)
        assert abs(F) <= 1e-12 and gap <= 1e-12


def test_cagrad_dual_by_hand():
    # two orthogonal unit gradients: by symmetry w = (½, ½), so g_w = ḡ and d = (1 + c) ḡ
    solution = cagrad_dual(np.eye(2), 0.4)
    np.testing.assert_allclose(solution.w, [0.5, 0.5], atol=1e-12)
    G = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(create("cagrad", 2).aggregate(G), G.mean(0) * 1.4 / 1.16)
    # a dominant gradient: the dual puts all weight on the small one when c is large
    A = np.array([[1.0, 0.0], [0.0, 1e-2]])
    w = cagrad_dual(A, 5.0).w
    np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-12)


def test_solvers_are_fast():
    rng = np.random.default_rng(0)
    G = torch.tensor(rng.standard_normal((10, 500)))
    for name in ("mgda", "cagrad"):
        method = create(name, 10)
        timings = []
        for step in range(15):
            G = G + 0.1 * torch.tensor(rng.standard_normal((10, 500)))
            start = time.perf_counter()
            method._coefficients(G)
            timings.append(time.perf_counter() - start)
        median = sorted(timings)[len(timings) // 2]
        assert median < 0.02, f"{name}: median {median * 1e3:.1f} ms"


# ------------------------------------------------------------------------------------------------
# backward: the direction written into .grad


class Net(nn.Module):
    """A shared linear encoder and one head per task."""

    def __init__(self, K: int):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(K)])

    def losses(self, x, y):
        rep = self.encoder(x)
        return rep, {
            f"t{k}": ((h(rep).squeeze(-1) - y[:, k]) ** 2).mean() for k, h in enumerate(self.heads)
        }


def _flat_grads(parameters):
    return torch.cat([p.grad.reshape(-1) for p in parameters])


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("name, hp", VARIANTS)
@pytest.mark.parametrize("mode", ["loop", "batched", "representation"])
def test_backward_writes_the_aggregated_direction(name, hp, mode, K):
    torch.manual_seed(1)
    x, y = torch.randn(10, 4), torch.randn(10, K)
    net = Net(K)
    rep, losses = net.losses(x, y)
    shared = list(net.encoder.parameters())
    target = [rep] if mode == "representation" else shared
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, target, retain_graph=True)])
            for loss in losses.values()]
    direction = create(name, K, **hp).aggregate(torch.stack(rows))
    if mode == "representation":  # the chain rule: the direction on the representation, pulled back
        pulled = torch.autograd.grad(rep, shared, direction.view_as(rep), retain_graph=True)
        expected = torch.cat([g.reshape(-1) for g in pulled])
    else:
        expected = direction
    heads = [torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
             for loss, h in zip(losses.values(), net.heads)]

    net2 = Net(K)
    rep2, losses2 = net2.losses(x, y)
    method = create(name, K, mode=mode, **hp)
    info = method.backward(losses2, shared_parameters=net2.encoder.parameters(),
                           representation=rep2 if mode == "representation" else None)
    got = _flat_grads(net2.encoder.parameters())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for h, grads in zip(net2.heads, heads):  # every head gets its own loss's gradient
        for p, g in zip(h.parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    assert set(info["weights"]) == {f"t{k}" for k in range(K)}
    assert int(method.steps) == 1


def test_mgda_in_representation_mode_is_mgda_ub():
    torch.manual_seed(2)
    net = Net(3)
    rep, losses = net.losses(torch.randn(16, 4), torch.randn(16, 3))
    method = create("mgda", 3, mode="representation")
    assert method.needs_representation
    method.backward(losses, shared_parameters=net.encoder.parameters(), representation=rep)
    w = method.last_weights
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1.0) < 1e-9


def test_backward_failure_leaves_the_state_untouched():
    net = Net(2)
    _rep, losses = net.losses(torch.randn(5, 4), torch.randn(5, 2))
    losses["t1"] = losses["t1"] * float("nan")
    for name in NAMES:
        method = create(name, 2)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        with pytest.raises(NonFiniteLossError):
            method.backward(losses, shared_parameters=net.encoder.parameters())
        for key, value in method.state_dict().items():
            torch.testing.assert_close(value, before[key], equal_nan=True)


# ------------------------------------------------------------------------------------------------
# hyperparameters


def test_unknown_hyperparameter_is_an_error():
    for name in NAMES:
        with pytest.raises(ValueError, match="bogus"):
            methods.create(name, tasks=["a", "b"], primary="a", bogus=1)


@pytest.mark.parametrize("name, hp, message", [
    ("pcgrad", {"seed": -1}, "seed"),
    ("pcgrad", {"seed": 1.5}, "seed"),
    ("pcgrad", {"seed": True}, "seed"),
    ("gcs", {"weighted": 1}, "weighted"),
    ("gcs", {"weighted": "yes"}, "weighted"),
    ("mgda", {"normalization": "l1"}, "normalization"),
    ("mgda", {"normalization": None}, "normalization"),
    ("cagrad", {"c": -0.1}, "c must be"),
    ("cagrad", {"c": float("nan")}, "c must be"),
    ("cagrad", {"c": float("inf")}, "c must be"),
    ("cagrad", {"c": "0.4"}, "c must be"),
    ("cagrad", {"rescale": 3}, "rescale"),
    ("cagrad", {"rescale": True}, "rescale"),
    ("cagrad", {"rescale": 1.5}, "rescale"),
    ("pcgrad-aux", {"mode": "vmap"}, "unknown gradient mode"),
    ("mgda", {"chunk_size": 0}, "chunk_size"),
])
def test_bad_hyperparameters(name, hp, message):
    with pytest.raises(ValueError, match=message):
        create(name, 2, **hp)


def test_aggregate_checks_the_shape():
    for name in NAMES:
        with pytest.raises(ValueError, match=r"expected a \(3, P\) matrix"):
            create(name, 3).aggregate(torch.zeros(2, 5))
