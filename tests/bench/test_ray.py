"""samkit bench --executor ray on a real Ray cluster that the test starts on this machine.

One cluster per module: a head node and a second worker node (``ray start --head ...``,
``ray start --address ...``, 1 CPU each, a temporary folder of the test's own), children of
the test in process groups of their own, ended at teardown by their process ids (never
``ray stop``, which ends every Ray of the user); the teardown fails if any of their processes
outlives it. Ray 2.60 replaces a loopback ``--node-ip-address`` by the machine's address and
listens on every interface, so:

* where the test may (root, ``unshare``, ``nsenter``, ``ip``), the nodes and every sweep run
  in a network namespace of the test's own that has only loopback: nothing outside can reach
  the cluster, and it cannot meet another test's;
* everywhere, the cluster requires a token of the test's own (Ray's token authentication).

The worker node runs in a mount namespace of its own with an empty tmpfs over one folder
(``hidden``), so that it truly cannot see a ``--out`` under it (that test is skipped where
``unshare --mount`` is not allowed). Sweeps are ``python -m samkit bench`` processes (the
cluster may be in another network namespace than the test). The runs are tiny: a Ray run's
cost is mostly its process start (importing torch). To kill a run mid-way whatever the
timing, its process is frozen (SIGSTOP) at its first checkpoint, then its Ray worker or the
sweep is killed.

Cost: about 125 s of CPU time for the module (all processes: the nodes, Ray's workers, the
sweeps, the runs), measured on the 2-core development machine under a load of about 15,
before the tuned sweep replaced a one-run sweep on a Ray instance of its own (that test:
71 s instead of 42 s of wall time under a load of about 7). Wall time of the module: 221 s
on that machine under a load of 6 to 7.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samkit.bench import bench
from samkit.cli import main

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the test cluster: Linux")

SRC = Path(__file__).resolve().parents[2] / "src"
# Tiny runs (a run's cost is mostly its process start: importing torch); the sam run is
# frozen (SIGSTOP) at its first checkpoint, so it is killed mid-run whatever the timing.
EPOCHS = 12
TINY = {"limit_train": 128, "limit_test": 100}
SWEEP = ["--tasks", "digits", "--optimizers", "sgd", "sam", "--seeds", "1", "--epochs",
         str(EPOCHS), "--limit-train", "128", "--limit-test", "100"]  # fmt: skip
RUNS = [f"digits/{m}/seed0-{EPOCHS}ep" for m in ("sgd", "sam")]
DEADLINE = 300  # seconds any one wait may take on a loaded machine before the test fails
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_evals",
               "grad_evals_epoch", "steps")  # fmt: skip


# ----------------------------------------------------------------------------- the cluster


def _tool(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _descendants(pids: list[int]) -> list[int]:
    """Every live process below ``pids`` (Ray workers are in process groups of their own)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], list(pids)
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _die_with_parent() -> None:
    """SIGKILL when the test's process dies abruptly (a node's Ray processes then end with
    it: Ray ties them to ``ray start``); the teardown ends everything by pid otherwise."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + DEADLINE
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.stdout.read()}{proc.stderr.read()}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {DEADLINE} s")
        time.sleep(0.02)


class Cluster:
    """A head node and a worker node on this machine (see the module docstring)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.hidden = base / "hidden"  # the worker node sees an empty tmpfs here
        self.hidden.mkdir()
        (self.hidden / "marker").write_text("the head and the drivers see this")
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_TMPDIR": str(base / "tmp"),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        # The nodes (and so Ray's workers) run elsewhere than the sweeps (in `base`): a path
        # relative to a sweep's folder means nothing there.
        self.nodes_cwd = base / "nodes"
        self.nodes_cwd.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.prefix: list[str] = []  # what enters the cluster's network namespace
        self.isolated = False  # the worker node cannot see `hidden`
        self.address = ""

    def _start(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.base / log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.nodes_cwd,
                                    start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self.procs.append(proc)
        return proc

    def _network(self) -> None:
        if not (os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter")
                and shutil.which("ip")):  # fmt: skip
            return
        holder = self._start(["unshare", "--net", "--", "sh", "-c",
                              "ip link set lo up && exec sleep 100000"], "netns.log")  # fmt: skip
        own = os.readlink("/proc/self/ns/net")
        deadline = time.time() + 30
        while time.time() < deadline and holder.poll() is None:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder.pid}/ns/net") != own:
                    time.sleep(0.2)  # `ip link set lo up` has run once sleep is exec'd
                    if "sleep" in Path(f"/proc/{holder.pid}/cmdline").read_text():
                        self.prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
                        return
            time.sleep(0.05)

    def start(self) -> None:
        self._network()
        ray = [str(Path(sys.executable).parent / "ray")]  # Ray's CLI, next to this Python
        common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
                  "--disable-usage-stats", "--object-store-memory", str(80 * 2**20),
                  "--include-log-monitor", "false",
                  "--block"]  # fmt: skip
        head_tmp = self.base / "head"
        self._start([*self.prefix, *ray, "start", "--head", "--port", "0",
                     "--include-dashboard", "false", "--temp-dir", str(head_tmp), *common],
                    "head.log")  # fmt: skip
        found = head_tmp / "ray_current_cluster"
        _wait(lambda: found.exists() and found.read_text().strip(), "Ray head node")
        port = found.read_text().strip().rsplit(":", 1)[1]
        self.address = f"127.0.0.1:{port}"
        worker = [*ray, "start", "--address", self.address,
                  "--temp-dir", str(self.base / "worker"), *common]  # fmt: skip
        if os.geteuid() == 0 and _tool("unshare", "--mount", "--propagation", "private", "true"):
            script = 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"'
            worker = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                      "sh", str(self.hidden), *worker]  # fmt: skip
            self.isolated = True
        self._start([*self.prefix, *worker], "worker.log")
        log = self.base / "worker.log"
        _wait(lambda: b"Ray runtime started" in log.read_bytes(), "Ray worker node")
        head_log = (self.base / "head.log").read_text(errors="replace")
        assert "Ray runtime started" in head_log, head_log

    def stop(self) -> list[int]:
        """End every process the cluster started, by process id (groups first); those still
        alive 30 s later."""
        everything = [p.pid for p in self.procs] + _descendants([p.pid for p in self.procs])
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        deadline = time.time() + 30
        while any(_alive(pid) for pid in everything) and time.time() < deadline:
            time.sleep(0.1)
        return [pid for pid in everything if _alive(pid)]

    def ours(self) -> list[str]:
        """Live processes whose command line names this cluster's folder."""
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(self.base) in text and _alive(int(cmdline.parent.name)):
                    found.append(f"{cmdline.parent.name} {text[:120]}")
        return found

    def sweep(self, out: Path, *flags: str, address: bool = True) -> subprocess.Popen:
        """``samkit bench --executor ray`` as a process of its own, on this cluster, in
        :attr:`base` (``out`` may be relative to it)."""
        argv = [*self.prefix, sys.executable, "-m", "samkit", "bench", "--executor", "ray",
                *(["--ray-address", self.address] if address else []), "--out", str(out),
                *flags]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=self.base, start_new_session=True)  # fmt: skip

    def run(self, out: Path, *flags: str, address: bool = True) -> tuple[int, str, str]:
        """The sweep's exit code, output and errors (without the lines of Ray's C++ logger:
        in a network namespace with only loopback it warns that there is no route out)."""
        proc = self.sweep(out, *flags, address=address)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
        return proc.returncode, stdout, _without_ray_logs(stderr)


