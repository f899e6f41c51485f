"""AuxiLearn: combiners, the meta step (against finite differences and torch's SGD), constraints,
learned auxiliary labels, unreduced losses through the Trainer, checkpoints and bad input."""

from functools import partial

import pytest
import torch
from torch import nn

from auxilia import NonFiniteLossError, Task, methods
from auxilia.methods.base import MetaContext
from auxilia.methods.combiners import ConvCombiner, LinearCombiner, NonlinearCombiner
from auxilia.methods.label_generator import (
    LabelGenerator,
    LearnedAuxiliaryModel,
    learned_label_task,
    masked_softmax,
    small_mlp,
)
from auxilia.tasks import TaskError
from auxilia.training import TaskDataset, Trainer, TrainerConfig

NAMES = ["main", "a", "b"]


class Tiny(nn.Module):
    """Vector inputs (B, 3) -> one output per task (B,); or images (B, 1, 6, 6) -> (B, 6, 6) per task."""

    def __init__(self, pixels: bool = False):
        super().__init__()
        self.pixels = pixels
        if pixels:
            self.encoder = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh())
            self.heads = nn.ModuleDict({n: nn.Conv2d(3, 1, 1) for n in NAMES})
        else:
            self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.heads = nn.ModuleDict({n: nn.Linear(4, 1) for n in NAMES})

    def forward(self, x):
        rep = self.encoder(x)
        return {n: h(rep).squeeze(1 if self.pixels else -1) for n, h in self.heads.items()}

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def _batch(seed, pixels=False, n=8):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if pixels else (n, 3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    out_shape = (n, 6, 6) if pixels else (n,)
    return x, {name: torch.randn(*out_shape, generator=g, dtype=torch.float64) for name in NAMES}


TASKS = [Task.regression("main", "primary"), Task.regression("a"), Task.regression("b")]
COMBINER_OF = {"linear": False, "nonlinear": False, "conv": True}


def _setup(combiner, **hp):
    pixels = COMBINER_OF[combiner]
    torch.manual_seed(0)
    model = Tiny(pixels).double()
    method = methods.create("auxilearn", TASKS, combiner=combiner, meta_scope="all", **hp).double()
    if combiner != "linear":  # move away from the symmetric initialization
        with torch.no_grad():
            for p in method.combiner.parameters():
                p.add_(0.3 * torch.rand_like(p))
    train, aux = _batch(1, pixels), _batch(2, pixels)

    def losses(batch):
        x, targets = batch
        outputs = model(x)
        return {t.name: t.compute_loss(outputs[t.name], targets[t.name], reduction=method.loss_reduction) for t in TASKS}

    context = MetaContext(
        losses=losses, train_batch=lambda: train, aux_batch=lambda: aux,
        shared=model.shared_parameters(), heads=model.task_parameters(), learning_rate=0.1,
    )
    return model, method, context, train, aux


@pytest.mark.parametrize("combiner", ["linear", "nonlinear", "conv"])
def test_meta_gradient_matches_finite_differences_through_one_sgd_step(combiner):
    """With terms=0 (unscaled) the implicit hypergradient is -∂(∂L_T/∂W · g_V)/∂φ, which is the
    derivative of L_V(W - η ∂L_T/∂W(W, φ)) divided by η, as η -> 0: one unrolled SGD step."""
    model, method, context, train, aux = _setup(combiner, neumann_terms=0)
    phi = method.meta_parameters()
    for p in phi:
        p.requires_grad_(True)
    grads, _ = method.meta_gradient(context)
    for p in phi:
        p.requires_grad_(False)
    W = list(model.parameters())
    eta, eps = 1e-6, 1e-4  # the O(η) bias of the unrolled step is below the tolerance

    def unrolled_val_loss():
        losses = method.tasks.ordered(context.losses(train), scalar=False)
        g = torch.autograd.grad(method.combiner(method.stack(losses)), W)
        saved = [w.detach().clone() for w in W]
        with torch.no_grad():
            for w, gw in zip(W, g):
                w.sub_(eta * gw)
            value = float(context.losses(aux)["main"].mean())
            for w, s in zip(W, saved):
                w.copy_(s)
        return value

    scale = max(float(g.abs().max()) for g in grads)  # finite-difference noise is absolute, ~1e-6
    checked = 0
    for p, grad in zip(phi, grads):
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            old = float(flat[i])
            flat[i] = old + eps
            up = unrolled_val_loss()
            flat[i] = old - eps
            down = unrolled_val_loss()
            flat[i] = old
            fd = (up - down) / (2 * eps) / eta
            assert grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-3, abs=1e-4 * scale), (p.shape, i)
            checked += 1
    assert checked >= 3


