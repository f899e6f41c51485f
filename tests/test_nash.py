import numpy as np
import pytest
import torch
from torch import nn

from auxilia import methods
from auxilia.methods.base import MetaContext
from auxilia.tasks import TaskError

TASKS = ["main", "a", "b"]


def _G(seed=0, K=3, P=20, dtype=torch.float64):
    return torch.randn(K, P, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("normalization", ["frobenius", "none"])
def test_nash_mtl_equals_auxinash_with_uniform_preferences(normalization):
    for seed in range(5):
        G = _G(seed)
        nash = methods.create("nash-mtl", TASKS, primary="main", gram_normalization=normalization)
        auxi = methods.create("auxinash", TASKS, primary="main", gram_normalization=normalization,
                              preferences=[2.0, 2.0, 2.0], learn_preferences=False)
        assert torch.equal(nash.aggregate(G), auxi.aggregate(G))
        assert torch.equal(nash.alpha, auxi.alpha)


@pytest.mark.parametrize("normalization", ["frobenius", "none"])
def test_alpha_solves_the_bargaining_system(normalization):
    G = _G(1)
    method = methods.create("auxinash", TASKS, primary="main", preferences=[0.5, 2.0, 1.0],
                            learn_preferences=False, gram_normalization=normalization, max_norm=0)
    d = method.aggregate(G)
    M = (G @ G.T).numpy()
    if normalization == "frobenius":
        M = M / np.linalg.norm(M)
    alpha, p = method.alpha.numpy(), method.preferences.numpy()
    assert p.sum() == pytest.approx(3.0)
    assert np.max(np.abs(alpha * (M @ alpha) - p) / p) < 1e-6
    torch.testing.assert_close(d, method.alpha @ G)


def test_update_is_clipped_to_max_norm_and_weights_can_be_reused():
    method = methods.create("nash-mtl", TASKS, primary="main", max_norm=0.5, update_weights_every=3)
    G = _G(2) * 100
    assert float(method.aggregate(G).norm()) == pytest.approx(0.5)
    first = method.alpha.clone()
    method.steps += 1
    method.aggregate(_G(3))
    assert torch.equal(method.alpha, first)  # step 1: reused
    method.steps += 2
    method.aggregate(_G(3))
    assert not torch.equal(method.alpha, first)  # step 3: solved again


@pytest.mark.parametrize("scale", [1e-15, 1.0, 1e15])
def test_degenerate_gradients_give_finite_updates(scale):
    G = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]], dtype=torch.float64) * scale
    for name in ("nash-mtl", "auxinash"):
        method = methods.create(name, TASKS, primary="main")
        d = method.aggregate(G)
        assert torch.isfinite(d).all() and torch.isfinite(method.alpha).all()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward(self, x):
        rep = self.encoder(x)
        return {t: h(rep).squeeze(-1) for t, h in self.heads.items()}


