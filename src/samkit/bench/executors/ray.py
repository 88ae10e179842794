"""The ``ray`` executor: one Ray task per run, on a Ray cluster (``pip install "samkit[ray]"``).

Each task runs on some node of the cluster and does there what the local executor does for a
run: it looks at the run directory (:func:`samkit.bench.run.prepare`: fresh, or resumed from
its checkpoint) and starts ``python -m samkit.bench.child`` (the local ``subprocess``
isolation, :class:`samkit.bench.executors.local.RunProcess`), with the run's log, exit code
and CPU time. So a run directory written through Ray is an ordinary ``samkit train`` run, the
same bit for bit as a local one with the same settings and threads.

* Resources: each task reserves ``cpus_per_run`` CPUs (also the run's torch threads) and
  ``gpus_per_run`` GPUs; Ray places it on a node that has them free.
* Storage: run directories live under ``--out``, which every node must see (a shared file
  system); :meth:`RayExecutor.check_out` proves it before any run (a task on each node writes
  a file there that the driver must read).
* Faults: a task whose worker process or node dies is started again by Ray (``max_retries``
  times); it looks at the run directory again and resumes from the checkpoint. A run that
  fails by itself (an exit code other than 0) is a failed run, not retried. The run process
  gets SIGKILL when its task's worker dies (Linux), and Ray ends the tasks of a driver that
  dies, so a killed sweep leaves no run writing into its directory: the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.bench.executors import Ended, Executor
from samkit.bench.plan import PlannedRun, plural
from samkit.bench.run import LOG_NAME, SweepError
from samkit.train.config import TrainConfig

__all__ = ["CONNECT_TIMEOUT", "PROBE_TIMEOUT", "RayExecutor"]

#: Seconds ``--ray-address`` may stay unreachable before the sweep gives up.
CONNECT_TIMEOUT = 10.0
#: Seconds the nodes have to answer the storage check.
PROBE_TIMEOUT = 120.0
#: Seconds between looks at the cluster's size while runs execute (nodes may come and go).
_RESIZE_EVERY = 10.0


def _first_line(error: BaseException | str) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[0] if lines else type(error).__name__


def _whole(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


# ----------------------------------------------------------------------------- on a node


def _probe(folder: str, name: str, token: str) -> str | None:
    """On a node: write ``token`` to ``folder/name``; why not, if it cannot (``None``: done).
    ``folder`` was just created by the driver: a node that does not see it does not share
    the driver's file system there."""
    path = Path(folder)
    deadline = time.monotonic() + 2  # a shared file system may show a new folder late
    while not path.is_dir():
        if time.monotonic() > deadline:
            return f"{folder} does not exist there"
        time.sleep(0.25)
    try:
        (path / name).write_text(token)
    except OSError as e:
        return f"cannot write {path / name} there: {e.strerror or e}"
    return None


