"""What Aux-NAS costs: the exported primary network against the single-task network, and training.

Inference: parameters, FLOPs (counted by ``torch.utils.flop_counter.FlopCounterMode``) and latency of
the exported primary network of a two-branch Aux-NAS model against (a) the plain single-task network
``nn.Sequential(*blocks, head)`` of the same blocks and (b) :class:`SingleTaskNetwork`, the same
network laid out as an Aux-NAS branch. Models are timed round-robin (one forward each, repeated) so
that drift on a shared machine hits them alike; the median per model is kept, and the ratio's spread
is given by the medians of the two halves of the repeats.

Training: the time of one step of the two-branch network (a weight step with ``equal`` and with
``gcs``; an α step) against a single-task step (``stl`` on the single-task network), same batch.

    OMP_NUM_THREADS=1 python benchmarks/auxnas_cost.py --out benchmarks/results/auxnas_cost
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from auxilia import Task, methods
from auxilia.architectures import ChannelAffine, SingleTaskNetwork, dense_architecture

TASKS = ["segmentation", "normals"]
NUM_CLASSES = 4


def build(backbone: str, size: int, widths: tuple[int, ...]):
    torch.manual_seed(0)
    kw = {"backbone": backbone, "image_size": size, "patch": 8} if backbone == "token" else {}
    model = dense_architecture("aux-nas", TASKS, NUM_CLASSES, widths=widths, **kw)
    with torch.no_grad():  # a trained-looking network: non-zero projections and norms away from identity
        for p in model.projections.parameters():
            p.normal_(0, 0.1)
    model.cut()
    branch = model.branches["segmentation"]
    # the plain single-task network: each block whole (its own norm and act), or bare where the
    # branch added an identity-initialised affine for fusion (the single-task network has none)
    plain = nn.Sequential(*[copy.deepcopy(layer.body if isinstance(layer.norm, ChannelAffine)
                                          else nn.Sequential(layer.body, layer.norm, layer.act))
                            for layer in branch.layers], copy.deepcopy(branch.head))
    layout = SingleTaskNetwork(copy.deepcopy(list(branch.layers)), copy.deepcopy(branch.head))
    return model, model.export_primary(), plain, layout


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(fns: dict[str, callable], repeats: int, warmup: int = 5) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(fns[name]))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    n = len(times[a])
    halves = [statistics.median(times[a][s]) / statistics.median(times[b][s]) for s in (slice(0, n // 2), slice(n // 2, n))]
    return {"ratio": statistics.median(times[a]) / statistics.median(times[b]), "half1": halves[0], "half2": halves[1]}


def inference(backbone: str, size: int, batch: int, widths: tuple[int, ...], repeats: int) -> dict:
    model, exported, plain, layout = build(backbone, size, widths)
    for m in (model, exported, plain, layout):
        m.eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x)["segmentation"], atol=1e-5)
    nets = {"exported": exported, "single-task": plain, "single-task (branch layout)": layout}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    tensors = {k: len(list(m.parameters())) for k, m in nets.items()}
    flops = {k: count_flops(m, x) for k, m in nets.items()}
    with torch.inference_mode():
        times = round_robin({k: (lambda m=m: m(x)) for k, m in nets.items()}, repeats)
    return {
        "backbone": backbone, "size": size, "batch": batch, "widths": list(widths), "repeats": repeats,
        "parameters": params, "parameter_tensors": tensors, "flops": flops,
        "latency_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "latency_ratio_vs_single": ratio(times, "exported", "single-task"),
        "latency_ratio_vs_branch_layout": ratio(times, "exported", "single-task (branch layout)"),
        "two_branch_parameters": sum(p.numel() for p in model.parameters()),
        "two_branch_flops": count_flops(model, x),
    }


def _losses(outputs, seg, normals):
    out = {"segmentation": F.cross_entropy(outputs["segmentation"], seg)}
    if "normals" in outputs:
        out["normals"] = (1 - F.cosine_similarity(outputs["normals"], normals, dim=1)).mean()
    return out


def training(size: int, batch: int, widths: tuple[int, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    model = dense_architecture("aux-nas", TASKS, NUM_CLASSES, widths=widths)
    single = dense_architecture("shared", ["segmentation"], NUM_CLASSES, widths=widths)
    x = torch.randn(batch, 3, size, size)
    seg = torch.randint(0, NUM_CLASSES, (batch, size, size))
    normals = F.normalize(torch.randn(batch, 3, size, size), dim=1)
    tasks = [Task.classification("segmentation", "primary"), Task.regression("normals")]
    setups = {
        "single-task (stl)": (single, methods.create("stl", [tasks[0]])),
        "aux-nas weight step (equal)": (model, methods.create("equal", tasks)),
        "aux-nas weight step (gcs)": (model, methods.create("gcs", tasks)),
    }
    optimizers = {k: torch.optim.Adam([p for p in m.parameters() if p is not getattr(m, "alpha_logits", None)], lr=1e-3)
                  for k, (m, _) in setups.items()}

    def step(name):
        m, method = setups[name]
        m.train()
        optimizers[name].zero_grad(set_to_none=True)
        losses = _losses(m(x), seg, normals)
        method.backward(losses, m.shared_parameters(), m.task_parameters())
        optimizers[name].step()

    def alpha_step():
        model.train()
        losses = _losses(model(x), seg, normals)
        model.own_step(losses, step=1, total_steps=2, batch_in_epoch=1)

    fns = {name: (lambda name=name: step(name)) for name in setups}
    fns["aux-nas α step"] = alpha_step
    times = round_robin(fns, repeats, warmup=2)
    base = "single-task (stl)"
    return {
        "size": size, "batch": batch, "widths": list(widths), "repeats": repeats,
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio_vs_single": {k: ratio(times, k, base) for k in times if k != base},
        "alternating_mean_ratio": 0.5 * (statistics.median(times["aux-nas weight step (equal)"])
                                         + statistics.median(times["aux-nas α step"])) / statistics.median(times[base]),
    }


def markdown(result: dict) -> str:
    lines = ["# Aux-NAS cost: exported primary network vs single-task network", ""]
    lines.append(f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} thread(s). "
                 f"Command: `{result['command']}`.")
    lines.append("")
    for inf in result["inference"]:
        lines.append(f"## Inference, {inf['backbone']} backbone ({inf['size']}x{inf['size']}, batch {inf['batch']}, "
                     f"widths {inf['widths']}, {inf['repeats']} interleaved repeats)")
        lines += ["", "| network | parameters | parameter tensors | FLOPs | median latency (ms) |", "|---|---|---|---|---|"]
        for k in inf["parameters"]:
            lines.append(f"| {k} | {inf['parameters'][k]:,} | {inf['parameter_tensors'][k]} | {inf['flops'][k]:,} | "
                         f"{inf['latency_ms'][k]:.3f} |")
        r, q = inf["latency_ratio_vs_single"], inf["latency_ratio_vs_branch_layout"]
        lines += ["", (f"Two-branch network during training: {inf['two_branch_parameters']:,} parameters, "
                       f"{inf['two_branch_flops']:,} FLOPs."), ""]
        lines.append(f"Latency ratio exported ÷ single-task: **{r['ratio']:.3f}** (halves of the repeats: "
                     f"{r['half1']:.3f}, {r['half2']:.3f}); exported ÷ branch layout: {q['ratio']:.3f} "
                     f"({q['half1']:.3f}, {q['half2']:.3f}).")
        lines.append("")
    tr = result["training"]
    lines.append(f"## Training step ({tr['size']}x{tr['size']}, batch {tr['batch']}, widths {tr['widths']}, "
                 f"{tr['repeats']} interleaved repeats)")
    lines += ["", "| step | median ms | ÷ single-task step |", "|---|---|---|"]
    for k, v in tr["step_ms"].items():
        rr = tr["ratio_vs_single"].get(k)
        lines.append(f"| {k} | {v:.1f} | {rr['ratio']:.2f} |" if rr else f"| {k} | {v:.1f} | 1.00 |")
    lines.append("")
    lines.append(f"Aux-NAS alternates weight and α steps, so its mean step (equal) costs "
                 f"{tr['alternating_mean_ratio']:.2f}x a single-task step.")
    lines += ["", "## Notes", "",
              ("- *single-task* is `nn.Sequential(*blocks, head)`, the network one would write without Aux-NAS; "
              "*branch layout* is the same network as a `SingleTaskNetwork` (what `export_primary` returns, "
              "before training)."),
              ("- The conv blocks end in BN-ReLU, which the fusion takes over, so the exported conv network is "
              "the single-task network operation for operation. The token blocks end in a residual sum: fused "
              "layers carry an identity-initialised scale and shift (2 tensors of width C per fused layer, "
              "here 3 layers: +6 tensors, +384 numbers)."),
              ("- `FlopCounterMode` counts matrix products and convolutions only; the affine's 2·N·C "
              "element-wise operations per fused layer are not in the FLOP column."),
              ("- Latencies were taken on a shared 2-core machine under load from other jobs; the ratio's "
              "halves show the noise of a few percent. The models are timed round-robin, so drift hits all alike."),
              ("- Training on CPU costs more than the paper's \"about twice a single task\": two branches, "
              "plus, in every fused layer, up to `window + 1` = 4 sources projected and bilinearly resized at "
              "full resolution (in a profile of the conv model, resizes and 1x1 convolutions with their "
              "backward passes take about half of the step)."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/auxnas_cost")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--train-repeats", type=int, default=20)
    parser.add_argument("--from-json", help="only rewrite the Markdown of a previous run's JSON")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        Path(args.from_json).with_suffix(".md").write_text(markdown(result))
        return
    result = {
        "machine": f"CPU ({platform.machine()}), 2 cores shared", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "OMP_NUM_THREADS=1 python benchmarks/auxnas_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "from_json"),
        "inference": [inference("conv", args.size, args.batch, (16, 32, 64), args.repeats),
                      inference("token", args.size, args.batch, (32, 64), args.repeats)],
        "training": training(args.size, args.batch, (16, 32, 64), args.train_repeats),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