def _batch(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, {"main": x[:, 0] - x[:, 1], "a": x[:, 0], "b": -x[:, 1] + 0.5 * x[:, 2]}


def _context(model, train, aux):
    def losses(batch):
        x, y = batch
        out = model(x)
        return {t: ((out[t] - y[t]) ** 2).mean() for t in TASKS}
    return MetaContext(losses=losses, train_batch=lambda: train, aux_batch=lambda: aux,
                       shared=list(model.encoder.parameters()), heads=list(model.heads.parameters()),
                       learning_rate=1e-4)


def test_meta_gradient_matches_finite_differences_through_one_step():
    """dL_V/dp from implicit differentiation (no Neumann terms, so v = g_V) equals, to first order in
    the step size, the finite-difference derivative of L_V after one update W - lr Σ α_k(p) g_k."""
    torch.set_default_dtype(torch.float64)
    try:
        model = Tiny()
        train, aux = _batch(1), _batch(2)
        p0 = np.array([1.5, 0.6, 0.9])
        method = methods.create("auxinash", TASKS, primary="main", preferences=list(p0), max_norm=0,
                                gram_normalization="none", meta_source="aux", neumann_terms=0)
        grad, _ = method.preference_gradient(_context(model, train, aux))
        lr, eps = 1e-5, 1e-5
        shared = list(model.encoder.parameters())
        start = [p.detach().clone() for p in shared]

        def val_after_step(p):
            probe = methods.create("auxinash", TASKS, primary="main", preferences=list(p), max_norm=0,
                                   gram_normalization="none", learn_preferences=False)
            probe.preferences = torch.tensor(p, dtype=torch.float64)  # no renormalization
            with torch.no_grad():
                for w, s in zip(shared, start):
                    w.copy_(s)
            model.zero_grad()
            x, y = train
            out = model(x)
            probe.backward({t: ((out[t] - y[t]) ** 2).mean() for t in TASKS}, shared_parameters=shared)
            with torch.no_grad():
                for w in shared:
                    w -= lr * w.grad
            x, y = aux
            return float(((model(x)["main"] - y["main"]) ** 2).mean().detach())

        fd = np.array([(val_after_step(p0 + eps * e) - val_after_step(p0 - eps * e)) / (2 * eps) for e in np.eye(3)])
        np.testing.assert_allclose(fd / lr, grad.numpy(), rtol=2e-3, atol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_meta_step_clips_renormalizes_and_restores_on_failure():
    model = Tiny()
    train, aux = _batch(1), _batch(2)
    method = methods.create("auxinash", TASKS, primary="main", meta_lr=10.0, meta_momentum=0.0,
                            min_preference=1e-3, meta_source="aux")
    context = _context(model.double(), train, aux)
    info = method.meta_step(context)
    p = method.preferences
    assert p.sum().item() == pytest.approx(3.0)
    assert (p >= 1e-3 * 3 / (p.sum().item())).all() and torch.isfinite(p).all()
    assert info["preference_grad_norm"] >= 0
    before = {k: v.clone() for k, v in method.state_dict().items()}
    broken = MetaContext(losses=lambda b: {"main": torch.tensor(float("nan"), requires_grad=True)},
                         train_batch=lambda: train, aux_batch=lambda: aux, shared=context.shared,
                         heads=context.heads, learning_rate=1e-3)
    with pytest.raises(TaskError, match="'a'"):  # the broken batch lacks the auxiliary losses
        method.meta_step(broken)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_keeps_preferences_alpha_and_momentum():
    model = Tiny().double()
    method = methods.create("auxinash", TASKS, primary="main", meta_source="aux")
    method.aggregate(_G(4))
    method.meta_step(_context(model, _batch(1), _batch(2)))
    clone = methods.create("auxinash", TASKS, primary="main", meta_source="aux")
    clone.load_state_dict(method.state_dict())
    for key in ("preferences", "alpha", "momentum", "steps"):
        assert torch.equal(getattr(clone, key), getattr(method, key))
    assert torch.count_nonzero(method.momentum) > 0


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="preference of task 'a'"):
        methods.create("auxinash", TASKS, primary="main", preferences=[1, 0, 1])
    with pytest.raises(ValueError, match="meta_source"):
        methods.create("auxinash", TASKS, primary="main", meta_source="val")
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        methods.create("auxinash", TASKS, primary="main", preferences={"zz": 1.0})
    with pytest.raises(ValueError, match="update_weights_every"):
        methods.create("nash-mtl", TASKS, primary="main", update_weights_every=0)


# ---------------------------------------------------------------- the solver
from auxilia.solvers import nash_bargaining, nash_sensitivity


def _gram_family(kind, K, seed, scale=1.0):
    """Gram matrices of generated gradients: the situations the solver meets in training."""
    rng = np.random.default_rng([seed, K])
    P = 3 * K
    if kind == "random":
        G = rng.standard_normal((K, P))
    elif kind == "conflicting":  # tasks pairwise pulling against a shared direction
        base = rng.standard_normal(P)
        G = np.where(np.arange(K) % 2 == 0, 1.0, -0.8)[:, None] * base + 0.5 * rng.standard_normal((K, P))
    elif kind == "spread":  # task scales from 1e-6 to 1e6 in one matrix
        G = rng.standard_normal((K, P)) * np.logspace(-6, 6, K)[:, None]
    elif kind == "near_singular":  # nearly dependent gradients that still share a descent direction
        G = np.abs(rng.standard_normal((K, 2))) @ rng.standard_normal((2, P)) + 2 * rng.standard_normal(P)
        G = G + 1e-7 * rng.standard_normal((K, P))
    else:
        raise ValueError(kind)
    G = G * scale
    return G @ G.T


def _kkt(M, p, alpha):
    return np.max(np.abs(alpha * (M @ alpha) - p) / p)


@pytest.mark.parametrize("kind", ["random", "conflicting", "spread", "near_singular"])
@pytest.mark.parametrize("K", [1, 2, 3, 5, 10])
def test_solver_kkt_residual_over_gram_families(kind, K):
    for seed in range(4):
        M = _gram_family(kind, K, seed)
        p = np.random.default_rng(seed).uniform(0.1, 3.0, K)
        solution = nash_bargaining(M, p)
        assert np.all(solution.alpha > 0)
        assert _kkt(M, p, solution.alpha) < 1e-6, (kind, K, seed, solution)
        assert np.all(solution.ridge == 0)  # every family has a common descent direction


@pytest.mark.parametrize("scale", [1e-15, 1e-8, 1.0, 1e8, 1e15])
def test_solver_is_exact_at_extreme_scales(scale):
    M = _gram_family("conflicting", 5, 0, scale)
    p = np.array([3.0, 0.5, 0.5, 0.5, 0.5])
    alpha = nash_bargaining(M, p).alpha
    assert _kkt(M, p, alpha) < 1e-6
    # rescaling every gradient by s rescales α by 1/s (scale equivariance of the bargaining)
    reference = nash_bargaining(_gram_family("conflicting", 5, 0), p).alpha
    np.testing.assert_allclose(alpha * scale, reference, rtol=1e-6)


def test_solver_without_agreement_returns_a_converged_regularized_solution():
    """Three tasks on two parameters whose gradients positively cancel: no direction improves all.
    The bargaining of the ridge-regularized game is returned, converged, with a small update."""
    G = np.array([[1.0, 0.2], [-0.6, 1.0], [-0.5, -1.1]])
    M = G @ G.T
    p = np.ones(3)
    solution = nash_bargaining(M, p)
    assert np.all(np.isfinite(solution.alpha)) and np.all(solution.alpha > 0)
    assert np.all(solution.ridge > 0)
    regularized = M + np.diag(solution.ridge)
    assert _kkt(regularized, p, solution.alpha) < 1e-6
    # ‖d‖² = Σp − Σ ridge_k α_k²: far below the Σp of a game with agreement
    assert float(solution.alpha @ M @ solution.alpha) < 0.1 * p.sum()


def test_solver_from_a_far_warm_start_still_converges():
    M = _gram_family("random", 5, 1)
    p = np.ones(5)
    exact = nash_bargaining(M, p).alpha
    for warm in (exact * 1e6, exact * 1e-6, np.full(5, 1e3)):
        assert _kkt(M, p, nash_bargaining(M, p, warm_start=warm).alpha) < 1e-6


@pytest.mark.parametrize("no_agreement", [False, True])
def test_sensitivity_matches_finite_differences_of_the_solver(no_agreement):
    if no_agreement:
        G = np.array([[1.0, 0.2], [-0.6, 1.0], [-0.5, -1.1]])
    else:
        G = np.random.default_rng(3).standard_normal((3, 7))
    M = G @ G.T
    p = np.array([1.4, 0.7, 0.9])
    solution = nash_bargaining(M, p, tol=1e-14)
    J = nash_sensitivity(M, p, solution.alpha, solution.ridge)
    eps = 1e-6 * p
    for j in range(3):
        e = np.eye(3)[j] * eps[j]
        hi = nash_bargaining(M, p + e, tol=1e-14)
        lo = nash_bargaining(M, p - e, tol=1e-14)
        assert np.array_equal(hi.ridge > 0, solution.ridge > 0)  # same regime on both sides
        fd = (hi.alpha - lo.alpha) / (2 * eps[j])
        np.testing.assert_allclose(J[:, j], fd, rtol=2e-4, atol=1e-9 * np.abs(solution.alpha).max())


def test_solver_agrees_with_cvxpy_on_well_conditioned_problems():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(0)
    for K in (2, 3, 5):
        G = rng.standard_normal((K, 4 * K))
        M = G @ G.T
        M = M / np.linalg.norm(M)
        p = rng.uniform(0.5, 2.0, K)
        alpha = cp.Variable(K, pos=True)
        L = np.linalg.cholesky(M)
        cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ alpha) - p @ cp.log(alpha))).solve()
        ours = nash_bargaining(M, p).alpha
        np.testing.assert_allclose(ours, alpha.value, rtol=1e-3)
        assert _kkt(M, p, ours) < 1e-9 < _kkt(M, p, alpha.value) + 1e-9  # ours is at least as accurate


