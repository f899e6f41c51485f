"""The ``auxilia`` command: list methods and experiments, run method × seed grids, report results.

Everything a user chooses is checked before anything trains (:func:`auxilia.experiments.runner.
check_grid`); a refused choice prints one line, ``auxilia: error: ...``, and exits with status 2.
Any other exception is a fault of the library and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed, experiments, methods
from .experiments import UsageError
from .experiments.results import RESULTS, output_path
from .experiments.runner import check_grid, finished_runs, run_key, run_one
from .report import format_table, load_results, plot_primary, plot_weights, summarize

DEFAULT_EXPERIMENT = "toy"
DEFAULT_OUT = "auxilia-results"
USAGE_EXIT = 2  # a refused command line, as argparse's own errors
PEER_LOST_EXIT = 3  # a worker whose collective failed because another worker stopped answering


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` so that every refusal reads alike."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number(kind: Callable[[str], Any], minimum: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: ``kind`` parsed and at least (``strict``: above) ``minimum``."""
    bound = f"{'above' if strict else 'at least'} {minimum:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {bound}, got {text!r}") from None
        if math.isnan(value) or not (value > minimum if strict else value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1, strict=False)
natural = _number(int, 0, strict=False)
positive = _number(float, 0, strict=True)


def _hyperparameter(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def default_methods() -> list[str]:
    """Every registered method, the two references (``stl``, ``equal``) first."""
    references = [name for name in ("stl", "equal") if name in methods.available()]
    return references + [name for name in methods.available() if name not in references]


def _training_arguments(command: argparse.ArgumentParser) -> None:
    """Options ``run`` and ``pareto`` share."""
    command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, ... (default cpu)")
    command.add_argument("--data-dir", default=None,
                         help="where the datasets are (default $AUXILIA_DATA, ./data or ../shared/data)")
    command.add_argument("--budget", type=positive, default=1.0, help="scale of the training length, 1 = protocol")
    command.add_argument("--epochs", type=positive_int, help="training epochs (default: the experiment's)")
    command.add_argument("--max-steps", type=positive_int, help="stop after this many training steps")
    command.add_argument("--no-plots", action="store_true", help="write the table only, no figures")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="auxilia", description="Auxiliary learning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"auxilia {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="methods, experiments, run, report or pareto")

    listing = commands.add_parser("methods", help="list the registered methods")
    listing.add_argument("-v", "--verbose", action="store_true", help="show each method's hyperparameters")
    listing_experiments = commands.add_parser("experiments", help="list the experiments")
    listing_experiments.add_argument("-v", "--verbose", action="store_true",
                                     help="show each experiment's options, their types and defaults")

    run = commands.add_parser("run", help="train methods x seeds on an experiment")
    run.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help=f"default: {DEFAULT_EXPERIMENT}")
    run.add_argument("--method", action="append", dest="methods", metavar="NAME", help="repeatable; default: all")
    run.add_argument("--seeds", type=positive_int, default=3, help="number of seeds, default 3")
    run.add_argument("--first-seed", type=natural, default=0, help="the seeds are FIRST..FIRST+N-1, default 0")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"results directory, default ./{DEFAULT_OUT}")
    run.add_argument("--nproc", type=positive_int, default=1,
                     help="data-parallel processes via torchrun (gloo on CPU, NCCL on CUDA); same results as 1")
    run.add_argument("--timeout", type=positive, default=None,
                     help="with --nproc: seconds a process waits for the others in a collective before the "
                          f"run fails (default $AUXILIA_DIST_TIMEOUT or {distributed.DEFAULT_TIMEOUT_S:g})")
    run.add_argument("--mode", choices=["loop", "batched", "representation"], help="gradient mode of gradient methods")
    run.add_argument("--hp", action="append", type=_hyperparameter, default=[], metavar="NAME=VALUE",
                     help="method hyperparameter (JSON value), applied to the methods that accept it")
    run.add_argument("--option", action="append", type=_hyperparameter, default=[], metavar="NAME=VALUE",
                     help="experiment option (JSON value), e.g. labels=5000; see 'auxilia experiments -v'")
    run.add_argument("--arch", help="architecture, for experiments with an 'arch' option (e.g. scenes: shared, "
                                    "aux-g-stage, aux-g-layer, aux-nas); combines with any --method")
    run.add_argument("--batch-size", type=positive_int, help="training batch size (default: the experiment's)")
    run.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    run.add_argument("--progress", action="store_true", help="progress bars (needs tqdm)")
    _training_arguments(run)

    report = commands.add_parser("report", help="print the table and redraw the plots of a results directory")
    report.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"results directory, default ./{DEFAULT_OUT}")
    report.add_argument("--experiment", help="only this experiment (default: every one in the results)")
    report.add_argument("--no-plots", action="store_true", help="write the table only, no figures")

    pareto = commands.add_parser("pareto", help="fixed-preference AuxiNash sweep vs Nash-MTL seeds on a two-task experiment")
    pareto.add_argument("experiment", nargs="?", default="multimnist", help="default: multimnist")
    pareto.add_argument("--points", type=_number(int, 2, strict=False), default=11,
                        help="preference vectors, and Nash-MTL seeds (default 11)")
    pareto.add_argument("--seed", type=natural, default=0,
                        help="seed of the fixed-preference runs; Nash-MTL uses seed..seed+points-1")
    pareto.add_argument("--out", default="auxilia-pareto", help="results directory, default ./auxilia-pareto")
    _training_arguments(pareto)
    return parser


