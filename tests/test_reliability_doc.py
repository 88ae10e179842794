"""docs/reliability.md cannot drift from the suite: every test it names exists.

Each table row's test ids (``tests/FILE.py::function`` or ``...::function[param-id]``) are
resolved: the file exists, it defines the test function, and a parameter id is one the
function's ``parametrize`` marks generate.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")


def _table_ids() -> list[tuple[str, str, str | None]]:
    ids = []
    for line in DOC.read_text().splitlines():
        if line.startswith("|"):
            ids += TEST_ID.findall(line)
    return [(f, fn, p or None) for f, fn, p in ids]


def _module(path: str):
    name = Path(path).stem
    loaded = getattr(sys.modules.get(name), "__file__", None)
    if loaded and Path(loaded).resolve() == (ROOT / path).resolve():
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(f"_doccheck_{name}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # test helpers import by plain name (pytest's pythonpath)
    return module


def _param_ids(func) -> set[str]:
    """The ids pytest generates from ``func``'s parametrize marks (explicit ids, or plain
    str/int/float/bool values, as this suite writes them)."""
    per_mark = []
    for mark in getattr(func, "pytestmark", []):  # closest decorator first, as pytest joins
        if mark.name != "parametrize":
            continue
        values = mark.args[1]
        explicit = mark.kwargs.get("ids")
        ids = []
        for i, value in enumerate(values):
            if explicit is not None:
                ids.append(str(explicit[i]))
            elif getattr(value, "id", None) is not None:
                ids.append(value.id)
            else:
                vals = value.values if hasattr(value, "values") else value
                vals = vals if isinstance(vals, tuple) else (vals,)
                ids.append("-".join(str(v) for v in vals))
        per_mark.append(ids)
    return {"-".join(combo) for combo in itertools.product(*per_mark)} if per_mark else set()


def test_the_doc_names_tests():
    ids = _table_ids()
    assert len(ids) >= 40, ids
    files = {f for f, _, _ in ids}
    for f in ("test_cli_errors", "train/test_run_faults", "optim/test_faults"):
        assert f"tests/{f}.py" in files


@pytest.mark.parametrize(("path", "function", "param"), _table_ids())
def test_every_test_named_in_the_doc_exists(path, function, param):
    assert (ROOT / path).is_file(), f"{path} does not exist"
    func = getattr(_module(path), function, None)
    assert callable(func), f"{path} has no test {function}"
    if param is not None:
        assert param in _param_ids(func), f"{path}::{function} has no parameter id {param!r}"


def test_the_checker_rejects_what_does_not_exist():
    mod = _module("tests/test_cli_errors.py")
    ids = _param_ids(mod.test_bad_input_is_one_line_exit_2)
    assert "lr-negative" in ids and "no-such-case" not in ids
    assert getattr(mod, "test_that_does_not_exist", None) is None
