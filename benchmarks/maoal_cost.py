"""What a MAOAL step costs: backward passes, time and peak memory, against two references.

* backward passes: every ``torch.autograd.grad`` / ``backward`` call is counted during one ordinary
  step and one meta step, and compared with the supplement's O(N + N/T) per step (N losses);
* time: the ordinary step as a ratio to the K per-task gradients it needs (forward + K backward
  passes, no weighting; target ≤ 1.5x), the amortized step (one meta step every T), and the
  approach of the official code, which builds the second-order graph of the K per-task gradients
  at *every* step (implemented here only, on the same model and batch, in the same run);
* peak memory: the peak resident set of a fresh process running one step of each variant, minus
  its resident set before the step (CPU), or CUDA's peak allocation on GPU.

Two models: MAOAL's CIFAR ConvNet with the rotation auxiliary (modules conv1..conv4) and AutoInt
with the L2-penalty auxiliary (modules embedding, block1..block4), on random data of the
experiments' shapes.

    OMP_NUM_THREADS=1 python benchmarks/maoal_cost.py --out benchmarks/results/maoal_cost
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from auxilia import Task, methods
from auxilia.gradients import jacobian, write_gradient
from auxilia.methods.base import MetaContext
from auxilia.models import (
    MultiTaskModel,
    SelfSupervisedViews,
    Squeeze,
    autoint_encoder,
    maoal_convnet,
    mlp_head,
)


# ---------------------------------------------------------------------- models and batches
def convnet(batch: int):
    torch.manual_seed(0)
    model = SelfSupervisedViews(maoal_convnet(), {"label": nn.Linear(2048, 10), "rotation": nn.Linear(2048, 4)}, "label")
    tasks = [Task.classification("label", role="primary"), Task.classification("rotation")]
    g = torch.Generator().manual_seed(0)

    def draw():
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
        return x, {"label": torch.randint(0, 10, (batch,), generator=g), "rotation": torch.arange(4).expand(batch, 4)}

    return model, tasks, draw


class _Penalty(MultiTaskModel):
    def forward(self, x):
        out = super().forward(x)
        shared = self.shared_parameters()
        penalty = sum(p.pow(2).sum() for p in shared) / sum(p.numel() for p in shared)
        out["l2"] = penalty.expand(x.shape[0])  # per sample, like the movielens experiment
        return out


def autoint(batch: int, fields: int = 5, embeddings: int = 2_700):
    torch.manual_seed(0)
    model = _Penalty(autoint_encoder(embeddings), {"rating": nn.Sequential(mlp_head(16 * fields, 1), Squeeze())})
    tasks = [Task.regression("rating", role="primary"), Task("l2", lambda out, target: out)]
    g = torch.Generator().manual_seed(0)

    def draw():
        x = torch.randint(0, embeddings, (batch, fields), generator=g)
        return x, {"rating": torch.rand(batch, generator=g) * 4 + 1, "l2": torch.zeros(batch)}

    return model, tasks, draw


MODELS = {"convnet": convnet, "autoint": autoint}


def _losses(model, tasks, batch):
    x, y = batch
    out = model(x)
    return {t.name: t.compute_loss(out[t.name].float(), y[t.name]) for t in tasks}


# ---------------------------------------------------------------------- the step variants
class Setup:
    def __init__(self, name: str, batch: int, meta_every: int, look_back: int):
        self.model, self.tasks, self.draw = MODELS[name](batch)
        self.shared, self.heads = self.model.shared_parameters(), self.model.task_parameters()
        self.method = methods.create("maoal", self.tasks, meta_every=meta_every, look_back=look_back).attach_model(self.model)
        self.batches = [self.draw() for _ in range(3)]
        self.lr = 0.01

    def context(self) -> MetaContext:
        return MetaContext(losses=lambda b: _losses(self.model, self.tasks, b), train_batch=lambda: self.batches[1],
                           aux_batch=lambda: self.batches[2], shared=self.shared, heads=self.heads, learning_rate=self.lr)

    def zero(self):
        for p in self.model.parameters():
            p.grad = None

    def equal(self):
        self.zero()
        sum(_losses(self.model, self.tasks, self.batches[0]).values()).backward()

    def per_task(self):
        """The K per-task gradients MAOAL needs, written unweighted: its cost floor."""
        self.zero()
        losses = list(self.method.tasks.ordered(_losses(self.model, self.tasks, self.batches[0])))
        params = [*self.shared, *self.heads]
        write_gradient(jacobian(losses, params, "loop", retain_graph=False).sum(0), params)

    def maoal(self):
        self.zero()
        self.method.backward(_losses(self.model, self.tasks, self.batches[0]), self.shared, self.heads)

    def meta(self):
        self.method.meta_gradient(self.context())

    def official(self):
        """The official code's ordinary step: per-task gradients with create_graph=True at every step,
        combined with relu(w) as a graph-connected tensor (kept for a later meta step)."""
        self.zero()
        with sdpa_kernel([SDPBackend.MATH]):
            losses = list(self.method.tasks.ordered(_losses(self.model, self.tasks, self.batches[0])))
            params = [*self.shared, *self.heads]
            w = self.method.w.detach().clone().requires_grad_(True)
            C = torch.cat([torch.ones(1, w.shape[1]), torch.relu(w)])
            grads = [torch.autograd.grad(loss, params, create_graph=True, allow_unused=True) for loss in losses]
            modules = self.method.module_of.tolist()
            for j, p in enumerate(params):
                parts = [(k, g[j]) for k, g in enumerate(grads) if g[j] is not None]
                if j < len(self.shared):
                    p.grad = sum(C[k, modules[j]] * g for k, g in parts).detach()
                else:
                    p.grad = sum(g for _, g in parts).detach()
            self._kept = (grads, w)  # the official code keeps the graph alive until the update


# ---------------------------------------------------------------------- counting, timing, memory
class Counter:
    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self._grad, self._backward = torch.autograd.grad, torch.autograd.backward
        counter = self

        def grad(*args, **kwargs):
            counter.calls += 1
            return counter._grad(*args, **kwargs)

        def backward(*args, **kwargs):
            counter.calls += 1
            return counter._backward(*args, **kwargs)

        torch.autograd.grad, torch.autograd.backward = grad, backward
        return self

    def __exit__(self, *exc):
        torch.autograd.grad, torch.autograd.backward = self._grad, self._backward


def count(setup: Setup, variant: str) -> int:
    with Counter() as c:
        getattr(setup, variant)()
    return c.calls


def timed(setup: Setup, variant: str, repeats: int) -> float:
    fn = getattr(setup, variant)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    setup._kept = None
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_child(name, batch, meta_every, look_back, variant, queue):
    """Peak resident set during one step above the resident set just before it, sampled every
    0.2 ms by a thread (torch kernels release the GIL); CUDA's peak allocation on GPU."""
    import threading

    torch.set_num_threads(1)
    setup = Setup(name, batch, meta_every, look_back)
    before = _rss()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    getattr(setup, variant)()
    peak[0] = max(peak[0], _rss())
    done.set()
    sampler.join()
    queue.put(peak[0] - before)


