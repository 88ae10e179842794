"""samkit report: statistics against hand computations, table numbers equal to the runs'
summary.json, figures, a self-contained HTML page (rendered by a real headless browser in
test_report_html.py), and the docs update."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from samkit.bench import collect, paired_difference, summarize, t_quantile_975, write_report
from samkit.bench.report import DOCS_BEGIN, DOCS_END
from samkit.cli import main

ACC = {  # optimizer -> seed -> test accuracy (fraction), as written by the runs
    "sgd": {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.93, 4: 0.94},
    "sam": {0: 0.91, 1: 0.905, 2: 0.94, 3: 0.94, 4: 0.95},
    "fsam": {0: 0.95, 1: 0.80},  # 2 of 5 finished
}


def test_t_quantiles():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(4) == 2.7764
    assert t_quantile_975(30) == 2.0423 and t_quantile_975(10**9) == pytest.approx(1.96, abs=1e-6)
    assert t_quantile_975(60) == 2.0003
    with pytest.raises(ValueError, match="degrees of freedom: 0"):
        t_quantile_975(0)


def test_summary_and_paired_difference_by_hand():
    s = summarize([90.0, 91.0, 92.0, 93.0, 94.0])
    # mean 92, squared deviations 4+1+0+1+4 = 10, / (n-1) = 2.5
    assert (s.n, s.mean, s.std) == (5, 92.0, math.sqrt(2.5))
    assert s.ci == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    # per-seed differences sam - sgd: 1, -0.5, 2, 1, 1 -> mean 0.9; deviations .1 -1.4 1.1 .1 .1
    # -> squares sum 3.2, / 4 = 0.8, std 0.894..., ci = 2.7764 * sqrt(0.8 / 5) = 2.7764 * 0.4
    a = {k: 100 * v for k, v in ACC["sam"].items()}
    b = {k: 100 * v for k, v in ACC["sgd"].items()}
    d = paired_difference(a, b)
    assert d.n == 5 and d.mean == pytest.approx(0.9, abs=1e-12)
    assert d.ci == pytest.approx(2.7764 * 0.4, rel=1e-9)
    assert not d.significant  # |0.9| < 1.1106: inside the noise
    assert paired_difference({0: 1.0}, {1: 2.0}) is None
    one = summarize([3.0])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.ci)


def _fake_sweep(out: Path) -> None:
    """A bench folder written by hand: manifest, summaries, metrics, configs."""
    runs = []
    for opt, by_seed in ACC.items():
        for seed in range(5):
            d = f"t/{opt}/seed{seed}-3ep"
            runs.append({"task": "t", "optimizer": opt, "seed": seed, "epochs": 3,
                         "budgets": ["equal-epochs"], "dir": d, "command": "samkit train ..."})  # fmt: skip
            if seed not in by_seed:
                continue
            folder = out / d
            folder.mkdir(parents=True)
            passes = 1 if opt == "sgd" else 2
            summary = {"test_acc": by_seed[seed], "completed": True, "epochs": 3, "steps": 30,
                       "grad_evals": 30.0 * passes, "train_time_s": 3.0 * passes,
                       "wall_time_s": 4.0 * passes}  # fmt: skip
            (folder / "summary.json").write_text(json.dumps(summary))
            rows = [{"epoch": e, "test_acc": by_seed[seed] - 0.1 * (3 - e), "grad_evals": 10.0 * e,
                     "lambda_max": 10.0 / e} for e in (1, 2, 3)]  # fmt: skip
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            config = {"dataset": "mnist1d", "model": "cnn1d", "model_args": {}, "batch_size": 64,
                      "lr": 0.05, "schedule": "cosine", "weight_decay": 5e-4, "label_noise": 0.25}  # fmt: skip
            (folder / "config.json").write_text(json.dumps({"config": config}))
    manifest = {"samkit_bench": 1, "command": "samkit bench --tasks t ...",
                "tasks": [{"name": "t", "description": "a task", "reported": {"source": "X",
                                                                            "sam": 91.0}}],
                "optimizers": list(ACC), "seeds": list(range(5)), "budgets": ["equal-epochs"],
                "runs": runs}  # fmt: skip
    (out / "bench.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The fake sweep and its report, written once (figures take seconds to draw)."""
    out = tmp_path_factory.mktemp("sweep")
    _fake_sweep(out)
    return out, write_report(out)


def test_report_numbers_are_the_summaries(report):
    tmp_path, res = report
    _, views = collect(tmp_path)
    (view,) = views
    sgd, sam, fsam = view.rows
    assert sgd.acc.mean == pytest.approx(92.0) and sam.acc.mean == pytest.approx(92.9)
    assert sam.diff.mean == pytest.approx(0.9) and not sam.diff.significant  # 0.9 < 1.11
    assert fsam.diff.n == 2 and fsam.diff.seeds == (0, 1)  # paired on the seeds both have
    assert fsam.diff.mean == pytest.approx(((95 - 90) + (80 - 91)) / 2)
    assert sam.step_ratio == pytest.approx(2.0) and sam.grad_evals == 60.0

    md = res["markdown"].read_text()
    table = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ACC:
            table[cells[0]] = cells
    for opt, by_seed in ACC.items():
        mean = 100 * sum(by_seed.values()) / len(by_seed)
        assert table[opt][2].startswith(f"{mean:.2f} ± "), table[opt]
        assert table[opt][1] == f"{len(by_seed)}/5"
    assert table["sam"][4] == "+0.90 [-0.21, +2.01]"  # 0.9 ± 2.7764 * 0.4, no star
    assert table["sgd"][7] == "1.00" and table["sam"][7] == "2.00"
    assert "inside the noise (interval contains 0): sam, fsam" in md
    assert "Reported by X (test accuracy %): sam 91.0." in md
    assert "25 % label noise" in md  # the settings line, from the runs' config.json
    names = sorted(p.name for p in res["figures"])
    assert names == ["t_equal-epochs_accuracy_vs_cost.png", "t_equal-epochs_lambda_max.png",
                     "t_equal-epochs_learning_curves.png"]  # fmt: skip
    for p in res["figures"]:
        assert (
            p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "figures" / p.name).exists()
        )
        assert f"(figures/{p.name})" in md


def test_html_is_self_contained(report):
    page = report[1]["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 3
    # No resource from anywhere else: no http(s)/file URL and no src/href outside data URIs.
    assert not re.search(r"(https?|file)://", page)
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:"), attr
    assert "<link" not in page and "@import" not in page and "<script" not in page


def test_docs_update_replaces_only_the_generated_part(tmp_path, capsys):
    _fake_sweep(tmp_path / "b")
    docs = tmp_path / "results.md"
    docs.write_text(f"# Results\n\nhand-written\n\n{DOCS_BEGIN}\nold\n{DOCS_END}\n\nafter\n")
    assert main(["report", str(tmp_path / "b"), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# Results\n\nhand-written\n\n") and text.endswith("\n\nafter\n")
    assert "old" not in text and "| sam | 5/5 |" in text
    assert "(results_figures/t_equal-epochs_learning_curves.png)" in text
    assert (tmp_path / "results_figures" / "t_equal-epochs_learning_curves.png").is_file()
    capsys.readouterr()
    docs.write_text("no markers")
    assert main(["report", str(tmp_path / "b"), "--docs", str(docs)]) == 2
    assert "markers are missing" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "bench.json not found" in capsys.readouterr().err