def _without_ray_logs(text: str) -> str:
    return "".join(
        line
        for line in text.splitlines(keepends=True)
        if not re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+ [DIWE] \d+ \d+\] \w+\.cc:\d+: ", line)
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("Ray's command line (ray start) is not next to this Python")
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start()
        yield c
    finally:
        alive = c.stop()
    left = c.ours()
    assert not alive and not left, f"processes of the test cluster outlived it: {alive} {left}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sweep on the local executor (forked runs, one thread each)."""
    out = tmp_path_factory.mktemp("local")
    before = torch.get_num_threads()
    try:
        results = bench(out, ["digits"], ["sgd", "sam"], 1, epochs=EPOCHS, extra=dict(TINY),
                        isolation="fork", progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert [r.status for r in results] == ["done", "done"]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in METRIC_KEYS} for r in rows]


def _same_run(a: Path, b: Path) -> None:
    """Bit for bit: the weights and optimizer state in the checkpoints, every metric."""
    ca = torch.load(a / "checkpoint.pt", weights_only=False)
    cb = torch.load(b / "checkpoint.pt", weights_only=False)
    assert ca["epoch"] == cb["epoch"] == EPOCHS
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"{a}: {k} differs"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, value in sa[k].items():
            if torch.is_tensor(value):
                assert torch.equal(value, sb[k][name]), f"{a}: optimizer {k}.{name} differs"
    assert _metrics(a) == _metrics(b)
    assert (
        json.loads((a / "summary.json").read_text())["test_acc"]
        == json.loads((b / "summary.json").read_text())["test_acc"]
    )


