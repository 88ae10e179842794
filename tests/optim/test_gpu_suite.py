"""benchmarks/gpu_suite.py's dry run on a CPU: every method, both precisions, no error (issue 21).

The suite is meant to run unattended on a GPU that the project does not have; this runs
the same code path at tiny sizes (``--device cpu --quick``; its timings mean nothing) so a
method that breaks under the suite (bf16 autocast, the closure it builds) is caught here.
The run of tests/optim/test_cuda.py that ends the suite is left out (``--no-tests``): that
file is part of this test suite already.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import samkit

_spec = importlib.util.spec_from_file_location(
    "samkit_gpu_suite", Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_dry_run_covers_every_method_in_both_precisions(tmp_path, threads):
    out = tmp_path / "suite.json"
    assert suite.main(["--device", "cpu", "--quick", "--no-tests", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = ["sgd", *samkit.list_optimizers(sharpness_aware=True)]
    assert list(result["precisions"]) == ["float32", "bf16 autocast"]
    for precision in result["precisions"].values():
        rows = precision["methods"]
        assert list(rows) == expected
        for name, row in rows.items():
            assert "error" not in row, (name, row)
            assert row["median_step_s"] > 0 and row["over_sgd"] > 0
        assert rows["sgd"]["over_sgd"] == 1.0


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_without_cuda_it_exits_with_one_line(tmp_path, capsys):
    assert suite.main(["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "--device cpu --quick" in err
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_method_is_refused(tmp_path, capsys):
    assert suite.main(["--device", "cpu", "--quick", "--methods", "sma", "--out", "x"]) == 2
    assert "unknown method" in capsys.readouterr().err
