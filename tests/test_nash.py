import numpy as np
import pytest
import torch
from torch import nn

from auxilia import methods
from auxilia.methods.base import MetaContext

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
    with pytest.raises(Exception):
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
