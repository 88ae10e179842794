"""``samkit bench`` as a function: plan the sweep, record it in ``DIR/bench.json``, run it.

Without ``--trials`` the sweep is one stage: every planned run, handed to the executor
(:func:`samkit.bench.run.run_sweep`). With ``--trials K`` it is two: the trials
(:mod:`samkit.bench.tuning`), then, once their results are read back from their run
directories and the choice is written to ``DIR/tuning.json``, the final runs of each
method's chosen trial. Everything is planned and checked before anything is written.

The runs execute in the executor asked for (:mod:`samkit.bench.executors`), one for the
whole sweep: with ``--executor ray`` both stages run on the same Ray connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from samkit.bench.executors import Executor, make_executor
from samkit.bench.plan import PlannedRun, Sweep
from samkit.bench.run import RunResult, SweepError, run_sweep, stop_on_signals
from samkit.bench.tuning import (
    Tuning,
    declared_target,
    final_runs,
    plan_trials,
    tuning_record,
    write_tuning,
)
from samkit.train.checkpoint import atomic_write_json
from samkit.train.config import ConfigError

__all__ = ["MANIFEST", "QUICK", "bench", "quick_settings", "read_manifest"]

#: The sweep's record in DIR: tasks, optimizers in order, seeds, budgets, every run.
MANIFEST = "bench.json"

#: What ``--quick`` changes (for tests and a first look), each only where neither a flag nor
#: a ``--recipe`` overlay gives it: 3 seeds (the fewest the report judges differences on), 3
#: epochs of the first 512 training samples in batches of 32, the first 256 test samples.
#: (scikit-learn digits reaches ~93 % test accuracy so, in ~2 s of training per run.)
QUICK: dict[str, Any] = {
    "seeds": 3,
    "epochs": 3,
    "limit_train": 512,
    "limit_test": 256,
    "batch_size": 32,
}
#: Seeds of a sweep when none are given.
DEFAULT_SEEDS = 5


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep per folder at a time (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = out / ".bench.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise SweepError(f"another samkit bench is running in {out}") from e
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _entry(r: PlannedRun, out: Path) -> dict[str, Any]:
    entry = {
        "task": r.task,
        "optimizer": r.spec.text,
        "seed": r.seed,
        "epochs": r.epochs,
        "budgets": list(r.budgets),
        "dir": str(r.out.relative_to(out)),
        "command": shlex.join(["samkit", "train", *r.argv]),
    }
    if r.trial is not None:
        entry["trial"] = r.trial
        entry["params"] = dict(r.params)
    return entry


def _manifest(
    command: str,
    sweep: Sweep,
    runs: Sequence[PlannedRun],
    tuning: Tuning | None,
    time_to_target: bool,
) -> dict[str, Any]:
    """``bench.json``: ``runs`` are the runs of the tables (with ``--trials``, the final
    runs, added once the trials have chosen); ``trial_runs`` the trials."""
    manifest: dict[str, Any] = {
        "samkit_bench": 1,
        "command": command,
        "tasks": [
            {
                "name": t.name,
                "recipes": t.recipe_specs,
                "description": t.recipe.description,
                "reference": t.recipe.reference,
                "reported": t.recipe.reported,
            }
            for t in sweep.tasks
        ],
        "optimizers": [s.text for s in sweep.specs],
        "seeds": list(sweep.seeds),
        "budgets": list(sweep.budgets),
        "time_to_target": time_to_target,
        "runs": [_entry(r, sweep.out) for r in runs],
    }
    if tuning is not None:
        manifest["trials"] = tuning.k
        manifest["trial_runs"] = [_entry(r, sweep.out) for r in tuning.runs]
    return manifest


def read_manifest(out: str | Path) -> dict[str, Any]:
    """``DIR/bench.json`` (``FileNotFoundError`` naming it if absent)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out} a samkit bench folder?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SweepError(f"{path} is damaged ({e}); rerun samkit bench to rewrite it") from e


def _check_targets(runs: Sequence[PlannedRun]) -> None:
    for run in runs:
        if declared_target(run.config) is None:
            raise ConfigError(
                f"--time-to-target: task {run.task} declares no validation target (its "
                "recipe sets none)"
            )


def quick_settings(
    seeds: int | Sequence[int] | None,
    epochs: int | None,
    extra: dict[str, Any],
    recipes: Sequence[str] = (),
) -> tuple[int | Sequence[int], int | None, dict[str, Any]]:
    """``seeds``, ``epochs`` and the settings given to every run, with :data:`QUICK`'s
    values where neither they nor a ``recipes`` overlay give one."""
    from samkit.train.recipes import load_recipe

    overlaid = {key for r in recipes for key in load_recipe(r).settings}
    if epochs is None and "epochs" not in overlaid:
        epochs = QUICK["epochs"]
    extra = dict(extra)
    for key in ("limit_train", "limit_test", "batch_size"):
        if key not in overlaid:
            extra.setdefault(key, QUICK[key])
    return (QUICK["seeds"] if seeds is None else seeds), epochs, extra