def _worker_pids(run_dir: Path) -> list[int]:
    """The Ray worker processes that ran this run, from its log (one per attempt)."""
    log = (run_dir / "train.log").read_text()
    return [int(x) for x in re.findall(r"^samkit bench: Ray node \S+, worker pid (\d+)$", log,
                                       flags=re.M)]  # fmt: skip


def _freeze_at_first_checkpoint(run_dir: Path, proc: subprocess.Popen) -> tuple[int, list[int]]:
    """Stop (SIGSTOP) the run's process once it has written its first checkpoint; its Ray
    worker and the stopped processes. Frozen, the run cannot finish before it is killed."""
    _wait(lambda: (run_dir / "checkpoint.pt").exists(), f"checkpoint in {run_dir}", proc)
    (worker,) = _worker_pids(run_dir)
    assert Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"ray::")  # a Ray worker
    run = _descendants([worker])  # python -m samkit.bench.child
    for pid in run:
        os.kill(pid, signal.SIGSTOP)
    assert run and not (run_dir / "summary.json").exists(), "the run finished before the stop"
    return worker, run


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_a_ray_sweep_equals_the_local_one_run_for_run_a_killed_worker_resumed(cluster,
                                                                            reference):  # fmt: skip
    # sgd runs undisturbed on one node; sam's Ray worker is killed (SIGKILL, by its pid)
    # after sam's first checkpoint: Ray starts the task again, which resumes the run.
    out = cluster.base / "equal"
    sgd, sam = (out / rel for rel in RUNS)
    # A relative --out: the runs start in Ray workers, elsewhere; the sweep makes it absolute.
    proc = cluster.sweep(Path("equal"), *SWEEP)
    try:
        worker, run = _freeze_at_first_checkpoint(sam, proc)
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert not any(_alive(p) for p in run)  # the run died with its worker
    lines = stdout.splitlines()
    assert lines[0] == (
        f"2 runs: 0 already finished, 2 to run, 2 at a time on the Ray cluster at "
        f"{cluster.address} (2 nodes, 2 CPUs, 0 GPUs)"
    )
    assert sum(x.startswith("done digits") for x in lines) == 2
    assert lines[-1].startswith("2 runs: 2 finished | ")
    assert lines[-1].endswith("next: samkit report equal")
    assert len(_worker_pids(sgd)) == 1 and len(_worker_pids(sam)) == 2  # sam ran twice
    assert "resumed at epoch" in (sam / "train.log").read_text()
    for rel in RUNS:  # bit for bit, the resumed run too
        _same_run(out / rel, reference / rel)
        config = json.loads((out / rel / "config.json").read_text())
        assert config["hardware"]["torch_threads"] == 1  # = --cpus-per-run
    manifest = json.loads((out / "bench.json").read_text())
    assert [r["dir"] for r in manifest["runs"]] == RUNS
    assert not list(out.glob(".samkit-probe-*"))  # the storage check cleans up


