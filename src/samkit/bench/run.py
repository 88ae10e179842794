"""Running a sweep: parallel worker processes, one overall progress line, resumable.

Each run is trained in a process of its own, so a crash or a SIGKILL of one run loses nothing
else. On Linux, CPU runs are forked from a parent that has already imported torch and
generated the embedded datasets (MNIST-1D takes ~7 s to generate, torch ~2 s to import: more
than a small run's training); elsewhere, and for GPU runs, each run is a fresh
``python -m samkit.bench.child`` process. Either way the child trains the settings resolved
in the parent (it resolves nothing itself), the run directory is an ordinary
``samkit train`` run, and ``bench.json`` records each run's equivalent command line.

State of a run directory, decided before anything starts:

* ``summary.json`` complete, same settings: finished, skipped;
* a ``checkpoint.pt`` from an earlier epoch: resumed, with the settings
  ``samkit train --out DIR --resume --epochs E`` resolves;
* anything else left by a killed run (no checkpoint yet): cleared and started again;
* settings that differ from the plan (a changed recipe or flag): an error for that run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from samkit.bench.plan import PlannedRun, plural
from samkit.train.config import RESUMABLE_KEYS, ConfigError, TrainConfig
from samkit.train.env import check_threads

__all__ = ["RunResult", "SweepError", "check_workers", "run_state", "run_sweep"]

LOG_NAME = "train.log"
#: Files a run writes; what a killed run leaves is cleared before it starts again.
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", LOG_NAME)
#: Settings that do not change a run's computation (compared when deciding to skip/resume).
_IGNORED_IN_COMPARISON = RESUMABLE_KEYS | {"recipe"}


class SweepError(Exception):
    """The sweep cannot start (reported as one line)."""


@dataclasses.dataclass
class RunResult:
    """What happened to one planned run."""

    run: PlannedRun
    status: str  # "skipped", "done", "failed"
    message: str = ""
    seconds: float = 0.0
    test_acc: float | None = None
    cpu_seconds: float | None = None


# ----------------------------------------------------------------------------- run state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(planned: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    return [
        f"{k} {saved.get(k)!r} there, {v!r} now"
        for k, v in planned.items()
        if k not in _IGNORED_IN_COMPARISON and saved.get(k) != v
    ]


def run_state(run: PlannedRun) -> tuple[str, str]:
    """``(state, detail)``: ``finished``, ``resume``, ``fresh``, ``stale`` or ``mismatch``."""
    out = run.out
    if not out.exists():
        return "fresh", ""
    record = _read_json(out / "config.json")
    if record is not None and isinstance(record.get("config"), dict):
        diff = _differences(run.config.to_dict(), record["config"])
        if diff:
            return "mismatch", "; ".join(diff[:3])
    summary = _read_json(out / "summary.json")
    if (
        isinstance(summary, dict)
        and summary.get("completed")
        and summary.get("epochs") == run.epochs
    ):
        return "finished", ""
    if (out / "checkpoint.pt").is_file():
        return "resume", ""
    if any((out / n).exists() for n in _RUN_FILES):
        return "stale", ""
    return "fresh", ""


def _clear(out: Path) -> None:
    for name in _RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _resumption(run: PlannedRun) -> TrainConfig | None:
    """The settings that resume ``run`` from its checkpoint, resolved as
    ``samkit train --out DIR --resume --epochs E`` resolves them; ``None`` when there is
    nothing to resume (a damaged checkpoint, or one that has all the epochs: start again)."""
    from samkit.train import read_checkpoint
    from samkit.train.recipes import run_config

    try:
        ckpt = read_checkpoint(run.out)
    except Exception:  # a damaged checkpoint: start again
        return None
    if int(ckpt["epoch"]) >= run.epochs:
        return None
    given = {"out": str(run.out), "resume": True, "epochs": run.epochs}
    return run_config(None, given, checkpoint=ckpt["config"])


# ----------------------------------------------------------------------------- one run


def _die_with_parent() -> None:
    """In a child: get SIGKILL when the sweep's process dies (Linux), so a killed sweep
    leaves no orphan writing into a run directory the next sweep resumes."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Child:
    """A run in progress, in a forked child or a subprocess, training ``config``."""

    def __init__(self, run: PlannedRun, config: TrainConfig, threads: int, fork: bool) -> None:
        self.run = run
        self.started = time.perf_counter()
        run.out.mkdir(parents=True, exist_ok=True)
        log_path = run.out / LOG_NAME
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.cpu_seconds: float | None = None
        if fork:
            parent = os.getpid()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child
                code = 2
                try:
                    _die_with_parent()
                    if os.getppid() != parent:
                        os._exit(2)
                    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
                    sys.stderr = sys.stdout
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
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

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.proc is not None:
                self.proc.terminate()
            elif self.pid is not None:
                os.kill(self.pid, signal.SIGTERM)

    def wait(self) -> None:
        with contextlib.suppress(ChildProcessError):
            if self.proc is not None:
                self.proc.wait()
            elif self.pid is not None:
                os.waitpid(self.pid, 0)


def _last_error(out: Path, code: int) -> str:
    try:
        lines = (out / LOG_NAME).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("samkit: error: "):
            return line[len("samkit: error: ") :]
    if code < 0:
        return f"killed by signal {-code}"
    tail = next((line for line in reversed(lines) if line.strip()), "")
    return f"exit code {code}" + (f": {tail.strip()}" if tail else "")


