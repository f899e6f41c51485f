import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxilia import Task, methods
from auxilia.architectures import (
    AUXILIARY_TO_PRIMARY,
    PRIMARY_TO_AUXILIARY,
    AuxNAS,
    ChannelAffine,
    PenaltySchedule,
    SingleTaskNetwork,
    TokenBlock,
    alpha_metrics,
    alpha_summary,
    alpha_table,
    dense_architecture,
    plan_connections,
    rows_from_metrics,
)
from auxilia.architectures.auxnas import penalty_schedule
from auxilia.training import TaskDataset, Trainer, TrainerConfig, read_checkpoint


def conv_blocks(widths=(4, 6, 6, 8), cin=3):
    blocks = []
    for k, w in enumerate(widths):
        layers = [nn.MaxPool2d(2)] if k == 2 else []
        blocks.append(nn.Sequential(*layers, nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
        cin = w
    return blocks


def conv_head(cin, cout):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, cout))


def token_blocks(dim=8, n=3):
    return [TokenBlock(dim, heads=2) for _ in range(n)]


def token_head(dim, cout):
    return nn.Linear(dim, cout)


def randomize(model, generator_seed=0):
    """Non-zero projections and α far from 0.5, so that fusion actually mixes the branches."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for p in model.projections.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if model.alpha_logits is not None:
            model.alpha_logits.copy_(torch.randn(model.alpha_logits.shape, generator=g))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, ChannelAffine)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def cnn(connections="aux-nas", **kw):
    torch.manual_seed(0)
    return AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), connections, stages=kw.pop("stages", [2, 2]),
                  primary="seg", auxiliary="normals", **kw)


def vit(connections="aux-nas", auxiliaries=("normals",), **kw):
    torch.manual_seed(0)
    return AuxNAS(token_blocks(), {a: token_blocks() for a in auxiliaries}, token_head(8, 5),
                  {a: token_head(8, 2) for a in auxiliaries}, connections, primary="seg", features="token", **kw)


# ---------------------------------------------------------------- connections


def test_connection_plan_follows_the_window_and_direction_rules():
    plan = plan_connections("aux-nas", "p", ["a", "b"], layers=6, window=3, stage_ends=[1, 3, 5])
    assert all({c.source, c.target} in ({"p", "a"}, {"p", "b"}) for c in plan)
    assert all(c.target_layer - 3 <= c.source_layer <= c.target_layer for c in plan)
    per_pair = sum(min(i, 3) + 1 for i in range(6))
    assert len(plan) == 2 * 2 * per_pair
    layer = plan_connections("aux-g-layer", "p", ["a"], 6, 3, [1, 3, 5])
    assert all(c.direction == PRIMARY_TO_AUXILIARY and c.source == "p" for c in layer) and len(layer) == per_pair
    stage = plan_connections("aux-g-stage", "p", ["a"], 6, 3, [1, 3, 5])
    assert {(c.source_layer, c.target_layer) for c in stage} == {(1, 1), (1, 3), (3, 3), (3, 5), (5, 5)}
    narrow = plan_connections("aux-nas", "p", ["a"], 4, 1, [3])
    assert {(c.source_layer, c.target_layer) for c in narrow} == {(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)}


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="same number of blocks"):
        AuxNAS(conv_blocks(), conv_blocks()[:3], conv_head(8, 5), conv_head(8, 2))
    shared = conv_blocks()
    with pytest.raises(ValueError, match="share parameters"):
        AuxNAS(shared, shared, conv_head(8, 5), conv_head(8, 2))
    with pytest.raises(ValueError, match="window"):
        AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), window=0)
    with pytest.raises(ValueError, match="unknown connections"):
        AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), connections="nddr")
    with pytest.raises(ValueError, match="stages"):
        AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), "aux-g-stage", stages=[2, 3])
    with pytest.raises(ValueError, match="heads for"):
        AuxNAS(conv_blocks(), {"a": conv_blocks()}, conv_head(8, 5), {"b": conv_head(8, 2)})
    with pytest.raises(ValueError, match="both the primary"):
        AuxNAS(conv_blocks(), {"p": conv_blocks()}, conv_head(8, 5), {"p": conv_head(8, 2)}, primary="p")
    with pytest.raises(ValueError, match="cannot tell how many channels"):
        AuxNAS([nn.Identity()], [nn.Identity()], nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match="split"):
        AuxNAS(token_blocks(), token_blocks(), token_head(8, 1), token_head(8, 1), features="token", fusion_norm="split")
    with pytest.raises(ValueError, match="init_alpha"):
        AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), init_alpha=1.0)
    with pytest.raises(ValueError, match="penalty schedule"):
        AuxNAS(conv_blocks(), conv_blocks(), conv_head(8, 5), conv_head(8, 2), penalty="linear")
    with pytest.raises(ValueError, match="start <= end"):
        PenaltySchedule(10.0, 0.8, 0.5)
    model = AuxNAS([nn.Linear(4, 4)], [nn.Linear(4, 4)], nn.Identity(), nn.Identity(), features="token")
    with pytest.raises(ValueError, match="token fusion"):
        model.projections["auxiliary"]["0"].map.weight.data.normal_()
        model.projections["auxiliary"]["0"]([torch.randn(2, 3, 4)], torch.ones(1), torch.randn(2, 5, 4))


def test_penalty_schedules():
    official = PenaltySchedule.official()
    assert [official(p) for p in (0.0, 0.49, 0.5, 0.65, 0.8, 1.0)] == pytest.approx([0, 0, 0, 500, 1000, 1000])
    paper = PenaltySchedule.paper()
    assert [paper(p) for p in (0.0, 0.25, 1.0)] == pytest.approx([0, 25, 100])
    assert PenaltySchedule.constant(3.0)(0.0) == 3.0
    assert penalty_schedule({"peak": 10, "start": 0.1, "end": 0.3}) == PenaltySchedule(10.0, 0.1, 0.3)
    with pytest.raises(ValueError, match="no field"):
        penalty_schedule({"peak": 10, "begin": 0.1})


# ---------------------------------------------------------------- initialisation and fusion


@pytest.mark.parametrize("connections", ["aux-nas", "aux-g-layer", "aux-g-stage"])
@pytest.mark.parametrize("kind", ["conv", "token"])
def test_at_initialisation_the_network_is_the_single_task_networks_exactly(connections, kind):
    torch.manual_seed(1)
    if kind == "conv":
        blocks = {t: conv_blocks() for t in ("seg", "normals", "depth")}
        heads = {"seg": conv_head(8, 5), "normals": conv_head(8, 3), "depth": conv_head(8, 1)}
        x = torch.randn(3, 3, 8, 8)
    else:
        blocks = {t: token_blocks() for t in ("seg", "normals", "depth")}
        heads = {t: token_head(8, 2) for t in ("seg", "normals", "depth")}
        x = torch.randn(3, 5, 8)
    singles = {t: SingleTaskNetwork.from_blocks(copy.deepcopy(blocks[t]), copy.deepcopy(heads[t]), features=kind)
               for t in blocks}
    model = AuxNAS(blocks["seg"], {"normals": blocks["normals"], "depth": blocks["depth"]}, heads["seg"],
                   {"normals": heads["normals"], "depth": heads["depth"]}, connections, stages=[2, 2] if kind == "conv" else [1, 2],
                   primary="seg", features=kind)
    for mode in (True, False):
        model.train(mode)
        for s in singles.values():
            s.train(mode)
        out = model(x)
        for t, single in singles.items():
            assert torch.equal(out[t], single(x)), (t, mode)


def test_fused_layer_matches_an_independent_computation():
    model = cnn("aux-nas", window=1)
    randomize(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    p, a = model.branches["seg"].layers, model.branches["normals"].layers
    alpha = torch.sigmoid(model.alpha_logits.detach())
    # layer 0 only: the primary reads the auxiliary's layer-0 block output, and vice versa
    xp, xa = p[0].body(x), a[0].body(x)
    k_pa = [k for k, c in enumerate(model.connections) if c.target == "seg" and c.target_layer == 0]
    k_ap = [k for k, c in enumerate(model.connections) if c.target == "normals" and c.target_layer == 0]
    Wp = model.projections["seg"]["0"].map.weight
    Wa = model.projections["normals"]["0"].map.weight
    model.train()  # train mode: the a2p connection counts
    with torch.no_grad():
        hp = F.relu(p[0].norm(xp + F.conv2d(alpha[k_pa[0]] * xa, Wp)))
        ha = F.relu(a[0].norm(xa + F.conv2d(alpha[k_ap[0]] * xp, Wa)))
    # run the network's first layer by truncating both branches
    model2 = copy.deepcopy(model)
    model2.depth = 1
    for t in ("seg", "normals"):
        model2.branches[t].head = nn.Identity()
    with torch.no_grad():
        out = model2(x)
    torch.testing.assert_close(out["seg"], hp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["normals"], ha, rtol=1e-5, atol=1e-6)


def test_features_of_different_sizes_are_resized_bilinearly():
    model = cnn("aux-g-layer")
    randomize(model)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)  # layer 2 pools: the window mixes 8x8 and 4x4 features
    assert all(torch.isfinite(v).all() for v in out.values())
    c = next(c for c in model.connections if c.source_layer == 1 and c.target_layer == 2)
    assert c is not None


def test_projection_equals_concat_then_conv_of_resized_features():
    from auxilia.architectures import Projection

    g = torch.Generator().manual_seed(0)
    projection = Projection([3, 4, 2, 5], 6, "conv")
    with torch.no_grad():
        projection.map.weight.copy_(torch.randn(projection.map.weight.shape, generator=g))
    sources = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g),
               torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 16, 16, generator=g)]
    alpha = torch.rand(4, generator=g)
    like = torch.zeros(2, 6, 8, 8)
    resized = [F.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False) if y.shape[-1] != 8 else y for y in sources]
    naive = F.conv2d(torch.cat([a * y for a, y in zip(alpha, resized)], dim=1), projection.map.weight)
    torch.testing.assert_close(projection(sources, alpha, like), naive, rtol=1e-5, atol=1e-5)


def test_auxiliary_gradient_reaches_the_primary_branch_only_through_connections():
    model = cnn("aux-g-layer")
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    grads = torch.autograd.grad(out["normals"].sum(), model.projections.parameters())
    assert any(g.abs().sum() > 0 for g in grads)  # the zero-initialised projections learn
    randomize(model)
    out = model(x)
    prim = list(model.branches["seg"].layers.parameters())
    aux = list(model.branches["normals"].layers.parameters())
    g_aux_on_prim = torch.autograd.grad(out["normals"].sum(), prim, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_aux_on_prim)
    g_prim_on_aux = torch.autograd.grad(out["seg"].sum(), aux, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_prim_on_aux)  # Aux-G: no aux -> primary path


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["conv", "token"])
def test_export_equals_the_cut_network(kind):
    model = cnn() if kind == "conv" else vit(auxiliaries=("normals", "depth"))
    randomize(model)
    x = torch.randn(4, 3, 8, 8) if kind == "conv" else torch.randn(4, 5, 8)
    model.train()
    before = model(x)["seg"]
    model.cut()
    exported = model.export_primary()
    exported.train()
    after = model(x)["seg"]
    assert not torch.allclose(before, after)  # the aux -> primary connections mattered before the cut
    assert torch.equal(exported(x), after)  # the same operations on the same numbers: bitwise
    model.eval()
    exported.eval()
    assert torch.equal(exported(x), model(x)["seg"])
    assert {row["cut"] for row in alpha_table(model) if row["direction"] == AUXILIARY_TO_PRIMARY} == {True}


def test_eval_mode_primary_output_is_the_exported_networks():
    model = cnn()
    randomize(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.export_primary().eval()(x), model(x)["seg"], rtol=1e-6, atol=1e-6)
    model.train()
    assert not torch.allclose(model.export_primary().train()(x), model(x)["seg"])


@pytest.mark.parametrize("kind", ["conv", "token"])
def test_export_parameter_count_bound(kind):
    model = cnn() if kind == "conv" else vit()
    single = (SingleTaskNetwork.from_blocks(conv_blocks(), conv_head(8, 5)) if kind == "conv"
              else SingleTaskNetwork.from_blocks(token_blocks(), token_head(8, 5), features="token"))
    exported = model.export_primary()
    fused = len({(c.target, c.target_layer) for c in model.connections if c.target == "seg"})
    n_single = sum(p.numel() for p in single.parameters())
    n_export = sum(p.numel() for p in exported.parameters())
    tensors_single, tensors_export = len(list(single.parameters())), len(list(exported.parameters()))
    assert tensors_export <= tensors_single + 2 * fused
    if kind == "conv":  # the fusion's norm is the block's own BN: nothing added
        assert n_export == n_single and tensors_export == tensors_single
    else:  # a scale and a shift of width 8 on each fused layer
        assert n_export == n_single + 2 * 8 * fused and tensors_export == tensors_single + 2 * fused


def test_export_holds_no_auxiliary_module_and_scripts_traces_and_round_trips(tmp_path):
    model = cnn()
    randomize(model)
    model.cut().eval()
    x = torch.randn(2, 3, 8, 8)
    exported = model.export_primary().eval()
    expected = exported(x)
    model_ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not any(p.data_ptr() in model_ptrs for p in exported.parameters())
    del model.branches["normals"], model.projections
    del model
    torch.testing.assert_close(exported(x), expected, rtol=0, atol=0)
    scripted = torch.jit.script(exported)
    torch.testing.assert_close(scripted(x), expected)
    traced = torch.jit.trace(exported, x)
    torch.testing.assert_close(traced(torch.randn(2, 3, 8, 8) * 0 + x), expected)
    torch.save(exported.state_dict(), tmp_path / "primary.pt")
    fresh = SingleTaskNetwork.from_blocks(conv_blocks(), conv_head(8, 5)).eval()
    fresh.load_state_dict(torch.load(tmp_path / "primary.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_token_export_goes_through_torch_export():
    model = vit()
    randomize(model)
    model.cut().eval()
    x = torch.randn(2, 5, 8)
    exported = model.export_primary().eval()
    program = torch.export.export(exported, (x,))
    torch.testing.assert_close(program.module()(x), model(x)["seg"], rtol=1e-5, atol=1e-6)


def test_branches_load_from_single_task_checkpoints(tmp_path):
    torch.manual_seed(3)
    trained = SingleTaskNetwork.from_blocks(token_blocks(), token_head(8, 5), features="token")
    torch.save(trained.state_dict(), tmp_path / "seg.pt")
    model = vit()
    model.load_branch("seg", tmp_path / "seg.pt")
    x = torch.randn(2, 5, 8)
    model.eval()
    torch.testing.assert_close(model(x)["seg"], trained.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        model.load_branch("normals", SingleTaskNetwork.from_blocks(token_blocks(n=2), token_head(8, 2), features="token"))
    with pytest.raises(ValueError, match="no branch"):
        model.load_branch("depth", trained)


def test_dense_architectures_build_and_export():
    x = torch.randn(2, 3, 16, 16)
    for arch in ("shared", "aux-g-stage", "aux-g-layer", "aux-nas"):
        model = dense_architecture(arch, ["segmentation", "normals"], 4, widths=(4, 8))
        out = model(x)
        assert out["segmentation"].shape == (2, 4, 16, 16) and out["normals"].shape == (2, 3, 16, 16)
    token = dense_architecture("aux-nas", ["segmentation", "normals", "depth"], 4, widths=(8, 8), backbone="token",
                               image_size=16, patch=4)
    token.eval()
    torch.testing.assert_close(token.export_primary().eval()(x), token(x)["segmentation"])


# ---------------------------------------------------------------- training α


def test_own_adam_matches_torch_adam():
    model = vit()
    reference = model.alpha_logits.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=model.arch_lr, betas=model.arch_betas)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(reference.shape, generator=g)
        reference.grad = grad.clone()
        optimizer.step()
        model._adam(grad)
    torch.testing.assert_close(model.alpha_logits.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def _regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(m):
        x = torch.randn(m, 4, generator=g)
        return TaskDataset(x, {"main": x[:, :2].sum(1, keepdim=True), "aux": x[:, 1:3].sum(1, keepdim=True)})
    return {"train": split(n), "val": split(32), "test": split(32)}


def _mlp_auxnas(**kw):
    torch.manual_seed(0)
    blocks = lambda: [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
    return AuxNAS(blocks(), blocks(), nn.Linear(8, 1), nn.Linear(8, 1), primary="main", auxiliary="aux",
                  features="token", window=1, **kw)


TASKS = [Task.regression("main", "primary"), Task.regression("aux")]


def _trainer(model, method="equal", epochs=4, **config):
    cfg = TrainerConfig(epochs=epochs, batch_size=16, seed=0, log_every=1, **config)
    return Trainer(model, methods.create(method, TASKS), _regression_data(), partial(torch.optim.Adam, lr=1e-2), cfg)


def test_alpha_and_weights_update_alternately_on_disjoint_halves():
    model = _mlp_auxnas()
    trainer = _trainer(model, epochs=1)
    assert all(p is not model.alpha_logits for g in trainer.optimizer.param_groups for p in g["params"])
    batches = list(__import__("auxilia.training.data", fromlist=["epoch_batches"]).epoch_batches(
        trainer.datasets["train"], 16, seed=0, epoch=0))
    for index, batch in enumerate(batches):
        alpha = model.alpha_logits.detach().clone()
        weights = [p.detach().clone() for p in model.shared_parameters()]
        trainer.batch_in_epoch = index
        info = trainer.train_step(batch)
        alpha_moved = not torch.equal(alpha, model.alpha_logits.detach())
        weights_moved = any(not torch.equal(a, b) for a, b in zip(weights, model.shared_parameters()))
        assert (alpha_moved, weights_moved) == ((True, False) if index % 2 else (False, True)), index
        assert ("own" in info) == bool(index % 2)


@pytest.mark.parametrize("method", ["equal", "pcgrad-aux"])
def test_l1_schedule_drives_auxiliary_to_primary_alpha_to_zero(method):
    model = _mlp_auxnas(penalty=PenaltySchedule(1000.0, 0.2, 0.4), arch_lr=0.2)
    trainer = _trainer(model, method=method, epochs=60)
    trainer.fit()
    stats = alpha_summary(alpha_table(model))
    assert stats[AUXILIARY_TO_PRIMARY]["max"] < 5e-3
    assert stats[PRIMARY_TO_AUXILIARY]["min"] > 0.05  # no penalty there
    control = _mlp_auxnas(penalty=0.0, arch_lr=0.2)
    _trainer(control, method=method, epochs=60).fit()
    assert alpha_summary(alpha_table(control))[AUXILIARY_TO_PRIMARY]["max"] > 0.1
    metrics = alpha_metrics(model)
    assert metrics["alpha/a2p/max"] == stats[AUXILIARY_TO_PRIMARY]["max"]
    assert len(rows_from_metrics(metrics, "main")) == len(model.connections)


def test_checkpoint_resume_keeps_alpha_and_both_optimizers(tmp_path):
    straight = _trainer(_mlp_auxnas(penalty="paper"), epochs=3)
    straight.fit()
    first = _trainer(_mlp_auxnas(penalty="paper"), epochs=3)
    first.fit(checkpoint=tmp_path / "ck.pt", checkpoint_every=3, stop_at=7)
    resumed = _trainer(_mlp_auxnas(penalty="paper"), epochs=3)
    state = read_checkpoint(tmp_path / "ck.pt")
    assert int(state["model"]["arch_steps"]) > 0 and state["optimizer"]["state"]
    resumed.fit(checkpoint=tmp_path / "ck.pt")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(b["arch_steps"]) == 6  # 4 batches per epoch, every second one for α


def test_nonfinite_architecture_gradient_changes_nothing():
    model = _mlp_auxnas()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 4)
    out = model(x)
    losses = {"main": out["main"].sum() * float("nan"), "aux": out["aux"].sum()}
    with pytest.raises(FloatingPointError, match="architecture"):
        model.own_step(losses, step=1, total_steps=10, batch_in_epoch=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- the runner


def test_cli_arch_option_runs_any_method_on_aux_nas_and_reports_alpha(tmp_path, capsys):
    from auxilia import cli
    from auxilia.architectures.analysis import report_alpha

    common = ["run", "scenes", "--seeds", "1", "--epochs", "2", "--no-plots", "--out", str(tmp_path),
              "--option", "size=16", "--option", "train_size=16", "--option", 'auxiliaries=["normals"]',
              "--option", "widths=[4,8]"]
    assert cli.main([*common, "--arch", "aux-nas", "--method", "gcs"]) == 0
    assert cli.main([*common, "--arch", "shared", "--method", "stl"]) == 0
    table = capsys.readouterr().out
    assert "aux-nas/gcs" in table and "shared/stl" in table
    records = [__import__("json").loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["aux-nas/gcs", "shared/stl"]
    assert "alpha/a2p/max" in records[0]["metrics"]["test"] and "alpha/a2p/max" not in records[1]["metrics"]["test"]
    summary = report_alpha(tmp_path)
    assert "aux-nas/gcs (1 seeds) | auxiliary->primary" in summary
    assert cli.main(["run", "toy", "--arch", "aux-nas", "--out", str(tmp_path)]) == 2
    assert "no architecture choice" in capsys.readouterr().err