def _run_on_node(run: PlannedRun, threads: int, hide_gpus: bool) -> dict[str, Any]:
    """On a node: what to do with the run directory (again: a retried task finds the
    checkpoint of the attempt that died), then the run as its own process, as the local
    executor's ``subprocess`` isolation starts it; its exit code, seconds and CPU time."""
    from samkit.bench.executors.local import RunProcess
    from samkit.bench.run import prepare

    state, config, message = prepare(run)
    if config is None:  # finished (by an attempt that died before answering), or refused
        return {"code": 0 if state == "finished" else None, "error": message or None}
    run.out.mkdir(parents=True, exist_ok=True)
    with open(run.out / LOG_NAME, "a") as log:  # which node and worker run it, for the log
        log.write(f"samkit bench: Ray node {_node_ip()}, worker pid {os.getpid()}\n")
    # Ray leaves the GPUs of the node visible to a task that asked for none.
    env = {"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else None
    child = RunProcess(run, config, threads, fork=False, env=env)
    while (code := child.poll()) is None:
        time.sleep(0.1)
    seconds = time.perf_counter() - child.started
    return {"code": code, "seconds": seconds, "cpu_seconds": child.cpu_seconds}


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for the log line
        return socket.gethostname()


# ----------------------------------------------------------------------------- the driver


def _host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` of ``address`` (``auto`` resolved as Ray resolves it), or ``None`` when
    it is in another form (left to Ray)."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address(address) or ""
        except Exception:  # noqa: BLE001 - none found, or Ray's helper moved: Ray says why
            return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return None
    return host.strip("[]"), int(port)


def _wait_reachable(address: str, timeout: float) -> None:
    """:class:`SweepError` when nothing answers at ``address`` within ``timeout`` seconds
    (``ray.init`` itself would wait minutes)."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(target, timeout=min(2.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                host, port = target
                raise SweepError(
                    f"cannot reach the Ray cluster at --ray-address {address} ({host}:{port}: "
                    f"{e.strerror or e}, for {timeout:g} s); start one with `ray start --head` "
                    "or give the address of its head node"
                ) from e
            time.sleep(0.5)


class RayExecutor(Executor):
    """One Ray task per run on the cluster at ``address`` (``None``: a Ray instance started
    on this machine for the sweep, ended with it), each reserving ``cpus_per_run`` CPUs (its
    torch threads) and ``gpus_per_run`` GPUs, started again up to ``max_retries`` times when
    its worker or node dies."""

    name = "ray"
    absolute_paths = True

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: int | None = None,
        gpus_per_run: float | None = None,
        max_retries: int | None = None,
        threads: int | None = None,
    ) -> None:
        cpus = 1 if cpus_per_run is None else cpus_per_run
        gpus = 0 if gpus_per_run is None else gpus_per_run
        retries = 2 if max_retries is None else max_retries
        if not _whole(cpus, 1):
            raise SweepError(f"invalid --cpus-per-run {cpus!r} (must be an integer >= 1)")
        if (
            isinstance(gpus, bool)
            or not isinstance(gpus, (int, float))
            or not math.isfinite(gpus)
            or gpus < 0
            or (gpus > 1 and gpus != int(gpus))
        ):
            raise SweepError(
                f"invalid --gpus-per-run {gpus!r} (must be >= 0; a fraction only below 1)"
            )
        if not _whole(retries, 0):
            raise SweepError(f"invalid --max-retries {retries!r} (must be an integer >= 0)")
        if threads is not None and threads != cpus:
            raise SweepError(
                f"--threads {threads}: with --executor ray a run's torch threads are its "
                f"--cpus-per-run ({cpus})"
            )
        if address is not None and not str(address).strip():
            raise SweepError("invalid --ray-address '' (HOST:PORT of the head node, or auto)")
        self.address = address
        self.cpus_per_run = cpus
        self.gpus_per_run = float(gpus) if gpus != int(gpus) else int(gpus)
        self.max_retries = retries
        self.threads = cpus
        self._own_connection = False  # this sweep connected (or started the instance)

    # -------------------------------------------------------------- cluster

    @property
    def where(self) -> str:
        if self.address is None:
            return "a Ray instance started on this machine for the sweep"
        return f"the Ray cluster at {self.address}"

    def start(self) -> None:
        import ray

        if ray.is_initialized():  # the caller's own connection (Python API): use it
            if self.address is not None:
                raise SweepError(
                    "Ray is already initialised in this process: leave --ray-address out to "
                    "use that connection"
                )
            self.address = ray.get_runtime_context().gcs_address
        else:
            if self.address is not None:
                _wait_reachable(self.address, CONNECT_TIMEOUT)
            options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
            if self.address is None:
                options["include_dashboard"] = False
            try:
                ray.init(address=self.address or "local", **options)
            except Exception as e:  # noqa: BLE001 - Ray's reason, as one line
                where = self.where
                raise SweepError(f"cannot connect to {where}: {_first_line(e)}") from e
            self._own_connection = True
        try:
            self._check_resources()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._own_connection:
            import ray

            ray.shutdown()  # a Ray instance started for the sweep ends here
        self._own_connection = False

    def _nodes(self) -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def _fits(self, node: dict[str, Any]) -> int:
        """How many runs ``node`` can run at once."""
        have = node.get("Resources", {})
        count = math.floor(have.get("CPU", 0) / self.cpus_per_run + 1e-9)
        if self.gpus_per_run:
            count = min(count, math.floor(have.get("GPU", 0) / self.gpus_per_run + 1e-9))
        return max(count, 0)

    def _slots(self) -> int:
        return sum(self._fits(n) for n in self._nodes())

    def _check_resources(self) -> None:
        nodes = self._nodes()
        if any(self._fits(n) for n in nodes):
            return
        have = "; ".join(
            f"{n.get('NodeManagerAddress', '?')}: {n['Resources'].get('CPU', 0):g} CPUs, "
            f"{n['Resources'].get('GPU', 0):g} GPUs"
            for n in nodes
        )
        need = f"{self.cpus_per_run} CPUs and {self.gpus_per_run:g} GPUs"
        gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        flag = "--gpus-per-run" if gpus < self.gpus_per_run else "--cpus-per-run"
        value = self.gpus_per_run if flag == "--gpus-per-run" else self.cpus_per_run
        raise SweepError(
            f"{flag} {value:g}: no node of {self.where} has {need} for a run "
            f"(nodes: {have or 'none'})"
        )

    # -------------------------------------------------------------- checks

    def check(self, configs: Sequence[TrainConfig]) -> None:
        if self.gpus_per_run:
            return
        cuda = sorted({c.device for c in configs if str(c.device).startswith("cuda")})
        if cuda:
            raise SweepError(
                f"--device {cuda[0]} with --executor ray needs --gpus-per-run (the runs "
                "reserve no GPU)"
            )

    def check_out(self, out: Path) -> None:
        """Every node that can take a run writes a file under ``out`` that this process
        must then read: :class:`SweepError` naming the path and the node otherwise."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        folder = out / f".samkit-probe-{token[:12]}"  # the path the runs will write to
        folder.mkdir()
        try:
            probe = ray.remote(_probe)
            refs = {}
            for node in self._nodes():
                if not self._fits(node):
                    continue
                strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
                ref = probe.options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(
                    str(folder), node["NodeID"], token
                )
                refs[ref] = node
            _, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT)
            problems = []
            for ref, node in refs.items():
                name = f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:12]})"
                if ref in late:
                    ray.cancel(ref, force=True)
                    problems.append(f"{name}: no answer within {PROBE_TIMEOUT:g} s")
                    continue
                try:
                    why = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the node's reason, as one line
                    why = _first_line(e)
                if why is None and not _reads(folder / node["NodeID"], token):
                    why = f"what it wrote in {folder} does not reach this machine"
                if why:
                    problems.append(f"{name}: {why}")
            if problems:
                more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
                raise SweepError(
                    f"--out {out} is not shared with every Ray node: {problems[0]}{more}; "
                    "run directories must be on a file system every node mounts at the "
                    "same path"
                )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -------------------------------------------------------------- runs

    def describe(self, pending: int) -> str:
        nodes = self._nodes()
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        size = f"{plural(len(nodes), 'node')}, {cpus:g} CPUs, {gpus:g} GPUs"
        at_once = min(max(1, self._slots()), max(1, pending))
        return f"{at_once} at a time on {self.where} ({size})"

    def execute(
        self,
        pending: Sequence[tuple[PlannedRun, TrainConfig]],
        started: Callable[[int], None],
        ended: Callable[[Ended, int], None],
    ) -> None:
        import ray

        remote = ray.remote(_run_on_node).options(
            num_cpus=self.cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )
        hide_gpus = not self.gpus_per_run
        queue = [run for run, _ in pending]  # each task decides its settings on its node
        running: dict[Any, PlannedRun] = {}
        slots, looked = self._slots(), time.monotonic()
        try:
            while queue or running:
                if time.monotonic() - looked > _RESIZE_EVERY:
                    slots, looked = self._slots(), time.monotonic()
                # As many tasks as the cluster runs at once: the order of the runs is kept
                # and "running" counts runs, not tasks waiting in Ray's queue.
                while queue and len(running) < max(1, slots):
                    run = queue.pop(0)
                    running[remote.remote(run, self.threads, hide_gpus)] = run
                started(len(running))
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in done:
                    run = running.pop(ref)
                    ended(self._outcome(ref, run), len(running))
        except KeyboardInterrupt:
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)  # its worker ends, and the run with it
            raise

    def _outcome(self, ref: Any, run: PlannedRun) -> Ended:
        import ray
        from ray.exceptions import NodeDiedError, WorkerCrashedError

        try:
            answer = ray.get(ref)
        except (WorkerCrashedError, NodeDiedError) as e:
            times = self.max_retries + 1
            why = f"its Ray worker or node died {plural(times, 'time')}"
            return Ended(run, None, error=f"{why} ({_first_line(e)}) (log: {run.out / LOG_NAME})")
        except Exception as e:  # noqa: BLE001 - e.g. samkit missing on the node
            return Ended(run, None, error=f"Ray task failed: {_first_line(e)}")
        return Ended(
            run,
            answer["code"],
            answer.get("seconds", 0.0),
            answer.get("cpu_seconds"),
            error=answer.get("error"),
        )


def _reads(path: Path, token: str) -> bool:
    deadline = time.monotonic() + 2  # a shared file system may show a new file late
    while True:
        with contextlib.suppress(OSError):
            if path.read_text() == token:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