# ----------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Progress:
    """One overall display: a redrawn line on a terminal, one line per finished run else."""

    def __init__(self, total: int, stream: TextIO, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self.cost_done = 0.0
        self.cost_left = 0.0
        self._width = 0

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.cost_done <= 0 or self.cost_left <= 0:
            return "-" if self.cost_left > 0 else "0s"
        return _duration(self.cost_left * elapsed / self.cost_done)

    def _status(self, running: int) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"[{self.done}/{self.total} runs{failed}] {running} running | "
            f"elapsed {_duration(time.perf_counter() - self.start)} | ETA {self.eta()}"
        )

    def line(self, text: str, running: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.write(text + "\n")
            self.redraw(running)
        else:
            self.stream.write(f"{text} | {self._status(running)}\n")
        self.stream.flush()

    def redraw(self, running: int) -> None:
        if not self.tty:
            return
        status = self._status(running)
        self.stream.write("\r" + status + " " * max(0, self._width - len(status)))
        self._width = len(status)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- the sweep


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


#: torch threads of each run when none are given: a sweep's runs share the machine's cores
#: (``workers`` at a time), and the embedded tasks' models gain nothing from more.
RUN_THREADS = 1


def run_sweep(
    runs: Sequence[PlannedRun],
    *,
    workers: int = 1,
    threads: int | None = None,
    isolation: str = "auto",
    stream: TextIO | None = None,
    progress: bool = True,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every planned run not yet finished, ``workers`` at a time; return one
    :class:`RunResult` per run (finished ones ``skipped``). A failed run is reported in one
    line and does not stop the others. ``isolation``: ``auto`` (fork where possible),
    ``fork`` or ``subprocess``; ``threads``: torch threads of each run (default
    :data:`RUN_THREADS`)."""
    check_workers(workers)
    check_threads(threads)
    threads = RUN_THREADS if threads is None else threads
    stream = stream if stream is not None else sys.stdout
    results: dict[Path, RunResult] = {}
    pending: list[tuple[PlannedRun, TrainConfig]] = []  # the run, the settings it trains
    display = _Progress(len(runs), stream, progress)

    def finish(result: RunResult, running: int) -> None:
        results[result.run.out] = result
        display.done += 1
        if result.status == "failed":
            display.failed += 1
            display.line(f"FAILED {result.run.key}: {result.message}", running)
        elif result.status == "done":
            acc = f"{100 * result.test_acc:.2f}%" if result.test_acc is not None else "?"
            cpu = f", {result.cpu_seconds:.0f} s CPU" if result.cpu_seconds is not None else ""
            display.line(
                f"done {result.run.key}: test accuracy {acc} ({_duration(result.seconds)}{cpu})",
                running,
            )
        if on_result is not None:
            on_result(result)

    skipped = 0
    for run in runs:
        state, detail = run_state(run)
        if state == "finished":
            summary = _read_json(run.out / "summary.json") or {}
            results[run.out] = RunResult(run, "skipped", test_acc=summary.get("test_acc"))
            display.done += 1
            skipped += 1
        elif state == "mismatch":
            finish(
                RunResult(
                    run,
                    "failed",
                    f"{run.out} holds a run with other settings ({detail}); remove it or "
                    "choose another --out",
                ),
                0,
            )
        else:
            config = run.config
            if state == "resume":
                try:
                    config = _resumption(run) or config
                except ConfigError as e:  # e.g. a checkpoint of another process count
                    finish(RunResult(run, "failed", f"cannot resume {run.out}: {e}"), 0)
                    continue
            if state in ("stale", "resume") and not config.resume:
                _clear(run.out)
            pending.append((run, config))
    if progress:
        resumed = sum(config.resume for _, config in pending)
        line = f"{plural(len(runs), 'run')}: {skipped} already finished, {len(pending)} to run"
        line += f" ({resumed} resumed from a checkpoint)" if resumed else ""
        stream.write(f"{line}, {min(workers, max(1, len(pending)))} at a time\n")
        stream.flush()
    # Partial results soon: all methods of seed 0 first; within a seed the costly ones first.
    pending.sort(key=lambda p: (p[0].seed, -p[0].cost))
    display.cost_left = sum(r.cost for r, _ in pending)
    if pending and any(_use_fork(c, isolation) for _, c in pending):
        _prewarm([c for _, c in pending])

    running: list[_Child] = []
    interrupted = False
    old_handlers = {}

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not in the main thread: keep the defaults
        old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)
    try:
        queue = list(pending)
        while queue or running:
            while queue and len(running) < workers:
                run, config = queue.pop(0)
                fork = isolation == "fork" or _use_fork(config, isolation)
                try:
                    running.append(_Child(run, config, threads, fork))
                except OSError as e:
                    finish(RunResult(run, "failed", f"cannot start: {e}"), len(running))
                display.redraw(len(running))
            time.sleep(0.05)
            for child in list(running):
                code = child.poll()
                if code is None:
                    continue
                running.remove(child)
                seconds = time.perf_counter() - child.started
                display.cost_done += child.run.cost
                display.cost_left -= child.run.cost
                summary = _read_json(child.run.out / "summary.json")
                if code == 0 and isinstance(summary, dict) and summary.get("completed"):
                    finish(
                        RunResult(child.run, "done", seconds=seconds,
                                  test_acc=summary.get("test_acc"),
                                  cpu_seconds=child.cpu_seconds),
                        len(running),
                    )  # fmt: skip
                else:
                    message = _last_error(child.run.out, code)
                    message += f" (log: {child.run.out / LOG_NAME})"
                    finish(RunResult(child.run, "failed", message, seconds), len(running))
            display.redraw(len(running))
    except KeyboardInterrupt:
        interrupted = True
        for child in running:
            child.terminate()
        for child in running:
            child.wait()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        display.close()
    if interrupted:
        raise KeyboardInterrupt
    return [results[r.out] for r in runs if r.out in results]
