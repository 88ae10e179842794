"""samkit report: table numbers equal to the runs'
summary.json, figures, a self-contained HTML page (rendered by a real headless browser in
test_report_html.py), and the docs update."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from samkit.bench import collect, write_report
from samkit.bench.report import DOCS_BEGIN, DOCS_END, tuning_sentence
from samkit.cli import main

ACC = {  # optimizer -> seed -> test accuracy (fraction), as written by the runs
    "sgd": {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.93, 4: 0.94},
    "sam": {0: 0.91, 1: 0.905, 2: 0.94, 3: 0.94, 4: 0.95},
    "fsam": {0: 0.95, 1: 0.80},  # 2 of 5 finished
}


CONFIG = {"dataset": "mnist1d", "model": "cnn1d", "model_args": {}, "batch_size": 64,
          "lr": 0.05, "schedule": "cosine", "weight_decay": 5e-4, "label_noise": 0.25,
          "base": "sgd"}  # fmt: skip


def _fake_sweep(
    out: Path,
    tasks: dict | None = None,
    *,
    epochs: int = 3,
    seeds: int = 5,
    opt_args: dict | None = None,
    ttt: dict | None = None,
    command: str = "samkit bench --tasks t ... --out /tmp/pytest-of-x/sweep7",
) -> None:
    """A bench folder written by hand: manifest, summaries, metrics, configs.
    ``tasks``: task -> optimizer -> seed -> test accuracy (a fraction); ``ttt``: task ->
    optimizer -> seed -> the summary's time_to_target; ``opt_args``: optimizer -> its
    config.json opt_args."""
    tasks = {"t": ACC} if tasks is None else tasks
    runs = []
    for task, acc in tasks.items():
        for opt, by_seed in acc.items():
            for seed in range(seeds):
                d = f"{task}/{opt}/seed{seed}-{epochs}ep"
                runs.append({"task": task, "optimizer": opt, "seed": seed, "epochs": epochs,
                             "budgets": ["equal-epochs"], "dir": d, "command": "samkit train ..."})  # fmt: skip
                if seed not in by_seed:
                    continue
                folder = out / d
                folder.mkdir(parents=True)
                passes = 1 if opt in ("sgd", "adamw", "saf", "mesa") else 2
                summary = {"test_acc": by_seed[seed], "completed": True, "epochs": epochs,
                           "steps": 30, "grad_evals": 10.0 * epochs * passes,
                           "train_time_s": 3.0 * passes, "wall_time_s": 4.0 * passes}  # fmt: skip
                if ttt is not None:
                    summary["time_to_target"] = ttt[task][opt][seed]
                (folder / "summary.json").write_text(json.dumps(summary))
                rows = [{"epoch": e, "test_acc": by_seed[seed] - 0.1 * (epochs - e),
                         "grad_evals": 10.0 * e * passes, "lambda_max": 10.0 / e}
                        for e in range(1, epochs + 1)]  # fmt: skip
                if ttt is not None:
                    for r in rows:
                        r["val_acc"] = r["test_acc"] + 0.01
                (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                config = {**CONFIG, "optimizer": opt, "epochs": epochs,
                          "opt_args": (opt_args or {}).get(opt, {})}  # fmt: skip
                (folder / "config.json").write_text(json.dumps({"config": config}))
    manifest = {"samkit_bench": 1, "command": command,
                "tasks": [{"name": t, "description": "a task, 40 epochs",
                           "reported": {"source": "X", "sam": 91.0}} for t in tasks],
                "optimizers": list(next(iter(tasks.values()))), "seeds": list(range(seeds)),
                "budgets": ["equal-epochs"], "runs": runs}  # fmt: skip
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
    assert sam.diff.mean == pytest.approx(0.9) and not sam.marked  # p = 0.088
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
    # fsam - sgd on seeds 0, 1: +5, -11 -> mean -3, standard error 8, t(0.975, 1) 12.7062
    assert table["fsam"][4] == "-3.00 [-104.65, +98.65] (2 seeds: too few to judge)"
    assert table["sgd"][7] == "1.00" and table["sam"][7] == "2.00"
    assert "(Holm, m = 1: " in md and "no difference shown: sam" in md
    assert "too few seeds to judge (fewer than 3 shared with sgd), nothing marked: fsam" in md
    assert "Reported by X (test accuracy %): sam 91.0." in md
    assert "25 % label noise" in md  # the settings line, from the runs' config.json
    # The heading's task line comes from the runs (3 epochs), not the recipe's description.
    assert "Task t: mnist1d; 25 % label noise;" in md and "; 3 epochs (" in md
    assert "batch 64, lr 0.05, cosine schedule; weight decay 0.0005;" in md
    assert "40 epochs" not in md
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
    docs.write_text(
        f"# Results\n\nhand-written\n\n{DOCS_BEGIN}\nold-generated-text\n{DOCS_END}\n\nafter\n"
    )
    assert main(["report", str(tmp_path / "b"), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# Results\n\nhand-written\n\n") and text.endswith("\n\nafter\n")
    assert "old-generated-text" not in text and "| sam | 5/5 |" in text
    assert "(results_figures/t_equal-epochs_learning_curves.png)" in text
    assert (tmp_path / "results_figures" / "t_equal-epochs_learning_curves.png").is_file()
    # The docs show the command a reader types, not the folder the sweep ran in.
    assert "Command: `samkit bench --tasks t ... --out DIR`" in text
    assert "/tmp/pytest-of-x/sweep7" not in text
    assert "--out /tmp/pytest-of-x/sweep7`" in (tmp_path / "b" / "report.md").read_text()
    capsys.readouterr()
    docs.write_text("no markers")
    assert main(["report", str(tmp_path / "b"), "--docs", str(docs)]) == 2
    assert "markers are missing" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "bench.json not found" in capsys.readouterr().err


def _markdown(out: Path, time_measure: str = "grad_evals") -> tuple[str, list]:
    """The report's Markdown without drawing the figures (seconds each), and the profiles."""
    from samkit.bench.report import markdown, profiles

    manifest, views = collect(out)
    pvs = profiles(views, time_measure)
    return markdown(manifest, views, "figures", pvs), pvs