# ---------------------------------------------------------------- the update
def test_clipping_bounds_the_direction_actually_returned():
    """Nearly cancelling float32 gradients (the toy's situation: 3 tasks on 2 parameters): α is
    large, and the float32 direction can be much longer than αᵀMα says. The clip must hold for
    the returned direction."""
    G = torch.tensor([[-0.23, 1.32], [-0.54, -2.47], [2.36, 7.04]], dtype=torch.float32)
    for name in ("nash-mtl", "auxinash"):
        method = methods.create(name, TASKS, primary="main", max_norm=1.0)
        for _ in range(3):
            d = method.aggregate(G)
            assert torch.isfinite(d).all()
            assert float(d.norm()) <= 1.0 + 1e-5
            # the large α are combined in float64: d is the exact combination, rounded once
            torch.testing.assert_close((method.last_weights @ G.double()).float(), d, rtol=1e-4, atol=1e-5)
            method.steps += 1


def test_solve_on_the_toy_geometry_is_converged():
    G = torch.tensor([[-0.23, 1.32], [-0.54, -2.47], [2.36, 7.04]], dtype=torch.float32)
    method = methods.create("nash-mtl", TASKS, primary="main")
    method.aggregate(G)
    assert float(method.residual) < 1e-6


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward_with_representation(self, x):
        rep = self.encoder(x)
        return rep, {t: h(rep).squeeze(-1) for t, h in self.heads.items()}


