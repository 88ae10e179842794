"""``samkit bench`` as a function: plan the sweep, record it in ``DIR/bench.json``, run it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from samkit.bench.plan import OptimizerSpec, PlannedRun, Task, plan_sweep
from samkit.bench.run import RunResult, SweepError, run_sweep
from samkit.train.checkpoint import atomic_write_json

__all__ = ["MANIFEST", "bench", "read_manifest"]

#: The sweep's record in DIR: tasks, optimizers in order, seeds, budgets and every run.
MANIFEST = "bench.json"


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


def _manifest(
    command: str,
    tasks: Sequence[Task],
    specs: Sequence[OptimizerSpec],
    seeds: Sequence[int],
    budgets: Sequence[str],
    runs: Sequence[PlannedRun],
    out: Path,
) -> dict[str, Any]:
    return {
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
            for t in tasks
        ],
        "optimizers": [s.text for s in specs],
        "seeds": list(seeds),
        "budgets": list(budgets),
        "runs": [
            {
                "task": r.task,
                "optimizer": r.spec.text,
                "seed": r.seed,
                "epochs": r.epochs,
                "budgets": list(r.budgets),
                "dir": str(r.out.relative_to(out)),
                "command": shlex.join(["samkit", "train", *r.argv]),
            }
            for r in runs
        ],
    }


def read_manifest(out: str | Path) -> dict[str, Any]:
    """``DIR/bench.json`` (``FileNotFoundError`` naming it if absent)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out} a samkit bench folder?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SweepError(f"{path} is damaged ({e}); rerun samkit bench to rewrite it") from e


def bench(
    out: str | Path,
    tasks: Sequence[str],
    optimizers: Sequence[str],
    seeds: int | Sequence[int] = 5,
    *,
    budget: str = "equal-epochs",
    epochs: int | None = None,
    recipes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    data_dir: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    isolation: str = "auto",
    command: str = "",
    stream: TextIO | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Plan, record and run a sweep (see :func:`samkit.bench.plan.plan_sweep` and
    :func:`samkit.bench.run.run_sweep`); finished runs are skipped, half-finished ones
    resumed. ``extra``: settings given to every run (the run-scope flags of ``samkit bench``,
    e.g. ``limit_train``, ``device``, ``data_dir``); ``threads``: torch threads per run
    (default 1). Returns one result per run."""
    out = Path(out)
    task_list, specs, runs = plan_sweep(
        out, tasks, optimizers, seeds, budget=budget, epochs=epochs, overlays=recipes,
        extra=extra, data_dir=data_dir,
    )  # fmt: skip
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    budgets = ["equal-epochs", "equal-grad-evals"] if budget == "both" else [budget]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepError(f"cannot create --out {out}: {e.strerror or e}") from e
    with _lock(out):
        atomic_write_json(
            out / MANIFEST,
            _manifest(command, task_list, specs, seed_list, budgets, runs, out),
        )
        return run_sweep(
            runs, workers=workers, threads=threads, isolation=isolation, stream=stream,
            progress=progress,
        )  # fmt: skip
