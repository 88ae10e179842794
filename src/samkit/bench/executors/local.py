"""The ``local`` executor: the sweep's runs in worker processes on this machine.

Each run is trained in a process of its own, so a crash or a SIGKILL of one run loses nothing
else. On Linux, CPU runs are forked from a parent that has already imported torch and
generated the embedded datasets (MNIST-1D takes ~7 s to generate, torch ~2 s to import: more
than a small run's training); elsewhere, and for GPU runs, each run is a fresh
``python -m samkit.bench.child`` process. Either way the child trains the settings resolved
in the parent (it resolves nothing itself). A run process gets SIGKILL when the sweep's
process dies (Linux), so a killed sweep leaves no orphan writing into a run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.bench.executors import Ended, Executor
from samkit.bench.plan import PlannedRun
from samkit.bench.run import LOG_NAME, STOP_SIGNALS, SweepError, deferred_stop
from samkit.train.config import TrainConfig
from samkit.train.env import check_threads

__all__ = [
    "ISOLATIONS",
    "RUN_THREADS",
    "STOP_GRACE",
    "LocalExecutor",
    "RunProcess",
    "check_workers",
    "stop",
]

#: ``--isolation``: ``auto`` (fork where possible), ``fork`` or ``subprocess``.
ISOLATIONS = ("auto", "fork", "subprocess")

#: Seconds a run process has to end after SIGTERM when the sweep stops, before SIGKILL (a
#: run dies at once on SIGTERM: this is for one that does not).
STOP_GRACE = 5.0

#: torch threads of each run when none are given: a sweep's runs share the machine's cores
#: (``workers`` at a time), and the embedded tasks' models gain nothing from more.
RUN_THREADS = 1


def _die_with_parent() -> None:
    """In a child: get SIGKILL when the sweep's process dies (Linux), so a killed sweep
    leaves no orphan writing into a run directory the next sweep resumes."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RunProcess:
    """A run in progress, in a forked child or a subprocess, training ``config``; its
    output goes to the run's log. ``env``: variables set for a subprocess (not a fork)."""

    def __init__(
        self,
        run: PlannedRun,
        config: TrainConfig,
        threads: int,
        fork: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.run = run
        self.started = time.perf_counter()
        run.out.mkdir(parents=True, exist_ok=True)
        log_path = run.out / LOG_NAME
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.cpu_seconds: float | None = None
        self.code: int | None = None  # the exit code, once waited for
        if fork:
            parent = os.getpid()
            sys.stdout.flush()
            sys.stderr.flush()
            # SIGTERM and SIGINT wait (blocked) until the child has its own handlers: one the
            # sweep sends it as it starts (stopping) must end it, not run the sweep's handler.
            pid = -1
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pid = os.fork()
            finally:
                if pid != 0:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if pid == 0:  # child
                code = 2
                try:
                    # The sweep's handlers are not the run's; SIGINT ignored stays ignored.
                    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    _die_with_parent()
                    if os.getppid() != parent:
                        os._exit(2)
                    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
                    sys.stderr = sys.stdout
                    from samkit.bench.child import train_planned

                    code = train_planned(config, threads)
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                    os._exit(code)
            self.pid = pid
        else:
            settings = json.dumps(config.to_dict())
            cmd = [sys.executable, "-m", "samkit.bench.child", settings, str(threads)]
            env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)}
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=_die_with_parent if os.name == "posix" else None,  # noqa: PLW1509
                )

    def poll(self) -> int | None:
        """Exit code (negative: killed by that signal), or None while running. Records the
        process's CPU time (user + system) in :attr:`cpu_seconds` when it has ended."""
        if self.code is None:
            self.code = self._poll()
        return self.code

    def _poll(self) -> int | None:
        pid = self.proc.pid if self.proc is not None else self.pid
        assert pid is not None
        if hasattr(os, "wait4"):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done == 0:
                return None
            self.cpu_seconds = usage.ru_utime + usage.ru_stime
            code = os.waitstatus_to_exitcode(status)
            if self.proc is not None:
                self.proc.returncode = code
            return code
        if self.proc is not None:  # pragma: no cover - not POSIX
            return self.proc.poll()
        done, status = os.waitpid(pid, os.WNOHANG)
        return None if done == 0 else os.waitstatus_to_exitcode(status)

    def send(self, signum: int) -> None:
        """Send ``signum`` to the run's process, by its pid, unless it was waited for."""
        pid = self.proc.pid if self.proc is not None else self.pid
        if pid is not None and self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def stop(children: Sequence[RunProcess], grace: float = STOP_GRACE) -> None:
    """End the run processes ``children`` (by their pids): SIGTERM, and SIGKILL to those
    still running ``grace`` seconds later; return once every one has been waited for."""
    for child in children:
        child.send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(children)
    while left:
        left = [c for c in left if c.poll() is None]
        if left and time.monotonic() > deadline:
            for child in left:
                child.send(signal.SIGKILL)
            deadline = float("inf")
        if left:
            time.sleep(0.01)


