"""Run methods × seeds on an experiment and append one JSON record per run to ``results.jsonl``.

A method that is itself a search (``search_space`` returns candidates, e.g. ``hpo-random``) trains
one run per candidate and keeps the one best on ``val``; ``test`` is read only for the kept run's
report, never to choose.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .. import methods as method_registry
from ..training.trainer import FitResult, Trainer
from .base import Experiment, Setup


def method_hyperparameters(
    name: str, experiment_defaults: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The experiment's defaults for ``name``, then the user's overrides that this method accepts."""
    accepted = method_registry.hyperparameters(name)
    chosen = dict(experiment_defaults.get(name, {}))
    chosen.update({k: v for k, v in overrides.items() if k in accepted})
    return chosen


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


def run_key(
    experiment: str, method: str, seed: int, budget: float,
    hyperparameters: Mapping[str, Any], trainer_overrides: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
) -> str:
    """Identifies a run in ``results.jsonl``, so that a grid can resume without redoing finished runs."""
    settings = {k: v for k, v in trainer_overrides.items() if v is not None and k not in ("progress",)}
    parts = [experiment, method, seed, budget, _jsonable(hyperparameters), _jsonable(settings)]
    if options:
        parts.append(_jsonable(options))
    return json.dumps(parts, sort_keys=True)


def finished_runs(out: str | Path) -> set[str]:
    path = Path(out) / "results.jsonl"
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            key = json.loads(line).get("run_key")
            if key:
                keys.add(key)
    return keys


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
    """Train ``method_name`` on ``experiment`` with ``seed``; append and return the result record."""
    out = Path(out)
    overrides = dict(hyperparameters or {})
    options = dict(options or {})
    trainer_overrides = dict(trainer_overrides or {})
    label = f"{options['arch']}/{method_name}" if options.get("arch") else method_name
    run_dir = out / "runs" / experiment.name / label / f"seed{seed}"
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
            search.append({"hyperparameters": _jsonable(candidate), "val": value})
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
        "run_key": run_key(experiment.name, method_name, seed, budget, overrides, trainer_overrides, options),
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
        "config": {
            "hyperparameters": _jsonable(hp),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "max_steps": config.max_steps,
            "budget": budget,
            "options": _jsonable(options),
            "notes": setup.notes,
            "device": device,
            "amp": config.amp,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "search": search or None,
        },
    }
    if distributed.is_main():  # under torchrun every process trained; rank 0 holds the results
        out.mkdir(parents=True, exist_ok=True)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
    return record


def _higher(trainer: Trainer) -> bool:
    primary = trainer.tasks.primary
    return bool(primary.higher_is_better and primary.metrics)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)
