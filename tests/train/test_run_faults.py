"""Runs survive faults: SIGKILL mid-run, damaged or malicious checkpoints, a full disk, fp16.

* A real ``python -m samkit train`` subprocess is killed with SIGKILL after its first
  checkpoint; ``--resume`` then finishes it bit-exactly (same weights, optimizer state and
  metrics as an uninterrupted run).
* Truncated, random and malicious (code-running pickle) checkpoints give CheckpointError
  and a one-line CLI error (exit 2) saying what is wrong with the file and what to do; the
  malicious payload never runs.
* A disk that fills up at any point of a run: one-line error (exit 2) naming the file, no
  partial line or temp file left, what was written before intact, and --resume recovers.
* fp16 autocast with a GradScaler: finite metrics, scaler state checkpointed, exact resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samkit.cli import main
from samkit.train import CheckpointError, TrainConfig, read_checkpoint, train
from samkit.train.checkpoint import TMP_SUFFIX

TINY = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--threads", "1"]
TIMING_KEYS = {"seconds", "train_seconds", "sharpness_seconds"}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _same_tensors(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_same_run(out: Path, ref: Path) -> None:
    a, b = read_checkpoint(out), read_checkpoint(ref)
    assert a["epoch"] == b["epoch"]
    assert _same_tensors(a["model"], b["model"]), "weights differ"
    assert _same_tensors(a["optimizer"], b["optimizer"]), "optimizer state differs"
    assert _rows(out) == _rows(ref)


def _temp_files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith(TMP_SUFFIX)]


def _one_line_error(err: str) -> str:
    assert err.startswith("samkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- SIGKILL


def _killed_run(out: Path, epochs: int) -> tuple[int | None, int]:
    """Start a run, SIGKILL it once its first checkpoint exists.

    Returns (the checkpoint epoch at the kill, or None if it finished first; return code).
    """
    cmd = [sys.executable, "-m", "samkit", "train", *TINY, "--epochs", str(epochs), "--seed",
           "3", "--out", str(out), "--checkpoint-every", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    try:
        while proc.poll() is None and not ckpt.exists():
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    if proc.returncode == 0:
        return None, 0
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr)
    return int(read_checkpoint(out)["epoch"]), proc.returncode


def test_sigkill_mid_run_then_resume_is_bit_exact(tmp_path):
    epochs, killed_at = 12, None
    for attempt in range(3):  # a run that finished before the kill proves nothing: go longer
        out = tmp_path / f"killed{attempt}"
        killed_at, _ = _killed_run(out, epochs)
        if killed_at is not None and killed_at < epochs:
            break
        epochs *= 4
    assert killed_at is not None and 1 <= killed_at < epochs, "the kill never landed mid-run"
    assert not (out / "summary.json").exists()  # it really died before the end
    # At most the epoch in progress is lost: metrics.jsonl may hold one row past the checkpoint.
    assert killed_at <= len(_rows(out)) <= killed_at + 1

    args = ["train", "--out", str(out), "--resume", "--epochs", str(epochs), "--quiet"]
    assert main([*args, "--threads", "1"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", *TINY, "--epochs", str(epochs), "--seed", "3", "--out", str(ref),
                 "--quiet"]) == 0  # fmt: skip
    _assert_same_run(out, ref)
    assert len(_rows(out)) == epochs
    assert _temp_files(out) == []  # a temp file of a write cut by the kill is cleaned up


# ----------------------------------------------------------------------------- checkpoints


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    torch.set_num_threads(1)
    train(TrainConfig(epochs=1, out=str(out), limit_train=64, limit_test=64), log=None)
    return (out / "checkpoint.pt").read_bytes()


def _damaged_checkpoints(good: bytes, marker: Path) -> dict[str, bytes]:
    rnd = random.Random(0)
    cases = {f"truncated-{frac}": good[: int(len(good) * frac)] for frac in (0, 0.01, 0.5, 0.99)}
    cases["truncated-minus-1-byte"] = good[:-1]
    cases["random-bytes"] = bytes(rnd.getrandbits(8) for _ in range(4096))
    flipped = bytearray(good)
    for i in rnd.sample(range(len(good) // 4, len(good)), 64):  # damage the tensor data
        flipped[i] ^= 0xFF
    cases["bit-flips"] = bytes(flipped)
    cases["text"] = b'{"format": "samkit.train"}'
    import io

    buf = io.BytesIO()
    torch.save({"format": "samkit.train", "version": 1, "epoch": 1, "config": _Evil(marker),
                "dataset_info": {}, "model": {}}, buf)  # fmt: skip
    cases["malicious-pickle"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"format": "samkit.train", "config": _Evil(marker)}, buf,
               _use_new_zipfile_serialization=False)  # fmt: skip
    cases["malicious-pickle-old-torch-format"] = buf.getvalue()
    cases["malicious-bare-pickle"] = pickle.dumps({"config": _Evil(marker)}, protocol=4)
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    cases["not-a-samkit-checkpoint"] = buf.getvalue()
    return cases


#: What the message says is wrong with each damaged file.
DIAGNOSIS = {
    "truncated-0": "the file is empty (0 bytes)",
    "truncated-0.01": "the file is truncated: a zip archive cut short",
    "truncated-0.5": "the file is truncated: a zip archive cut short",
    "truncated-0.99": "the file is truncated: a zip archive cut short",
    "truncated-minus-1-byte": "the file is truncated: a zip archive cut short",
    "random-bytes": "it is not a torch checkpoint: not a zip archive",
    "text": "it is not a torch checkpoint: not a zip archive",
    "malicious-pickle": "unsafe content: its pickle names posix.system",
    "malicious-pickle-old-torch-format": "unsafe content: its pickle names posix.system",
    "malicious-bare-pickle": "unsafe content: its pickle names posix.system",
    "not-a-samkit-checkpoint": "it is a torch file but not a samkit training checkpoint",
}


def test_malicious_checkpoint_would_run_code_without_weights_only(tmp_path):
    # Sanity check of the payload itself: the unsafe loader runs it.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(_damaged_checkpoints(b"x" * 100, marker)["malicious-pickle"])
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("case", [*DIAGNOSIS, "bit-flips"])
def test_damaged_checkpoint_is_a_checkpoint_error_and_one_cli_line(
    case, real_checkpoint, tmp_path, capsys
):
    marker = tmp_path / "pwned"
    data = _damaged_checkpoints(real_checkpoint, marker)[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(data)
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    if case == "bit-flips":
        # Flipped bytes inside tensor data are not detectable without a checksum: the
        # checkpoint loads (or not) but must never crash deep inside torch.
        with contextlib.suppress(CheckpointError):
            read_checkpoint(out)
    else:
        with pytest.raises(CheckpointError, match="checkpoint.pt"):
            read_checkpoint(out)
        rc = main(["train", "--out", str(out), "--resume", "--epochs", "5", "--threads", "1"])
        err = _one_line_error(capsys.readouterr().err)
        # What is wrong with the file, and what to do; never torch's advice to load it unsafely.
        assert rc == 2 and f"cannot use checkpoint {out / 'checkpoint.pt'}: " in err, err
        assert DIAGNOSIS[case] in err, err
        assert err.endswith(". Start a new run (with another --out) or restore the file from a "
                            "copy\n"), err  # fmt: skip
        assert "weights_only=False" not in err and "Re-running" not in err, err
        assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # left as it was
    assert not marker.exists(), "the checkpoint ran code"


# ----------------------------------------------------------------------------- full disk


class _Disk:
    """``os.fdopen`` whose files raise ENOSPC once ``budget`` bytes have been written in
    total (after writing what still fits, as a real full disk does)."""

    def __init__(self, budget: float = float("inf")):
        self.left = budget
        self.writes: list[tuple[str, int]] = []  # (file name, bytes) of every write call
        self._fdopen = os.fdopen

    def fdopen(self, fd, *args, **kwargs):
        return _DiskFile(self._fdopen(fd, *args, **kwargs), self)


class _DiskFile:
    def __init__(self, f, disk: _Disk):
        self._f, self._disk = f, disk
        self._name = Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._disk.writes.append((self._name, n))
        if n > self._disk.left:
            fits = int(self._disk.left)
            self._f.write(bytes(memoryview(data).cast("B")[:fits]))
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _train_args(out: Path) -> list[str]:
    return ["train", *TINY, "--epochs", "2", "--out", str(out), "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A 2-epoch run on an unlimited disk: its files and the writes it made, in order."""
    out = tmp_path_factory.mktemp("disk") / "clean"
    disk = _Disk()
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "fdopen", disk.fdopen)
    try:
        assert main(_train_args(out)) == 0
    finally:
        mp.undo()
    return out, disk.writes