def _check_device(device: str) -> None:
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device (cpu, cuda, cuda:N, mps, ...)") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch has no CUDA device available")


def _pareto(args: argparse.Namespace) -> int:
    from .experiments.pareto import report_sweep, run_sweep, sweep_runs

    experiment = experiments.get(args.experiment)
    _check_device(args.device)
    output_path(args.out, RESULTS)
    runs = sweep_runs(args.points, args.seed)
    for method, _, hp in runs[:1] + runs[-1:]:
        check_grid(experiment, [method], seed=args.seed, data_dir=args.data_dir, budget=args.budget,
                   hyperparameters=hp)
    overrides = {"epochs": args.epochs, "max_steps": args.max_steps}
    run_sweep(experiment, args.out, points=args.points, seed=args.seed, budget=args.budget, device=args.device,
              data_dir=args.data_dir, trainer_overrides=overrides)
    print(report_sweep(args.out, experiment.name, plots=not args.no_plots))
    return 0


def _report_paths(out: str | Path, experiment_name: str) -> dict[str, Path]:
    """Where ``_report`` writes the table and the figures (refused if a link is in the way)."""
    return {kind: output_path(out, f"{experiment_name}_{kind}") for kind in ("table.md", "primary.png", "weights.png")}


def _report(out: Path, experiment_name: str, plots: bool) -> str:
    paths = _report_paths(out, experiment_name)
    records = load_results(out)
    experiment = experiments.get(experiment_name)
    mine = [r for r in records if r["experiment"] == experiment_name]
    if not mine:
        raise UsageError(f"no results for experiment {experiment_name!r} in {out}")
    primary_name = mine[0]["primary_metric_name"]
    rows = summarize(mine, experiment_name, experiment.report_metrics)
    table = format_table(rows, primary_name, experiment.report_metrics)
    paths["table.md"].write_text(table + "\n")
    print(f"\n{experiment_name}: mean ± std over seeds ({out / RESULTS})\n{table}")
    if plots:
        try:
            written = [plot_primary(rows, primary_name, paths["primary.png"]),
                       plot_weights(mine, experiment_name, paths["weights.png"])]
            print("plots: " + ", ".join(str(p) for p in written if p is not None))
        except ImportError as error:
            print(f"(no plots: {error})")
    return table


def _plan(args: argparse.Namespace) -> tuple[experiments.Experiment, list[str], dict[str, Any], dict[str, Any]]:
    """The experiment, methods, hyperparameters and options of ``run``, every one checked."""
    experiment = experiments.get(args.experiment)
    names = args.methods or default_methods()
    hyperparameters = dict(args.hp)
    if args.mode:
        hyperparameters["mode"] = args.mode
    options = dict(args.option)
    if args.arch is not None:
        if "arch" not in experiment.options():
            raise UsageError(f"experiment {experiment.name!r} has no architecture choice (--arch)")
        options["arch"] = args.arch
    _check_device(args.device)
    output_path(args.out, RESULTS)
    output_path(args.out, "runs", experiment.name)
    _report_paths(args.out, experiment.name)
    check_grid(experiment, names, seed=args.first_seed, data_dir=args.data_dir, budget=args.budget,
               hyperparameters=hyperparameters, options=options)
    return experiment, names, hyperparameters, options


