"""Run methods × seeds on an experiment and append one JSON record per run to ``results.jsonl``.

A method that is itself a search (``search_space`` returns candidates, e.g. ``hpo-random``) trains
one run per candidate and keeps the one best on ``val``; ``test`` is read only for the kept run's
report, never to choose.

:func:`check_grid` validates a whole grid (options, hyperparameters, data) before anything trains,
so that a mistake fails at once instead of after the runs before it. Every record carries what is
needed to tell where it came from: the auxilia version, the git commit of the package's checkout
(``None`` when it is not one), the device, the start time (ISO 8601, UTC) and the wall time.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import platform
import subprocess
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__, distributed
from .. import methods as method_registry
from ..data import DatasetCorrupt, DatasetMissing
from ..training.trainer import FitResult, Trainer
from .base import Experiment, Setup, UsageError
from .results import (
    RESULTS,
    append_record,
    finished_runs,
    jsonable,
    output_path,
    refuse_links_under,
    run_key,
)

__all__ = ["check_grid", "finished_runs", "method_hyperparameters", "run_key", "run_one"]


def method_hyperparameters(
    name: str, experiment_defaults: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The experiment's defaults for ``name``, then the user's overrides that this method accepts."""
    accepted = method_registry.hyperparameters(name)
    chosen = dict(experiment_defaults.get(name, {}))
    chosen.update({k: v for k, v in overrides.items() if k in accepted})
    return chosen


