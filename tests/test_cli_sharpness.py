"""``samkit sharpness`` and ``samkit landscape`` on a tiny run: files, numbers and errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

import samkit.sharpness as S
from samkit.cli import main
from samkit.train import build_dataset, load_checkpoint

TINY = ["--limit-train", "256", "--limit-test", "100", "--batch-size", "64", "--threads", "1"]
SUBSET = ["--batches", "2", "--batch-size", "32"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_sharpness") / "run"
    argv = ["train", "--epochs", "1", "--optimizer", "sgd", "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    return out


def _subset(run):
    """The subset the commands promise to use: first 2×32 training samples, prepared."""
    model, config, _ = load_checkpoint(run)
    data = build_dataset(config)
    batches = [(data.prepare(data.x_train[i : i + 32]), data.y_train[i : i + 32]) for i in (0, 32)]
    return model, batches


def test_sharpness_writes_the_measures_of_measure_all(run_dir, capsys):
    rc = main(["sharpness", str(run_dir), "--rho", "0.1", "--iters", "8", *SUBSET])
    out = capsys.readouterr().out
    assert rc == 0
    record = json.loads((run_dir / "sharpness.json").read_text())
    assert set(record) == {"run", "settings", "measures"}
    m = record["measures"]
    expected = {"loss", "lambda_max", "lambda_max_converged", "trace", "trace_std_error",
                "worst_direction", "ascent_direction", "average_direction",
                "average_direction_std_error", "alignment", "num_hvp", "rho", "seconds",
                "errors"}  # fmt: skip
    assert set(m) == expected and m["errors"] == {}
    for key in expected - {"lambda_max_converged", "errors"}:
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    assert m["lambda_max"] > 0 and 0 <= m["alignment"] <= 1 and m["worst_direction"] >= 0
    assert record["run"]["samples"] == 64 and record["run"]["batches"] == 2
    assert record["run"]["optimizer"] == "sgd" and record["run"]["epoch"] == 1
    assert record["settings"] == {"rho": 0.1, "batches": 2, "batch_size": 32, "iters": 8,
                                  "seed": 0}  # fmt: skip
    # exactly what measure_all gives on the promised subset (deterministic, seeded)
    model, batches = _subset(run_dir)
    ref = S.measure_all(model, nn.CrossEntropyLoss(), batches, rho=0.1, lanczos_iter=8, seed=0)
    for key in expected - {"seconds"}:
        assert m[key] == ref[key], key
    assert "lambda_max" in out and f"{m['lambda_max']:.6g}" in out
    # Monte-Carlo estimates come with their standard error, flagged when inside their noise
    lines = {ln.split("  ")[1].strip(): ln for ln in out.splitlines() if ln.startswith("  ")}
    avg = lines["average-direction (rho 0.1)"]
    assert f"{m['average_direction']:.6g} ± {m['average_direction_std_error']:.2g}" in avg
    inside = abs(m["average_direction"]) < 2 * m["average_direction_std_error"]
    assert ("within noise" in avg) == inside
    assert f"{m['trace']:.6g} ± {m['trace_std_error']:.2g}" in lines["Hessian trace"]
    assert "std error" not in out  # no longer a row of its own, read as a value
    assert out.strip().endswith(f"saved {run_dir / 'sharpness.json'}")


def test_sharpness_of_a_checkpoint_file_with_json_path(run_dir, tmp_path, capsys):
    target = tmp_path / "deep" / "s.json"
    target.parent.mkdir()
    argv = ["sharpness", str(run_dir / "checkpoint.pt"), "--rho", "0", "--iters", "4",
            "--json", str(target), *SUBSET]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads(target.read_text())["measures"]
    # rho = 0: every neighbourhood notion is exactly 0
    assert m["worst_direction"] == 0 and m["average_direction"] == 0
    assert m["ascent_direction"] == 0


def test_landscape_1d_2d_and_interpolation(run_dir, tmp_path, capsys):
    rc = main(["landscape", str(run_dir), "--steps", "5", "--span", "0.5", *SUBSET])
    assert rc == 0, capsys.readouterr().err
    png, grid = (
        run_dir / "landscape_1d.png",
        json.loads((run_dir / "landscape_1d.json").read_text()),
    )
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert grid["alphas"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5], abs=1e-12)
    assert len(grid["losses"]) == 5 and all(math.isfinite(x) for x in grid["losses"])
    model, batches = _subset(run_dir)
    with torch.no_grad():  # α = 0 is the checkpoint's own loss on the same subset
        loss0 = sum(float(nn.functional.cross_entropy(model(x), y)) * len(y) for x, y in batches)
    assert grid["losses"][2] == pytest.approx(loss0 / 64, rel=1e-6)

    out2 = tmp_path / "two"
    rc = main(["landscape", str(run_dir), "--2d", "--steps", "3", "--out", str(out2), *SUBSET])
    assert rc == 0, capsys.readouterr().err
    grid2 = json.loads((out2 / "landscape_2d.json").read_text())
    assert (out2 / "landscape_2d.png").read_bytes()[:8] == PNG_MAGIC
    assert len(grid2["losses"]) == 3 and all(len(row) == 3 for row in grid2["losses"])
    assert grid2["losses"][1][1] == pytest.approx(loss0 / 64, rel=1e-6)

    # interpolating a checkpoint with a copy of itself: the loss is the same everywhere
    other = tmp_path / "copy.pt"
    shutil.copy(run_dir / "checkpoint.pt", other)
    argv = ["landscape", str(run_dir), "--other", str(other), "--steps", "3", "--out",
            str(tmp_path / "interp"), *SUBSET]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    grid3 = json.loads((tmp_path / "interp" / "interpolation.json").read_text())
    assert grid3["alphas"] == [0.0, 0.5, 1.0]
    assert grid3["settings"]["names"] == ["run", "copy.pt"]  # the plot's names of the ends
    assert grid3["settings"]["span"] is None
    assert grid3["losses"] == pytest.approx([loss0 / 64] * 3, rel=1e-6)
    assert (tmp_path / "interp" / "interpolation.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_inputs_give_one_line_and_exit_code_2(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)
    missing = tmp_path / "nowhere"
    run = str(run_dir)
    cases = [
        (["sharpness", str(missing)], "checkpoint not found"),
        (["sharpness", str(broken)], "broken.pt"),
        (["sharpness", run, "--rho", "-0.1"], "invalid rho"),
        (["sharpness", run, "--rho", "nan"], "invalid rho"),
        (["sharpness", run, "--batches", "0"], "invalid batches"),
        (["sharpness", run, "--batch-size", "0"], "invalid batch_size"),
        (["sharpness", run, "--iters", "0"], "invalid iters"),
        (["sharpness", run, "--iters", "abc"], "--iters: invalid int value"),
        (["sharpness", run, "--seed", "-1"], "invalid seed"),
        (["sharpness", run, "--device", "warp9"], "invalid device"),
        (["sharpness"], "required: RUN_DIR_OR_CHECKPOINT"),
        (["landscape", str(missing)], "checkpoint not found"),
        (["landscape", str(broken), "--2d"], "broken.pt"),
        (["landscape", run, "--steps", "1"], "invalid steps"),
        (["landscape", run, "--span", "0"], "invalid span"),
        (["landscape", run, "--2d", "--other", run], "cannot be combined"),
        (["landscape", run, "--other", str(missing)], "checkpoint not found"),
        (["landscape", run, "--other", run, "--span", "2"], "--span does not apply"),
        (["landscape", run, "--steps", "100000000000000000000"], "from 2 to 1001"),
        (["sharpness", run, "--device", "meta"], "invalid device 'meta'"),
        (["landscape", run, "--device", "cuda:x"], "invalid device 'cuda:x'"),
        (["sharpness", run, "--json", str(missing / "s.json")], "does not exist"),
        (["sharpness", run, "--json", str(tmp_path)], "it is a folder"),
        (["landscape", run, "--out", str(broken)], "exists and is not a folder"),
        (["landscape", run, "--out", str(broken / "sub")], "--out"),
    ]
    for argv, expected in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.startswith("samkit: error: ") and err.count("\n") == 1, (argv, err)
        assert expected in err, (argv, err)
        assert "samkit-tmp" not in err and "Errno" not in err, (argv, err)
    assert not (missing / "sharpness.json").exists()


def test_output_problems_are_found_before_measuring(run_dir, tmp_path, capsys, monkeypatch):
    """A bad --json or --out fails at once, not after minutes of measurement."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("measured although the output cannot be written")

    for name in ("measure_all", "landscape_1d", "landscape_2d", "interpolate"):
        monkeypatch.setattr(S, name, must_not_run)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        ["sharpness", str(run_dir), "--json", str(tmp_path / "no" / "s.json")],
        ["landscape", str(run_dir), "--out", str(blocker)],
        ["landscape", str(run_dir), "--2d", "--out", str(blocker / "sub")],
        ["landscape", str(run_dir), "--other", str(run_dir), "--out", str(blocker)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("samkit: error: --") and err.count("\n") == 1, err


def test_batch_size_help_says_what_it_does_per_command(capsys):
    helps = {}
    for command in ("sharpness", "landscape"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        helps[command] = text[text.index("--batch-size M") :]
    assert "m-sharpness" in helps["sharpness"]
    assert "m-sharpness" not in helps["landscape"]
    assert "only memory and speed" in helps["landscape"]


def _record(**measures):
    run = {"checkpoint": "r", "optimizer": "sgd", "dataset": "d", "model": "m", "epoch": 1,
           "samples": 8, "batches": 1}  # fmt: skip
    return {"run": run, "measures": {"rho": 0.05, "errors": {}, **measures}}


def test_table_shows_standard_errors_noise_failures_and_undefined_values():
    from samkit.train.measure import format_table

    def rows(text):  # name column, then value column (the table's two columns)
        return {ln[2:32].strip(): ln[32:].strip() for ln in text.splitlines()[1:11]}

    t = format_table(
        _record(trace=12.5, trace_std_error=0.5, average_direction=-3e-5,
                average_direction_std_error=2e-5, ascent_direction=None, alignment=None)
    )  # fmt: skip
    r = rows(t)
    assert r["Hessian trace"] == "12.5 ± 0.5"  # 25 standard errors away from 0: no flag
    assert r["average-direction (rho 0.05)"] == (
        "-3e-05 ± 2e-05  (within noise: |value| < 2 standard errors)"
    )
    assert r["ascent-direction (rho 0.05)"] == "undefined (zero gradient)"
    assert "failed" not in t
    # a failed measure reads "failed" and its error is listed under the table
    failed = _record(trace=None, trace_std_error=None, lambda_max=None, loss=1.0)
    failed["measures"]["errors"] = {"trace": "RuntimeError: no second derivative"}
    t2 = format_table(failed)
    assert rows(t2)["Hessian trace"] == "failed (see errors below)"
    assert rows(t2)["lambda_max"] == "n/a"
    assert t2.splitlines()[-1] == "  trace: RuntimeError: no second derivative"


def test_run_labels(tmp_path):
    from samkit.train.measure import run_label

    run = tmp_path / "sam_seed1"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert run_label(run) == "sam_seed1"
    assert run_label(run / "checkpoint.pt") == "sam_seed1"
    assert run_label(tmp_path / "epoch5.pt") == "epoch5.pt"


def test_an_interrupt_is_one_line_with_exit_code_130(run_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("measure_all", "landscape_1d"):
        monkeypatch.setattr(S, name, interrupted)
    out = tmp_path / "o"
    for argv in (
        ["sharpness", str(run_dir), "--json", str(tmp_path / "s.json")],
        ["landscape", str(run_dir), "--out", str(out)],
    ):
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert err.startswith("samkit: error: interrupted") and err.count("\n") == 1, err
    assert not (tmp_path / "s.json").exists() and not (out / "landscape_1d.png").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_landscape_under_torchrun_is_measured_and_written_by_rank_0_alone(
    run_dir, tmp_path, capsys, monkeypatch, rank
):
    # What torchrun sets in each of its processes (no process group: the landscape
    # functions evaluate on one process, so the others have nothing to do).
    for var, value in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank))):
        monkeypatch.setenv(var, value)
    out = tmp_path / "o"
    assert main(["landscape", str(run_dir), "--steps", "3", "--out", str(out), *SUBSET]) == 0
    printed = capsys.readouterr()
    if rank == 0:
        assert sorted(p.name for p in out.iterdir()) == ["landscape_1d.json", "landscape_1d.png"]
        assert printed.out.count("landscape_1d: 3 points") == 1 and not printed.err
    else:
        assert not out.exists() and printed.out == printed.err == ""
