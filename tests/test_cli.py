"""The samkit command line: end-to-end runs, config files, resume, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from samkit.cli import SUBCOMMANDS, main

TINY = ["--limit-train", "256", "--limit-test", "200", "--batch-size", "64", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_end_to_end_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--epochs", "2", "--out", str(out), "--no-progress", *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    lines = captured.out.strip().splitlines()
    assert "samkit train | sam" in lines[0]  # the header names method, data, model, seed
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert f"test accuracy {100 * summary['test_acc']:.2f}%" in lines[-1]
    best = f"(best {100 * summary['best_val_acc']:.2f}% at epoch {summary['best_val_epoch']})"
    assert f"validation {100 * summary['val_acc']:.2f}% {best}" in lines[-1]

    # --resume picks the settings up from the checkpoint; only --epochs changes.
    rc = main(
        ["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet", "--threads", "1"]
    )
    assert rc == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert capsys.readouterr().out.count("\n") == 1  # --quiet: only the final line


def test_without_a_terminal_each_epoch_is_one_line_and_no_bar(capsys):
    # capsys is not a terminal: no bar redraws, one line per epoch with the test accuracy.
    rc = main(["train", "--epochs", "2", "--optimizer", "sgd", *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.out + captured.err and "step/s" not in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert [line.split("|")[0].split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("| test loss " in line and "acc " in line for line in lines)


def test_training_accuracy_is_na_when_no_pass_covers_the_batch(capsys):
    # AUSAM's passes run on a sampled half of each batch: there is no prediction of the whole
    # batch to count, so the training accuracy is "n/a", not a made-up 0 %.
    rc = main(["train", "--epochs", "1", "--optimizer", "ausam", *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (line,) = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert "| train loss " in line and " acc n/a | val acc " in line
    assert "acc 0.00%" not in line


def test_progress_bar_shows_the_test_accuracy_of_each_epoch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    import samkit.cli

    monkeypatch.setattr(samkit.cli, "_is_terminal", lambda: True)
    out = tmp_path / "run"
    rc = main(["train", "--epochs", "2", "--optimizer", "sgd", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not any(line.startswith("epoch ") for line in captured.out.splitlines())
    # tqdm draws on stderr; the last drawing of each epoch's bar carries its test accuracy.
    drawings = captured.err.replace("\n", "\r").split("\r")
    finals = {d.split(":")[0]: d for d in drawings if "test_acc=" in d}  # last one per epoch
    assert list(finals) == ["epoch 1/2", "epoch 2/2"], captured.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for drawing, row in zip(finals.values(), rows, strict=True):
        assert f"test_acc={row['test_acc']:.4f}" in drawing
        assert f"val_acc={row['val_acc']:.4f}" in drawing


def test_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 1, "lr": 0.01, "optimizer": "sgd", "limit-train": 128}))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--lr", "0.02", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "config.json").read_text())["config"]
    assert record["lr"] == 0.02 and record["optimizer"] == "sgd" and record["limit_train"] == 128
    cfg.write_text(json.dumps({"epochs": 1, "learning_rate": 0.1}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'learning_rate'" in err and err.count("\n") == 1


def test_opt_arg_parsing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        ["train", "--epochs", "1", "--optimizer", "sam", "--opt-arg", "adaptive=true",
         "--opt-arg", "eta=0.02", "--rho", "0.3", "--out", str(out), "--quiet", *TINY]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    kwargs = json.loads((out / "config.json").read_text())["optimizer_kwargs"]
    assert kwargs["adaptive"] is True and kwargs["eta"] == 0.02 and kwargs["rho"] == 0.3


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    return [
        (["train", "--lr", "-1"], "invalid lr"),
        (["train", "--epochs", "0"], "invalid epochs"),
        (["train", "--epochs", "abc"], "--epochs: invalid int value"),
        (["train", "--batch-size", "-5"], "invalid batch_size"),
        (["train", "--label-noise", "1.0"], "invalid label_noise"),
        (["train", "--label-noise", "-0.1"], "invalid label_noise"),
        (["train", "--rho", "-0.1"], "invalid rho"),
        (["train", "--optimizer", "nope"], "invalid choice: 'nope'"),
        (["train", "--model", "nope"], "invalid choice: 'nope'"),
        (["train", "--dataset", "nope"], "invalid choice: 'nope'"),
        (["train", "--base", "nope"], "invalid base: 'nope' (choose one of adagrad, adam, "),
        (["train", "--dataset", "cifar10"], "needs --data-dir"),
        (["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], "none"),
        (["train", "--opt-arg", "bogus=1", "--limit-train", "64"], "rejected its settings"),
        (["train", "--opt-arg", "novalue"], "expected KEY=VALUE"),
        (["train", "--amp", "fp8"], "invalid choice: 'fp8'"),
        (["train", "--out", str(blocker / "sub")], "cannot create --out"),
        (["train", "--resume", "--out", str(tmp_path / "none")], f"no run at {tmp_path / 'none'}"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--config", str(tmp_path / "missing.json")], "missing.json"),
        (["train", "--config", str(bad_json)], "not valid JSON"),
        (["train", "--threads", "0"], "invalid --threads"),
        (["train", "--no-such-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]


def test_bad_arguments_give_one_line_and_exit_code_2(tmp_path, capsys):
    for argv, expected in _bad_cases(tmp_path):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.startswith("samkit: error: ") and err.count("\n") == 1, (argv, err)
        assert expected in err, (argv, err)
        assert "Traceback" not in err


def test_corrupted_checkpoint_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--quiet", *TINY]) == 0
    (out / "checkpoint.pt").write_bytes(b"\x00" * 100)
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and err.count("\n") == 1
    assert (out / "metrics.jsonl").read_text() == before  # results already written stay


def test_resuming_where_there_is_no_run_says_so_in_one_line(tmp_path, capsys):
    from samkit.train import CheckpointError, TrainConfig, train

    missing = tmp_path / "missing"
    assert main(["train", "--out", str(missing), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"samkit: error: no run at {missing}: the folder does not exist\n"
    )
    with pytest.raises(CheckpointError, match="^no run at .*missing: the folder does not"):
        train(TrainConfig(out=str(missing), resume=True, limit_train=64), log=None)
    assert not missing.exists()  # nothing created on the way
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--out", str(empty), "--resume"]) == 2
    assert "no run at" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint
    assert main(["train", "--out", str(empty), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume in" in err and "before writing checkpoint.pt" in err


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_a_run_that_ends_before_the_start_epoch_warns_in_one_line(method, capsys):
    tiny = ["train", "--optimizer", method, "--dataset", "digits", "--quiet"]
    tiny += ["--limit-train", "64", "--limit-test", "32", "--batch-size", "64"]
    assert main([*tiny, "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("samkit: warning: ") and err.count("\n") == 1, err
    assert f"{method} adds its term from start_epoch 6 (counted from 0: epoch 7" in err
    assert "the run has 1 epoch, so it trains as plain sgd" in err
    # The boundary: samkit train's epoch E is the optimizer's epoch E - 1.
    assert main([*tiny, "--opt-arg", "start_epoch=2", "--epochs", "2"]) == 0
    assert "from start_epoch 2" in capsys.readouterr().err
    assert main([*tiny, "--opt-arg", "start_epoch=2", "--epochs", "3"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_list(capsys):
    import samkit

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in samkit.list_optimizers():
        assert f"  {name} " in out
    assert "cnn1d" in out and "mnist1d" in out and "cifar100" in out


def test_subcommands_are_registered_in_one_list():
    assert [c.name for c in SUBCOMMANDS][:2] == ["train", "list"]


def test_help_exits_zero(capsys):
    assert main(["train", "--help"]) == 0
    assert "--opt-arg" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_top_level_help_lists_every_subcommand_with_its_help(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:  # the report's help holds a literal % (95% CI)
        assert cmd.name in out and " ".join(cmd.help.split()[:3]) in " ".join(out.split())


def test_samkit_alone_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert all(cmd.name in captured.out for cmd in SUBCOMMANDS) and captured.err == ""


@pytest.mark.parametrize("name", [cmd.name for cmd in SUBCOMMANDS])
def test_every_subcommand_has_a_help(capsys, name):
    assert main([name, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: samkit {name}") and captured.err == ""


def test_real_subprocess_python_dash_m(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "samkit", "train", "--dataset", "digits", "--epochs", "1",
         "--limit-train", "64", "--limit-test", "64", "--out", str(out), "--quiet",
         "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "test accuracy" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["model"] == "cnn_small"
    bad = subprocess.run(
        [sys.executable, "-m", "samkit", "train", "--lr", "-3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "samkit: error: invalid lr: -3.0 (must be > 0)"
    )


# ----------------------------------------------------------------------------- first hour


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_resume_after_stop_after_epoch_continues_to_epochs(tmp_path, capsys):
    # The README's example: stop early, then `--resume` alone finishes the run.
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "4", "--stop-after-epoch", "1",
                 "--quiet", *TINY]) == 0  # fmt: skip
    assert "stopped after epoch 1 of 4" in capsys.readouterr().out
    # A resume command that says where to stop is obeyed ...
    assert main(["train", "--out", str(out), "--resume", "--stop-after-epoch", "2", "--quiet",
                 "--threads", "1"]) == 0  # fmt: skip
    assert "stopped after epoch 2 of 4" in capsys.readouterr().out
    assert _summary(out)["epochs"] == 2
    # ... one that does not runs to --epochs, whatever the earlier commands said.
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert "stopped" not in line and "4 epochs" in line
    summary = _summary(out)
    assert summary["epochs"] == 4 and summary["completed"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    # A stop that is already behind the run is refused, not a run of zero epochs.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "6",
                 "--stop-after-epoch", "3"]) == 2  # fmt: skip
    assert "--stop-after-epoch 3 is already behind" in capsys.readouterr().err


def test_fp16_on_cpu_warns_with_what_to_use_instead(tmp_path, capsys):
    tiny = ["--epochs", "1", "--limit-train", "32", "--limit-test", "32", "--batch-size", "32",
            "--threads", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(["train", "--amp", "fp16", *tiny]) == 0
    err = capsys.readouterr().err
    assert err.startswith("samkit: warning: --amp fp16 on a CPU is slow") and err.count("\n") == 1
    assert "x the time of --amp off" in err and "use --amp off" in err
    assert main(["train", "--amp", "off", *tiny]) == 0
    assert capsys.readouterr().err == ""


def test_amp_warnings_depend_on_the_device_and_the_cpu(monkeypatch):
    from samkit.train import env

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert env.amp_warning("fp16", cuda) is None and env.amp_warning("bf16", cuda) is None
    assert env.amp_warning("off", cpu) is None
    monkeypatch.setattr(env, "_native_bf16_cpu", lambda: True)
    assert env.amp_warning("bf16", cpu) is None
    assert "or --amp bf16, which this CPU computes natively" in env.amp_warning("fp16", cpu)
    monkeypatch.setattr(env, "_native_bf16_cpu", lambda: False)
    assert "--amp bf16 on this CPU is slow" in env.amp_warning("bf16", cpu)
    assert "bf16" not in env.amp_warning("fp16", cpu).split("use ")[1]


def test_base_error_lists_the_names_the_cli_accepts(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"base": "lion"}))
    for argv in (["train", "--base", "lion"], ["train", "--config", str(cfg)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            "samkit: error: invalid base: 'lion' (choose one of adagrad, adam, adamw, rmsprop, "
            "sgd)\n"
        )
    assert main(["train", "--help"]) == 0
    assert "one of adagrad, adam, adamw, rmsprop, sgd" in " ".join(capsys.readouterr().out.split())


def test_model_errors_name_the_model_once(capsys):
    assert main(["train", "--model", "resnet18", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("'resnet18'") == 1 and "needs inputs of shape [C, H, W]" in err
    assert main(["train", "--model-arg", "depth=3", *TINY]) == 2
    err = capsys.readouterr().err
    assert err == (
        "samkit: error: model 'cnn1d' takes no argument 'depth'; its arguments: channels, "
        "kernels, strides\n"
    )


def test_a_run_directory_that_disappears_is_named_as_out(tmp_path, capsys, monkeypatch):
    import shutil

    from samkit.train.rundir import RunDirectory

    append = RunDirectory.append_metrics

    def vanish_before_epoch_2(self, row):
        if row["epoch"] == 2:
            shutil.rmtree(self.path)
        append(self, row)

    monkeypatch.setattr(RunDirectory, "append_metrics", vanish_before_epoch_2)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "3", "--quiet", *TINY]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"samkit: error: cannot write --out {out}: metrics.jsonl: No such file or directory "
        "(the folder is gone); no result of this run is left\n"
    )


def test_counts_in_train_output_are_singular_for_one(tmp_path, capsys):
    out = tmp_path / "run"
    one_step = ["--limit-train", "64", "--limit-test", "64", "--batch-size", "64"]
    argv = ["train", "--optimizer", "sgd", "--epochs", "1", "--out", str(out), "--threads", "1"]
    assert main([*argv, *one_step, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| 1 epoch x 1 step |" in text
    assert "| 1 epoch, " in text and "s training, 1 gradient evaluation | saved in" in text
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1"]) == 2
    text += capsys.readouterr().err
    assert "already done 1 epoch;" in text
    for plural in ("1 epochs", "1 steps", "1 gradient evaluations"):
        assert plural not in text, plural


def test_a_real_terminal_gets_a_bar_per_epoch_ending_with_its_test_accuracy():
    # `samkit train` in a pseudo-terminal (piped output: see the test without a terminal).
    pty = pytest.importorskip("pty")
    pytest.importorskip("tqdm")
    import fcntl
    import os
    import struct
    import termios

    argv = [sys.executable, "-m", "samkit", "train", "--dataset", "digits", "--epochs", "2",
            "--limit-train", "64", "--limit-test", "64", "--batch-size", "32", "--threads", "1"]  # fmt: skip
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    drawings = screen.replace("\n", "\r").split("\r")
    finals = {d.split(":")[0]: d for d in drawings if "test_acc=" in d}
    assert list(finals) == ["epoch 1/2", "epoch 2/2"], screen
    assert not any(d.startswith("epoch   1/2 |") for d in drawings), screen


def test_train_and_bench_share_one_declaration_of_the_run_scope_flags(tmp_path, monkeypatch):
    import samkit.bench
    from samkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")  # noqa: SLF001
    train, bench = sub.choices["train"], sub.choices["bench"]
    scope = train.get_default("_run_scope")
    assert scope == bench.get_default("_run_scope")
    assert {"data_dir", "device", "limit_train", "limit_test", "threads", "track_sharpness"} <= set(
        scope
    )

    def declared(parser):
        return {
            a.dest: (a.option_strings, a.type, a.default, a.help)
            for a in parser._actions  # noqa: SLF001
            if a.dest in scope
        }

    assert declared(train) == declared(bench) and len(declared(train)) == len(scope)
    # samkit bench gives every run-scope flag to its runs (threads: to their processes).
    seen = {}
    monkeypatch.setattr(samkit.bench, "bench", lambda *a, **kw: seen.update(kw) or [])
    argv = ["bench", "--optimizers", "sgd", "--out", str(tmp_path), "--data-dir", "d",
            "--device", "cpu", "--limit-train", "64", "--limit-test", "32",
            "--track-sharpness", "2", "--threads", "3"]  # fmt: skip
    assert main(argv) == 0
    assert seen["threads"] == 3 and seen["extra"] == {
        "data_dir": "d", "device": "cpu", "limit_train": 64, "limit_test": 32,
        "track_sharpness": 2,
    }  # fmt: skip
    assert {a.dest for a in bench._actions if a.dest in scope} == set(seen["extra"]) | {"threads"}  # noqa: SLF001


# ----------------------------------------------------------------------------- process groups


@pytest.fixture
def torchrun_rank0(monkeypatch):
    """The variables torchrun sets in rank 0 of 2; any group left joined is destroyed after."""
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


_INIT = dist.init_process_group


def _join(tmp_path: Path) -> None:
    _INIT("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_main_leaves_the_process_group_of_its_caller_joined(tmp_path, torchrun_rank0, capsys):
    # A script under torchrun that joined its group, then calls samkit's main.
    _join(tmp_path)
    group = dist.group.WORLD
    assert main(["list", "recipes"]) == 0 and "mnist1d" in capsys.readouterr().out
    assert dist.is_initialized() and dist.group.WORLD is group


def test_main_leaves_a_process_group_samkit_joined(tmp_path, torchrun_rank0, monkeypatch):
    from samkit.train.distributed import launch_from_env, processes

    # processes() joins the group torchrun's variables describe (here through a file: one
    # process), and leaves it joined after an error, until the error is reported.
    monkeypatch.setattr(dist, "init_process_group", lambda backend: _join(tmp_path))
    joined = processes(launch_from_env(), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="failed"), joined:
        assert dist.is_initialized()
        raise RuntimeError("failed while joined")
    assert dist.is_initialized()
    assert main(["list", "recipes"]) == 0
    assert not dist.is_initialized()