RESULT_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")


def _fail_points(writes: list[tuple[str, int]]) -> dict[str, int]:
    """A byte budget that runs out in the middle of each written file, in order."""
    points, total, seen = {}, 0, {}
    for name, n in writes:
        key = next(k for k in RESULT_FILES if k in name)  # a temp file counts as its target
        if n:
            seen[key] = seen.get(key, 0) + 1
            label = f"{key}#{seen[key]}"
            points.setdefault(label, total + n // 2)
        total += n
    return points


FULL_DISK_POINTS = [
    "config.json#1", "metrics.jsonl#1", "checkpoint.pt#1", "metrics.jsonl#2", "checkpoint.pt#2",
    "summary.json#1",
]  # fmt: skip


@pytest.mark.parametrize("point", FULL_DISK_POINTS)
def test_full_disk_one_line_error_and_earlier_results_intact(point, clean_run, tmp_path, capsys):
    clean, writes = clean_run
    points = _fail_points(writes)
    assert set(FULL_DISK_POINTS) <= set(points), points
    out = tmp_path / "run"
    disk = _Disk(points[point])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fdopen", disk.fdopen)
        rc = main(_train_args(out))
    err = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "No space left on device" in err, err
    assert disk.left == 0  # the fault really happened
    assert _temp_files(out) == []
    # Everything written before the fault is intact and readable.
    if (out / "config.json").exists():
        json.loads((out / "config.json").read_text())
    rows = _rows(out) if (out / "metrics.jsonl").exists() else []
    assert rows == _rows(clean)[: len(rows)]  # complete lines only, the same as the clean run
    if (out / "checkpoint.pt").exists():
        epoch = read_checkpoint(out)["epoch"]
        assert epoch <= len(rows)
        if epoch < 2:
            assert "continue with --resume" in err
            # ... and resuming on a healthy disk gives the clean run, bit for bit.
            assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet",
                         "--threads", "1"]) == 0  # fmt: skip
            _assert_same_run(out, clean)
    if point == "summary.json#1":
        assert "final epoch 2 is intact" in err and read_checkpoint(out)["epoch"] == 2


