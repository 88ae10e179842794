"""The examples in the docs run: every ``samkit`` command and Python block, on a tiny setting.

For each page in :data:`PAGES`, the code blocks are taken in document order:

* ``bash``/``sh``/``shell`` blocks (every line) and ``console`` blocks (the ``$ `` lines), with
  ``\\`` continuations joined and comments dropped. A line may chain commands with ``&&`` or
  ``;``: the ``samkit ...`` (or ``python -m samkit ...``) parts run, in process, through
  ``samkit.cli.main``; install and test commands (``pip``, ``pytest``, ...) do not.
* ``python`` blocks run with ``exec`` after the commands above them, in the same folder.

A block right after a line ``<!-- docs-test: skip REASON -->`` is not run (a fragment that
needs the reader's model, say); the reason is shown in the test's output.

Commands run in an empty temporary folder with ``HOME`` pointing at it, made small: each
command gets the flags of :data:`TINY_FLAGS` that its subcommand has (values already given
are lowered to them); the epoch counts of a page (``--epochs``, ``--stop-after-epoch``,
the default epochs of a new run) are replaced by 1, 2, 3, ... in the same order, per run
directory (``--out``), so a "stop at 20 of 60, then resume" example still stops half-way and
resumes; CIFAR commands
get small fake CIFAR files in their ``--data-dir``. Cost: about 15 s for both pages on an
idle 2-core machine (most of it generating MNIST-1D once and the CIFAR ResNet-18 steps).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

import samkit
from samkit.cli import build_parser, main
from samkit.train import TrainConfig
from samkit.train.recipes import load_recipe
from tests.train.test_data import write_fake_cifar

ROOT = Path(__file__).resolve().parents[1]

#: The pages whose examples must run (add a page here to cover its examples).
PAGES = ["README.md", "docs/training.md"]

#: Per subcommand: flags appended (or lowered to this value) when the subcommand has them.
TINY_FLAGS: dict[str, dict[str, int]] = {
    "train": {"--limit-train": 256, "--limit-test": 128, "--threads": 1},
    "sharpness": {"--batches": 1, "--batch-size": 64, "--iters": 5},
    "landscape": {"--batches": 1, "--batch-size": 64, "--steps": 5},
    "bench": {"--seeds": 1, "--epochs": 1, "--limit-train": 256, "--limit-test": 128},
}
EPOCH_FLAGS = ("--epochs", "--stop-after-epoch")
SHELL = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->")


@dataclasses.dataclass
class Example:
    """One runnable thing from a page: a command (``argv``) or a Python block (``code``)."""

    line: int  # where it starts in the page (1-based)
    text: str  # as written
    argv: list[str] | None = None
    code: str | None = None
    skip: str | None = None  # the reason, for a block marked as not run


def extract(markdown: str) -> list[Example]:
    """The examples of a page, in document order."""
    examples: list[Example] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```+\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1).lower(), i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].strip().startswith("```")),
                   len(lines))  # fmt: skip
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(before)
        body = lines[start:end]
        if marker:
            examples.append(Example(start, "\n".join(body), skip=marker.group(1) or "marked"))
        elif lang in SHELL:
            examples += _commands(body, start, console=lang == "console")
        elif lang in ("python", "py"):
            examples.append(Example(start + 1, "\n".join(body), code="\n".join(body)))
        i = end + 1
    return examples


def _commands(body: list[str], first: int, console: bool) -> list[Example]:
    out: list[Example] = []
    k = 0
    while k < len(body):
        line, number = body[k], first + k + 1
        k += 1
        if console:
            if not line.lstrip().startswith("$ "):
                continue  # the command's output
            line = line.lstrip()[2:]
        while line.rstrip().endswith("\\") and k < len(body):
            line = line.rstrip()[:-1] + " " + body[k].strip()
            k += 1
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        part: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", ";", "||", "|"):
                part.append(token)
                continue
            if part[:1] == ["samkit"]:
                out.append(Example(number, line.strip(), argv=part[1:]))
            elif part[:3] in (["python", "-m", "samkit"], ["python3", "-m", "samkit"]):
                out.append(Example(number, line.strip(), argv=part[3:]))
            part = []
    return out


def _options(subcommand: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001
    return set(sub.choices[subcommand]._option_string_actions)  # noqa: SLF001


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _epoch_maps(examples: list[Example]) -> dict[str | None, dict[int, int]]:
    """Per run directory (``--out``), its epoch counts -> 1, 2, 3, ... in the same order."""
    values: dict[str | None, set[int]] = {}
    for ex in examples:
        if ex.argv and ex.argv[:1] == ["train"]:
            given = values.setdefault(_value(ex.argv, "--out"), set())
            given |= {int(_value(ex.argv, f)) for f in EPOCH_FLAGS if _value(ex.argv, f)}
            if "--resume" not in ex.argv and not _value(ex.argv, "--epochs"):
                given.add(TrainConfig().epochs)
    return {out: {v: i + 1 for i, v in enumerate(sorted(vs))} for out, vs in values.items()}


def tiny(argv: list[str], epochs: dict[str | None, dict[int, int]]) -> list[str]:
    """``argv`` made small (see the module docstring); ``~`` expanded as a shell would."""
    argv = [os.path.expanduser(a) if a.startswith("~") else a for a in argv]
    if not argv or argv[0] not in TINY_FLAGS:
        return argv
    sub, known = argv[0], _options(argv[0])
    argv = list(argv)
    for flag, value in TINY_FLAGS[sub].items():
        if flag not in known:
            continue
        given = _value(argv, flag)
        if given is None:
            argv += [flag, str(value)]
        elif int(given) > value:
            argv[argv.index(flag) + 1] = str(value)
    if sub == "train":
        epochs = {None: {}, **epochs}[_value(argv, "--out")]
        for flag in EPOCH_FLAGS:
            if _value(argv, flag):
                argv[argv.index(flag) + 1] = str(epochs[int(_value(argv, flag))])
        if "--resume" not in argv and not _value(argv, "--epochs"):
            argv += ["--epochs", str(epochs[TrainConfig().epochs])]
    if sub in ("train", "bench"):
        dataset, data_dir = _value(argv, "--dataset"), _value(argv, "--data-dir")
        if dataset is None and _value(argv, "--recipe"):
            dataset = load_recipe(_value(argv, "--recipe")).settings.get("dataset")
        if dataset and dataset.startswith("cifar") and data_dir:
            folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
            if not (Path(data_dir) / folder).exists():
                write_fake_cifar(Path(data_dir), dataset, n_train=5, n_test=4)
    return argv


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs(page, tmp_path, monkeypatch, capsys):
    examples = extract((ROOT / page).read_text(encoding="utf-8"))
    assert any(ex.argv for ex in examples), f"{page}: no samkit command found"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    before = torch.get_num_threads()
    epochs = _epoch_maps(examples)
    try:
        for ex in examples:
            where = f"{page}:{ex.line}: {ex.text}"
            if ex.skip:
                print(f"not run ({ex.skip}): {where.splitlines()[0]}")
            elif ex.argv is not None:
                argv = tiny(ex.argv, epochs)
                rc = main(argv)
                captured = capsys.readouterr()
                assert rc == 0, f"{where}\nran: samkit {shlex.join(argv)}\n{captured.err}"
            else:
                try:
                    exec(compile(ex.code, f"{page}:{ex.line}", "exec"), {"__name__": "__doc__"})
                except Exception as e:  # noqa: BLE001 - report which block failed
                    pytest.fail(f"{where}\nraised {type(e).__name__}: {e}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", samkit.list_optimizers(sharpness_aware=True))
def test_the_readme_loop_drives_every_method(method):
    """The README's own-loop block, with its method replaced (it runs as written above)."""
    line = 'method = "sam"'
    blocks = [ex for ex in extract((ROOT / "README.md").read_text()) if ex.code and line in ex.code]
    assert len(blocks) == 1, "README.md: the loop block (with its method = line) not found"
    code = blocks[0].code.replace(line, f"method = {method!r}")
    scope: dict = {"__name__": "__doc__"}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is the fastest next to other tests
    try:
        exec(compile(code, f"README.md:{blocks[0].line}", "exec"), scope)
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(scope["loss"]) and scope["opt"].epoch == 7
    assert samkit.get_optimizer_info(method).cls is type(scope["opt"])


