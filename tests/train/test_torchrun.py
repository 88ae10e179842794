"""``samkit train`` under torchrun: real 2-process launches on the CPU (gloo).

Launch tests (marked slow; each launch starts torchrun and two workers): a 2-process run with
a synchronised ascent equals one process on the global batch; an interrupted 2-process run
resumes bit for bit (F-SAM keeps per-process state; BatchNorm); a setup error is reported
once; an error on one process ends both with one line each; ``--track-sharpness`` and
``samkit sharpness`` by 2 processes equal one process measuring the same samples, and a
subset too small for the processes is one line from rank 0. In-process tests cover the
loader's shares, the refusals and the collective helpers' single-process forms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import samkit.sharpness as S
from samkit.cli import main
from samkit.train import (
    ConfigError,
    TrainConfig,
    build_dataset,
    load_checkpoint,
    read_checkpoint,
    resolve_config,
    train,
)
from samkit.train.data import InMemoryLoader
from samkit.train.distributed import Launch, PeerFailure, Processes, _digest, launch_from_env

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

#: digits loads in a fraction of MNIST-1D's generation time: each process loads its data.
TINY = ["--dataset", "digits", "--limit-test", "91", "--batch-size", "40", "--no-progress"]
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_evals")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _launch(
    *args: str, runner: str = "module", timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ...`` (``runner="torchrun"``: the script;
    else ``python -m torch.distributed.run``); ``--standalone`` takes a free port."""
    if runner == "torchrun":
        exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        if exe is None:
            pytest.skip("no torchrun script next to this Python")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=timeout, stdin=subprocess.DEVNULL
    )


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in METRIC_KEYS} for r in rows]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("samkit: error:")]


#: The end of a script run under torchrun: samkit's main, then a line saying how many of
#: gloo's threads are still alive and whether the process group is still joined. A thread
#: alive when the interpreter shuts down can abort the process after its work is done
#: (samkit.train.distributed.processes): none may be left.
_MAIN_THEN_THREADS = """
import os, sys
import torch.distributed as dist
from samkit.cli import main
code = main(sys.argv[1:])
task = "/proc/self/task"
names = [open(f"{task}/{t}/comm").read() for t in os.listdir(task)] if os.path.isdir(task) else []
print(f"rank {os.environ['RANK']}: {sum('gloo' in n for n in names)} gloo threads, "
      f"joined {dist.is_initialized()}", file=sys.stderr)
sys.exit(code)
"""


def _left_in_order(stderr: str, ranks: tuple[int, ...] = (0, 1)) -> None:
    """These processes ended with no gloo thread and no group (Linux: /proc lists threads)."""
    if sys.platform.startswith("linux"):
        for rank in ranks:
            assert f"rank {rank}: 0 gloo threads, joined False" in stderr, stderr


# ----------------------------------------------------------------------------- launches