def test_unwritable_output_is_one_line_for_root_too(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "sub", blocker, Path("/proc/samkit-run")):  # fails even for root
        assert main(_train_args(out)) == 2
        err = _one_line_error(capsys.readouterr().err)
        assert str(out) in err, err
    assert blocker.read_text() == "x"


def test_result_files_are_readable_by_others(tmp_path):
    # mkstemp creates 0600 files; results must follow the umask like any other file.
    out = tmp_path / "run"
    mask = os.umask(0o022)
    try:
        assert main(_train_args(out)) == 0
    finally:
        os.umask(mask)
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


# ----------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("optimizer", ["sam", "sgd"])  # sharpness-aware and plain step paths
@pytest.mark.filterwarnings("ignore::samkit.train.TrainWarning")  # fp16 on a CPU is slow
def test_fp16_run_is_finite_and_resumes_exactly_with_the_scaler(optimizer, tmp_path):
    torch.set_num_threads(1)
    common = dict(optimizer=optimizer, amp="fp16", limit_train=128, limit_test=64, batch_size=32)
    ref = tmp_path / "ref"
    s = train(TrainConfig(epochs=2, out=str(ref), **common), log=None)
    for row in _rows(ref):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert torch.isfinite(torch.tensor(float(row[key]))), row
    assert s["completed"] and s["grad_evals"] > 0
    scaler = read_checkpoint(ref)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0

    out = tmp_path / "out"
    train(TrainConfig(epochs=2, stop_after_epoch=1, out=str(out), **common), log=None)
    train(TrainConfig(epochs=2, resume=True, out=str(out), **common), log=None)
    _assert_same_run(out, ref)
    assert read_checkpoint(out)["scaler"] == scaler
