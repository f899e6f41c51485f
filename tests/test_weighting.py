import math

import pytest
import torch
from torch import nn

from auxilia import NonFiniteLossError, methods

TASKS = ["main", "a", "b"]


def _setup(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Linear(4, 3)
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in TASKS])
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    rep = encoder(x)
    losses = {t: ((h(rep).squeeze(-1) - y[:, k]) ** 2).mean() for k, (t, h) in enumerate(zip(TASKS, heads))}
    return encoder, heads, losses


def _grads(module):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in module.parameters()])


def _reference(weights):
    encoder, heads, losses = _setup()
    sum(w * losses[t] for w, t in zip(weights, TASKS)).backward()
    return _grads(encoder), _grads(heads)


@pytest.mark.parametrize(
    "name, hp, weights",
    [("stl", {}, [1, 0, 0]), ("equal", {}, [1, 1, 1]), ("fixed", {"weights": [1, 0.5, 2]}, [1, 0.5, 2]),
     ("fixed", {"weights": {"a": 0.5, "b": 2}}, [1, 0.5, 2]), ("uncertainty", {}, [1, 1, 1]),
     ("dwa", {}, [1, 1, 1]), ("gradnorm", {}, [1, 1, 1])],
)
def test_gradients_equal_the_weighted_sum(name, hp, weights):
    method = methods.create(name, TASKS, primary="main", **hp)
    encoder, heads, losses = _setup()
    info = method.backward(losses, shared_parameters=encoder.parameters())
    ref_enc, ref_heads = _reference(weights)
    torch.testing.assert_close(_grads(encoder), ref_enc)
    torch.testing.assert_close(_grads(heads), ref_heads)
    assert list(info["weights"]) == TASKS
    assert [info["weights"][t] for t in TASKS] == pytest.approx(weights)


def test_uncertainty_objective_and_its_gradient():
    method = methods.create("uncertainty", TASKS, primary="main", init=0.3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    expected = sum(math.exp(-0.3) * l + 0.3 for l in losses.tolist())
    assert method.combine(losses).item() == pytest.approx(expected, rel=1e-6)
    method.combine(losses).backward()
    torch.testing.assert_close(method.log_vars.grad, 1 - math.exp(-0.3) * losses)


def test_dwa_follows_the_loss_ratio_rule():
    method = methods.create("dwa", TASKS, primary="main", temperature=2.0)
    epochs = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0])]
    for epoch in epochs:
        for _ in range(3):
            method.combine(epoch)
        method.epoch_end()
    ratio = epochs[1] / epochs[0]
    expected = 3 * torch.softmax(ratio / 2.0, 0)
    torch.testing.assert_close(method.task_weights(), expected)
    assert method.task_weights().sum().item() == pytest.approx(3.0)


def test_gradnorm_weight_gradient_matches_its_definition():
    method = methods.create("gradnorm", TASKS, primary="main", alpha=1.5)
    encoder, _heads, losses = _setup()
    method.backward(losses, shared_parameters=encoder.parameters())
    # independent computation of the GradNorm loss gradient on the step's first call (rates = 1)
    encoder2, _, losses2 = _setup()
    W = encoder2.weight
    norms = torch.stack([torch.autograd.grad(losses2[t], W, retain_graph=True)[0].norm() for t in TASKS])
    w = torch.ones(3, requires_grad=True)
    weighted = w * norms
    target = weighted.mean().detach()
    (weighted - target).abs().sum().backward()
    torch.testing.assert_close(method.loss_weights.grad, w.grad)


def test_hpo_random_candidates_are_seeded_and_in_range():
    method = methods.create("hpo-random", TASKS, primary="main", trials=5, low=0.1, high=3.0)
    a = method.search_space(torch.Generator().manual_seed(1))
    b = method.search_space(torch.Generator().manual_seed(1))
    assert a == b and len(a) == 5
    for candidate in a:
        assert candidate["weights"][0] == 1.0
        assert all(0.1 <= w <= 3.0 for w in candidate["weights"][1:])


@pytest.mark.parametrize("name, hp, message", [
    ("fixed", {"weights": [1, 2]}, "expected 3 weights"),
    ("fixed", {"weights": {"zzz": 1}}, "unknown task 'zzz'"),
    ("fixed", {"weights": [1, -1, 1]}, "weight of task 'a'"),
    ("dwa", {"temperature": 0}, "temperature"),
    ("gradnorm", {"alpha": float("nan")}, "alpha"),
    ("hpo-random", {"trials": 0}, "trials"),
    ("equal", {"bogus": 1}, "no hyperparameter 'bogus'"),
])
def test_bad_hyperparameters_are_rejected(name, hp, message):
    with pytest.raises(ValueError, match=message):
        methods.create(name, TASKS, primary="main", **hp)


def test_failed_step_leaves_method_state_untouched():
    method = methods.create("gradnorm", TASKS, primary="main")
    with torch.no_grad():
        method.loss_weights.copy_(torch.tensor([2.0, 1.0, 1.0]))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    x = torch.zeros(3, requires_grad=True)
    W = nn.Parameter(torch.ones(2, 3))
    losses = {"main": (W @ x).sum(), "a": torch.sqrt((W @ x).abs()).sum(), "b": (W @ x).sum()}  # d sqrt at 0 = inf
    with pytest.raises(NonFiniteLossError):
        method.backward(losses, shared_parameters=[W])
    for k, v in method.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert W.grad is None


def test_registry_lists_every_baseline():
    expected = {"stl", "equal", "fixed", "hpo-random", "uncertainty", "dwa", "gradnorm",
                "pcgrad", "pcgrad-aux", "cagrad", "gcs", "mgda"}
    assert expected <= set(methods.available())
