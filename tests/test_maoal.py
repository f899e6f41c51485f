"""MAOAL: module map, lower step, look-back meta-gradient, upper optimizer, checkpoints.

The exactness test of the meta-gradient rests on this derivation. Let the lower step be
θ ← θ − η d(θ, w) with d(θ, w) = Qθ + u(w): the primary training loss quadratic (Hessian Q), the
auxiliary losses linear in θ (their gradients c_k do not depend on θ), so u(w) = −r + s Σ_k
relu(w_{k,m(j)}) c_k per coordinate j. After M unrolled steps from θ_0,

    θ_M = (I − ηQ)^M θ_0 − η Σ_{τ<M} (I − ηQ)^τ u(w),

and with a validation loss linear in θ (L_V = eᵀθ) the derivative is exactly

    dL_V(θ_M)/dw = −η eᵀ Σ_{τ<M} (I − ηQ)^τ ∂u/∂w,

the best-response formula with H = Q, mixed derivative ∂d/∂w = ∂u/∂w and g_V = e, i.e.
``hypergradient(terms=M − 1, scale_by_step=True)``. L_V(θ_M) is affine in relu(w), so central
differences away from w = 0 are exact up to rounding.
"""

from functools import partial

import pytest
import torch
from torch import nn

from auxilia import Task, methods
from auxilia.methods.base import MetaContext
from auxilia.methods.maoal import MAOAL, module_map, plot_module_weights, read_module_weights
from auxilia.training import TaskDataset, Trainer, TrainerConfig

NAMES = ["main", "x", "y"]
D = torch.float64


# ---------------------------------------------------------------------- module maps
def test_children_map_strips_the_common_prefix():
    names = ["encoder.conv1.0.weight", "encoder.conv1.1.bias", "encoder.conv2.0.weight", "encoder.conv4.0.bias"]
    assert module_map(names) == ["conv1", "conv1", "conv2", "conv4"]
    assert module_map(["embedding.weight", "blocks.0.w", "head.1.bias"]) == ["embedding", "blocks", "head"]
    assert module_map(["encoder.weight"]) == ["weight"]


def test_parameter_map_gives_one_module_per_tensor():
    names = ["a.weight", "a.bias", "b.weight"]
    assert module_map(names, "parameter") == names


def test_user_map_takes_the_longest_prefix():
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "enc.2.weight"]
    mapping = {"enc": "rest", "enc.0": "first", "enc.2.weight": "last"}
    assert module_map(names, mapping) == ["first", "first", "rest", "last"]


