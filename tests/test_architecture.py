"""Imports point one way: optim and sharpness know nothing of train, bench or the CLI, nor of
each other; what both need lives in top-level modules that import nothing of samkit."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "samkit"
FORBIDDEN = {
    "optim": ("samkit.train", "samkit.bench", "samkit.cli", "samkit.sharpness"),
    "sharpness": ("samkit.train", "samkit.bench", "samkit.cli", "samkit.optim"),
    "train": ("samkit.bench", "samkit.cli"),
    "bench": ("samkit.cli",),
}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    offenders = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders


def test_the_modules_optim_and_sharpness_share_import_nothing_of_samkit():
    # samkit/_losses.py, samkit/_dtensor.py: what optim and sharpness both need, in one place.
    shared = sorted(p for p in SRC.glob("_*.py") if not p.name.startswith("__"))
    assert {p.name for p in shared} >= {"_losses.py", "_dtensor.py"}
    offenders = [
        f"{path.name} imports {name}"
        for path in shared
        for name in _imports(path)
        if name.split(".")[0] == "samkit"
    ]
    assert not offenders, offenders


def test_importing_samkit_loads_no_training_code():
    code = (
        "import sys, samkit, samkit.optim, samkit.sharpness\n"
        "bad = [m for m in sys.modules if m.startswith(('samkit.train', 'samkit.bench', "
        "'samkit.cli'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