def test_meta_step_is_torch_sgd_with_momentum_weight_decay_and_clipping(monkeypatch):
    _, method, context, _, _ = _setup("nonlinear", meta_lr=0.05, meta_max_norm=0.01, meta_weight_decay=0.1)
    reference = [p.detach().clone().requires_grad_(True) for p in method.meta_parameters()]
    optimizer = torch.optim.SGD(reference, lr=0.05, momentum=0.9, weight_decay=0.1)
    recorded = []
    original = method.meta_gradient

    def spy(ctx):
        grads, info = original(ctx)
        recorded.append([g.clone() for g in grads])
        return grads, info

    monkeypatch.setattr(method, "meta_gradient", spy)
    for _ in range(3):
        method.meta_step(context)
        for r, g in zip(reference, recorded[-1]):
            r.grad = g.clone()
        assert float(torch.cat([g.reshape(-1) for g in recorded[-1]]).norm()) > 0.01  # clipping is active
        torch.nn.utils.clip_grad_norm_(reference, 0.01)
        optimizer.step()
        with torch.no_grad():
            for r in (reference[0], reference[2]):  # hidden and output weights are kept >= 0
                r.clamp_(min=0)
        for p, r in zip(method.meta_parameters(), reference):
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-9)  # torch clips by norm + 1e-6
    assert int(method.meta_steps) == 3
    assert not any(p.requires_grad for p in method.meta_parameters())


@pytest.mark.parametrize("combiner", ["linear", "nonlinear", "conv"])
def test_weights_stay_nonnegative_and_combiner_monotone_after_every_meta_step(combiner):
    _, method, context, _, _ = _setup(combiner, meta_lr=5.0, meta_max_norm=100.0)
    for _ in range(4):
        method.meta_step(context)
        for weight in method.combiner.constrained():
            assert bool((weight >= 0).all())
        # monotone: raising any task's loss never lowers the objective
        g = torch.Generator().manual_seed(int(method.meta_steps))
        shape = (16, 3, 6, 6) if combiner == "conv" else ((16, 3) if combiner == "nonlinear" else (3,))
        losses = torch.rand(*shape, generator=g, dtype=torch.float64) * 3
        base = method.combiner(losses)
        for k in range(3):
            raised = losses.clone()
            (raised[k] if combiner == "linear" else raised[:, k]).add_(0.5)
            assert float(method.combiner(raised)) >= float(base) - 1e-12


def test_combiner_initializations():
    torch.manual_seed(0)
    assert torch.equal(LinearCombiner(4).weight, torch.ones(4))
    nl = NonlinearCombiner(4, hidden=7, init_upper=0.2)
    assert nl.out.bias is None and torch.equal(nl.hidden.bias, torch.zeros(7))
    assert 0 <= float(nl.hidden.weight.detach().min()) and float(nl.hidden.weight.detach().max()) <= 0.2
    conv = ConvCombiner(3)
    assert [tuple(c.weight.shape) for c in (conv.conv1, conv.conv2, conv.conv3)] == [(8, 3, 3, 3), (16, 8, 3, 3), (1, 16, 1, 1)]
    assert all(0 <= float(w.detach().min()) and float(w.detach().max()) <= 0.1 for w in conv.constrained())
    # the skip term: the primary loss enters the objective with weight 1 on top of the network
    losses = torch.zeros(5, 4)
    losses[:, 0] = 2.0
    with torch.no_grad():
        assert float(nl(losses)) == pytest.approx(2.0 + float(nl.out(nl.activation(nl.hidden(losses)))[0]))


def test_ordinary_step_is_one_backward_of_the_combined_objective():
    model, method, context, train, _ = _setup("nonlinear")
    losses = context.losses(train)
    info = method.backward(losses, model.shared_parameters(), model.task_parameters())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    losses = method.tasks.ordered(context.losses(train), scalar=False)
    method.combiner(method.stack(losses)).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert all(p.grad is None for p in method.combiner.parameters())  # φ is not trained here
    # effective weight: the rise of L_T when every sample's loss of a task rises by δ, over δ
    stacked = method.stack([x.detach() for x in losses])
    for k, name in enumerate(NAMES):
        delta = torch.zeros_like(stacked)
        delta[:, k] = 1e-6
        slope = (float(method.combiner(stacked + delta)) - float(method.combiner(stacked - delta))) / 2e-6
        assert info["weights"][name] == pytest.approx(slope, rel=1e-5)