def check_grid(
    experiment: Experiment,
    method_names: Iterable[str],
    *,
    seed: int = 0,
    data_dir: str | Path | None = None,
    budget: float = 1.0,
    hyperparameters: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`UsageError` for anything in the grid that would fail: an unknown method, a
    hyperparameter no chosen method accepts or one a method refuses, an option the experiment does
    not declare or of the wrong type, missing or damaged data. Builds the experiment once (for
    ``seed``) and every method for its tasks; trains nothing."""
    names = list(method_names)
    overrides = dict(hyperparameters or {})
    options = dict(options or {})
    for name in names:
        try:
            method_registry.get(name)
        except ValueError as error:
            raise UsageError(str(error)) from None
    for key in overrides:
        if not any(key in method_registry.hyperparameters(name) for name in names):
            raise UsageError(f"no chosen method ({', '.join(names)}) accepts hyperparameter {key!r}; "
                             "see 'auxilia methods -v'")
    experiment.check_options(options)
    try:
        setup = experiment.setup(seed, data_dir, budget, **options)
    except (ValueError, TypeError, KeyError, DatasetMissing, DatasetCorrupt) as error:
        shown = " ".join(f"{k}={json.dumps(jsonable(v))}" for k, v in options.items())
        raise UsageError(f"experiment {experiment.name!r}{' with ' + shown if shown else ''}: {error}") from None
    for name in names:
        hp = method_hyperparameters(name, setup.method_defaults, overrides)
        try:
            method_registry.create(name, setup.tasks, **hp)
        except (ValueError, TypeError, KeyError) as error:
            raise UsageError(f"method {name!r}: {error}") from None


def _train(
    setup: Setup,
    method_name: str,
    hp: Mapping[str, Any],
    *,
    device: str,
    log_dir: Path | None,
    trainer_overrides: Mapping[str, Any],
) -> tuple[FitResult, Trainer]:
    method = method_registry.create(method_name, setup.tasks, **hp)
    config = setup.config
    for key, value in trainer_overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.device = device
    config.__post_init__()
    trainer = Trainer(
        setup.model, method, setup.datasets, setup.optimizer, config,
        scheduler=setup.scheduler, log_dir=log_dir, metrics_fn=setup.metrics_fn,
    )
    return trainer.fit(), trainer


def run_one(
    experiment: Experiment,
    method_name: str,
    seed: int,
    *,
    out: str | Path,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    budget: float = 1.0,
    hyperparameters: Mapping[str, Any] | None = None,
    trainer_overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``method_name`` on ``experiment`` with ``seed``; append and return the result record
    (not appended when another process recorded the same run meanwhile)."""
    out = Path(out)
    overrides = dict(hyperparameters or {})
    options = dict(options or {})
    trainer_overrides = dict(trainer_overrides or {})
    label = f"{options['arch']}/{method_name}" if options.get("arch") else method_name
    run_dir = output_path(out, "runs", experiment.name, *label.split("/"), f"seed{seed}")
    refuse_links_under(out, run_dir)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()

    setup = experiment.setup(seed, data_dir, budget, **options)
    hp = method_hyperparameters(method_name, setup.method_defaults, overrides)
    candidates = method_registry.create(method_name, setup.tasks, **hp).search_space(
        torch.Generator().manual_seed(seed)
    )

    search: list[dict[str, Any]] = []
    if candidates:
        best: tuple[float, FitResult, dict[str, Any], Trainer] | None = None
        for index, candidate in enumerate(candidates):
            if index > 0:  # every trial starts from the same, freshly built model
                setup = experiment.setup(seed, data_dir, budget, **options)
            trial_hp = {**hp, **candidate}
            result, trainer = _train(
                setup, method_name, trial_hp, device=device,
                log_dir=run_dir / f"trial{index}", trainer_overrides=trainer_overrides,
            )
            value = result.metrics.get("val", {}).get(result.primary_metric, math.nan)
            search.append({"hyperparameters": jsonable(candidate), "val": value})
            better = best is None or (
                math.isfinite(value)
                and (not math.isfinite(best[0]) or (value > best[0] if _higher(trainer) else value < best[0]))
            )
            if better:
                best = (value, result, trial_hp, trainer)
        assert best is not None
        _, result, hp, trainer = best
    else:
        result, trainer = _train(
            setup, method_name, hp, device=device, log_dir=run_dir, trainer_overrides=trainer_overrides
        )

    config = trainer.config
    record: dict[str, Any] = {
        "run_key": run_key(experiment.name, method_name, seed, budget, overrides, trainer_overrides, options,
                           device=device),
        "experiment": experiment.name,
        "method": method_name,
        "label": label,
        "seed": seed,
        "primary_metric": result.metrics.get("test", {}).get(result.primary_metric, math.nan),
        "primary_metric_name": f"test/{result.primary_metric}",
        "higher_is_better": _higher(trainer),
        "metrics": result.metrics,
        "weights": result.weights,
        "weights_history": result.weights_history,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "skipped_meta_steps": result.skipped_meta_steps,
        "best_epoch": result.best_epoch,
        "time_per_step_s": result.time_per_step_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "wall_time_s": time.perf_counter() - started,
        "started_at": started_at,
        **provenance(),
        "config": {
            "hyperparameters": jsonable(hp),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "max_steps": config.max_steps,
            "budget": budget,
            "options": jsonable(options),
            "notes": setup.notes,
            "device": device,
            "device_name": _device_name(device),
            "world_size": distributed.world_size(),
            "amp": config.amp,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "search": search or None,
        },
    }
    # under torchrun every process trained; rank 0 holds the results
    if distributed.is_main() and not append_record(out, jsonable(record)):
        warnings.warn(f"{out / RESULTS}: {experiment.name} {label} seed {seed} was recorded meanwhile by "
                      "another process; that record is kept", stacklevel=2)
    return record


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The auxilia version, and the commit of the git checkout the package is imported from
    (``None`` when it is not in one, e.g. installed from a wheel, or git is missing) with whether
    tracked files differ from it."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=package, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    commit, dirty = None, None
    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # a checkout of this package, not one it sits in
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"auxilia_version": __version__, "git_commit": commit, "git_dirty": dirty}


def _device_name(device: str) -> str:
    where = torch.device(device)
    if where.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(where)
    return platform.processor() or platform.machine()


def _higher(trainer: Trainer) -> bool:
    primary = trainer.tasks.primary
    return bool(primary.higher_is_better and primary.metrics)