def test_bad_module_maps_name_the_problem():
    with pytest.raises(ValueError, match="'enc.1.weight' is in no module"):
        module_map(["enc.0.weight", "enc.1.weight"], {"enc.0": "a"})
    with pytest.raises(ValueError, match="'dec' matches no shared parameter"):
        module_map(["enc.0.weight"], {"enc": "a", "dec": "b"})
    with pytest.raises(ValueError, match="modules must be"):
        methods.create("maoal", NAMES, primary="main", modules="layers")
    with pytest.raises(ValueError, match="module names"):
        module_map(["enc.0.weight"], {"enc": ""})
    method = methods.create("maoal", NAMES, primary="main")
    p = nn.Parameter(torch.ones(2))
    loss = {n: p.sum() for n in NAMES}
    with pytest.raises(ValueError, match="module map is unknown.*attach_model"):
        method.backward(loss, [p])
    method.attach([("enc.a", p)])
    with pytest.raises(ValueError, match="differ from those the module map was built for"):
        method.backward(loss, [nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        methods.create("maoal", NAMES, primary="main").attach_model(nn.Linear(2, 2), [p])


@pytest.mark.parametrize("bad", [{"scale": 0.0}, {"meta_every": 0}, {"look_back": 0}, {"upper": "rmsprop"},
                                 {"upper_momentum": 1.0}, {"meta_source": "val"}, {"mode": "representation"},
                                 {"upper_lr": float("nan")}])
def test_hyperparameters_are_validated(bad):
    with pytest.raises(ValueError):
        methods.create("maoal", NAMES, primary="main", **bad)


# ---------------------------------------------------------------------- lower step
class Net(nn.Module):
    """Encoder children ``l1``, ``l2``; one head per task."""

    def __init__(self, dtype=D):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential()
        self.encoder.add_module("l1", nn.Sequential(nn.Linear(3, 4), nn.Tanh()))
        self.encoder.add_module("l2", nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        self.heads = nn.ModuleDict({n: nn.Linear(4, 1) for n in NAMES})
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=dtype)

    def forward(self, x):
        z = self.encoder(x)
        return {n: h(z).squeeze(-1) for n, h in self.heads.items()}

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return list(self.heads.parameters())


def _losses(model, seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    out = model(x)
    return {k: ((v - torch.randn(n, generator=g, dtype=D)) ** 2).mean() for k, v in out.items()}


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_lower_step_is_the_weighted_sum_per_module(mode):
    model = Net()
    method = methods.create("maoal", NAMES, primary="main", scale=0.5, mode=mode).attach_model(model)
    assert method.module_names == ["l1", "l2"]
    w = torch.tensor([[2.0, -1.0], [0.25, 3.0]], dtype=D)  # x: l1 2, l2 off; y: l1 .25, l2 3
    method.w.copy_(w)
    losses = _losses(model)
    shared, heads = model.shared_parameters(), model.task_parameters()
    per_task = {n: torch.autograd.grad(losses[n], shared + heads, retain_graph=True, allow_unused=True) for n in NAMES}
    info = method.backward(losses, shared, heads)
    for j, p in enumerate(shared):
        m = 0 if j < 2 else 1
        expected = per_task["main"][j] + 0.5 * (torch.relu(w[0, m]) * per_task["x"][j] + torch.relu(w[1, m]) * per_task["y"][j])
        torch.testing.assert_close(p.grad, expected)
    for i, p in enumerate(heads):  # each head: its own loss's gradient, unweighted
        own = [per_task[n][len(shared) + i] for n in NAMES if per_task[n][len(shared) + i] is not None]
        assert len(own) == 1
        torch.testing.assert_close(p.grad, own[0])
    assert info["module_weights"] == {"x": {"l1": 1.0, "l2": 0.0}, "y": {"l1": 0.125, "l2": 1.5}}
    assert info["weights"] == pytest.approx({"main": 1.0, "x": 0.5, "y": 0.8125})


def test_negative_weights_are_inert():
    model = Net()
    method = methods.create("maoal", NAMES, primary="main").attach_model(model)
    shared = model.shared_parameters()

    def grads(w):
        model.zero_grad()
        method.w.copy_(torch.tensor(w, dtype=D))
        method.backward(_losses(model), shared, model.task_parameters())
        return [p.grad.clone() for p in shared]

    for a, b in zip(grads([[-3.0, 1.0], [1.0, -0.5]]), grads([[0.0, 1.0], [1.0, 0.0]])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the meta-gradient of a negative entry is zero
    method.w.copy_(torch.tensor([[-3.0, 1.0], [1.0, -0.5]], dtype=D))
    grad, _ = method.meta_gradient(_context(model, lr=0.1))
    assert grad[0, 0] == 0 and grad[1, 1] == 0 and grad[0, 1] != 0


def _context(model, lr, train_seed=2, aux_seed=3):
    return MetaContext(
        losses=lambda seed: _losses(model, seed), train_batch=lambda: train_seed, aux_batch=lambda: aux_seed,
        shared=model.shared_parameters(), heads=model.task_parameters(), learning_rate=lr,
    )


# ---------------------------------------------------------------------- meta-gradient
class QuadraticLinear:
    """Primary training loss ½θᵀQθ − rᵀθ, auxiliary losses c_kᵀθ, validation loss eᵀθ (see the
    module docstring): the look-back formula is then the exact unrolled derivative."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(5, 5, generator=g, dtype=D)
        self.Q = A @ A.T / 5 + torch.eye(5, dtype=D)
        self.r, self.e = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
        self.c = torch.randn(2, 5, generator=g, dtype=D)
        self.a = nn.Parameter(torch.randn(2, generator=g, dtype=D))
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=D))
        self.module = torch.tensor([0, 0, 1, 1, 1])

    def losses(self, split):
        theta = torch.cat([self.a, self.b])
        aux = {"x": self.c[0] @ theta, "y": self.c[1] @ theta}
        main = 0.5 * theta @ self.Q @ theta - self.r @ theta if split == "train" else self.e @ theta
        return {"main": main, **aux}

    def unrolled(self, w, s, eta, steps):
        """L_V after ``steps`` lower steps from the current θ, written out independently."""
        theta = torch.cat([self.a, self.b]).detach()
        coef = s * torch.relu(w)[:, self.module]  # (2, 5)
        for _ in range(steps):
            d = self.Q @ theta - self.r + (coef * self.c).sum(0)
            theta = theta - eta * d
        return self.e @ theta

    def context(self, eta):
        return MetaContext(losses=self.losses, train_batch=lambda: "train", aux_batch=lambda: "aux",
                           shared=[self.a, self.b], heads=[], learning_rate=eta)


@pytest.mark.parametrize("look_back", [1, 3, 5])
def test_meta_gradient_equals_finite_differences_of_the_unrolled_look_back(look_back):
    problem = QuadraticLinear()
    s, eta = 0.7, 0.15
    method = methods.create("maoal", NAMES, primary="main", scale=s, look_back=look_back).attach([("enc.a", problem.a), ("enc.b", problem.b)])
    w0 = torch.tensor([[1.0, 0.5], [2.0, -0.4]], dtype=D)
    method.w.copy_(w0)
    grad, info = method.meta_gradient(problem.context(eta))
    fd = torch.zeros_like(w0)
    h = 1e-4
    for i in range(2):
        for j in range(2):
            up, down = w0.clone(), w0.clone()
            up[i, j] += h
            down[i, j] -= h
            fd[i, j] = (problem.unrolled(up, s, eta, look_back) - problem.unrolled(down, s, eta, look_back)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-10)
    assert fd[1, 1] == 0 and float(fd.abs().sum()) > 0.1
    assert info["backward_calls"] == 3 + look_back  # K per-task graphs, g_V, M_lb - 1 HVPs


def test_meta_gradient_on_a_nonlinear_model_matches_dense_matrices():
    """−η g_Vᵀ Σ_{τ<M} (I − ηJ)^τ B with J = ∂d/∂θ and B = ∂d/∂w formed as dense matrices."""
    model = Net()
    s, eta, M = 0.8, 0.05, 3
    method = methods.create("maoal", NAMES, primary="main", scale=s, look_back=M).attach_model(model)
    method.w.copy_(torch.tensor([[1.5, 0.3], [0.7, 2.0]], dtype=D))
    grad, _ = method.meta_gradient(_context(model, eta))

    params = model.shared_parameters() + model.task_parameters()
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    n_shared = len(model.shared_parameters())
    module = [0, 0, 1, 1]

    def load(flat):
        return [f.view_as(p) for f, p in zip(torch.split(flat, sizes), params)]

    def losses_at(flat, seed):
        tensors = load(flat)
        state = dict(zip([n for n, _ in model.named_parameters()], tensors))
        out = torch.func.functional_call(model, state, (torch.randn(16, 3, generator=torch.Generator().manual_seed(seed), dtype=D),))
        g = torch.Generator().manual_seed(seed)
        torch.randn(16, 3, generator=g, dtype=D)
        return {k: ((v - torch.randn(16, generator=g, dtype=D)) ** 2).mean() for k, v in out.items()}

    def direction(flat, w):
        losses = losses_at(flat, 2)
        grads = [torch.autograd.grad(losses[n], flat, create_graph=True)[0] for n in NAMES]
        coef = torch.cat([torch.ones(1, 2, dtype=D), s * torch.relu(w)])
        col = torch.cat([torch.full((sz,), module[i] if i < n_shared else -1) for i, sz in enumerate(sizes)])
        weights = torch.stack([torch.where(col >= 0, coef[k][col.clamp(min=0)], torch.ones(())) for k in range(3)])
        return sum(weights[k] * grads[k] for k in range(3))

    w0 = method.w.clone()
    J = torch.autograd.functional.jacobian(lambda f: direction(f, w0), flat0.clone().requires_grad_(True))
    B = torch.autograd.functional.jacobian(lambda w: direction(flat0.clone().requires_grad_(True), w), w0).reshape(len(flat0), -1)
    flat = flat0.clone().requires_grad_(True)
    g_val = torch.autograd.grad(losses_at(flat, 3)["main"], flat)[0]
    series, power = torch.zeros_like(J), torch.eye(len(flat0), dtype=D)
    for _ in range(M):
        series += power
        power = power @ (torch.eye(len(flat0), dtype=D) - eta * J)
    reference = -eta * (g_val @ series @ B).reshape(2, 2)
    torch.testing.assert_close(grad, reference, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------- upper optimizer and state
@pytest.mark.parametrize("upper,lr", [("adam", 1e-2), ("sgd", 1e-3)])
def test_upper_optimizer_follows_torch_optim(upper, lr):
    method = methods.create("maoal", NAMES, primary="main", upper=upper, upper_lr=lr)
    p = nn.Parameter(torch.zeros(3))
    method.attach([("a.w", p)])
    reference = nn.Parameter(method.w.clone())
    optimizer = torch.optim.Adam([reference], lr=lr) if upper == "adam" else torch.optim.SGD([reference], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(method.w.shape, generator=g)
        method._upper_step(grad)
        reference.grad = grad
        optimizer.step()
        torch.testing.assert_close(method.w, reference.detach(), rtol=1e-6, atol=1e-7)


def test_w_is_a_buffer_and_a_failing_meta_step_changes_nothing():
    model = Net()
    method = methods.create("maoal", NAMES, primary="main").attach_model(model)
    assert not [p for p in method.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in method.state_dict().items()}
    context = _context(model, 0.1)
    context.aux_batch = None
    with pytest.raises(ValueError, match="needs an 'aux' split"):
        method.meta_step(context)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k
    info = method.meta_step(_context(model, 0.1))
    assert info["grad_norm"] > 0 and not torch.equal(method.w, before["w"]) and int(method.upper_steps) == 1


def test_backward_calls_per_step():
    model = Net()
    method = methods.create("maoal", NAMES, primary="main", meta_every=2).attach_model(model)
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        method.backward(_losses(model), model.shared_parameters(), model.task_parameters())
        ordinary = len(calls)
        assert not method.meta_due()
        method.backward(_losses(model), model.shared_parameters(), model.task_parameters())
        assert method.meta_due()
        calls.clear()
        method.meta_step(_context(model, 0.1))
        meta = len(calls)
    finally:
        torch.autograd.grad = original
    assert ordinary == 3  # K
    assert meta == 3 + 3  # K graph-building, g_V, M_lb - 1 HVPs (the mixed product is closed-form)


# ---------------------------------------------------------------------- with the Trainer
def _datasets():
    g = torch.Generator().manual_seed(0)

    def split(m):
        x = torch.randn(m, 3, generator=g)
        return TaskDataset(x, {"main": x.sum(1), "x": x[:, 0], "y": -x[:, 1]})

    return {"train": split(96), "aux": split(32), "val": split(32), "test": split(32)}


def _trainer(log_dir=None):
    torch.manual_seed(0)
    model = Net(dtype=torch.float32)
    tasks = [Task.regression("main", "primary"), Task.regression("x"), Task.regression("y")]
    method = methods.create("maoal", tasks, meta_every=3)
    config = TrainerConfig(epochs=3, batch_size=16, seed=1, log_every=1)
    return Trainer(model, method, _datasets(), partial(torch.optim.SGD, lr=0.05, momentum=0.9), config, log_dir=log_dir)


def test_resume_keeps_w_and_the_upper_optimizer(tmp_path):
    full = _trainer()
    full.fit()
    assert full.method.module_names == ["l1", "l2"] and int(full.method.upper_steps) == 6
    first = _trainer()
    first.fit(checkpoint=tmp_path / "ckpt.pt", checkpoint_every=4, stop_at=8)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["method"]
    assert int(state["upper_steps"]) == 2 and state["w"].shape == (2, 2) and bool(state["upper_v"].abs().sum() > 0)
    resumed = _trainer()
    resumed.fit(checkpoint=tmp_path / "ckpt.pt")
    for key, value in full.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_unattached_method_loads_a_checkpoint_and_keeps_training():
    trained = _trainer()
    trained.fit()
    fresh = methods.create("maoal", NAMES, primary="main", meta_every=3)
    fresh.load_state_dict(trained.method.state_dict())
    assert torch.equal(fresh.w, trained.method.w)
    model = trained.model
    losses = _losses_f32(model)
    fresh.backward(losses, model.shared_parameters(), model.task_parameters())  # map restored from module_of
    assert fresh.module_names == ["module0", "module1"]


def _losses_f32(model):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    return {k: (v**2).mean() for k, v in model(x).items()}


def test_module_weights_are_logged_and_plotted(tmp_path):
    trainer = _trainer(log_dir=tmp_path)
    trainer.fit()
    series = read_module_weights(tmp_path / "log.csv")
    assert set(series) == {"x", "y"} and set(series["x"][-1][1]) == {"l1", "l2"}
    final = trainer.method.module_weights()
    assert series["x"][-1][1] == pytest.approx(final["x"], rel=1e-6)
    pytest.importorskip("matplotlib")
    path = plot_module_weights([tmp_path / "log.csv"], tmp_path / "modules.png", stages=3)
    assert path.stat().st_size > 1000


def test_registered_with_its_hyperparameters():
    assert isinstance(methods.create("maoal", NAMES, primary="main"), MAOAL)
    hp = methods.hyperparameters("maoal")
    assert hp["meta_every"] == 20 and hp["look_back"] == 3 and hp["upper"] == "adam" and hp["upper_lr"] == 1e-2


def test_meta_step_works_through_attention_blocks():
    """Fused attention kernels have no double backward; the meta step must still run on AutoInt."""
    from auxilia.models import autoint_encoder

    torch.manual_seed(0)
    encoder = autoint_encoder(20, dim=8, blocks=2, heads=2)
    head = nn.Linear(8 * 3, 1)
    fields = torch.randint(0, 20, (16, 3))

    def losses(_):
        z = encoder(fields)
        return {"main": (head(z).squeeze(-1) - 1).pow(2).mean(), "x": sum(p.pow(2).sum() for p in encoder.parameters())}

    tasks = [Task.regression("main", "primary"), Task.regression("x")]
    method = methods.create("maoal", tasks).attach([(f"encoder.{n}", p) for n, p in encoder.named_parameters()])
    assert method.module_names == ["embedding", "block1", "block2"]
    context = MetaContext(losses=losses, train_batch=lambda: 0, aux_batch=lambda: 1, shared=list(encoder.parameters()),
                          heads=list(head.parameters()), learning_rate=0.01)
    grad, _ = method.meta_gradient(context)
    assert grad.shape == (1, 3) and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_the_three_module_maps_on_a_model():
    model = Net()
    shared, heads = model.shared_parameters(), model.task_parameters()
    children = methods.create("maoal", NAMES, primary="main").attach_model(model)
    assert children.w.shape == (2, 2) and children.module_of.tolist() == [0, 0, 1, 1]
    mapped = methods.create("maoal", NAMES, primary="main", modules={"encoder": "all", "encoder.l2.0.bias": "bias"})
    mapped.attach_model(model)
    assert mapped.module_names == ["all", "bias"] and mapped.module_of.tolist() == [0, 0, 0, 1]
    per_tensor = methods.create("maoal", NAMES, primary="main", modules="parameter")
    per_tensor.backward(_losses(model), shared, heads)  # binds itself to the tensors of the first step
    assert per_tensor.w.shape == (2, 4) and per_tensor.module_of.tolist() == [0, 1, 2, 3]
    # Parameter-L with one weight switched off equals dropping that task's gradient on that tensor only
    per_tensor.w[0, 3] = -1.0
    model.zero_grad()
    per_tensor.backward(_losses(model), shared, heads)
    losses = _losses(model)
    g = {n: torch.autograd.grad(losses[n], shared, retain_graph=True) for n in NAMES}
    torch.testing.assert_close(shared[3].grad, g["main"][3] + g["y"][3])
    torch.testing.assert_close(shared[2].grad, g["main"][2] + g["x"][2] + g["y"][2])


def test_closed_form_mixed_product_equals_the_shared_hypergradient():
    from auxilia.hypergrad import hypergradient

    model = Net()
    eta, M = 0.05, 3
    method = methods.create("maoal", NAMES, primary="main", scale=1.3, look_back=M).attach_model(model)
    method.w.copy_(torch.tensor([[1.5, -0.3], [0.7, 2.0]], dtype=D))
    grad, _ = method.meta_gradient(_context(model, eta))
    params = model.shared_parameters() + model.task_parameters()
    w = method.w.clone().requires_grad_(True)
    coef = torch.cat([torch.ones(1, 2, dtype=D), 1.3 * torch.relu(w)])
    losses = _losses(model, 2)
    per_task = {n: torch.autograd.grad(losses[n], params, create_graph=True, allow_unused=True) for n in NAMES}
    direction = []
    for j, p in enumerate(params):
        parts = [(k, per_task[n][j]) for k, n in enumerate(NAMES) if per_task[n][j] is not None]
        direction.append(sum((coef[k, 0 if j < 2 else 1] if j < 4 else 1.0) * g for k, g in parts))
    reference = hypergradient(None, _losses(model, 3)["main"], params, [w], terms=M - 1, step_size=eta,
                              scale_by_step=True, train_grads=direction)
    torch.testing.assert_close(grad, reference[0], rtol=1e-10, atol=1e-13)