def test_conv_effective_weight_is_the_mean_per_pixel_weight():
    model, method, context, train, _ = _setup("conv")
    info = method.backward(context.losses(train), model.shared_parameters())
    losses = method.stack([x.detach() for x in method.tasks.ordered(context.losses(train), scalar=False)])
    leaf = losses.clone().requires_grad_(True)
    (per_pixel,) = torch.autograd.grad(method.combiner(leaf), leaf)
    expected = per_pixel.mean(dim=(0, 2, 3)) * losses[:, 0].numel()  # mean per pixel x pixel count
    for k, name in enumerate(NAMES):
        assert info["weights"][name] == pytest.approx(float(expected[k]), rel=1e-9)
    assert info["weights"]["main"] > 1.0  # the skip term alone gives 1


def test_masked_softmax_puts_zero_mass_outside_the_true_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4 * 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (12,), generator=g)
    soft = masked_softmax(logits, labels, 4, 5)
    grouped = soft.view(12, 4, 5)
    for i, c in enumerate(labels.tolist()):
        assert torch.all(grouped[i, [k for k in range(4) if k != c]] == 0)
        assert float(grouped[i, c].sum()) == pytest.approx(1.0)
        assert bool((grouped[i, c] > 0).all())
    (grad,) = torch.autograd.grad((soft * torch.randn(12, 20, generator=g)).sum(), logits)
    outside = torch.ones(12, 4, 5, dtype=torch.bool)
    outside[torch.arange(12), labels] = False
    assert torch.all(grad.view(12, 4, 5)[outside] == 0) and bool(grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        masked_softmax(logits, torch.full((12,), 4), 4, 5)


def _learned_model(psi=3):
    torch.manual_seed(0)
    backbone, width = small_mlp(5, hidden=6)
    generator = LabelGenerator(backbone, width, num_classes=3, psi=psi)
    model = LearnedAuxiliaryModel(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), 8, 3, generator)
    tasks = [Task.classification("label", "primary"), learned_label_task("learned", 3, psi)]
    return model, tasks


def _learned_datasets():
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 5, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return TaskDataset(x, {"label": y, "learned": y})

    return {"train": split(64), "aux": split(32), "val": split(32), "test": split(32)}


def test_generator_given_as_a_generator_expression_is_meta_learned():
    model, tasks = _learned_model()
    method = methods.create("auxilearn", tasks, meta_every=2, meta_lr=0.5,
                            label_generator=(p for p in model.generator.parameters()))
    assert len(method.meta_parameters()) == 1 + 4  # the linear weights, then the generator's tensors
    before = [p.detach().clone() for p in model.generator.parameters()]
    trainer = Trainer(model, method, _learned_datasets(), partial(torch.optim.SGD, lr=0.1),
                      TrainerConfig(epochs=1, batch_size=16, seed=0))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in method.meta_parameters())
    trainer.fit()
    assert int(method.meta_steps) == 2
    changed = [not torch.equal(b, p) for b, p in zip(before, model.generator.parameters())]
    assert all(changed)
    assert not any(p.requires_grad for p in model.generator.parameters())


def test_unreduced_losses_are_asked_for_only_when_the_method_needs_them():
    seen = {}

    class Spy(methods.get("auxilearn")):
        def backward(self, losses, *args, **kwargs):
            seen[self.combiner_kind] = {k: tuple(v.shape) for k, v in losses.items()}
            return super().backward(losses, *args, **kwargs)

    for kind in ("linear", "nonlinear"):
        model, tasks = _learned_model()
        method = Spy(tasks, combiner=kind)
        Trainer(model, method, _learned_datasets(), partial(torch.optim.SGD, lr=0.1),
                TrainerConfig(epochs=1, batch_size=16, max_steps=1)).fit()
    assert seen["linear"] == {"label": (), "learned": ()}
    assert seen["nonlinear"] == {"label": (16,), "learned": (16,)}


def test_unreduced_losses_average_to_the_reduced_loss_with_masks():
    task = Task.regression("depth")
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    mean = task.compute_loss(out, target, mask)
    sample = task.compute_loss(out, target, mask, reduction="sample")
    pixels = task.compute_loss(out, target, mask, reduction="none")
    assert sample.shape == (6,) and pixels.shape == (6, 2, 4, 4)
    torch.testing.assert_close(sample.mean(), mean)
    torch.testing.assert_close(pixels.mean(), mean)
    assert float(sample[1]) == 0 and float(pixels[4].abs().sum()) == 0
    with pytest.raises(TaskError, match="'depth'.*reduction"):
        task.compute_loss(out, target, reduction="sum")