@pytest.mark.parametrize("mode", ["loop", "batched", "representation"])
def test_nash_mtl_and_uniform_auxinash_give_identical_gradients(mode):
    grads = []
    for name, hp in (("nash-mtl", {}), ("auxinash", {"preferences": [0.3, 0.3, 0.3], "learn_preferences": False})):
        model = _Encoder().double()
        method = methods.create(name, TASKS, primary="main", mode=mode, **hp)
        x, y = _batch(5)
        for _ in range(3):  # warm starts follow the same path
            model.zero_grad()
            rep, out = model.forward_with_representation(x)
            losses = {t: ((out[t] - y[t]) ** 2).mean() for t in TASKS}
            info = method.backward(losses, list(model.encoder.parameters()), list(model.heads.parameters()),
                                   representation=rep if mode == "representation" else None)
        grads.append([p.grad.clone() for p in model.parameters()])
        assert set(info["alpha"]) == set(TASKS)
        assert info["alpha"] == method._as_dict(method.alpha)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the meta step
def test_meta_step_takes_the_clipped_momentum_step_then_clips_and_renormalizes(monkeypatch):
    method = methods.create("auxinash", TASKS, primary="main", preferences=[1.0, 1.0, 1.0], meta_lr=0.6,
                            meta_momentum=0.5, meta_max_norm=1.0, min_preference=1e-2)
    grads = iter([torch.tensor([0.0, 3.0, -4.0], dtype=torch.float64), torch.tensor([0.0, 30.0, 0.0], dtype=torch.float64)])
    monkeypatch.setattr(method, "preference_gradient", lambda context: (next(grads), {}))
    info = method.meta_step(None)
    assert info["preference_grad_norm"] == pytest.approx(5.0)
    expected = torch.tensor([1.0, 1.0 - 0.6 * 0.6, 1.0 + 0.6 * 0.8], dtype=torch.float64)
    torch.testing.assert_close(method.preferences, expected * 3 / expected.sum())
    torch.testing.assert_close(method.momentum, torch.tensor([0.0, 0.6, -0.8], dtype=torch.float64))
    # second step: the momentum carries; p_helpful would go negative, so it is clipped, then renormalized
    before = method.preferences.clone()
    method.meta_step(None)
    momentum = torch.tensor([0.0, 0.5 * 0.6 + 1.0, 0.5 * -0.8], dtype=torch.float64)
    raw = (before - 0.6 * momentum).clamp(min=1e-2)
    assert raw[1] == 1e-2
    torch.testing.assert_close(method.preferences, raw * 3 / raw.sum())
    assert float(method.preferences.sum()) == pytest.approx(3.0)


