"""samkit bench: planning (specs, budgets), and sweeps of tiny real runs: skip-finished,
resume after a real SIGKILL, a failing run among good ones, the equivalent command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import torch

from samkit.bench import bench, parse_spec, plan_sweep
from samkit.bench.executors import Executor
from samkit.bench.executors.local import RunProcess
from samkit.bench.run import (
    LOG_NAME,
    Stopped,
    deferred_stop,
    run_state,
    run_sweep,
    stop_on_signals,
)
from samkit.cli import build_parser, main
from samkit.train import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "src" / "samkit" / "recipes"

# 128 samples in batches of 64: a run of 2 epochs takes well under a second. The sweeps use
# the digits task: MNIST-1D takes seconds to generate in each process that needs it.
TINY = {"limit_train": 128, "limit_test": 100, "batch_size": 64}
TINY_FLAGS = ["--limit-train", "128", "--limit-test", "100"]
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_evals")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _overlay(tmp_path: Path) -> str:
    """Batches of 64 for every task (a recipe laid over the embedded one)."""
    path = tmp_path / "tiny.toml"
    path.write_text("batch_size = 64\n")
    return str(path)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in METRIC_KEYS} for r in rows]


# ----------------------------------------------------------------------------- planning


def test_optimizer_specs():
    s = parse_spec("FSAM:rho=0.05, lr=0.1")
    assert (s.name, s.settings, s.text, s.slug) == (
        "fsam", {"rho": 0.05, "lr": 0.1}, "fsam:rho=0.05,lr=0.1", "fsam_rho=0.05_lr=0.1"
    )  # fmt: skip
    assert parse_spec("bsam:ratio=one").settings == {"ratio": "one"}
    with pytest.raises(ConfigError, match="did you mean 'fsam'"):
        parse_spec("fsma")
    with pytest.raises(ConfigError, match="NAME:KEY=VALUE"):
        parse_spec("sam:rho")


def test_all_is_every_registered_optimizer_sgd_first():
    from samkit.bench.plan import expand_optimizers
    from samkit.optim import list_optimizers

    everything = expand_optimizers(["all"])
    assert everything[0] == "sgd" and sorted(everything) == list_optimizers()
    assert expand_optimizers(["fsam", "all"])[0] == "fsam"
    assert expand_optimizers(["fsam", "all"]).count("fsam") == 1


def test_budgets_give_cheaper_methods_more_epochs(tmp_path):
    _, _, runs = plan_sweep(tmp_path, ["mnist1d"], ["sgd", "sam", "bsam"], 2, budget="both",
                            epochs=4)  # fmt: skip
    epochs = {(r.spec.name, r.epochs): r.budgets for r in runs if r.seed == 0}
    # bsam: 3 passes -> the budget; sam (2 passes) 6 epochs, sgd (1 pass) 12 epochs.
    assert epochs == {
        ("sgd", 4): ("equal-epochs",), ("sgd", 12): ("equal-grad-evals",),
        ("sam", 4): ("equal-epochs",), ("sam", 6): ("equal-grad-evals",),
        ("bsam", 4): ("equal-epochs", "equal-grad-evals"),  # one run serves both views
    }  # fmt: skip
    assert len(runs) == 10 and len({r.out for r in runs}) == 10
    assert all(r.out.name == f"seed{r.seed}-{r.epochs}ep" for r in runs)


@pytest.mark.parametrize(
    ("tasks", "optimizers", "expected"),
    [
        (["mnist1d"], ["sgd:rho=0.1"], "'sgd:rho=0.1': rho 0.1 has no effect on optimizer 'sgd'"),
        (["mnist1d"], ["sam:rhoo=0.1"], "did you mean 'rho'"),
        (["mnist1d"], ["sam", "sam"], "names an optimizer twice"),
        (["cifar10"], ["sgd"], "needs --data-dir"),
        (["mnist1d-nosy"], ["sgd"], "did you mean 'mnist1d-noisy'"),
    ],
)
def test_bad_plans_fail_before_any_run(tmp_path, tasks, optimizers, expected, capsys):
    argv = ["bench", "--tasks", *tasks, "--optimizers", *optimizers, "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists()


def test_each_run_is_the_samkit_train_command_it_records(tmp_path):
    from samkit.cli import _train_config_from_args

    _, _, runs = plan_sweep(tmp_path, ["mnist1d-noisy"], ["fsam:rho=0.2,lmbda=0.3", "adamw"], 1,
                            extra=dict(TINY), overlays=[_overlay(tmp_path)])  # fmt: skip
    for run in runs:
        args = build_parser().parse_args(["train", *run.argv])
        assert _train_config_from_args(args) == run.config
    fsam = runs[0].config
    # The spec's values win over the recipe's tuned [methods.fsam] table; its other keys stay.
    tuned = tomllib.loads((RECIPES / "mnist1d-noisy.toml").read_text())["methods"]["fsam"]
    kept = {k: v for k, v in tuned.items() if k not in ("rho", "lr", "lmbda")}
    assert fsam.rho == 0.2 and fsam.opt_args == {**kept, "lmbda": 0.3}
    assert fsam.label_noise == 0.25
    assert fsam.batch_size == 64 and runs[1].config.lr != fsam.lr  # the adamw table applies


# ----------------------------------------------------------------------------- sweeps


def test_sweep_then_rerun_skips_every_finished_run(tmp_path):
    out = tmp_path / "b"
    kw = dict(epochs=2, extra=dict(TINY), recipes=[_overlay(tmp_path)], isolation="fork",
              progress=False)  # fmt: skip
    results = bench(out, ["digits"], ["sgd", "sam"], 2, **kw)
    assert [r.status for r in results] == ["done"] * 4
    assert all(r.cpu_seconds and r.cpu_seconds > 0 for r in results)  # measured per process
    manifest = json.loads((out / "bench.json").read_text())
    assert len(manifest["runs"]) == 4 and manifest["optimizers"] == ["sgd", "sam"]
    stamps = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("bench.json", ".bench.lock")
    }
    t0 = time.perf_counter()
    again = bench(out, ["digits"], ["sgd", "sam"], 2, **kw)
    assert [r.status for r in again] == ["skipped"] * 4
    assert time.perf_counter() - t0 < 30  # nothing trained (a generous bound, not a benchmark)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Another --epochs is another set of runs, never a reuse of these.
    _, _, runs = plan_sweep(out, ["digits"], ["sgd"], 1, epochs=3, extra=dict(TINY))
    assert run_state(runs[0]) == ("fresh", "")


def test_a_failing_run_is_one_line_and_the_others_finish(tmp_path, capsys):
    bad = tmp_path / "broken.toml"  # builds no model: fails inside the run, not in planning
    bad.write_text('dataset = "digits"\nmodel = "wrn"\n[model_args]\ndepth = 15\n')
    out = tmp_path / "b"
    argv = ["bench", "--tasks", "digits", str(bad), "--optimizers", "sgd", "sam", "--seeds",
            "1", "--epochs", "1", "--out", str(out), "--isolation", "fork", *TINY_FLAGS]  # fmt: skip
    assert main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [x for x in lines if x.startswith("FAILED")]
    assert len(failed) == 2 and all("broken sgd" in x or "broken sam" in x for x in failed)
    assert all("Invalid WRN depth 15" in x for x in failed), failed  # the model's own message
    assert sum(x.startswith("done digits") for x in lines) == 2
    assert any(x.startswith("done digits sgd seed 0 (1 epoch): ") for x in lines), lines
    assert "epochs)" not in "\n".join(lines)  # never "(1 epochs)"
    assert "2 failed" in lines[-1]
    # The same folder with a changed setting: refused per run, nothing overwritten.
    before = (out / "digits" / "sgd" / "seed0-1ep" / "summary.json").read_text()
    argv = ["bench", "--tasks", "digits", "--optimizers", "sgd", "--seeds", "1", "--epochs",
            "1", "--out", str(out), "--limit-train", "96", "--limit-test", "100"]  # fmt: skip
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "holds a run with other settings (limit_train 128 there, 96 now)" in printed
    assert "\n1 run: 0 already finished" in printed and "\n1 run: 0 finished" in printed
    assert (out / "digits" / "sgd" / "seed0-1ep" / "summary.json").read_text() == before


def test_a_run_stopped_early_by_samkit_train_is_resumed_to_its_epochs(tmp_path):
    # A run directory left by `samkit train --stop-after-epoch 1` with the planned settings:
    # the sweep resumes it, and the resumed run goes on to the planned epochs (the stop of
    # the earlier command is not this one's), as `samkit train --resume` does.
    import dataclasses

    from samkit.train import train

    out = tmp_path / "b"
    kw = dict(epochs=2, extra=dict(TINY), recipes=[_overlay(tmp_path)], isolation="fork",
              progress=False)  # fmt: skip
    _, _, (run,) = plan_sweep(out, ["digits"], ["sgd"], 1, epochs=2, extra=dict(TINY),
                              overlays=kw["recipes"])  # fmt: skip
    stopped = train(dataclasses.replace(run.config, stop_after_epoch=1), log=None)
    assert (stopped["epochs"], stopped["completed"]) == (1, False)
    (result,) = bench(out, ["digits"], ["sgd"], 1, **kw)
    assert result.status == "done", result.message
    assert "resumed at epoch 1" in (run.out / LOG_NAME).read_text()
    # Bit-exact: the resumed run equals an uninterrupted one.
    (fresh,) = bench(tmp_path / "c", ["digits"], ["sgd"], 1, **kw)
    assert fresh.status == "done"
    assert _metrics(run.out) == _metrics(tmp_path / "c" / "digits" / "sgd" / run.out.name)


def test_a_damaged_checkpoint_is_trained_again_not_reported_failed(tmp_path):
    # A run directory whose checkpoint was cut short (a full disk, a copy interrupted): the
    # sweep cannot resume it, so it clears the directory and trains the run from the start.
    import dataclasses

    from samkit.train import train

    out = tmp_path / "b"
    kw = dict(epochs=2, extra=dict(TINY), recipes=[_overlay(tmp_path)], isolation="fork",
              progress=False)  # fmt: skip
    _, _, (run,) = plan_sweep(out, ["digits"], ["sgd"], 1, epochs=2, extra=dict(TINY),
                              overlays=kw["recipes"])  # fmt: skip
    train(dataclasses.replace(run.config, stop_after_epoch=1), log=None)
    ckpt = run.out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    assert run_state(run) == ("resume", "")
    (result,) = bench(out, ["digits"], ["sgd"], 1, **kw)
    assert result.status == "done", result.message
    log = (run.out / LOG_NAME).read_text()
    assert "resumed" not in log and log.startswith("samkit train | sgd")
    assert [m["epoch"] for m in _metrics(run.out)] == [1, 2]  # trained from the start


def test_workers_zero_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["bench", "--tasks", "digits", "--optimizers", "sgd", "--out", str(out)]
    for bad, why in (("0", "invalid --workers 0 (must be an integer >= 1)"),
                     ("-2", "invalid --workers -2")):  # fmt: skip
        assert main([*argv, "--workers", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
        assert not out.exists()
    assert main([*argv, "--threads", "0"]) == 2
    assert "invalid --threads: 0" in capsys.readouterr().err and not out.exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc: Linux")
def test_sigkill_mid_sweep_then_the_same_command_resumes(tmp_path):
    out = tmp_path / "b"
    argv = [sys.executable, "-m", "samkit", "bench", "--tasks", "digits", "--optimizers", "sgd",
            "--seeds", "1", "--epochs", "12", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    run_dir = out / "digits" / "sgd" / "seed0-12ep"
    deadline = time.time() + 300
    try:
        while not (run_dir / "checkpoint.pt").exists():  # the run is past its first epoch
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        children = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)  # the sweep only: its run must die with it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    for child in children:  # no orphan left writing into the run directory
        for _ in range(200):
            if (
                not Path(f"/proc/{child}").exists()
                or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
            ):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"run process {child} outlived the killed sweep")
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    killed_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert 1 <= killed_at < 12

    results = bench(out, ["digits"], ["sgd"], 1, epochs=12, isolation="fork", progress=False)
    assert [r.status for r in results] == ["done"]
    assert "resumed at epoch" in (run_dir / LOG_NAME).read_text()
    # Bit-exact: the resumed run equals an uninterrupted one.
    fresh = bench(tmp_path / "c", ["digits"], ["sgd"], 1, epochs=12, isolation="fork",
                  progress=False)  # fmt: skip
    assert fresh[0].status == "done"
    assert _metrics(run_dir) == _metrics(tmp_path / "c" / "digits" / "sgd" / "seed0-12ep")


@pytest.mark.slow
def test_subprocess_isolation_runs_python_dash_m_samkit_train(tmp_path):
    out = tmp_path / "b"
    results = bench(out, ["digits"], ["sgd"], 1, epochs=1, extra={"limit_train": 64,
                    "limit_test": 64}, isolation="subprocess", progress=False)  # fmt: skip
    assert [r.status for r in results] == ["done"]
    log = (out / "digits" / "sgd" / "seed0-1ep" / LOG_NAME).read_text()
    assert log.startswith("samkit train | sgd") and "test accuracy" in log


def _alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:  # gone
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="SIGTERM and /proc: Linux")
def test_sigterm_stops_a_background_sweep_and_the_same_command_resumes(tmp_path, capsys):
    # As a shell's `&` starts it: SIGINT ignored (inherited), so SIGTERM is how it is stopped.
    out = tmp_path / "b"
    argv = ["bench", "--tasks", "digits", "--optimizers", "sgd", "--seeds", "2", "--epochs",
            "20", "--out", str(out), *TINY_FLAGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "samkit", *argv], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )  # fmt: skip
    children: set[int] = set()
    try:
        for line in proc.stdout:  # one line per ended run (not a terminal)
            if line.startswith("done"):
                break
        else:
            pytest.fail(f"no run finished: {proc.wait()} {proc.stderr.read()}")
        children.update(_children(proc.pid))
        proc.send_signal(signal.SIGTERM)  # at once: the next run is starting or just started
        deadline = time.monotonic() + 15  # a hang, not a benchmark: it takes ~2 s here
        while proc.poll() is None and time.monotonic() < deadline:
            children.update(_children(proc.pid))  # a run started as the signal came
            time.sleep(0.01)
        assert proc.poll() is not None, "samkit bench still running 15 s after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == [
        f"samkit: error: stopped by SIGTERM: the runs that finished are kept; run the same "
        f"command again to resume the others ({out})"
    ]
    assert not [pid for pid in children if _alive(pid)], "a run outlived the stopped sweep"
    finished = [p.parent.name for p in out.rglob("summary.json")]
    assert finished == ["seed0-20ep"]  # the second run was stopped

    assert main([*argv, "--isolation", "fork"]) == 0  # the same command, in this process
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("2 runs: 2 finished (1 before this command)"), last


class _SwallowingExecutor(Executor):
    """Runs nothing; sends this process SIGTERM where the KeyboardInterrupt a signal handler
    raises is lost (as in an at-fork hook or a __del__ method), then goes on for a while."""

    name = "swallowing"

    def describe(self, pending: int) -> str:
        return "none"

    def execute(self, pending, started, ended) -> None:
        self.sigint = signal.getsignal(signal.SIGINT)
        self.calls = 0
        with contextlib.suppress(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        for self.calls in range(1, 4):
            started(0)  # where the sweep looks whether it was asked to stop


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to itself")
@pytest.mark.parametrize("sigint", [signal.SIG_IGN, signal.default_int_handler])
def test_sigterm_stops_the_sweep_even_where_its_interrupt_was_lost(tmp_path, sigint):
    _, _, runs = plan_sweep(tmp_path / "b", ["digits"], ["sgd"], 1, epochs=1, extra=dict(TINY))
    executor = _SwallowingExecutor()
    before = signal.signal(signal.SIGINT, sigint)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            run_sweep(runs, executor=executor, progress=False)
        assert signal.getsignal(signal.SIGINT) is sigint  # the process's own again
    finally:
        signal.signal(signal.SIGINT, before)
    assert executor.calls == 1 and stopped.value.signum == signal.SIGTERM
    # SIGINT ignored (a shell's `&`) stays ignored: the user's choice; else it stops too.
    assert (executor.sigint is signal.SIG_IGN) == (sigint is signal.SIG_IGN)


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_run_forked_as_the_sweep_stops_ends_on_the_sigterm_it_is_sent(tmp_path):
    # The stop comes while the run process is being started (recorded, raised once it is
    # recorded), and the sweep sends it SIGTERM before it has handlers of its own: it must
    # die of it, not run the sweep's handler (which, stopping already, would do nothing).
    _, _, runs = plan_sweep(tmp_path / "b", ["digits"], ["sgd"], 1, epochs=1, extra=dict(TINY))
    with stop_on_signals(), pytest.raises(Stopped):
        with deferred_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here: it records the stop
            child = RunProcess(runs[0], runs[0].config, 1, fork=True)
        pytest.fail("the stop was not raised at the end of the section")
    child.send(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.code == -signal.SIGTERM, (runs[0].out / LOG_NAME).read_text()