def _table(md: str, ncells: int = 8) -> dict[str, list[str]]:
    """The Markdown table rows of ``md`` with ``ncells`` cells, by first cell."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == ncells and not set(cells[0]) <= {"-"}:
            rows.setdefault(cells[0], cells)
    return rows


def test_holm_marks_only_the_differences_that_hold_for_the_family(tmp_path):
    sgd = {s: 0.90 + 0.01 * s for s in range(5)}
    # per-seed differences in points: a tiny p; p = 0.0295 (interval above 0); p ~ 0.55
    diffs = {"a": [1.0, 1.1, 0.9, 1.0, 1.05], "b": [1.0, 0.0, 2.0, 1.0, 1.5],
             "c": [0.5, -1.0, 1.0, -0.5, 0.8]}  # fmt: skip
    acc = {"sgd": sgd, **{m: {s: sgd[s] + d[s] / 100 for s in range(5)} for m, d in diffs.items()}}
    _fake_sweep(tmp_path, {"t": acc})
    _, (view,) = collect(tmp_path)
    p = {r.optimizer: r.diff.p for r in view.rows[1:]}
    assert p["a"] < 0.05 / 3 and 0.05 / 2 < p["b"] < 0.05 and p["c"] > 0.05
    assert view.rows[2].diff.mean - view.rows[2].diff.ci > 0  # b's own interval excludes 0
    # Holm over m = 3: a is rejected (p <= .05/3), b is not (p > .05/2): only a is marked.
    assert [r.marked for r in view.rows[1:]] == [True, False, False] and view.family == 3
    md, _ = _markdown(tmp_path)
    table = _table(md)
    assert table["a"][4].endswith(" *") and not table["b"][4].endswith("*")
    assert (
        "Differences marked * hold at family-wise 5 % (Holm, m = 3: paired t-tests of the "
        "per-seed differences to sgd; the intervals shown are per comparison): better than "
        "sgd: a; no difference shown: b, c."
    ) in md


def test_fewer_than_three_seeds_judge_nothing(tmp_path):
    acc = {"sgd": {0: 0.90, 1: 0.91}, "sam": {0: 0.95, 1: 0.96}}  # +5 points on both seeds
    _fake_sweep(tmp_path, {"t": acc}, seeds=2)
    md, _ = _markdown(tmp_path)
    assert _table(md)["sam"][4] == "+5.00 [+5.00, +5.00] (2 seeds: too few to judge)"
    assert "*" not in _table(md)["sam"][4] and "Holm, m =" not in md
    assert "Too few seeds to judge (fewer than 3 shared with sgd), nothing marked: sam." in md


def test_a_method_that_never_switched_on_is_marked_not_given_a_difference(tmp_path):
    # SAF's term starts at epoch 6 (counted from 0): a 3-epoch run is its base optimizer.
    # MESA here starts at 2: 3 epochs switch it on (epoch index 2).
    sgd = {s: 0.90 + 0.01 * s for s in range(5)}
    acc = {"sgd": sgd, "saf": dict(sgd), "mesa": {s: v + 0.01 for s, v in sgd.items()}}
    _fake_sweep(tmp_path, {"t": acc}, opt_args={"mesa": {"start_epoch": 2}})
    _, (view,) = collect(tmp_path)
    saf, mesa = view.rows[1:]
    assert saf.inactive == "never switched on: 3 epochs <= start_epoch 6, so it trained as sgd"
    assert mesa.inactive is None and view.family == 1  # saf is not in Holm's family
    md, _ = _markdown(tmp_path)
    assert _table(md)["saf"][4] == "never switched on (= its base optimizer)"
    assert "+0.00 [+0.00, +0.00]" not in md
    assert "saf: never switched on: 3 epochs <= start_epoch 6, so it trained as sgd." in md
    assert _table(md)["mesa"][4].startswith("+1.00 [")
    # At the boundary (3 epochs, start_epoch 3: epochs 0, 1, 2) MESA never switches on.
    _fake_sweep(tmp_path / "b", {"t": acc}, opt_args={"mesa": {"start_epoch": 3}})
    _, (view,) = collect(tmp_path / "b")
    assert view.rows[2].inactive == (
        "never switched on: 3 epochs <= start_epoch 3, so it trained as sgd"
    )


def _ttt(epoch, passes=1, target=0.8):
    return {"target": target, "epoch": epoch, "grad_evals": None if epoch is None else
            100.0 * passes * epoch, "wall_s": None if epoch is None else 1.5 * epoch}  # fmt: skip


def test_time_to_target_medians_and_performance_profile_by_hand(tmp_path, capsys):
    acc = {"sgd": {s: 0.9 for s in range(3)}, "sam": {s: 0.91 for s in range(3)},
           "fsam": {s: 0.92 for s in range(3)}}  # fmt: skip
    epochs = {  # task -> optimizer -> first epoch reaching the target per seed (None: never)
        "t": {"sgd": [3, 2, None], "sam": [None, None, 2], "fsam": [2, 1, 2]},
        "u": {"sgd": [4, 5, 6], "sam": [2, 3, None], "fsam": [None, 4, None]},
    }
    passes = {"sgd": 1, "sam": 2, "fsam": 2}
    ttt = {t: {m: dict(enumerate(_ttt(e, passes[m]) for e in es)) for m, es in by.items()}
           for t, by in epochs.items()}  # fmt: skip
    _fake_sweep(tmp_path, {"t": acc, "u": acc}, seeds=3, ttt=ttt)
    md, (pv,) = _markdown(tmp_path)
    # Medians (the ceil(n/2)-th smallest time reached; more than half censored: not reached):
    # t: sgd epochs {2, 3} -> 3 (2/3), sam {2} -> not reached (1/3), fsam {1, 2, 2} -> 2
    # u: sgd {4, 5, 6} -> 5, sam {2, 3} -> 3 (2/3), fsam {4} -> not reached (1/3)
    t_part, u_part = md.split("### u (equal-epochs)")
    assert _table(t_part, 5)["sgd"] == ["sgd", "2/3", "3", "300", "4.5"]
    assert _table(t_part, 5)["sam"] == ["sam", "1/3", "not reached", "not reached",
                                        "not reached"]  # fmt: skip
    assert _table(t_part, 5)["fsam"] == ["fsam", "3/3", "2", "400", "3.0"]
    assert _table(u_part, 5)["sgd"] == ["sgd", "3/3", "5", "500", "7.5"]
    assert _table(u_part, 5)["sam"] == ["sam", "2/3", "3", "600", "4.5"]
    assert "Time to reach validation accuracy 80 % (the task's target)" in md
    # Profile in gradient evaluations: t: sgd 300, sam inf, fsam 400 -> r 1, inf, 4/3;
    # u: sgd 500, sam 600, fsam inf -> r 1, 6/5, inf. Score = sum max(0, 4 - r) / (3 * 2).
    assert pv.profile.ratios["fsam"] == {"t": pytest.approx(4 / 3), "u": math.inf}
    scores = {"sgd": (3 + 3) / 6, "sam": (4 - 6 / 5) / 6, "fsam": (4 - 4 / 3) / 6}
    prof = _table(md.split("performance profile")[-1], 4)
    for m, score in scores.items():
        assert pv.profile.scores[m] == pytest.approx(score)
        assert prof[m][1] == f"{score:.3f}"
    assert prof["sgd"][2:] == ["2", "2"] and prof["fsam"][2:] == ["0", "1"]
    from samkit.bench.report import profile_figure

    png = profile_figure(pv, tmp_path / "figures")
    assert png.name == "profile_equal-epochs.png" and png.read_bytes()[:4] == b"\x89PNG"
    # In epochs instead: t: sgd 3, fsam 2 -> fsam fastest there.
    assert _markdown(tmp_path, "epoch")[1][0].profile.ratios["fsam"]["t"] == 1.0
    assert main(["report", str(tmp_path), "--time-measure", "wall"]) == 2
    assert "invalid choice: 'wall'" in capsys.readouterr().err


def test_time_to_target_asked_of_runs_without_a_target_is_one_line(tmp_path, capsys):
    _fake_sweep(tmp_path)
    assert "Time to reach" not in _markdown(tmp_path)[0]  # not asked: no such section
    assert main(["report", str(tmp_path), "--time-to-target"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "samkit: error: task t: its runs declare no validation target, so there is no "
        "time-to-target (a target is set in the task's recipe)\n"
    )


def test_the_task_base_optimizer_is_the_reference_when_the_sweep_ran_it(tmp_path):
    # modular-add's methods wrap AdamW: their differences are to AdamW, not to the first
    # optimizer given (SGD); a task whose base is not in the sweep keeps the given order.
    acc = {"sgd": {s: 0.1 for s in range(3)},
           "adamw": {s: 0.9 + 0.01 * s for s in range(3)},
           "sam": {s: 0.92 + 0.01 * s for s in range(3)}}  # fmt: skip
    _fake_sweep(tmp_path, {"t": acc}, seeds=3)

    def task_base(base):
        for config in tmp_path.rglob("config.json"):
            record = json.loads(config.read_text())
            record["config"]["base"] = base
            config.write_text(json.dumps(record))

    task_base("adamw")
    _, views = collect(tmp_path)
    assert [r.optimizer for r in views[0].rows] == ["adamw", "sgd", "sam"]
    assert views[0].rows[2].diff.mean == pytest.approx(0.02 * 100)
    task_base("lion")
    _, views = collect(tmp_path)
    assert [r.optimizer for r in views[0].rows] == ["sgd", "adamw", "sam"]


def test_a_target_set_after_the_sweep_recomputes_time_to_target_from_the_metrics(tmp_path, capsys):
    # The fake runs' val_acc at epoch e is acc - 0.1 * (3 - e) + 0.01; their summaries
    # declare a target none of them reached; --target t=... is computed from metrics.jsonl.
    never = {"target": 0.999, "epoch": None, "grad_evals": None, "wall_s": None}
    acc = {"sgd": {s: 0.80 for s in range(3)}, "sam": {s: 0.90 for s in range(3)}}
    ttt = {"t": {opt: dict.fromkeys(range(3), never) for opt in acc}}
    _fake_sweep(tmp_path, {"t": acc}, seeds=3, ttt=ttt)
    _, views = collect(tmp_path, time_to_target=True)
    assert views[0].rows[1].ttt.reached == 0
    _, views = collect(tmp_path, time_to_target=True, targets={"t": 0.8})
    sgd, sam = views[0].rows
    # sgd: 0.61, 0.71, 0.81 -> epoch 3; sam: 0.71, 0.81, 0.91 -> epoch 2 (grad evals 10*e*2)
    assert (sgd.ttt.target, sgd.ttt.reached, sgd.ttt.median["epoch"]) == (0.8, 3, 3)
    assert (sam.ttt.reached, sam.ttt.median["epoch"], sam.ttt.median["grad_evals"]) == (3, 2, 40)
    assert main(["report", str(tmp_path), "--target", "t=0.8"]) == 0
    assert "Time to reach validation accuracy 80 %" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    for bad, says in [("u=0.8", "the sweep has no task 'u'"), ("t=1.5", "--target t=1.5"),
                      ("t", "invalid --target 't'"), ("t=x", "invalid --target 't=x'")]:  # fmt: skip
        assert main(["report", str(tmp_path), "--target", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("samkit: error: ") and says in err and err.count("\n") == 1


def test_a_sweep_with_no_finished_run_yet_is_reported_without_a_target_error(tmp_path):
    # A sweep still running (a tuned one lists its final runs only after its trials): no
    # run to check a target on is not "its runs declare no target".
    _fake_sweep(tmp_path)
    for summary in tmp_path.rglob("summary.json"):
        summary.unlink()
    assert main(["report", str(tmp_path), "--time-to-target"]) == 0
    assert "| sgd | 0/" in (tmp_path / "report.md").read_text()


def test_cost_labels_do_not_overlap_with_fourteen_methods(tmp_path):
    from samkit.bench.report import _colors, cost_plot
    from samkit.optim import list_optimizers

    names = list_optimizers()
    assert len(names) >= 14
    # Accuracies within 0.5 points of each other (several nearly equal) and costs in four
    # clusters, as on the embedded tasks: the crowded case.
    acc = {m: {s: 0.94 + 0.002 * (i % 3) + 0.0001 * (i % 2) + 0.0005 * s for s in range(3)}
           for i, m in enumerate(names)}  # fmt: skip
    _fake_sweep(tmp_path, {"t": acc}, seeds=3)
    _, (view,) = collect(tmp_path)
    for i, row in enumerate(view.rows):
        row.grad_evals = [960.0, 1152.0, 1920.0, 2880.0][i % 4]
    fig = cost_plot(view, view.rows, dict(zip(names, _colors(len(names)))))
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(names)
    for i, a in enumerate(boxes):
        assert fig.bbox.contains(a.x0, a.y0) and fig.bbox.contains(a.x1, a.y1)
        for j in range(i):
            assert not a.overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())


def test_the_tuned_line_gives_each_method_its_whole_configuration(tmp_path):
    # A tuned sweep: bsam's search covered lr and rho; the recipe fixed ratio="one" (and
    # rho_min), the class the rest. A reader must be able to rerun it from the report.
    # mSAM's vectorize is an implementation switch (how, not what): recorded, not listed.
    _fake_sweep(tmp_path, {"t": {"sgd": ACC["sgd"], "bsam": ACC["sam"], "msam": ACC["sam"]}})
    used = {
        "sgd": {"lr": 0.0659, "weight_decay": 0.0005, "momentum": 0.9},
        "bsam": {"rho": 0.0197, "rho_min": 0.0303, "ratio": "one", "official_update": False,
                 "lr": 0.184, "weight_decay": 0.0005, "momentum": 0.9},
        "msam": {"rho": 0.05, "micro_batches": 4, "vectorize": True, "lr": 0.1},
    }  # fmt: skip
    for opt, kwargs in used.items():
        for path in tmp_path.glob(f"t/{opt}/*/config.json"):
            record = json.loads(path.read_text())
            info = {"name": opt, "sharpness_aware": opt != "sgd"}
            path.write_text(json.dumps({**record, "optimizer_kwargs": kwargs,
                                        "optimizer_info": info}))  # fmt: skip
    trials = {"sgd": ({"lr": 0.0659},), "bsam": ({"lr": 0.01, "rho": 0.3}, {"lr": 0.184, "rho": 0.0197}),
              "msam": ({"lr": 0.1, "rho": 0.05},)}  # fmt: skip
    tuning = {
        "tasks": {"t": {opt: {"trials": [{"params": p, "val_acc": 0.9 + 0.01 * i, "run": "x"}
                                         for i, p in enumerate(ts)], "chosen": len(ts) - 1}
                        for opt, ts in trials.items()}}
    }  # fmt: skip
    (tmp_path / "tuning.json").write_text(json.dumps(tuning))
    _, (view,) = collect(tmp_path)
    assert tuning_sentence(view).endswith(
        "sgd trial 0 (tuned: lr=0.0659; fixed: weight_decay=0.0005, momentum=0.9; 90.00 % "
        "validation); bsam trial 1 (tuned: lr=0.184, rho=0.0197; fixed: rho_min=0.0303, "
        "ratio=one, official_update=False, weight_decay=0.0005, momentum=0.9, base=sgd; "
        "91.00 % validation); msam trial 0 (tuned: lr=0.1, rho=0.05; fixed: micro_batches=4, "
        "base=sgd; 90.00 % validation)."
    ), tuning_sentence(view)
