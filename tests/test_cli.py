"""The samkit command line: end-to-end runs, config files, resume, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        (["train", "--resume", "--out", str(tmp_path / "empty")], "checkpoint not found"),
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