def test_extract_finds_commands_python_blocks_and_skips():
    page = "\n".join([
        "text",
        "```bash",
        "pip install -e . && samkit train --epochs 4   # a comment",
        "samkit list; python -m samkit train \\",
        "    --out r --resume",
        "```",
        "```console",
        "$ samkit train --epochs 2",
        "test accuracy 90% (output, not a command)",
        "```",
        "<!-- docs-test: skip needs your model -->",
        "```python",
        "opt.step(closure)",
        "```",
        "```python",
        "x = 1",
        "```",
    ])  # fmt: skip
    got = extract(page)
    assert [ex.argv for ex in got if ex.argv is not None] == [
        ["train", "--epochs", "4"],
        ["list"],
        ["train", "--out", "r", "--resume"],
        ["train", "--epochs", "2"],
    ]
    assert [ex.line for ex in got] == [3, 4, 4, 8, 12, 16]
    assert got[4].skip == "needs your model" and got[4].code is None
    assert got[5].code == "x = 1"


def test_tiny_keeps_the_order_of_epoch_counts_of_each_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    examples = [
        Example(1, "", argv=["train", "--out", "r", "--epochs", "60", "--stop-after-epoch", "20"]),
        Example(2, "", argv=["train", "--out", "r", "--resume"]),
        Example(3, "", argv=["train", "--out", "q", "--stop-after-epoch", "40"]),
        Example(4, "", argv=["train", "--out", "q", "--resume", "--epochs", "90"]),
        Example(5, "", argv=["train", "--dataset", "cifar10", "--data-dir", "~/data"]),
    ]
    epochs = _epoch_maps(examples)
    assert epochs == {"r": {20: 1, 60: 2}, "q": {30: 1, 40: 2, 90: 3}, None: {30: 1}}
    first = tiny(examples[0].argv, epochs)
    assert _value(first, "--epochs") == "2" and _value(first, "--stop-after-epoch") == "1"
    assert _value(first, "--limit-train") == "256" and _value(first, "--threads") == "1"
    assert _value(tiny(examples[1].argv, epochs), "--epochs") is None  # resume: the run's
    third = tiny(examples[2].argv, epochs)  # 30 epochs by default, stop after 40: no stop
    assert _value(third, "--epochs") == "1" and _value(third, "--stop-after-epoch") == "2"
    assert _value(tiny(examples[3].argv, epochs), "--epochs") == "3"  # extends the run
    fifth = tiny(examples[4].argv, epochs)
    assert (
        _value(fifth, "--data-dir") == str(tmp_path / "data") and _value(fifth, "--epochs") == "1"
    )
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert _value(tiny(["train", "--limit-train", "64"], epochs), "--limit-train") == "64"