def test_fixed_preferences_take_no_meta_step():
    method = methods.create("auxinash", TASKS, primary="main", preferences={"a": 3.0}, learn_preferences=False)
    for step in range(60):
        method.steps.fill_(step)
        assert not method.meta_due()
    torch.testing.assert_close(method.preferences, torch.tensor([0.6, 1.8, 0.6], dtype=torch.float64))


def test_meta_step_gradient_with_neumann_terms_scales_as_the_series():
    """With the unscaled convention and a tiny step the Neumann vector is ≈ (n + 1) g_V, so the
    preference gradient with n terms is ≈ (n + 1) times the one with none."""
    torch.set_default_dtype(torch.float64)
    try:
        model = Tiny()
        context = _context(model, _batch(1), _batch(2))
        grads = []
        for n in (0, 3):
            method = methods.create("auxinash", TASKS, primary="main", meta_source="aux", neumann_terms=n,
                                    neumann_lr=1e-7)
            grads.append(method.preference_gradient(context)[0])
        torch.testing.assert_close(grads[1], 4 * grads[0], rtol=1e-4, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_checkpoint_round_trip_with_weights_only_load(tmp_path):
    model = Tiny().double()
    method = methods.create("auxinash", TASKS, primary="main", meta_source="aux")
    method.aggregate(_G(4))
    method.meta_step(_context(model, _batch(1), _batch(2)))
    method.meta_step(_context(model, _batch(3), _batch(2)))
    torch.save(method.state_dict(), tmp_path / "m.pt")
    clone = methods.create("auxinash", TASKS, primary="main", meta_source="aux")
    clone.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for key in ("preferences", "alpha", "momentum", "steps", "solved", "residual"):
        assert torch.equal(getattr(clone, key), getattr(method, key)), key
    # the restored method continues exactly as the original
    G = _G(6)
    method.steps += 1
    clone.steps += 1
    assert torch.equal(method.aggregate(G), clone.aggregate(G))
    method.meta_step(_context(model, _batch(7), _batch(2)))
    clone.meta_step(_context(model, _batch(7), _batch(2)))
    assert torch.equal(method.preferences, clone.preferences) and torch.equal(method.momentum, clone.momentum)


def test_meta_source_train_draws_a_different_batch_for_the_validation_loss():
    from auxilia.training.data import TaskDataset
    from auxilia.training.trainer import Trainer, TrainerConfig

    x = torch.randn(200, 3)
    data = TaskDataset(x, {t: x[:, 0] for t in TASKS})
    model = _Encoder()
    method = methods.create("auxinash", TASKS, primary="main", meta_source="train")
    trainer = Trainer(model, method, {"train": data}, lambda groups: torch.optim.SGD(groups, lr=0.1),
                      TrainerConfig(batch_size=16))
    first, second = trainer._meta_context().train_batch(), trainer._meta_context().train_batch()
    assert torch.equal(first[0], second[0])  # reproducible per step
    context = trainer._meta_context()
    a, b = context.train_batch(), context.train_batch()
    assert torch.equal(a[0], first[0]) and not torch.equal(a[0], b[0])


def test_toy_seed_that_diverged_stays_bounded():
    """Seed 2 of the toy once diverged (w_dist 12 after 20 steps, 35 after 40): an unconverged α on a
    nearly cancelling batch, and a clip that trusted αᵀMα. Every step must now move W by at most
    lr · max_norm (plus momentum), so W stays near the Pareto set."""
    from auxilia.experiments import toy
    from auxilia.training.trainer import Trainer

    setup = toy.EXPERIMENT.setup(2)  # the full schedule (its learning rates), stopped after 40 steps
    method = methods.create("nash-mtl", setup.tasks)
    trainer = Trainer(setup.model, method, setup.datasets, setup.optimizer, setup.config, scheduler=setup.scheduler,
                      metrics_fn=setup.metrics_fn)
    trainer.fit(stop_at=40)
    assert toy.w_dist(setup.model)["w_dist"] < 2.0
    assert float(method.residual) < 1e-6