def peak_memory(name, batch, meta_every, look_back, variant) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_peak_child, args=(name, batch, meta_every, look_back, variant, queue))
    process.start()
    value = queue.get(timeout=900)
    process.join()
    return int(value)


def measure(name: str, batch: int, meta_every: int, look_back: int, repeats: int) -> dict:
    setup = Setup(name, batch, meta_every, look_back)
    K = len(setup.tasks)
    out = {"model": name, "batch": batch, "K": K, "T": meta_every, "M_lb": look_back,
           "modules": setup.method.module_names,
           "shared_parameters": sum(p.numel() for p in setup.shared)}
    out["calls"] = {v: count(setup, v) for v in ("equal", "per_task", "maoal", "meta", "official")}
    out["time_s"] = {v: timed(setup, v, repeats) for v in ("equal", "per_task", "maoal", "official")}
    out["time_s"]["meta"] = timed(setup, "meta", max(1, repeats // 2))
    out["peak_rss_bytes"] = {v: peak_memory(name, batch, meta_every, look_back, v) for v in ("per_task", "maoal", "official", "meta")}
    return out


def report(rows: list[dict]) -> str:
    lines = [
        (
            "| model | batch | K | T | M_lb | backward calls: ordinary / meta / per step (amortized) "
            "| O(N + N/T) | ordinary ÷ per-task | amortized ÷ per-task | official ÷ ours (ordinary) "
            "| official ÷ ours (amortized) | meta ÷ ordinary | peak RSS Δ per-task / ours / official / meta (MiB) |"
        ),
        "|" + "---|" * 13,
    ]
    for r in rows:
        t, c, m = r["time_s"], r["calls"], r["peak_rss_bytes"]
        T = r["T"]
        amortized = t["maoal"] + t["meta"] / T
        # the official meta step may reuse the graph its ordinary step kept: credit it with that
        official_amortized = t["official"] + max(t["meta"] - t["official"], 0.0) / T
        per_step_calls = c["maoal"] + c["meta"] / T
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['K']} | {T} | {r['M_lb']} | {c['maoal']} / {c['meta']} / {per_step_calls:.2f} | "
            f"{r['K']} + {r['K']}/{T} = {r['K'] + r['K'] / T:.2f} | {t['maoal'] / t['per_task']:.2f} | {amortized / t['per_task']:.2f} | "
            f"{t['official'] / t['maoal']:.2f} | {official_amortized / amortized:.2f} | {t['meta'] / t['maoal']:.1f} | "
            f"{m['per_task'] / 2**20:.0f} / {m['maoal'] / 2**20:.0f} / {m['official'] / 2**20:.0f} / {m['meta'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--meta-every", type=int, default=20)
    parser.add_argument("--look-back", type=int, default=3)
    parser.add_argument("--convnet-batch", type=int, default=32)
    parser.add_argument("--autoint-batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure("convnet", args.convnet_batch, args.meta_every, args.look_back, args.repeats),
            measure("autoint", args.autoint_batch, args.meta_every, args.look_back, args.repeats)]
    table = report(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": 1, "args": vars(args)}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