@pytest.mark.slow
def test_a_killed_driver_then_the_same_command_skips_finished_runs(cluster, reference):
    out = cluster.base / "driver-killed"
    sgd, sam = (out / rel for rel in RUNS)
    proc = cluster.sweep(out, *SWEEP)
    try:
        worker, run = _freeze_at_first_checkpoint(sam, proc)
        _wait(lambda: (sgd / "summary.json").exists(), "finished sgd run", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray ends the tasks of a driver that died: no run keeps writing into its directory.
    _wait(lambda: not any(_alive(p) for p in [worker, *run]), "end of the dead driver's run")
    assert not (sam / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in sgd.iterdir()}

    code, stdout, stderr = cluster.run(out, *SWEEP)
    assert code == 0, stdout + stderr
    assert stdout.splitlines()[0].startswith(
        "2 runs: 1 already finished, 1 to run (1 resumed from a checkpoint), 1 at a time"
    )
    assert stdout.splitlines()[-1].startswith("2 runs: 2 finished (1 before this command)")
    assert {p: p.stat().st_mtime_ns for p in sgd.iterdir()} == stamps
    assert "resumed at epoch" in (sam / "train.log").read_text()
    for rel in RUNS:
        _same_run(out / rel, reference / rel)


@pytest.mark.slow
def test_a_tuned_sweep_runs_both_stages_on_one_ray_instance_started_for_it(cluster):
    # --trials on Ray, without --ray-address: the trials, then the chosen trial's final run,
    # each stage handed to the executor, both on the one Ray instance started for the sweep.
    out = cluster.base / "own-instance"
    flags = ["--tasks", "digits", "--optimizers", "sgd", "--trials", "2", "--seeds", "1",
             "--epochs", "1", "--limit-train", "128", "--limit-test", "100"]  # fmt: skip
    sessions = cluster.base / "tmp" / "ray"  # RAY_TMPDIR: a session folder per Ray instance
    before = set(sessions.glob("session_2*"))
    code, stdout, stderr = cluster.run(out, *flags, address=False)
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    own = " at a time on a Ray instance started on this machine for the sweep (1 node, "
    trials = lines.index("trials (2 per method and task):")
    finals = lines.index("final runs of the chosen trials:")
    assert trials < finals
    assert lines[trials + 1].startswith("2 runs: 0 already finished, 2 to run, ")
    assert own in lines[trials + 1]
    assert lines[finals + 1].startswith(f"1 run: 0 already finished, 1 to run, 1{own}")
    assert lines[-1].startswith("3 runs: 3 finished | ")
    assert len(set(sessions.glob("session_2*")) - before) == 1  # one instance for both stages
    entry = json.loads((out / "tuning.json").read_text())["tasks"]["digits"]["sgd"]
    assert len(entry["trials"]) == 2 and all(t["val_acc"] is not None for t in entry["trials"])
    final = out / "digits" / "sgd" / f"trial{entry['chosen']}-seed0-1ep"
    config = json.loads((final / "config.json").read_text())
    assert config["config"]["lr"] == entry["trials"][entry["chosen"]]["params"]["lr"]
    assert config["hardware"]["torch_threads"] == 1  # = --cpus-per-run
    assert _worker_pids(final) and (final / "summary.json").exists()  # run by a Ray worker
    # Its processes (Ray's temporary folder is RAY_TMPDIR here) ended with the sweep.
    assert not [p for p in cluster.ours() if str(cluster.base / "tmp") in p]


# ----------------------------------------------------------------------------- refused


@pytest.mark.slow
def test_an_out_a_node_cannot_see_is_refused_before_any_run(cluster):
    if not cluster.isolated:
        pytest.skip("unshare --mount is not allowed here: no node can be kept from a folder")
    out = cluster.hidden / "sweep"
    code, stdout, stderr = cluster.run(out, *SWEEP)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert re.match(rf"samkit: error: --out {re.escape(str(out))} is not shared with every Ray "
                    r"node: \S+ \(node \w+\): ", stderr), stderr  # fmt: skip
    assert f"{out}/.samkit-probe-" in stderr and "does not exist there" in stderr
    assert not (out / "digits").exists()  # no run started
    assert not list(out.glob(".samkit-probe-*"))


@pytest.mark.slow
def test_gpus_per_run_on_a_cluster_without_gpus_is_refused(cluster, tmp_path):
    code, stdout, stderr = cluster.run(tmp_path / "b", *SWEEP, "--gpus-per-run", "1")
    assert code == 2 and stdout == ""
    node = r"\S+: 1 CPUs, 0 GPUs"
    assert re.fullmatch(
        f"samkit: error: --gpus-per-run 1: no node of the Ray cluster at {cluster.address} has "
        rf"1 CPUs and 1 GPUs for a run \(nodes: {node}; {node}\)\n",
        stderr,
    ), stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--cpus-per-run", "0"], "invalid --cpus-per-run 0 (must be an integer >= 1)"),
        (["--gpus-per-run", "-1"], "invalid --gpus-per-run -1.0 (must be >= 0;"),
        (["--max-retries", "-1"], "invalid --max-retries -1 (must be an integer >= 0)"),
        (["--threads", "2"], "--threads 2: with --executor ray a run's torch threads are its"),
        (["--workers", "2"], "--workers: only with --executor local"),
    ],
)
def test_bad_ray_options_are_one_line_before_anything(tmp_path, capsys, flags, expected):
    pytest.importorskip("ray")
    out = tmp_path / "b"
    assert main(["bench", *SWEEP, "--out", str(out), "--executor", "ray", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"samkit: error: {expected}") and err.count("\n") == 1, err
    assert not out.exists()


def test_cuda_runs_without_gpus_per_run_are_refused():
    pytest.importorskip("ray")
    from samkit.bench import SweepError
    from samkit.bench.executors.ray import RayExecutor
    from samkit.train import TrainConfig

    runs = [TrainConfig(device="cpu"), TrainConfig(device="cuda")]
    with pytest.raises(SweepError, match=r"^--device cuda with --executor ray needs --gpus-per"):
        RayExecutor().check(runs)
    RayExecutor(gpus_per_run=0.5).check(runs)  # a GPU reserved: nothing to refuse


def test_ray_options_with_the_local_executor_are_refused(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", *SWEEP, "--out", str(out), "--cpus-per-run", "2"]) == 2
    assert capsys.readouterr().err == ("samkit: error: --cpus-per-run: only with --executor ray\n")
    assert not out.exists()


def test_executor_ray_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "b"
    assert main(["bench", *SWEEP, "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            'samkit: error: --executor ray needs Ray, which is not installed: pip install "samkit[ray]"'
        )
        and err.count("\n") == 1
    ), err
    assert not out.exists()


def test_an_unreachable_ray_address_is_one_line_after_a_bounded_wait(tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    pytest.importorskip("ray")
    import socket

    from samkit.bench.executors import ray as ray_executor

    monkeypatch.setattr(ray_executor, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as s:  # bound, not listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        out = tmp_path / "b"
        t0 = time.monotonic()
        argv = ["bench", *SWEEP, "--out", str(out), "--executor", "ray", "--ray-address", address]
        assert main(argv) == 2
        assert time.monotonic() - t0 < 30  # not Ray's own minutes of waiting
    err = capsys.readouterr().err
    assert err == (
        f"samkit: error: cannot reach the Ray cluster at --ray-address {address} ({address}: "
        "Connection refused, for 1 s); start one with `ray start --head` or give the address "
        "of its head node\n"
    )
    assert not out.exists()
