"""Cost of one training step of every registered method, as a ratio to ``equal``.

Every configuration (model × K × method × gradient mode) takes steps on the same model and batch; the
configurations are timed round-robin (one step each, repeated) so that drift of a shared machine hits
them all alike, and the median is kept. Two reference rows per mode time what a gradient method cannot
avoid: the forward pass plus the per-task gradients in that mode (``grads:<mode>``). Ratios are
reported against ``equal`` and, for gradient methods, against that reference.

Memory: on CUDA the peak allocation of a step; on CPU the bytes of the per-task gradient matrix a
method holds (K × P or K × representation size, float32), since CPU peak allocation is not observable
per step from inside one process.

    python benchmarks/step_cost.py --out benchmarks/results/step_cost_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from auxilia import Task, gradients, methods
from auxilia.methods import GradientAggregation
from auxilia.methods.base import MetaContext


class MLP(nn.Module):
    def __init__(self, tasks: list[str], width: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(width, 10) for t in tasks})

    def forward_with_representation(self, x):
        rep = self.encoder(x)
        return rep, {t: h(rep) for t, h in self.heads.items()}


class CNN(nn.Module):
    def __init__(self, tasks: list[str]):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(64 * 16, 10) for t in tasks})

    def forward_with_representation(self, x):
        rep = self.encoder(x)
        return rep, {t: h(rep) for t, h in self.heads.items()}


MODELS = {"mlp": (MLP, (64, 64)), "cnn": (CNN, (32, 3, 32, 32))}


def configurations(names: list[str]) -> list[tuple[str, str | None]]:
    """(method, mode) pairs: loss-weighting methods once, gradient methods in every mode."""
    out: list[tuple[str, str | None]] = []
    for name in names:
        if issubclass(methods.get(name), GradientAggregation):
            out.extend((name, mode) for mode in gradients.MODES)
        else:
            out.append((name, None))
        if "hypergrad_every" in methods.hyperparameters(name):  # meta-learned: time a meta step too
            out.extend((name + META, mode) for n, mode in list(out) if n == name)
    return out


META = "+meta"


def build_step(model_name: str, K: int, method_name: str, mode: str | None):
    task_names = [f"t{k}" for k in range(K)]
    tasks = [Task.classification(t, "primary" if k == 0 else "auxiliary") for k, t in enumerate(task_names)]
    cls, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = cls(task_names)
    x = torch.randn(*shape)
    y = {t: torch.randint(0, 10, (shape[0],)) for t in task_names}
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())

    if method_name.startswith("grads:"):
        reference_mode = method_name.split(":", 1)[1]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            rep, out = model.forward_with_representation(x)
            losses = [task.compute_loss(out[task.name], y[task.name]) for task in tasks]
            if reference_mode == "representation":
                gradients.jacobian(losses, [rep], "loop")
                torch.autograd.backward(torch.stack(losses).sum(), inputs=heads + shared)
            else:
                gradients.jacobian(losses, shared, reference_mode)
                torch.autograd.backward(torch.stack(losses).sum(), inputs=heads)
            optimizer.step()

        return step, 0

    with_meta = method_name.endswith(META)
    method_name = method_name.removesuffix(META)
    hp = {"mode": mode} if mode is not None else {}
    method = methods.create(method_name, tasks, **hp)
    optimizer = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=1e-3)
    jacobian_bytes = 0
    if mode is not None:
        width = sum(p.numel() for p in shared) if mode != "representation" else None
        if width is None:
            with torch.no_grad():
                width = model.forward_with_representation(x)[0].numel()
        jacobian_bytes = K * width * 4

    def step():
        optimizer.zero_grad(set_to_none=True)
        rep, out = model.forward_with_representation(x)
        losses = {task.name: task.compute_loss(out[task.name], y[task.name]) for task in tasks}
        method.backward(losses, shared, heads, representation=rep if method.needs_representation else None)
        optimizer.step()
        if with_meta:  # an ordinary step followed by a meta step on another batch of the same size
            method.meta_step(context)

    def meta_losses(batch):
        inputs, targets = batch
        _, out = model.forward_with_representation(inputs)
        return {task.name: task.compute_loss(out[task.name], targets[task.name]) for task in tasks}

    meta_batch = (torch.randn(*shape), {t: torch.randint(0, 10, (shape[0],)) for t in task_names})
    context = MetaContext(losses=meta_losses, train_batch=lambda: meta_batch, aux_batch=lambda: meta_batch,
                          shared=shared, heads=heads, learning_rate=1e-3)
    return step, jacobian_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 3, 5, 10])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/step_cost_cpu")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other methods already in --out and replace only the methods timed now "
                             "(each row's ratios are to the equal of its own run)")
    args = parser.parse_args()

    names = args.methods or methods.available()
    if "equal" not in names:
        names = ["equal", *names]
    rows = []
    for model_name in args.models:
        for K in args.tasks:
            configs = [(f"grads:{m}", None) for m in gradients.MODES] + configurations(names)
            steps = {}
            for name, mode in configs:
                step, nbytes = build_step(model_name, K, name, mode)
                for _ in range(args.warmup):
                    step()
                steps[(name, mode)] = (step, nbytes)
            times: dict[tuple[str, str | None], list[float]] = {key: [] for key in steps}
            for _ in range(args.repeats):
                for key, (step, _) in steps.items():
                    start = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - start)
            median = {key: statistics.median(v) for key, v in times.items()}
            equal = median[("equal", None)]
            for (name, mode), t in median.items():
                reference = median.get((f"grads:{mode}", None)) if mode else None
                rows.append({
                    "model": model_name, "K": K, "method": name, "mode": mode or "-",
                    "ratio_to_equal": t / equal,
                    "ratio_to_grads": (t / reference) if reference else None,
                    "jacobian_bytes": steps[(name, mode)][1],
                    "median_s": t,
                })
                if name.endswith(META):  # one step in hypergrad_every carries the meta step
                    every = methods.hyperparameters(name.removesuffix(META))["hypergrad_every"]
                    plain = median[(name.removesuffix(META), mode)]
                    amortized = plain + (t - plain) / every
                    rows.append({
                        "model": model_name, "K": K, "method": f"{name.removesuffix(META)} (meta every {every})",
                        "mode": mode or "-", "ratio_to_equal": amortized / equal,
                        "ratio_to_grads": (amortized / reference) if reference else None,
                        "jacobian_bytes": steps[(name, mode)][1], "median_s": amortized,
                    })
            print(f"{model_name} K={K}: done", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(), "processor": _cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": "cpu",
    }
    if args.merge and out.with_suffix(".json").exists():
        def base(r):
            return r["model"], r["method"].split(" ")[0].removesuffix(META)

        timed = {base(r) for r in rows if base(r)[1] != "equal" and not base(r)[1].startswith("grads:")}
        kept = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if base(r) not in timed]
        rows = kept + [{**r, "merged": True} for r in rows if base(r) in timed]
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(rows, machine, args))
    print(out.with_suffix(".md").read_text())


def render(rows, machine, args) -> str:
    lines = [
        "# Step cost as a ratio to `equal`",
        "",
        (f"Machine: {machine['processor']}, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"{machine['platform']}."),
        (f"Command: `python benchmarks/step_cost.py --repeats {args.repeats}` (median of {args.repeats} "
        "round-robin steps per configuration)."),
        "",
        ("`÷ equal`: step time over `equal`'s step time on the same model, batch and K. `÷ grads`: over the "
        "forward pass plus the per-task gradients in the same mode (what the method cannot avoid). "
        "`G bytes`: the per-task gradient matrix held (float32)."),
        "",
        ("`M+meta`: an ordinary step followed by a meta step (L_V and the hypergradient on another batch of the "
        "same size); `M (meta every N)`: the amortized cost of M's default schedule, one meta step in N steps."),
        "",
    ]
    if any(r.get("merged") for r in rows):
        lines += ["Rows marked * were timed in a later run, `python benchmarks/step_cost.py --methods "
                  + " ".join(sorted({r["method"].split(" ")[0].removesuffix(META) for r in rows if r.get("merged")}))
                  + f" --repeats {args.repeats} --merge` (per model); their ratios are to that run's own `equal`.", ""]
    for model_name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model_name}", "", "| method | mode | " + " | ".join(f"K={K} ÷ equal | K={K} ÷ grads" for K in args.tasks) + " | G bytes (K=max) |",
                  "|---|---|" + "---|---|" * len(args.tasks) + "---|"]
        keys = list(dict.fromkeys((r["method"], r["mode"]) for r in rows if r["model"] == model_name))
        for method, mode in keys:
            merged = any(r.get("merged") for r in rows if r["model"] == model_name and r["method"] == method)
            cells = [method + (" *" if merged else ""), mode]
            last_bytes = 0
            for K in args.tasks:
                row = next(r for r in rows if r["model"] == model_name and r["K"] == K and r["method"] == method and r["mode"] == mode)
                cells.append(f"{row['ratio_to_equal']:.2f}")
                cells.append(f"{row['ratio_to_grads']:.2f}" if row["ratio_to_grads"] else "")
                last_bytes = row["jacobian_bytes"]
            cells.append(f"{last_bytes:,}" if last_bytes else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