def _run(args: argparse.Namespace) -> int:
    experiment, names, hyperparameters, options = _plan(args)
    out = Path(args.out)
    trainer_overrides = {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                         "progress": args.progress or None,
                         "amp": args.amp or None}
    device = args.device
    if distributed.init_from_environment(device, timeout=args.timeout) and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    main_process = distributed.is_main()
    done = finished_runs(out)  # read once, before rank 0 appends: every process runs the same grid
    for name in names:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            key = run_key(experiment.name, name, seed, args.budget, hyperparameters, trainer_overrides, options,
                          device=device)
            if key in done:
                if main_process:
                    print(f"{experiment.name} {name:12s} seed {seed}: already in {out / RESULTS}, skipped")
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


def _launch(nproc: int, argv: list[str], timeout: float | None) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine; a failed worker
    is named in one line."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest, skip = [], False
    for arg in argv:  # the workers learn their number from torchrun's environment, not from --nproc
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    launch = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "auxilia.cli", *rest])
    try:
        torchrun.run(launch)
    except ChildFailedError as error:
        print(f"auxilia: error: {_describe_failure(error.failures, nproc, timeout)}", file=sys.stderr)
        return 1
    return 0


def _describe_failure(failures: dict[int, Any], nproc: int, timeout: float | None) -> str:
    """Which worker stopped the run: one that failed on its own (an exception, a signal), else the
    ones the waiting workers timed out on (or lost the connection to)."""
    terminated = -int(signal.SIGTERM)  # how the launcher stops the others once one has failed
    own = {rank: f for rank, f in failures.items() if f.exitcode not in (PEER_LOST_EXIT, terminated)}
    if own:
        rank, failure = min(own.items(), key=lambda item: item[1].timestamp)
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"worker rank {rank} of {nproc} {how}; the run stopped (its messages are above)"
    waiting = sorted(rank for rank, f in failures.items() if f.exitcode == PEER_LOST_EXIT)
    if waiting:
        stopped = [rank for rank in range(nproc) if rank not in waiting]
        names = ", ".join(map(str, stopped)) or "unknown"
        return (f"worker rank {names} of {nproc} stopped answering: rank {', '.join(map(str, waiting))} gave up "
                f"waiting for it in a collective (a closed connection, or --timeout "
                f"{distributed.collective_timeout(timeout):g} s)")
    return "workers " + ", ".join(f"{rank} (status {f.exitcode})" for rank, f in sorted(failures.items())) + " failed"


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as ``auxilia: warning: ...`` lines on stderr while the command runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *_, **__: print(f"auxilia: warning: {message}", file=sys.stderr)
        yield


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "methods":
        for name in methods.available():
            if args.verbose:
                hp = ", ".join(f"{k}={v!r}" for k, v in methods.hyperparameters(name).items())
                print(f"{name:14s} {hp}")
            else:
                print(name)
        return 0
    if args.command == "experiments":
        from .experiments.base import describe_type

        for name in experiments.available():
            experiment = experiments.get(name)
            print(f"{name:18s} {experiment.description}")
            if args.verbose and experiment.options():
                types = experiment.option_types()
                print(" " * 19 + "options: " + ", ".join(
                    f"{k}: {describe_type(types[k])} = {v!r}" for k, v in experiment.options().items()))
        return 0
    if args.command == "run":
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            _plan(args)  # refuse a mistake once, here, rather than in every worker
            return _launch(args.nproc, argv, args.timeout)
        return _run_in_group(args)
    if args.command == "pareto":
        return _pareto(args)
    if args.command == "report":
        out = Path(args.out)
        names = [args.experiment] if args.experiment else list(dict.fromkeys(r["experiment"] for r in load_results(out)))
        for name in names:
            _report(out, name, plots=not args.no_plots)
        return 0
    return USAGE_EXIT


def _run_in_group(args: argparse.Namespace) -> int:
    """``run`` in this process. Under torchrun a failing worker reports and ends at once, with
    :data:`PEER_LOST_EXIT` (and one line) when a collective failed for want of another worker: the
    group cannot be left cleanly once a process is missing, and the launcher names the culprit
    from the exit statuses (:func:`_describe_failure`)."""
    try:
        status = _run(args)
    except Exception as error:
        if not distributed.is_distributed():
            raise
        where = f"rank {distributed.rank()}"
        if distributed.lost_peer(error):
            print(f"auxilia: error: {where}: {error}", file=sys.stderr)
            code = PEER_LOST_EXIT
        elif isinstance(error, UsageError):
            print(f"auxilia: error: {where}: {error}", file=sys.stderr)
            code = USAGE_EXIT
        else:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if distributed.is_distributed():
        distributed.barrier()
        distributed.destroy()
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _one_line_warnings():
            args = build_parser().parse_args(argv)
            return _command(args, argv)
    except UsageError as error:
        print(f"auxilia: error: {error}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
