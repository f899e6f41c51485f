"""The ``auxilia`` command: list methods and experiments, run method × seed grids, report results."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import distributed, experiments, methods
from .experiments.runner import finished_runs, run_key, run_one
from .report import format_table, load_results, plot_primary, plot_weights, summarize

DEFAULT_EXPERIMENT = "toy"
DEFAULT_OUT = "auxilia-results"


def _hyperparameter(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def default_methods() -> list[str]:
    """Every registered method, the two references (``stl``, ``equal``) first."""
    references = [name for name in ("stl", "equal") if name in methods.available()]
    return references + [name for name in methods.available() if name not in references]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auxilia", description="Auxiliary learning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("methods", help="list the registered methods")
    listing.add_argument("-v", "--verbose", action="store_true", help="show each method's hyperparameters")
    listing_experiments = commands.add_parser("experiments", help="list the experiments")
    listing_experiments.add_argument("-v", "--verbose", action="store_true", help="show each experiment's options")

    run = commands.add_parser("run", help="train methods x seeds on an experiment")
    run.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=f"default: {DEFAULT_EXPERIMENT}")
    run.add_argument("--method", action="append", dest="methods", metavar="NAME", help="repeatable; default: all")
    run.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    run.add_argument("--first-seed", type=int, default=0)
    run.add_argument("--out", default=DEFAULT_OUT, help=f"results directory, default ./{DEFAULT_OUT}")
    run.add_argument("--device", default="cpu")
    run.add_argument("--nproc", type=int, default=1,
                     help="data-parallel processes via torchrun (gloo on CPU, NCCL on CUDA); same results as 1")
    run.add_argument("--data-dir", default=None, help="where the datasets are")
    run.add_argument("--budget", type=float, default=1.0, help="scale of the training length, 1 = protocol")
    run.add_argument("--mode", choices=["loop", "batched", "representation"], help="gradient mode of gradient methods")
    run.add_argument("--hp", action="append", type=_hyperparameter, default=[], metavar="NAME=VALUE",
                     help="method hyperparameter (JSON value), applied to the methods that accept it")
    run.add_argument("--option", action="append", type=_hyperparameter, default=[], metavar="NAME=VALUE",
                     help="experiment option (JSON value), e.g. labels=5000; see 'auxilia experiments -v'")
    run.add_argument("--arch", help="architecture, for experiments with an 'arch' option (e.g. scenes: shared, "
                                    "aux-g-stage, aux-g-layer, aux-nas); combines with any --method")
    run.add_argument("--epochs", type=int)
    run.add_argument("--max-steps", type=int)
    run.add_argument("--batch-size", type=int, help="training batch size (default: the experiment's)")
    run.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    run.add_argument("--progress", action="store_true", help="progress bars (needs tqdm)")
    run.add_argument("--no-plots", action="store_true")

    report = commands.add_parser("report", help="print the table and redraw the plots of a results directory")
    report.add_argument("out", nargs="?", default=DEFAULT_OUT)
    report.add_argument("--experiment")
    report.add_argument("--no-plots", action="store_true")

    pareto = commands.add_parser("pareto", help="fixed-preference AuxiNash sweep vs Nash-MTL seeds on a two-task experiment")
    pareto.add_argument("experiment", nargs="?", default="multimnist", help="default: multimnist")
    pareto.add_argument("--points", type=int, default=11, help="preference vectors, and Nash-MTL seeds (default 11)")
    pareto.add_argument("--seed", type=int, default=0, help="seed of the fixed-preference runs; Nash-MTL uses seed..seed+points-1")
    pareto.add_argument("--out", default="auxilia-pareto")
    pareto.add_argument("--device", default="cpu")
    pareto.add_argument("--data-dir", default=None)
    pareto.add_argument("--budget", type=float, default=1.0, help="scale of the training length, 1 = protocol")
    pareto.add_argument("--epochs", type=int)
    pareto.add_argument("--max-steps", type=int)
    pareto.add_argument("--no-plots", action="store_true")
    return parser


def _pareto(args: argparse.Namespace) -> int:
    from .experiments.pareto import report_sweep, run_sweep

    experiment = experiments.get(args.experiment)
    overrides = {"epochs": args.epochs, "max_steps": args.max_steps}
    run_sweep(experiment, args.out, points=args.points, seed=args.seed, budget=args.budget, device=args.device,
              data_dir=args.data_dir, trainer_overrides=overrides)
    print(report_sweep(args.out, experiment.name, plots=not args.no_plots))
    return 0


def _report(out: Path, experiment_name: str, plots: bool) -> str:
    records = load_results(out)
    experiment = experiments.get(experiment_name)
    mine = [r for r in records if r["experiment"] == experiment_name]
    if not mine:
        raise SystemExit(f"no results for experiment {experiment_name!r} in {out}")
    primary_name = mine[0]["primary_metric_name"]
    rows = summarize(mine, experiment_name, experiment.report_metrics)
    table = format_table(rows, primary_name, experiment.report_metrics)
    (out / f"{experiment_name}_table.md").write_text(table + "\n")
    print(f"\n{experiment_name}: mean ± std over seeds ({out / 'results.jsonl'})\n{table}")
    if plots:
        try:
            written = [plot_primary(rows, primary_name, out / f"{experiment_name}_primary.png"),
                       plot_weights(mine, experiment_name, out / f"{experiment_name}_weights.png")]
            print("plots: " + ", ".join(str(p) for p in written if p is not None))
        except ImportError as error:
            print(f"(no plots: {error})")
    return table


def _run(args: argparse.Namespace) -> int:
    experiment = experiments.get(args.experiment)
    names = args.methods or default_methods()
    for name in names:
        methods.get(name)  # unknown names fail before any training
    hyperparameters = dict(args.hp)
    if args.mode:
        hyperparameters["mode"] = args.mode
    for key in hyperparameters:
        if not any(key in methods.hyperparameters(name) for name in names):
            raise SystemExit(f"none of the methods {names} accepts hyperparameter {key!r}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    options = dict(args.option)
    if args.arch is not None:
        if "arch" not in experiment.options():
            raise SystemExit(f"experiment {experiment.name!r} has no architecture choice (--arch)")
        options["arch"] = args.arch
    unknown = sorted(set(options) - set(experiment.options()))
    if unknown:
        raise SystemExit(f"experiment {experiment.name!r} has no option {unknown[0]!r}; options: {experiment.options()}")
    out = Path(args.out)
    trainer_overrides = {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                         "progress": args.progress or None,
                         "amp": args.amp or None}
    device = args.device
    if distributed.init_from_environment(device) and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    main_process = distributed.is_main()
    done = finished_runs(out)  # read once, before rank 0 appends: every process runs the same grid
    for name in names:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if run_key(experiment.name, name, seed, args.budget, hyperparameters, trainer_overrides, options) in done:
                if main_process:
                    print(f"{experiment.name} {name:12s} seed {seed}: already in {out / 'results.jsonl'}, skipped")
                continue
            record = run_one(
                experiment, name, seed, out=out, device=device, data_dir=args.data_dir, budget=args.budget,
                hyperparameters=hyperparameters, trainer_overrides=trainer_overrides, options=options,
            )
            if not main_process:
                continue
            extra = " ".join(f"{m}={record['metrics'].get('test', {}).get(m, float('nan')):.4g}" for m in experiment.report_metrics)
            print(f"{experiment.name} {name:12s} seed {seed}: {record['primary_metric_name']}="
                  f"{record['primary_metric']:.4g} {extra} ({record['wall_time_s']:.1f}s)", flush=True)
    if main_process:
        _report(out, experiment.name, plots=not args.no_plots)
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    if nproc < 1:
        raise SystemExit("--nproc must be at least 1")
    rest, skip = [], False
    for arg in argv:  # the workers learn their number from torchrun's environment, not from --nproc
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "auxilia.cli", *rest]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        for name in methods.available():
            if args.verbose:
                hp = ", ".join(f"{k}={v!r}" for k, v in methods.hyperparameters(name).items())
                print(f"{name:14s} {hp}")
            else:
                print(name)
        return 0
    if args.command == "experiments":
        for name in experiments.available():
            experiment = experiments.get(name)
            print(f"{name:18s} {experiment.description}")
            if args.verbose and experiment.options():
                print(" " * 19 + "options: " + ", ".join(f"{k}={v!r}" for k, v in experiment.options().items()))
        return 0
    if args.command == "run":
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(args.nproc, argv)
        try:
            return _run(args)
        finally:
            if distributed.is_distributed():
                distributed.barrier()
                distributed.destroy()
    if args.command == "pareto":
        return _pareto(args)
    if args.command == "report":
        out = Path(args.out)
        names = [args.experiment] if args.experiment else list(dict.fromkeys(r["experiment"] for r in load_results(out)))
        for name in names:
            _report(out, name, plots=not args.no_plots)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