@pytest.mark.slow
def test_two_processes_with_synchronised_ascent_equal_one_process(tmp_path):
    """--batch-size is the global batch: each process takes half of it; with the ascent
    gradient averaged too (sync_ascent), the run is one process's run up to float rounding
    (an MLP: no BatchNorm, which would see each process's half)."""
    settings = ["--model", "mlp", "--limit-train", "200", "--epochs", "2"]
    settings += ["--rho", "0.1", "--lr", "0.05", "--opt-arg", "sync_ascent=true"]
    script = tmp_path / "samkit_main.py"
    script.write_text(_MAIN_THEN_THREADS)
    res = _ok(_launch(str(script), "train", *TINY, *settings, "--out", str(tmp_path / "two")))
    _left_in_order(res.stderr)  # the process group left in order: nothing can abort at exit
    # Rank 0 alone prints: one header, one line per epoch, one final line.
    assert res.stdout.count("samkit train |") == 1
    assert res.stdout.count("epoch   1/2") == 1 and res.stdout.count("test accuracy") == 1
    assert "x 2 processes (gloo, DDP, batch 20 each)" in res.stdout
    record = json.loads((tmp_path / "two" / "config.json").read_text())
    assert record["world_size"] == 2 and record["distributed"]["batch_per_process"] == 20

    one = tmp_path / "one"
    torch.set_num_threads(1)
    train(
        TrainConfig(
            dataset="digits", model="mlp", limit_train=200, limit_test=91, batch_size=40,
            epochs=2, rho=0.1, opt_args={"sync_ascent": True}, out=str(one),
        ),
        log=None,
    )  # fmt: skip
    two_w, one_w = read_checkpoint(tmp_path / "two")["model"], read_checkpoint(one)["model"]
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=1e-6)
    assert not all(torch.equal(two_w[k], one_w[k]) for k in one_w)  # two all-reduces: rounding
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(one)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=2e-6)  # means of means: 1e-5
        assert a["lr"] == b["lr"] and a["grad_evals"] == b["grad_evals"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """F-SAM on digits with BatchNorm and label noise, 2 processes: 3 epochs in one go, and
    1 epoch then --resume. 210 samples in batches of 40: a last batch of 10 (5 each)."""
    root = tmp_path_factory.mktemp("torchrun")
    args = [*TINY, "--optimizer", "fsam", "--rho", "0.1", "--label-noise", "0.2"]
    args += ["--limit-train", "210"]
    args += ["--epochs", "3"]
    full, part = root / "full", root / "part"
    _ok(_launch("-m", "samkit", "train", *args, "--out", str(full), runner="torchrun"))
    stopped = _ok(
        _launch("-m", "samkit", "train", *args, "--out", str(part), "--stop-after-epoch", "1")
    )
    assert "stopped after epoch 1 of 3" in stopped.stdout
    _ok(_launch("-m", "samkit", "train", "--out", str(part), "--resume", "--no-progress"))
    return full, part


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_bit_exactly(resumed):
    full, part = resumed
    a, b = read_checkpoint(full), read_checkpoint(part)
    assert a["world_size"] == b["world_size"] == 2
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # BN buffers too
    assert _metrics(full) == _metrics(part) and len(_metrics(full)) == 3
    # F-SAM's EMA follows each process's own ascent gradient: rank 1's state is saved too.
    assert a["optimizer_ranks"][0] is None and a["optimizer_ranks"][1] is not None
    assert _digest(a["optimizer_ranks"][1]) == _digest(b["optimizer_ranks"][1])
    assert _digest(a["optimizer"]) == _digest(b["optimizer"])
    assert len(a["rng_ranks"]) == 2
    # One process can read a 2-process run (samkit sharpness, landscape, users' code), and
    # the test loss recorded is that of the saved model (every process evaluated its half
    # with rank 0's BatchNorm statistics).
    model, config, _ = load_checkpoint(full)
    assert config.optimizer == "fsam" and not model.training
    data = build_dataset(config)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(data.prepare(data.x_test)), data.y_test)
    assert float(loss) == pytest.approx(_metrics(full)[-1]["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_each_process_ascends_on_its_own_half_by_default(resumed, tmp_path):
    full, _ = resumed
    torch.set_num_threads(1)
    one = tmp_path / "one"
    train(
        TrainConfig(dataset="digits", optimizer="fsam", rho=0.1, label_noise=0.2,
                    limit_train=210, limit_test=91, batch_size=40, epochs=3, out=str(one)),
        log=None,
    )  # fmt: skip
    a, b = read_checkpoint(full)["model"], read_checkpoint(one)["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst > 1e-4  # local ascent (m-sharpness with m = 20), not rounding


@pytest.mark.slow
def test_resuming_with_another_process_count_is_refused(resumed, tmp_path):
    full, _ = resumed
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    with pytest.raises(ConfigError, match="trained by 2 processes and this command runs 1"):
        saved = read_checkpoint(copy)["config"]
        train(TrainConfig.from_dict({**saved, "out": str(copy), "resume": True}), log=None)


@pytest.mark.slow
def test_a_setup_error_is_reported_once(resumed):
    full, _ = resumed
    res = _launch("-m", "samkit", "train", *TINY, "--out", str(full))
    assert res.returncode != 0
    errors = _errors(res.stderr)
    assert len(errors) == 1 and "already holds a run" in errors[0], res.stderr


@pytest.mark.slow
def test_an_error_on_one_process_ends_both_with_one_line_each(tmp_path):
    # Rank 1 fails in its first epoch while rank 0 waits in the first gradient all-reduce.
    script = tmp_path / "fault.py"
    script.write_text(
        "import os, sys\n"
        "import samkit.train.epoch as epoch\n"
        "from samkit.optim import NonFiniteError\n"
        "def fail(run, on_step=None):\n"
        "    raise NonFiniteError('simulated: a NaN on this process only')\n"
        "if os.environ['RANK'] == '1':\n"
        "    epoch.train_epoch = fail\n" + _MAIN_THEN_THREADS
    )
    start = time.monotonic()
    res = _launch(str(script), "train", *TINY, "--limit-train", "80", "--epochs", "1", timeout=300)
    assert time.monotonic() - start < 300  # no hang (subprocess.run would raise anyway)
    assert res.returncode != 0
    errors = _errors(res.stderr)
    assert (
        "samkit: error: rank 1 of 2: training diverged: simulated: a NaN on this process only"
        in (errors)
    ), res.stderr
    assert any(e.startswith("samkit: error: rank 0 of 2: stopped") for e in errors), res.stderr
    assert len(errors) == 2, res.stderr
    # The failed process left the group once its error was reported (the other one may be
    # ended by torchrun first).
    _left_in_order(res.stderr, ranks=(1,))


# ----------------------------------------------------------------------------- sharpness

#: --track-sharpness on 150 samples in batches of 40: each process measures 75 of them (in
#: batches of 40 and 35), one process measures batches of 40, 40, 40 and 30.
TRACKED = ["--model", "mlp", "--limit-train", "200", "--epochs", "1", "--lr", "0.5"]
TRACKED += ["--track-sharpness", "1", "--sharpness-samples", "150"]


def _digits_batches(run: Path, n: int, size: int) -> tuple[torch.nn.Module, list]:
    """The run's model and its first ``n`` training samples in batches of ``size``, as one
    process measures them."""
    model, config, _ = load_checkpoint(run)
    data = build_dataset(config)
    batches = [
        (data.prepare(data.x_train[lo : min(lo + size, n)]), data.y_train[lo : min(lo + size, n)])
        for lo in range(0, n, size)
    ]
    return model, batches


def _same_measure(two: float, one: float) -> bool:
    """Equal up to float32 rounding (the CLI measures in the model's float32): the processes
    may add their partial sums (gradients, HVPs, losses) in another order than one process.
    Measured (2026-12-06): the tracked run's shares (batches of 40+35 on each process, 40,
    40, 40, 30 in one) differ by at most 1.1e-7 relative (1.7e-7 absolute on a trace of
    4.4); the sharpness command's split (2 batches | 1) adds them in one process's order and
    is bit-identical. 1e-5 relative has margin; 1e-6 absolute covers the sharpness values
    near 0, which are differences of losses near 2.2 (float32 rounding ~2e-7 each). Measuring
    one process's half of the samples instead moves every measure by more than 1e-3 relative
    (checked in the tests)."""
    return two == pytest.approx(one, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """``samkit train --track-sharpness 1`` by 2 processes (launch 1 of 2 of this section)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    res = _ok(_launch("-m", "samkit", "train", *TINY, *TRACKED, "--out", str(out)))
    return out, res


@pytest.mark.slow
def test_tracked_sharpness_of_two_processes_is_that_of_the_whole_subset(tracked):
    """Each process measures its half of the tracked subset; the measures, over the union,
    equal one process measuring the whole subset (the final checkpoint is the model measured
    after the last epoch)."""
    from samkit.train.epoch import measure_sharpness

    out, res = tracked
    assert res.stdout.count("test accuracy") == 1  # rank 0 alone prints
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    torch.set_num_threads(1)
    model, batches = _digits_batches(out, 150, 40)
    seed = json.loads((out / "config.json").read_text())["config"]["seed"]
    one = measure_sharpness(model, batches, seed)
    half = measure_sharpness(model, _digits_batches(out, 75, 40)[1], seed)  # rank 0's share
    assert row["lambda_max_converged"] == one["lambda_max_converged"]
    for key in ("lambda_max", "hessian_trace", "grad_eig_alignment"):
        assert _same_measure(row[key], one[key]), (key, row[key], one[key])
        assert abs(half[key] - one[key]) > 1e-3 * abs(one[key]), key


@pytest.fixture(scope="module")
def measured(tracked, tmp_path_factory):
    """``samkit sharpness`` by 2 processes on the tracked run (launch 2 of 2): first with a
    subset of one batch (refused before the processes join a group), then with 3 batches of
    32 (2 on rank 0, 1 on rank 1), both in the same launch."""
    run, _ = tracked
    folder = tmp_path_factory.mktemp("measured")
    script = folder / "two_commands.py"
    script.write_text(
        "import json, os, sys\n"
        "from samkit.cli import main\n"
        "run, folder = sys.argv[1], sys.argv[2]\n"
        "bad = main(['sharpness', run, '--batches', '1', '--batch-size', '32'])\n"
        "good = main(['sharpness', run, '--batches', '3', '--batch-size', '32', '--iters', '8',\n"
        "             '--rho', '0.1'])\n"
        "with open(os.path.join(folder, 'rc' + os.environ['RANK']), 'w') as f:\n"
        "    json.dump([bad, good], f)\n"
    )
    start = time.monotonic()
    res = _launch(str(script), str(run), str(folder), timeout=300)
    seconds = time.monotonic() - start
    codes = [json.loads((folder / f"rc{r}").read_text()) for r in range(2) if res.returncode == 0]
    return run, res, codes, seconds


@pytest.mark.slow
def test_sharpness_by_two_processes_is_that_of_one_on_the_subset(measured):
    run, res, codes, _ = measured
    assert res.returncode == 0, res.stdout + res.stderr
    assert [good for _, good in codes] == [0, 0]
    record = json.loads((run / "sharpness.json").read_text())
    assert record["run"]["processes"] == 2
    assert record["run"]["samples"] == 96 and record["run"]["batches"] == 3
    # rank 0 alone prints the table and writes
    assert res.stdout.count("96 training samples in 3 batches, measured by 2 processes") == 1
    assert res.stdout.count(f"saved {run / 'sharpness.json'}") == 1
    torch.set_num_threads(1)
    model, batches = _digits_batches(run, 96, 32)
    loss_fn = torch.nn.CrossEntropyLoss()
    one = S.measure_all(model, loss_fn, batches, rho=0.1, lanczos_iter=8, seed=0)
    half = S.measure_all(model, loss_fn, batches[:2], rho=0.1, lanczos_iter=8, seed=0)
    m = record["measures"]
    assert m["errors"] == {} and m["num_hvp"] == one["num_hvp"]
    assert m["lambda_max_converged"] == one["lambda_max_converged"]
    for key, value in one.items():
        if isinstance(value, float) and key not in ("rho", "seconds"):
            assert _same_measure(m[key], value), (key, m[key], value)
            assert abs(half[key] - value) > 1e-3 * abs(value), key


@pytest.mark.slow
def test_too_few_batches_for_the_processes_is_one_line_from_rank_0(measured):
    _, res, codes, seconds = measured
    assert res.returncode == 0, res.stdout + res.stderr
    assert [bad for bad, _ in codes] == [2, 2]
    errors = _errors(res.stderr)
    assert errors == [
        "samkit: error: --batches 1: the subset has 1 batch for 2 processes; each process "
        "measures whole batches of --batch-size 32 (the m of m-sharpness), at least one: use "
        "--batches 2 or more"
    ], res.stderr
    assert seconds < 300  # no process waited for the other


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch-size", "63"], "--batch-size 63 is the global batch and must be divisible"),
        (["--device", "cuda:1"], "--device cuda:1 names one GPU, but 2 processes run"),
    ],
)
def test_settings_that_cannot_be_split_are_refused_before_joining(monkeypatch, capsys, argv, words):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--dataset", "digits", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")  # the same error on rank 1, which says nothing
    assert main(["train", "--dataset", "digits", *argv]) == 2
    assert capsys.readouterr().err == ""
    assert not dist.is_initialized()


def test_launch_from_env_reads_torchrun_variables():
    assert launch_from_env({}) == Launch()
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert launch_from_env(env) == Launch(world_size=4, rank=3, local_rank=1)
    with pytest.raises(ConfigError, match="RANK=4, WORLD_SIZE=4"):
        launch_from_env({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ConfigError, match="invalid WORLD_SIZE"):
        launch_from_env({"WORLD_SIZE": "two"})


def _loader(rank: int, world: int, n: int, seed: int = 0) -> InMemoryLoader:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n) % 10
    gen = torch.Generator().manual_seed(seed)

    def noisy(xb: torch.Tensor) -> torch.Tensor:  # a transform that draws random numbers
        return xb + torch.rand(xb.shape, generator=gen)

    return InMemoryLoader(
        x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1), transform=noisy,
        shard=(rank, world),
    )  # fmt: skip


@pytest.mark.parametrize("n, world", [(40, 2), (43, 2), (41, 4), (33, 4), (5, 4)])
def test_the_shares_of_every_process_make_up_the_global_batch(n, world):
    one = _loader(0, 1, n)
    loaders = [_loader(r, world, n) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    for _epoch in range(2):  # the generators carry over: a new order each epoch
        whole = [b for b in one if len(b[2]) >= world]  # a last batch cut to nothing is dropped
        shares = [list(ld) for ld in loaders]
        assert all(len(s) == len(whole) == len(loaders[0]) for s in shares)
        for k, (x, y, idx) in enumerate(whole):
            keep = len(idx) - len(idx) % world  # a last batch is cut to a multiple of world
            parts = [s[k] for s in shares]
            assert len({len(p[2]) for p in parts}) == 1
            assert torch.equal(torch.cat([p[2] for p in parts]), idx[:keep])
            assert torch.equal(torch.cat([p[1] for p in parts]), y[:keep])
            assert torch.equal(torch.cat([p[0] for p in parts]), x[:keep])  # same draws


def test_a_batch_that_cannot_be_shared_is_refused():
    with pytest.raises(ValueError, match="Invalid batch_size value: 9"):
        InMemoryLoader(torch.zeros(4, 1), torch.zeros(4), 9, shard=(0, 2))
    with pytest.raises(ValueError, match=r"Invalid shard value: \(2, 2\)"):
        InMemoryLoader(torch.zeros(4, 1), torch.zeros(4), 8, shard=(2, 2))


def test_one_process_collectives_are_the_identity():
    procs = Processes(Launch(), torch.device("cpu"))
    assert procs.sum([1.5, 3]) == [1.5, 3]
    assert procs.gather({"a": 1}) == [{"a": 1}] and procs.gather_differing(1) == [None]
    assert procs.agree(lambda: 7) == 7
    with pytest.raises(ConfigError, match="bad"):
        procs.agree(lambda: (_ for _ in ()).throw(ConfigError("bad")))
    assert procs.shard(10) == (0, 10)
    model = torch.nn.Linear(2, 2)
    assert procs.wrap(model) is model


def test_the_digest_sees_every_bit_and_the_order():
    state = {"a": torch.tensor([1.0, 2.0]), "b": [torch.tensor(3), "x"], "c": None}
    same = {"a": torch.tensor([1.0, 2.0]), "b": [torch.tensor(3), "x"], "c": None}
    assert _digest(state) == _digest(same)
    bumped = {
        **same,
        "a": torch.tensor([1.0, torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))]),
    }
    assert _digest(bumped) != _digest(state)
    assert _digest({**same, "a": same["a"].double()}) != _digest(state)
    assert _digest({"b": same["b"], "a": same["a"], "c": None}) != _digest(state)
    assert _digest({**same, "b": [torch.tensor(3), "y"]}) != _digest(state)


def test_each_process_tracks_the_sharpness_of_its_share_of_the_subset():
    from samkit.train.build import build_run

    config = resolve_config(
        TrainConfig(dataset="digits", model="mlp", limit_train=200, limit_test=91,
                    batch_size=30, track_sharpness=1, sharpness_samples=150)
    )  # fmt: skip
    cpu = torch.device("cpu")
    whole = build_run(config, cpu).sharpness_batches
    shares = [
        build_run(config, cpu, Processes(Launch(world_size=3, rank=r), cpu)).sharpness_batches
        for r in range(3)
    ]
    assert [[len(y) for _, y in share] for share in shares] == [[30, 20]] * 3
    for i in (0, 1):  # the union, in rank order, is the subset one process measures
        assert torch.equal(torch.cat([b[i] for s in shares for b in s]),
                           torch.cat([b[i] for b in whole]))  # fmt: skip
    few = dataclasses.replace(config, sharpness_samples=2)
    with pytest.raises(ConfigError, match=r"--track-sharpness: 2 training samples .* 3 proc"):
        build_run(few, cpu, Processes(Launch(world_size=3, rank=0), cpu))


def test_a_subset_too_small_to_share_names_the_setting_to_change():
    from samkit.train.measure import _check_shares

    _check_shares(2, batch_size=32, world=2)  # enough, before the data is loaded
    _check_shares(4, batch_size=32, world=2, bounds=[(0, 32), (32, 50)])  # and after
    with pytest.raises(ConfigError, match="--batches 1: the subset has 1 batch for 2 proc"):
        _check_shares(1, batch_size=32, world=2)
    with pytest.raises(
        ConfigError,
        match=r"--batch-size 64: the training set has 50 samples, 1 batch for 3 processes; "
        r".*use --batch-size 16 or less",
    ):
        _check_shares(4, batch_size=64, world=3, bounds=[(0, 50)])


def test_measurement_errors_of_several_processes_are_agreed():
    two = Processes(Launch(world_size=2, rank=1), torch.device("cpu"))
    for error in (S.PeerError("hvp: process 0 failed"), ValueError("v"), TypeError("t")):
        with pytest.raises(PeerFailure, match=str(error)) as caught, two.measuring():
            raise error
        assert caught.value.samkit_agreed and caught.value.__cause__ is error
    with pytest.raises(RuntimeError, match="a bug") as caught, two.measuring():
        raise RuntimeError("a bug")  # its own traceback, not agreed
    assert not getattr(caught.value, "samkit_agreed", False)
    with pytest.raises(ValueError, match="v"), Processes(Launch(), two.device).measuring():
        raise ValueError("v")  # one process: unchanged
