"""Running a sweep: which runs are left and how, one overall progress line, resumable.

The runs themselves execute in an executor (:mod:`samkit.bench.executors`): worker processes
on this machine (``local``) or Ray tasks on a cluster (``ray``). Either way the run directory
is an ordinary ``samkit train`` run, and ``bench.json`` records each run's equivalent command
line.

State of a run directory, decided before anything starts (:func:`prepare`; a Ray task decides
again on its node, so a retried run resumes from its checkpoint):

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
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from samkit.bench.plan import PlannedRun, plural
from samkit.train.config import RESUMABLE_KEYS, ConfigError, TrainConfig

if TYPE_CHECKING:
    from samkit.bench.executors import Ended, Executor

__all__ = [
    "STOP_SIGNALS",
    "RunResult",
    "Stopped",
    "SweepError",
    "deferred_stop",
    "prepare",
    "run_state",
    "run_sweep",
    "stop_on_signals",
]

LOG_NAME = "train.log"
#: Files a run writes; what a killed run leaves is cleared before it starts again.
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", LOG_NAME)
#: Settings that do not change a run's computation (compared when deciding to skip/resume).
_IGNORED_IN_COMPARISON = RESUMABLE_KEYS | {"recipe"}


class SweepError(Exception):
    """The sweep cannot start (reported as one line)."""


# ----------------------------------------------------------------------------- stopping


#: The signals that stop a sweep (SIGINT only where this process does not ignore it).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The sweep was stopped by the signal ``signum`` (SIGTERM, or SIGINT): its running runs
    were ended, the finished ones are kept, and the same sweep again resumes the others."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While a sweep runs, SIGTERM (and SIGINT, unless this process ignores it, as a shell's
    ``&`` makes it do: the user's choice, kept) stops it. The handler raises :class:`Stopped`
    at once, and records the signal, so that :meth:`check`, called where the sweep is
    between two steps, raises it again where the first one was lost (a handler's exception
    raised in an at-fork hook or a ``__del__`` method is printed and dropped). In a
    :meth:`deferred` section (starting a run process and recording it) it only records."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.depth = 0
        self.defer = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # already stopping: a second signal changes nothing
            return
        self.signum = signum
        if not self.defer:
            raise Stopped(signum)

    def check(self) -> None:
        if self.signum is not None and not self.defer:
            raise Stopped(self.signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if self.depth == 0:
            self.signum = None
            self.previous = {}
            for sig in STOP_SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                try:
                    self.previous[sig] = signal.signal(sig, self.handle)
                except ValueError:  # not in the main thread: no handlers of ours
                    break
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for sig, handler in self.previous.items():
                    signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.defer += 1
        try:
            yield
        finally:
            self.defer -= 1
        self.check()


_STOP = _StopSignals()  # one per process, as signal handlers are


def stop_on_signals() -> contextlib.AbstractContextManager[None]:
    """Context manager: SIGTERM (and SIGINT unless ignored) raise :class:`Stopped` in it
    (nested: the outermost one installs and restores the handlers)."""
    return _STOP.installed()


def deferred_stop() -> contextlib.AbstractContextManager[None]:
    """Context manager for an executor's section that must not be cut (start a run process
    and record it, so that it is ended with the others): a stop asked for in it is raised
    at its end."""
    return _STOP.deferred()


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


def prepare(run: PlannedRun) -> tuple[str, TrainConfig | None, str]:
    """What to do with ``run`` now, from its directory: ``(state, settings, message)``.

    ``settings``: what to train, the planned ones or those that resume its checkpoint (what
    a run killed before its first checkpoint left is cleared here); ``None`` when there is
    nothing to train: ``finished``, or a failure (``mismatch``, ``failed``) that ``message``
    explains."""
    state, detail = run_state(run)
    if state == "finished":
        return state, None, ""
    if state == "mismatch":
        why = f"{run.out} holds a run with other settings ({detail}); remove it or choose "
        return state, None, why + "another --out"
    config = run.config
    if state == "resume":
        try:
            config = _resumption(run) or config
        except ConfigError as e:  # e.g. a checkpoint of another process count
            return "failed", None, f"cannot resume {run.out}: {e}"
    if state in ("stale", "resume") and not config.resume:
        _clear(run.out)
    return state, config, ""


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


def _result(outcome: Ended) -> RunResult:
    """The result of a run that ended: done if its process exited with 0 and its
    ``summary.json`` is complete, else failed with the reason (its log's last error)."""
    run = outcome.run
    if outcome.error is not None or outcome.code is None:
        return RunResult(run, "failed", outcome.error or "?", outcome.seconds)
    summary = _read_json(run.out / "summary.json")
    if outcome.code == 0 and isinstance(summary, dict) and summary.get("completed"):
        return RunResult(run, "done", seconds=outcome.seconds, test_acc=summary.get("test_acc"),
                         cpu_seconds=outcome.cpu_seconds)  # fmt: skip
    message = f"{_last_error(run.out, outcome.code)} (log: {run.out / LOG_NAME})"
    return RunResult(run, "failed", message, outcome.seconds)


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


def run_sweep(
    runs: Sequence[PlannedRun],
    *,
    executor: Executor | None = None,
    workers: int = 1,
    threads: int | None = None,
    isolation: str = "auto",
    stream: TextIO | None = None,
    progress: bool = True,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every planned run not yet finished in ``executor``; return one
    :class:`RunResult` per run (finished ones ``skipped``). A failed run is reported in one
    line and does not stop the others. Without ``executor``: the local one,
    ``workers`` at a time (``isolation``: ``auto`` (fork where possible), ``fork`` or
    ``subprocess``; ``threads``: torch threads of each run, default 1)."""
    if executor is None:
        from samkit.bench.executors.local import LocalExecutor

        executor = LocalExecutor(workers=workers, isolation=isolation, threads=threads)
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

    executor.check([r.config for r in runs])
    skipped = 0
    for run in runs:
        state, config, message = prepare(run)
        if state == "finished":
            summary = _read_json(run.out / "summary.json") or {}
            results[run.out] = RunResult(run, "skipped", test_acc=summary.get("test_acc"))
            display.done += 1
            skipped += 1
        elif config is None:
            finish(RunResult(run, "failed", message), 0)
        else:
            pending.append((run, config))
    if progress:
        resumed = sum(config.resume for _, config in pending)
        line = f"{plural(len(runs), 'run')}: {skipped} already finished, {len(pending)} to run"
        line += f" ({resumed} resumed from a checkpoint)" if resumed else ""
        stream.write(f"{line}, {executor.describe(len(pending))}\n")
        stream.flush()
    # Partial results soon: all methods of seed 0 first; within a seed the costly ones first.
    pending.sort(key=lambda p: (p[0].seed, -p[0].cost))
    display.cost_left = sum(r.cost for r, _ in pending)

    def started(running: int) -> None:
        _STOP.check()  # a stop whose Stopped was lost where the signal came
        display.redraw(running)

    def ended(outcome: Ended, running: int) -> None:
        display.cost_done += outcome.run.cost
        display.cost_left -= outcome.run.cost
        finish(_result(outcome), running)

    with stop_on_signals():
        try:
            executor.execute(pending, started, ended)
        finally:
            display.close()
    return [results[r.out] for r in runs if r.out in results]
