"""Every bad input to ``samkit`` is one line on stderr with exit code 2, never a traceback.

The matrix: wrong flags, missing paths, invalid values, unknown names, optimizer arguments the
method rejects, unusable --out, config files that are broken or hostile, dataset pickles
that try to run code. Each case runs ``samkit.cli.main`` in-process (a real subprocess
checks a sample, so the ``python -m samkit`` entry point is covered too).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samkit.cli import main

TINY = ["--limit-train", "64", "--limit-test", "64", "--batch-size", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _config(d: Path, name: str, text: str | bytes) -> list[str]:
    return ["train", "--config", str(_write(d / f"{name}.json", text)), *TINY]


def _evil_cifar(d: Path, marker: Path) -> list[str]:
    folder = d / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(f"touch {marker}"), b"labels": [0]}, f, protocol=2)
    return ["train", "--dataset", "cifar10", "--data-dir", str(d / "cifar"), *TINY]


def _evil_cifar_raw_global(d: Path, marker: Path) -> list[str]:
    # A hand-written protocol-0 pickle: GLOBAL posix.system, no Python class involved.
    folder = d / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(f"cposix\nsystem\n(Vtouch {marker}\ntR.".encode())
    return ["train", "--dataset", "cifar10", "--data-dir", str(d / "cifar"), *TINY]


def _existing_run(d: Path) -> Path:
    out = d / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    return out


#: id -> (argv builder(tmp dir, marker path), text the one-line message must contain)
CASES = {
    # wrong flags
    "unknown-flag": (lambda d, m: ["train", "--no-such-flag"], "unrecognized arguments"),
    "unknown-command": (lambda d, m: ["frobnicate"], "invalid choice: 'frobnicate'"),
    "flag-missing-value": (lambda d, m: ["train", "--epochs"], "expected one argument"),
    "int-flag-not-a-number": (lambda d, m: ["train", "--epochs", "ten"], "invalid int value"),
    "float-flag-not-a-number": (lambda d, m: ["train", "--lr", "fast"], "invalid float value"),
    "stray-positional": (lambda d, m: ["train", "extra"], "unrecognized arguments: extra"),
    # missing paths
    "config-missing": (lambda d, m: ["train", "--config", str(d / "no.json")], "no.json"),
    "config-is-a-directory": (lambda d, m: ["train", "--config", str(d)], "cannot read config"),
    "cifar-without-data-dir": (lambda d, m: ["train", "--dataset", "cifar10"], "--data-dir"),
    "cifar-data-dir-missing": (
        lambda d, m: ["train", "--dataset", "cifar100", "--data-dir", str(d / "nope")],
        "nope",
    ),
    "resume-without-out": (lambda d, m: ["train", "--resume"], "--resume needs --out"),
    "resume-missing-out": (
        lambda d, m: ["train", "--resume", "--out", str(d / "none")],
        "no run at",
    ),
    "resume-empty-out": (
        lambda d, m: ["train", "--resume", "--out", str(d)],
        "holds no checkpoint.pt",
    ),
    # invalid values
    "lr-negative": (lambda d, m: ["train", "--lr", "-0.1"], "invalid lr: -0.1"),
    "lr-zero": (lambda d, m: ["train", "--lr", "0"], "invalid lr: 0.0"),
    "lr-nan": (lambda d, m: ["train", "--lr", "nan"], "invalid lr: nan"),
    "lr-inf": (lambda d, m: ["train", "--lr", "inf"], "invalid lr: inf"),
    "epochs-zero": (lambda d, m: ["train", "--epochs", "0"], "invalid epochs: 0"),
    "epochs-negative": (lambda d, m: ["train", "--epochs", "-3"], "invalid epochs: -3"),
    "batch-size-zero": (lambda d, m: ["train", "--batch-size", "0"], "invalid batch_size: 0"),
    "label-noise-one": (lambda d, m: ["train", "--label-noise", "1"], "invalid label_noise"),
    "label-noise-negative": (
        lambda d, m: ["train", "--label-noise", "-0.2"],
        "invalid label_noise: -0.2",
    ),
    "rho-negative": (lambda d, m: ["train", "--rho", "-0.05"], "invalid rho: -0.05"),
    "momentum-one": (lambda d, m: ["train", "--momentum", "1"], "invalid momentum: 1.0"),
    "weight-decay-negative": (
        lambda d, m: ["train", "--weight-decay", "-1"],
        "invalid weight_decay: -1.0",
    ),
    "label-smoothing-one": (
        lambda d, m: ["train", "--label-smoothing", "1"],
        "invalid label_smoothing: 1.0",
    ),
    "seed-negative": (lambda d, m: ["train", "--seed", "-1"], "invalid seed: -1"),
    "seed-too-large": (lambda d, m: ["train", "--seed", str(2**32)], "invalid seed"),
    "accumulation-zero": (
        lambda d, m: ["train", "--accumulation-steps", "0"],
        "invalid accumulation_steps: 0",
    ),
    "limit-train-zero": (lambda d, m: ["train", "--limit-train", "0"], "invalid limit_train"),
    "stop-after-zero": (
        lambda d, m: ["train", "--stop-after-epoch", "0"],
        "invalid stop_after_epoch: 0",
    ),
    "checkpoint-every-negative": (
        lambda d, m: ["train", "--checkpoint-every", "-1"],
        "invalid checkpoint_every: -1",
    ),
    "device-unknown": (lambda d, m: ["train", "--device", "tpu9", *TINY], "invalid device"),
    "device-cuda-missing": (
        lambda d, m: ["train", "--device", "cuda:7", *TINY],
        "CUDA is not available",
    ),
    "threads-zero": (lambda d, m: ["train", "--threads", "0"], "invalid --threads: 0"),
    "augment-on-1d-data": (lambda d, m: ["train", "--augment", *TINY], "augment needs image"),
    # unknown names
    "unknown-optimizer": (lambda d, m: ["train", "--optimizer", "adam9"], "'adam9'"),
    "unknown-model": (lambda d, m: ["train", "--model", "gpt"], "invalid choice: 'gpt'"),
    "unknown-dataset": (lambda d, m: ["train", "--dataset", "imagenet"], "'imagenet'"),
    "unknown-base": (lambda d, m: ["train", "--base", "lbfgs2", *TINY], "'lbfgs2'"),
    "model-for-other-data": (lambda d, m: ["train", "--model", "resnet18", *TINY], "resnet18"),
    "unknown-model-arg": (lambda d, m: ["train", "--model-arg", "depth=3", *TINY], "model 'cnn1d'"),
    # --opt-arg the optimizer rejects
    "opt-arg-unknown": (lambda d, m: ["train", "--opt-arg", "bogus=1", *TINY], "bogus"),
    "opt-arg-rho-negative": (
        lambda d, m: ["train", "--opt-arg", "rho=-1", *TINY],
        "Invalid rho value: -1",
    ),
    "opt-arg-fsam-lmbda-one": (
        lambda d, m: ["train", "--optimizer", "fsam", "--opt-arg", "lmbda=1", *TINY],
        "Invalid lmbda value: 1",
    ),
    "opt-arg-fsam-sigma-inf": (
        lambda d, m: ["train", "--optimizer", "fsam", "--opt-arg", "sigma=inf", *TINY],
        "Invalid sigma value: inf",
    ),
    "opt-arg-bsam-rho-min-negative": (
        lambda d, m: ["train", "--optimizer", "bsam", "--opt-arg", "rho_min=-0.1", *TINY],
        "Invalid rho_min value: -0.1",
    ),
    "opt-arg-on-nonfinite": (
        lambda d, m: ["train", "--opt-arg", "on_nonfinite=maybe", *TINY],
        "'maybe'",
    ),
    "opt-arg-no-equals": (lambda d, m: ["train", "--opt-arg", "rho"], "expected KEY=VALUE"),
    "opt-arg-bad-key": (lambda d, m: ["train", "--opt-arg", "1x=2"], "expected KEY=VALUE"),
    # --out that cannot be used (root ignores permissions: use paths that fail for root)
    "out-under-a-file": (
        lambda d, m: ["train", "--out", str(_write(d / "f", "x") / "sub")],
        "cannot create --out",
    ),
    "out-is-a-file": (lambda d, m: ["train", "--out", str(_write(d / "f", "x"))], "--out"),
    "out-in-proc": (lambda d, m: ["train", "--out", "/proc/samkit-run"], "cannot create --out"),
    "out-holds-a-run": (
        lambda d, m: ["train", "--out", str(_existing_run(d)), *TINY],
        "already holds a run",
    ),
    "resume-changed-setting": (
        lambda d, m: [
            "train",
            "--out",
            str(_existing_run(d)),
            "--resume",
            "--epochs",
            "2",
            "--lr",
            "0.5",
            "--threads",
            "1",
        ],
        "setting 'lr'",
    ),  # fmt: skip
    "resume-finished-run": (
        lambda d, m: ["train", "--out", str(_existing_run(d)), "--resume", "--epochs", "1"],
        "already done 1 epoch;",
    ),
    # config files
    "config-unknown-key": (lambda d, m: _config(d, "c", '{"epochz": 3}'), "'epochz'"),
    "config-wrong-type-str": (
        lambda d, m: _config(d, "c", '{"epochs": "10"}'),
        "invalid epochs: '10'",
    ),
    "config-wrong-type-bool": (lambda d, m: _config(d, "c", '{"lr": true}'), "invalid lr"),
    "config-wrong-type-dict": (
        lambda d, m: _config(d, "c", '{"model_args": [1]}'),
        "invalid model_args",
    ),
    "config-wrong-type-list": (lambda d, m: _config(d, "c", '{"model": []}'), "invalid model"),
    "config-wrong-type-out": (lambda d, m: _config(d, "c", '{"out": 3}'), "invalid out: 3"),
    "config-wrong-type-bool-str": (
        lambda d, m: _config(d, "c", '{"resume": "no"}'),
        "invalid resume: 'no'",
    ),
    "config-nan-literal": (lambda d, m: _config(d, "c", '{"lr": NaN}'), "invalid lr: nan"),
    "config-not-json": (lambda d, m: _config(d, "c", "epochs = 3"), "not valid JSON"),
    "config-empty": (lambda d, m: _config(d, "c", ""), "not valid JSON"),
    "config-not-an-object": (lambda d, m: _config(d, "c", "[1, 2]"), "expected a JSON object"),
    "config-not-utf8": (lambda d, m: _config(d, "c", b'{"lr": "\xff"}'), "not valid JSON"),
    "config-deeply-nested": (
        lambda d, m: _config(d, "c", "[" * 100_000 + "]" * 100_000),
        "not valid JSON",
    ),
    "config-code-in-a-value": (
        lambda d, m: _config(
            d, "c", json.dumps({"optimizer": f"__import__('os').system('touch {m}')"})
        ),
        "Unknown optimizer",
    ),  # fmt: skip
    "config-dunder-key": (
        lambda d, m: _config(d, "c", json.dumps({"__class__": "os.system"})),
        "'__class__'",
    ),
    "config-code-in-model-args": (
        lambda d, m: _config(d, "c", json.dumps({"model_args": {"__init__": f"touch {m}"}})),
        "model 'cnn1d'",
    ),
    "config-seed-huge": (lambda d, m: _config(d, "c", '{"seed": 1e400}'), "invalid seed: inf"),
    # dataset pickles that try to run code
    "cifar-pickle-reduce-os-system": (_evil_cifar, "refusing to load posix.system"),
    "cifar-pickle-raw-global": (_evil_cifar_raw_global, "refusing to load posix.system"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    if case == "device-cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    build, expected = CASES[case]
    marker = tmp_path / "pwned"
    d = tmp_path / "w"
    d.mkdir()
    argv = build(d, marker)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert err.startswith("samkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert expected in err, (expected, err)
    assert not marker.exists(), "an input ran code"


def test_evil_payloads_are_real(tmp_path):
    # Sanity check of the hostile inputs above: a plain unpickler runs them.
    marker = tmp_path / "pwned"
    _evil_cifar_raw_global(tmp_path, marker)
    path = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_a_real_process_prints_one_line_without_traceback(tmp_path):
    cases = ["lr-negative", "config-deeply-nested", "cifar-pickle-reduce-os-system"]
    script = (
        "import sys\nfrom samkit.cli import main\n"
        "for argv in eval(sys.argv[1]):\n    print(main(argv), file=sys.stderr)\n"
    )  # one interpreter for all cases (startup costs seconds); main() is the entry point
    marker = tmp_path / "pwned"
    argvs = []
    for i, case in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        argvs.append(CASES[case][0](d, marker))
    res = subprocess.run(
        [sys.executable, "-c", script, repr(argvs)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 2 * len(cases), res.stderr
    for i, case in enumerate(cases):
        err, rc = lines[2 * i], lines[2 * i + 1]
        assert rc == "2" and err.startswith("samkit: error: ") and CASES[case][1] in err, err
    assert "Traceback" not in res.stderr and not marker.exists()
    # And the console entry point itself (python -m samkit): exit status 2, one line.
    res = subprocess.run(
        [sys.executable, "-m", "samkit", "train", "--epochs", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr == "samkit: error: invalid epochs: 0 (must be >= 1)\n"