def bench(
    out: str | Path,
    tasks: Sequence[str],
    optimizers: Sequence[str],
    seeds: int | Sequence[int] | None = None,
    *,
    budget: str = "equal-epochs",
    epochs: int | None = None,
    recipes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    data_dir: str | None = None,
    trials: int = 0,
    time_to_target: bool = False,
    quick: bool = False,
    workers: int | None = None,
    threads: int | None = None,
    isolation: str | None = None,
    executor: str | Executor = "local",
    ray_address: str | None = None,
    cpus_per_run: int | None = None,
    gpus_per_run: float | None = None,
    max_retries: int | None = None,
    command: str = "",
    stream: TextIO | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Plan, record and run a sweep (see :class:`samkit.bench.plan.Sweep` and
    :func:`samkit.bench.run.run_sweep`); finished runs are skipped, half-finished ones
    resumed. ``seeds``: N (seeds 0..N-1) or a list (default :data:`DEFAULT_SEEDS`);
    ``extra``: settings given to every run (the run-scope flags of ``samkit bench``, e.g.
    ``limit_train``, ``device``, ``data_dir``); ``threads``: torch threads per run (default
    1). ``trials``: K > 0 tunes each method first (:mod:`samkit.bench.tuning`);
    ``time_to_target``: every task must declare a validation target; ``quick``: the
    defaults of :data:`QUICK` where not given. ``executor``: ``local`` (``workers``,
    ``isolation``) or ``ray`` (``ray_address``, ``cpus_per_run``, ``gpus_per_run``,
    ``max_retries``), see :func:`samkit.bench.executors.make_executor`, or an
    :class:`Executor`; the stages of the sweep run in it one after the other. Returns one
    result per run, trials first.

    Every check (settings, search spaces, the executor's options and resources) happens
    before anything is written to ``out``. SIGTERM (and SIGINT, unless this process ignores
    it) stops the sweep: its running runs are ended, the finished ones kept, and
    :class:`~samkit.bench.run.Stopped` (a ``KeyboardInterrupt``) is raised; the same call
    again resumes it."""
    if not isinstance(executor, Executor):
        executor = make_executor(
            executor, workers=workers, isolation=isolation, threads=threads,
            ray_address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
            max_retries=max_retries,
        )  # fmt: skip
    out = Path(out)
    extra = dict(extra or {})
    if executor.absolute_paths:  # the runs start elsewhere: paths that mean the same there
        out = out.absolute()
        data_dir = None if data_dir is None else os.path.abspath(data_dir)
        if extra.get("data_dir") is not None:
            extra["data_dir"] = os.path.abspath(extra["data_dir"])
    if quick:
        seeds, epochs, extra = quick_settings(seeds, epochs, extra, recipes)
    sweep = Sweep.parse(
        out, tasks, optimizers, DEFAULT_SEEDS if seeds is None else seeds, budget=budget,
        epochs=epochs, overlays=recipes, extra=extra, data_dir=data_dir,
    )  # fmt: skip
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"invalid --trials {trials!r} (must be an integer >= 0)")
    tuning = plan_trials(sweep, trials) if trials else None
    runs = [] if tuning else [r for t in sweep.tasks for s in sweep.specs for r in sweep.runs(t, s)]
    if time_to_target:
        _check_targets(tuning.runs if tuning else runs)
    executor.check([r.config for r in (tuning.runs if tuning else runs)])

    def execute(stage: Sequence[PlannedRun], what: str) -> list[RunResult]:
        if progress and tuning is not None:
            (stream or sys.stdout).write(f"{what}:\n")
        return run_sweep(stage, executor=executor, stream=stream, progress=progress)

    # SIGTERM (SIGINT) between the stages stops the sweep as it does within one (Stopped).
    with stop_on_signals(), executor:  # e.g. connected to the Ray cluster; both stages
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweepError(f"cannot create --out {out}: {e.strerror or e}") from e
        with _lock(out):
            executor.check_out(out)  # e.g. every Ray node sees it
            manifest = _manifest(command, sweep, runs, tuning, time_to_target)
            atomic_write_json(out / MANIFEST, manifest)
            if tuning is None:
                return execute(runs, "runs")
            results = execute(tuning.runs, f"trials ({tuning.k} per method and task)")
            record = tuning_record(tuning, out)
            write_tuning(out, record)
            runs = final_runs(sweep, tuning, record)
            manifest = _manifest(command, sweep, runs, tuning, time_to_target)
            atomic_write_json(out / MANIFEST, manifest)
            return results + execute(runs, "final runs of the chosen trials")
