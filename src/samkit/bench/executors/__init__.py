"""How the planned runs of a sweep execute: an :class:`Executor`.

The sweep (:func:`samkit.bench.run.run_sweep`) decides which runs are left and with which
settings (fresh, or resumed from a checkpoint), prints the progress and turns each ended run
into a result; an executor only runs them:

* ``local`` (:class:`samkit.bench.executors.local.LocalExecutor`): worker processes on this
  machine, ``--workers`` at a time;
* ``ray`` (:class:`samkit.bench.executors.ray.RayExecutor`): one Ray task per run on a Ray
  cluster (``pip install "samkit[ray]"``); the task starts the run as the local executor's
  ``subprocess`` isolation does.

Either way a run is an ordinary ``samkit train`` run directory, its process writes its own
log, and its exit code (or the executor's reason it could not run) is all that comes back.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.bench.plan import PlannedRun
from samkit.bench.run import SweepError
from samkit.train.config import TrainConfig

__all__ = ["EXECUTORS", "Ended", "Executor", "make_executor"]

#: The names ``--executor`` takes.
EXECUTORS = ("local", "ray")


@dataclasses.dataclass
class Ended:
    """A run that ended: the exit code of its process (0 done, 1 diverged, 2 any other
    failure, negative: killed by that signal), or ``error``, the executor's reason the run
    did not run to its end (it could not start; its Ray worker died too often)."""

    run: PlannedRun
    code: int | None
    seconds: float = 0.0
    cpu_seconds: float | None = None
    error: str | None = None


class Executor(abc.ABC):
    """Runs the planned runs of a sweep. Used as a context manager around the sweep (its
    stages, when there are several): :meth:`start` on entry, :meth:`close` on exit."""

    #: ``--executor`` name.
    name: str = ""
    #: torch threads of each run.
    threads: int = 1
    #: The runs start on other machines, in other working directories: the sweep gives them
    #: ``--out`` and ``--data-dir`` as absolute paths.
    absolute_paths: bool = False

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:  # noqa: B027 - optional hook
        """Get ready (connect to a cluster, check its resources); before any run."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` took."""

    def check_out(self, out: Path) -> None:  # noqa: B027 - optional hook
        """:class:`~samkit.bench.run.SweepError` when a run could not write under ``out`` (the sweep's
        folder, already created)."""

    def check(self, configs: Sequence[TrainConfig]) -> None:  # noqa: B027 - optional hook
        """:class:`~samkit.bench.run.SweepError` when one of these settings cannot run here."""

    @abc.abstractmethod
    def describe(self, pending: int) -> str:
        """How ``pending`` runs will run, for the sweep's first line (``2 at a time``)."""

    @abc.abstractmethod
    def execute(
        self,
        pending: Sequence[tuple[PlannedRun, TrainConfig]],
        started: Callable[[int], None],
        ended: Callable[[Ended, int], None],
    ) -> None:
        """Run each ``(run, settings)`` in the order given; ``started(running)`` after runs
        start (and now and then, so the progress line is redrawn), ``ended(outcome, running)``
        as each ends (``running``: how many are still running). A run that fails ends like
        any other; on ``KeyboardInterrupt`` stop every run and re-raise."""


def make_executor(
    name: str = "local",
    *,
    workers: int | None = None,
    isolation: str | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    cpus_per_run: int | None = None,
    gpus_per_run: float | None = None,
    max_retries: int | None = None,
) -> Executor:
    """The executor ``name`` with its options (``None``: not given, its default); an option
    of the other executor is an :class:`~samkit.bench.run.SweepError`, as are invalid values."""
    if name not in EXECUTORS:
        raise SweepError(f"invalid --executor {name!r}; choose from {', '.join(EXECUTORS)}")
    own = {
        "local": {"--workers": workers, "--isolation": isolation},
        "ray": {
            "--ray-address": ray_address,
            "--cpus-per-run": cpus_per_run,
            "--gpus-per-run": gpus_per_run,
            "--max-retries": max_retries,
        },
    }
    for other, flags in own.items():
        given = [flag for flag, value in flags.items() if value is not None]
        if other != name and given:
            raise SweepError(f"{', '.join(given)}: only with --executor {other}")
    if name == "local":
        from samkit.bench.executors.local import LocalExecutor

        return LocalExecutor(workers=workers, isolation=isolation, threads=threads)
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise SweepError(
            f'--executor ray needs Ray, which is not installed: pip install "samkit[ray]" ({e})'
        ) from e
    from samkit.bench.executors.ray import RayExecutor

    return RayExecutor(
        address=ray_address,
        cpus_per_run=cpus_per_run,
        gpus_per_run=gpus_per_run,
        max_retries=max_retries,
        threads=threads,
    )
