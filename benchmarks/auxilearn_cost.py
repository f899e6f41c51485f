"""Cost of AuxiLearn's meta step, in ordinary training steps, and its amortized overhead.

An ordinary step is what every step of training costs: zero_grad, forward, the task losses,
``method.backward`` (one backward of the combined loss) and ``optimizer.step()``. A meta step is
``method.meta_step(context)``: a forward on a ``train`` batch, one on an ``aux`` batch, and the
implicit hypergradient (3 Neumann terms by default) and the combiner update. Both are timed
round-robin on the same model and batches (so that drift of a shared machine hits them alike) and
the medians are kept. The amortized overhead of a meta step every N steps is
(meta / ordinary) / N.

    python benchmarks/auxilearn_cost.py --out benchmarks/results/auxilearn_cost
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from auxilia import Task, methods
from auxilia.methods.base import MetaContext


class MLP(nn.Module):
    def __init__(self, tasks: list[str], width: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(width, 10) for t in tasks})

    def forward(self, x):
        rep = self.encoder(x)
        return {t: h(rep) for t, h in self.heads.items()}


class CNN(nn.Module):
    def __init__(self, tasks: list[str]):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(64 * 16, 10) for t in tasks})

    def forward(self, x):
        rep = self.encoder(x)
        return {t: h(rep) for t, h in self.heads.items()}


class Dense(nn.Module):
    """Pixel-wise tasks: a small fully convolutional encoder, one 1x1 conv head per task."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(32, 1, 1) for t in tasks})

    def forward(self, x):
        rep = self.encoder(x)
        return {t: h(rep).squeeze(1) for t, h in self.heads.items()}


# model, input shape, combiners, task kind
SETTINGS = {
    "mlp": (MLP, (128, 64), ("linear", "nonlinear"), "classification"),
    "cnn": (CNN, (32, 3, 32, 32), ("linear", "nonlinear"), "classification"),
    "dense": (Dense, (8, 3, 32, 32), ("linear", "conv"), "regression"),
}


def build(model_name: str, K: int, combiner: str, seed: int = 0):
    factory, shape, _, kind = SETTINGS[model_name]
    names = [f"t{k}" for k in range(K)]
    make = Task.classification if kind == "classification" else Task.regression
    tasks = [make(t, "primary" if k == 0 else "auxiliary") for k, t in enumerate(names)]
    torch.manual_seed(seed)
    model = factory(names)
    method = methods.create("auxilearn", tasks, combiner=combiner)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(*shape, generator=g)
        if kind == "classification":
            return x, {t: torch.randint(0, 10, (shape[0],), generator=g) for t in names}
        return x, {t: torch.randn(shape[0], *shape[2:], generator=g) for t in names}

    train, aux, meta_train = batch(), batch(), batch()

    def losses(b):
        x, targets = b
        outputs = model(x)
        return {t.name: t.compute_loss(outputs[t.name], targets[t.name], reduction=method.loss_reduction) for t in tasks}

    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    context = MetaContext(losses=losses, train_batch=lambda: meta_train, aux_batch=lambda: aux,
                          shared=shared, heads=heads, learning_rate=1e-3)

    def ordinary():
        optimizer.zero_grad(set_to_none=True)
        method.backward(losses(train), shared, heads)
        optimizer.step()

    def meta():
        method.meta_step(context)

    return ordinary, meta


def measure(repeats: int, warmup: int, Ks: list[int]) -> list[dict]:
    rows = []
    for model_name, (_, _, combiners, _) in SETTINGS.items():
        for K in Ks:
            for combiner in combiners:
                ordinary, meta = build(model_name, K, combiner)
                times: dict[str, list[float]] = {"ordinary": [], "meta": []}
                for i in range(warmup + repeats):
                    for name, fn in (("ordinary", ordinary), ("meta", meta)):
                        start = time.perf_counter()
                        fn()
                        elapsed = time.perf_counter() - start
                        if i >= warmup:
                            times[name].append(elapsed)
                o, m = statistics.median(times["ordinary"]), statistics.median(times["meta"])
                rows.append({
                    "model": model_name, "K": K, "combiner": combiner,
                    "ordinary_ms": 1e3 * o, "meta_ms": 1e3 * m, "meta_in_steps": m / o,
                    "overhead_at_50": m / o / 50,
                })
                print(f"{model_name:5s} K={K} {combiner:9s} ordinary {1e3 * o:8.2f} ms  meta {1e3 * m:8.2f} ms  "
                      f"= {m / o:5.2f} steps  overhead at N=50: {100 * m / o / 50:4.1f}%", flush=True)
    return rows


def write(rows: list[dict], out: Path, repeats: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(), "repeats": repeats}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# AuxiLearn meta-step cost (CPU)",
        "",
        (f"`python benchmarks/auxilearn_cost.py` — torch {meta['torch']}, {meta['machine']}, "
         f"{meta['threads']} thread(s), median of {repeats} round-robin repeats after warm-up. Official settings: "
         "3 Neumann terms, meta step every N = 50 steps. Machine: CPU, 2 cores shared with other jobs "
         "(absolute times drift; the round-robin ratios are what to read)."),
        "",
        ("A meta step is two forwards (a `train` and an `aux` batch), one backward for ∂L_V/∂W, one "
         "graph-building backward for ∂L_T/∂W, 3 Hessian-vector products and one mixed product: about "
         "4 + 2.8·3 ≈ 12 backward-equivalents, against about 1.5–2 for an ordinary step (forward, backward, "
         "optimizer step)."),
        "",
        "| model | K | combiner | ordinary step (ms) | meta step (ms) | meta step ÷ ordinary step | overhead at N = 50 | smallest N under 10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['K']} | {r['combiner']} | {r['ordinary_ms']:.2f} | {r['meta_ms']:.2f} | "
            f"{r['meta_in_steps']:.2f} | {100 * r['overhead_at_50']:.1f}% | {math.floor(10 * r['meta_in_steps']) + 1} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/auxilearn_cost")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--K", type=int, action="append", help="numbers of tasks (default 3 and 6)")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the saved JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.render:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write(saved["rows"], Path(args.out), saved["meta"]["repeats"])
        return
    rows = measure(args.repeats, args.warmup, args.K or [3, 6])
    write(rows, Path(args.out), args.repeats)


if __name__ == "__main__":
    main()