def _prewarm(configs: Sequence[TrainConfig]) -> None:
    """Import the training code and generate the embedded datasets once, in the parent, so
    every forked run starts with them in memory."""
    import torch

    import samkit.train  # noqa: F401
    from samkit.train.data import dataset_spec, load_dataset

    torch.set_num_threads(1)  # no intra-op pool in the parent: fork-safe
    # The first call imports torch._inductor (seconds): pay it once, state unchanged.
    torch.use_deterministic_algorithms(
        torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    for name in sorted({c.dataset for c in configs}):
        if not dataset_spec(name).needs_data_dir:  # generated: once here, not in every run
            load_dataset(name)


def _use_fork(config: TrainConfig, isolation: str) -> bool:
    if isolation == "subprocess" or not hasattr(os, "fork") or sys.platform != "linux":
        return False
    return config.device == "cpu" or (config.device == "auto" and not _cuda_might_be_used())


def _cuda_might_be_used() -> bool:
    # Asking torch would initialise CUDA in the parent, which forked children cannot use.
    return (
        bool(os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip()) and Path("/dev/nvidia0").exists()
    )


def check_workers(workers: Any) -> None:
    """``SweepError`` unless ``workers`` is an integer >= 1."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SweepError(f"invalid --workers {workers!r} (must be an integer >= 1)")


class LocalExecutor(Executor):
    """``workers`` runs at a time, each in a process of its own on this machine
    (``isolation``: ``auto``, ``fork`` or ``subprocess``; ``threads``: torch threads of each
    run, default :data:`RUN_THREADS`)."""

    name = "local"

    def __init__(
        self, workers: int | None = None, isolation: str | None = None, threads: int | None = None
    ) -> None:
        workers = 1 if workers is None else workers
        check_workers(workers)
        isolation = "auto" if isolation is None else isolation
        if isolation not in ISOLATIONS:
            raise SweepError(
                f"invalid --isolation {isolation!r}; choose from {', '.join(ISOLATIONS)}"
            )
        check_threads(threads)
        self.workers = workers
        self.isolation = isolation
        self.threads = RUN_THREADS if threads is None else threads

    def describe(self, pending: int) -> str:
        return f"{min(self.workers, max(1, pending))} at a time"

    def execute(
        self,
        pending: Sequence[tuple[PlannedRun, TrainConfig]],
        started: Callable[[int], None],
        ended: Callable[[Ended, int], None],
    ) -> None:
        if pending and any(_use_fork(c, self.isolation) for _, c in pending):
            _prewarm([c for _, c in pending])
        running: list[RunProcess] = []
        try:
            queue = list(pending)
            while queue or running:
                while queue and len(running) < self.workers:
                    run, config = queue.pop(0)
                    fork = self.isolation == "fork" or _use_fork(config, self.isolation)
                    try:
                        with deferred_stop():  # a started process is one `running` holds
                            running.append(RunProcess(run, config, self.threads, fork))
                    except OSError as e:
                        ended(Ended(run, None, error=f"cannot start: {e}"), len(running))
                    started(len(running))
                time.sleep(0.05)
                for child in list(running):
                    code = child.poll()
                    if code is None:
                        continue
                    running.remove(child)
                    seconds = time.perf_counter() - child.started
                    ended(Ended(child.run, code, seconds, child.cpu_seconds), len(running))
                started(len(running))
        except KeyboardInterrupt:
            stop(running)
            raise