def test_checkpoint_resume_keeps_the_combiner_and_its_optimizer(tmp_path):
    def trainer():
        model, tasks = _learned_model()
        method = methods.create("auxilearn", tasks, combiner="nonlinear", meta_every=3, meta_lr=0.1,
                                label_generator=model.generator)
        return Trainer(model, method, _learned_datasets(), partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                       TrainerConfig(epochs=2, batch_size=16, seed=1))

    full = trainer()
    full.fit()
    path = tmp_path / "ckpt.pt"
    first = trainer()
    first.fit(checkpoint=path, checkpoint_every=5, stop_at=5)
    state = torch.load(path, weights_only=True)["method"]
    assert {"velocity", "meta_steps", "combiner.hidden.weight"} <= set(state)
    assert bool(state["velocity"].abs().sum() > 0)
    resumed = trainer()
    resumed.fit(checkpoint=path, checkpoint_every=5)
    for key, value in full.method.state_dict().items():
        torch.testing.assert_close(resumed.method.state_dict()[key], value, rtol=0, atol=0)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_bad_input_errors_name_the_task_and_touch_nothing():
    model, method, context, train, _ = _setup("nonlinear")
    losses = context.losses(train)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    bad = dict(losses, b=losses["b"].detach().clone().index_fill_(0, torch.tensor([2]), float("nan")))
    with pytest.raises(NonFiniteLossError, match="'b'"):
        method.backward(bad, model.shared_parameters())
    short = dict(losses, a=losses["a"][:5])
    with pytest.raises(TaskError, match="'a'.*5 per-sample"):
        method.backward(short, model.shared_parameters())
    with pytest.raises(TaskError, match="no loss given for task 'b'"):
        method.backward({"main": losses["main"], "a": losses["a"]}, model.shared_parameters())
    assert all(p.grad is None for p in model.parameters())
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k])
    conv = methods.create("auxilearn", TASKS, combiner="conv")
    with pytest.raises(TaskError, match="'main'.*per-pixel"):
        conv.backward({n: torch.ones((), requires_grad=True) for n in NAMES}, model.shared_parameters())


def test_failed_meta_step_leaves_everything_as_it_was():
    _, method, context, _, _ = _setup("linear")
    method.meta_step(context)
    before = {k: v.clone() for k, v in method.state_dict().items()}

    def broken():
        raise RuntimeError("no aux data today")

    context.aux_batch = broken
    with pytest.raises(RuntimeError, match="no aux data"):
        method.meta_step(context)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(p.requires_grad for p in method.meta_parameters())


@pytest.mark.parametrize("bad, match", [
    ({"combiner": "quadratic"}, "combiner must be one of"),
    ({"meta_every": 0}, "meta_every"),
    ({"meta_lr": -1.0}, "meta_lr"),
    ({"meta_momentum": 1.0}, "meta_momentum"),
    ({"meta_source": "val"}, "meta_source"),
    ({"learn_combiner": False}, "nothing to meta-learn"),
    ({"label_generator": iter(())}, "no parameters"),
    ({"hidden": 0, "combiner": "nonlinear"}, "hidden"),
])
def test_hyperparameters_are_validated_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        methods.create("auxilearn", TASKS, **bad)


def test_toy_run_down_weights_the_harmful_task(tmp_path):
    from auxilia.experiments import get
    from auxilia.experiments.runner import run_one

    record = run_one(get("toy"), "auxilearn", 1, out=tmp_path, budget=0.5, hyperparameters={"meta_every": 5})
    weights = record["weights"]
    assert weights["harmful"] < 0.5 * weights["helpful"]
    assert weights["harmful"] < 1.0 < weights["helpful"]  # both started at 1


def test_many_aux_attributes_are_noisy_class_values_then_coins():
    from auxilia.experiments.many_aux import attributes

    labels = torch.arange(10).repeat(2000)
    values = attributes(labels, informative=6, noise=4, flip=0.2, generator=torch.Generator().manual_seed(1))
    assert values.shape == (20_000, 10) and set(values.unique().tolist()) <= {0, 1}
    table = attributes(torch.arange(10), 6, 0, 0.0, torch.Generator().manual_seed(2))  # the class values
    agree = (values[:, :6] == table[labels]).float().mean()
    assert 0.77 < float(agree) < 0.83  # each value flipped with probability 0.2
    per_class_rate = torch.stack([values[labels == c, 6:].float().mean(0) for c in range(10)])
    assert float((per_class_rate - 0.5).abs().max()) < 0.05  # coins do not depend on the class
