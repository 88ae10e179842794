"""samkit bench --trials: trial planning (reproducible draws inside the space, the same
sequence for every method), selection on validation only (argmax of validation where the
argmax of test differs), tuning.json exactly, bad input refused before anything is written,
a tuned sweep end to end and its resume after a real SIGKILL.

The search spaces here are a stand-in of this file (:func:`install_standin`): the methods'
declared spaces and their draws belong to samkit.train and are tested there; these tests
check what bench does with any space. Tests that train need the validation split of
samkit.train (``TrainConfig.val_fraction``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from samkit.bench import choose, validation_accuracy
from samkit.bench import tuning as tuning_mod
from samkit.bench.plan import Sweep
from samkit.bench.tuning import TRIAL_SEED, TUNING, plan_trials, tuning_record
from samkit.cli import main
from samkit.train import TrainConfig
from samkit.train.config import optimizer_settings
from samkit.train.recipes import format_value, recipe_config

ROOT = Path(__file__).resolve().parents[2]
HAS_SPLIT = "val_fraction" in TrainConfig.field_names()
needs_split = pytest.mark.skipif(
    not HAS_SPLIT, reason="needs the validation split of samkit.train (issue 18)"
)
try:
    import samkit.train.search  # noqa: F401

    HAS_SPACES = True
except ImportError:
    HAS_SPACES = False
needs_spaces = pytest.mark.skipif(
    not HAS_SPACES, reason="needs the declared search spaces of samkit.train (issue 18)"
)

#: Stand-in spaces: name -> (scale, low, high).
SPACES = {
    "sgd": {"lr": ("log", 0.01, 0.3)},
    "asam": {"lr": ("log", 0.01, 0.3)},
    "sam": {"lr": ("log", 0.01, 0.3), "rho": ("log", 0.01, 0.5)},
}
TINY = ["--limit-train", "128", "--limit-test", "100"]


def standin_space(task, method, base):
    return SPACES[method]


def standin_draws(space, k, seed):
    from scipy.stats import qmc

    names = sorted(space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # k not a power of 2
        unit = qmc.Sobol(len(names), scramble=True, seed=seed).random(k)
    out = []
    for row in unit:
        d = {}
        for name, u in zip(names, row):
            scale, lo, hi = space[name]
            d[name] = lo * (hi / lo) ** u if scale == "log" else lo + (hi - lo) * u
        out.append(d)
    return out


def install_standin(setattr=None) -> None:
    """Give samkit.bench.tuning the stand-in spaces (``setattr``: pytest's monkeypatch)."""
    set_ = setattr or (lambda obj, name, value: object.__setattr__(obj, name, value))
    set_(tuning_mod, "search_space", standin_space)
    set_(tuning_mod, "draw_trials", standin_draws)


@pytest.fixture
def standin(monkeypatch):
    install_standin(monkeypatch.setattr)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- selection


def test_choose_is_the_argmax_with_ties_to_the_lowest_index():
    assert choose([0.8, None, 0.9, 0.9, 0.7]) == 2
    assert choose([None, 0.5]) == 1
    assert choose([None, None]) is None and choose([]) is None


def _sweep(tmp_path, optimizers=("sgd",), seeds=2, epochs=2):
    return Sweep.parse(tmp_path / "b", ["digits"], list(optimizers), seeds, epochs=epochs,
                       extra={"limit_train": 128, "limit_test": 100})  # fmt: skip


def _summary(folder: Path, **keys) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"completed": True, **keys}))


def test_selection_is_on_validation_where_test_would_choose_otherwise(tmp_path, standin,
                                                                      monkeypatch):  # fmt: skip
    monkeypatch.setattr(tuning_mod, "has_validation", lambda config: True)
    sweep = _sweep(tmp_path)
    tuning = plan_trials(sweep, 5)
    runs = tuning.trials[("digits", "sgd")]
    # test accuracy would pick trial 0; validation picks trial 1 (tied with 2: the lower)
    _summary(runs[0].out, best_val_acc=0.80, test_acc=0.99, best_test_acc=0.99,
             test_acc_at_best_val=0.99)  # fmt: skip
    _summary(runs[1].out, best_val_acc=0.90, test_acc=0.70, best_test_acc=0.71,
             test_acc_at_best_val=0.70)  # fmt: skip
    _summary(runs[2].out, best_val_acc=0.90, test_acc=0.95)
    runs[3].out.mkdir(parents=True)  # killed before it finished: no summary
    (runs[3].out / "summary.json").write_text(
        json.dumps({"completed": False, "best_val_acc": 0.99, "test_acc": 0.99})
    )
    _summary(runs[4].out, best_val_acc=None, test_acc=0.98)  # diverged or no split: skipped
    record = tuning_record(tuning, sweep.out)
    expected = {
        "tasks": {
            "digits": {
                "sgd": {
                    "trials": [
                        {
                            "params": runs[i].params,
                            "val_acc": acc,
                            "run": f"digits/sgd/trial{i}-seed{TRIAL_SEED}-2ep",
                        }
                        for i, acc in enumerate([0.80, 0.90, 0.90, None, None])
                    ],  # fmt: skip
                    "chosen": 1,
                }
            }
        }
    }
    assert record == expected
    assert json.loads(json.dumps(record)) == record  # plain JSON (numpy scalars converted)
    # The test figures cannot move the choice: change every one of them, remove them.
    for i, r in enumerate(runs[:3]):
        summary = json.loads((r.out / "summary.json").read_text())
        poisoned = {k: (1.0 if i == 2 else 0.0) for k in summary if "test" in k}
        (r.out / "summary.json").write_text(json.dumps({**summary, **poisoned}))
    assert tuning_record(tuning, sweep.out) == expected
    for r in runs[:3]:
        summary = json.loads((r.out / "summary.json").read_text())
        (r.out / "summary.json").write_text(
            json.dumps({k: v for k, v in summary.items() if "test" not in k})
        )
    assert tuning_record(tuning, sweep.out) == expected
    assert [validation_accuracy(r.out) for r in runs] == [0.80, 0.90, 0.90, None, None]


def test_trial_draws_are_reproducible_inside_the_space_and_shared_by_methods(
    tmp_path, standin, monkeypatch
):
    monkeypatch.setattr(tuning_mod, "has_validation", lambda config: True)
    sweep = _sweep(tmp_path, ["sgd", "asam", "sam"], epochs=3)
    first, again = plan_trials(sweep, 6), plan_trials(sweep, 6)
    params = {key: [r.params for r in runs] for key, runs in first.trials.items()}
    assert params == {key: [r.params for r in runs] for key, runs in again.trials.items()}
    sgd, asam, sam = (params[("digits", m)] for m in ("sgd", "asam", "sam"))
    assert len(sgd) == 6 and len({p["lr"] for p in sgd}) == 6
    assert sgd == asam  # one sequence: the same space gives every method the same points
    for p in sam:
        assert 0.01 <= p["lr"] <= 0.3 and 0.01 <= p["rho"] <= 0.5
    # Each trial is an ordinary run of those settings at the trial seed.
    for r in first.trials[("digits", "sam")]:
        assert (r.seed, r.epochs, r.trial, r.tuning) == (TRIAL_SEED, 3, r.trial, True)
        assert r.config.lr == r.params["lr"] and r.config.rho == r.params["rho"]
        assert r.out.name == f"trial{r.trial}-seed{TRIAL_SEED}-3ep"
        assert ["--lr", str(r.params["lr"])] == r.argv[r.argv.index("--lr") :][:2]


def test_final_runs_are_the_chosen_trial_at_every_seed_and_budget(tmp_path, standin,
                                                                  monkeypatch):  # fmt: skip
    from samkit.bench.tuning import final_runs

    monkeypatch.setattr(tuning_mod, "has_validation", lambda config: True)
    sweep = Sweep.parse(tmp_path / "b", ["digits"], ["sgd", "sam"], 2, epochs=2, budget="both")
    tuning = plan_trials(sweep, 3)
    # trials at the equal-epochs epochs only
    assert {r.epochs for r in tuning.runs} == {2} and len(tuning.runs) == 6
    record = {"tasks": {"digits": {"sgd": {"trials": [], "chosen": 2},
                                   "sam": {"trials": [], "chosen": None}}}}  # fmt: skip
    runs = final_runs(sweep, tuning, record)
    chosen = tuning.trials[("digits", "sgd")][2].params
    # sgd: 1 pass against sam's 2 -> 4 epochs under equal-grad-evals; sam: nothing finished
    assert sorted((r.spec.text, r.seed, r.epochs, r.budgets) for r in runs) == [
        ("sgd", 0, 2, ("equal-epochs",)), ("sgd", 0, 4, ("equal-grad-evals",)),
        ("sgd", 1, 2, ("equal-epochs",)), ("sgd", 1, 4, ("equal-grad-evals",)),
    ]  # fmt: skip
    assert all(r.params == chosen and r.trial == 2 and not r.tuning for r in runs)
    assert {r.out.name for r in runs} == {"trial2-seed0-2ep", "trial2-seed1-2ep",
                                          "trial2-seed0-4ep", "trial2-seed1-4ep"}  # fmt: skip


# ----------------------------------------------------------------------------- bad input


def _refused(tmp_path, capsys, argv, expected):
    out = tmp_path / "b"
    assert main(["bench", "--tasks", "digits", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not out.exists(), "something was written to --out"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--optimizers", "sam:rho=0.1", "--trials", "2"],
         "--optimizers 'sam:rho=0.1' fixes rho, which --trials searches"),
        (["--optimizers", "sgd", "--trials", "-1"], "invalid --trials -1"),
        (["--optimizers", "sgd", "--trials", "2", "--seeds", "1001"],
         f"--seeds includes {TRIAL_SEED}, the seed of the trials"),
        (["--optimizers", "sgd", "--workers", "0", "--trials", "2"], "invalid --workers 0"),
    ],
)  # fmt: skip
def test_bad_tuning_input_fails_before_anything_is_written(tmp_path, capsys, standin,
                                                           monkeypatch, argv, expected):  # fmt: skip
    monkeypatch.setattr(tuning_mod, "has_validation", lambda config: True)
    _refused(tmp_path, capsys, argv, expected)


def test_an_unknown_hyperparameter_in_a_space_fails_before_anything_is_written(
    tmp_path, capsys, standin, monkeypatch
):
    monkeypatch.setitem(SPACES, "sam", {"rhoo": ("log", 0.01, 0.5)})
    monkeypatch.setattr(tuning_mod, "has_validation", lambda config: True)
    _refused(tmp_path, capsys, ["--optimizers", "sam", "--trials", "2"], "did you mean 'rho'")


@needs_split
def test_trials_without_a_validation_split_fail_before_anything_is_written(
    tmp_path, capsys, standin
):
    overlay = tmp_path / "noval.toml"
    overlay.write_text("val_fraction = 0.0\n")
    _refused(tmp_path, capsys, ["--optimizers", "sgd", "--trials", "2", "--recipe",
                                str(overlay)], "--trials: task digits has no validation split")  # fmt: skip


@needs_split
def test_time_to_target_without_a_declared_target_fails_before_anything_is_written(
    tmp_path, capsys
):
    task = tmp_path / "notarget.toml"  # a task of its own: digits, no val_target
    task.write_text('dataset = "digits"\nepochs = 2\n')
    _refused(tmp_path, capsys, ["--optimizers", "sgd", "--time-to-target", "--tasks", str(task)],
             "--time-to-target: task notarget declares no validation target")  # fmt: skip


@needs_spaces
@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('rhoo = {low = 0.01, high = 0.5, scale = "log"}', "rhoo"),
        ('rho = {low = 0.5, high = 0.01, scale = "log"}', "rho"),
        ('rho = {low = 0.1, high = 0.1, scale = "log"}', "rho"),
        ('rho = {low = 0.0, high = 0.5, scale = "log"}', "rho"),
    ],
)
def test_bad_declared_spaces_fail_before_anything_is_written(tmp_path, capsys, table, expected):
    overlay = tmp_path / "space.toml"
    overlay.write_text(f"[search.sam]\n{table}\n")
    _refused(tmp_path, capsys, ["--optimizers", "sam", "--trials", "2", "--recipe",
                                str(overlay)], expected)  # fmt: skip


@needs_spaces
def test_every_declared_space_plans_runs(tmp_path):
    # The real spaces: every registered method's draws are settings its runs accept.
    from samkit.optim import list_optimizers

    sweep = Sweep.parse(tmp_path / "b", ["digits"], list_optimizers(), 1, epochs=1)
    tuning = plan_trials(sweep, 2)
    assert len(tuning.runs) == 2 * len(list_optimizers())
    assert all(r.params for r in tuning.runs)


# ----------------------------------------------------------------------------- end to end


def test_quick_fills_in_only_what_is_not_given(tmp_path):
    from samkit.bench.sweep import quick_settings

    seeds, epochs, extra = quick_settings(None, None, {})
    assert (seeds, epochs, extra) == (3, 3, {"limit_train": 512, "limit_test": 256,
                                             "batch_size": 32})  # fmt: skip
    overlay = tmp_path / "o.toml"
    overlay.write_text("batch_size = 16\nepochs = 5\n")
    seeds, epochs, extra = quick_settings(2, None, {"limit_train": 64}, [str(overlay)])
    assert (seeds, epochs, extra) == (2, None, {"limit_train": 64, "limit_test": 256})
    assert quick_settings(None, 7, {})[1] == 7


def _expected_record(out: Path) -> dict:
    """tuning.json as it must be, from the trials' own files (bench.json lists them)."""
    manifest = json.loads((out / "bench.json").read_text())
    record: dict = {"tasks": {}}
    for t in manifest["trial_runs"]:
        summary = json.loads((out / t["dir"] / "summary.json").read_text())
        entry = (
            record["tasks"]
            .setdefault(t["task"], {})
            .setdefault(t["optimizer"], {"trials": [], "chosen": None})
        )
        entry["trials"].append({"params": t["params"], "val_acc": summary["best_val_acc"],
                                "run": t["dir"]})  # fmt: skip
    for by_spec in record["tasks"].values():
        for entry in by_spec.values():
            accs = [t["val_acc"] for t in entry["trials"]]
            entry["chosen"] = accs.index(max(accs))
    return record


def _trial_summaries(out: Path) -> dict[Path, int]:
    pattern = f"*/*/trial*-seed{TRIAL_SEED}-*/summary.json"
    return {p: p.stat().st_mtime_ns for p in out.glob(pattern)}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _wait_gone(pids: list[int]) -> None:
    for pid in pids:  # a run dies with the killed sweep (and releases the folder's lock)
        for _ in range(200):
            stat = Path(f"/proc/{pid}/stat")
            if not stat.exists() or "Z" in stat.read_text().split()[2]:
                break
            time.sleep(0.05)


@needs_split
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL, fork and /proc: Linux")
def test_a_killed_tuning_sweep_continues_where_it_stopped(tmp_path, capsys, standin):
    # A real `samkit bench --trials` process (with this file's stand-in spaces), killed by
    # SIGKILL after two of its four trials finished; the same command again skips those,
    # trains the rest, writes tuning.json exactly, and runs the chosen trials at fresh seeds.
    out = tmp_path / "b"
    argv = ["bench", "--tasks", "digits", "--optimizers", "sgd", "sam", "--trials", "2",
            "--seeds", "1", "--epochs", "2", "--out", str(out), "--isolation", "fork", *TINY]  # fmt: skip
    boot = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from tests.bench.test_tuning import install_standin; install_standin(); "
        f"from samkit.cli import main; sys.exit(main({argv!r}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", boot], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline = time.time() + 120
    children: list[int] = []
    try:
        while len(_trial_summaries(out)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no two trials finished within 120 s"
            children = _children(proc.pid) or children
            time.sleep(0.01)
        children = _children(proc.pid) or children
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_gone(children)
    finished = _trial_summaries(out)
    assert 2 <= len(finished) < 4 and not (out / TUNING).exists()

    assert main([*argv, "--workers", "2"]) == 0  # the stand-in: the standin fixture
    printed = capsys.readouterr().out
    assert f"4 runs: {len(finished)} already finished, {4 - len(finished)} to run" in printed
    assert "trials (2 per method and task):" in printed and "final runs" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # not trained again
    record = json.loads((out / TUNING).read_text())
    assert record == _expected_record(out)
    manifest = json.loads((out / "bench.json").read_text())
    assert len(manifest["trial_runs"]) == 4 and len(manifest["runs"]) == 2
    for spec in ("sgd", "sam"):
        entry = record["tasks"]["digits"][spec]
        c = entry["chosen"]
        finals = [r for r in manifest["runs"] if r["optimizer"] == spec]
        assert [r["seed"] for r in finals] == [0]  # a fresh seed, not the trials'
        for r in finals:
            assert r["dir"] == f"digits/{spec}/trial{c}-seed0-2ep"
            config = json.loads((out / r["dir"] / "config.json").read_text())["config"]
            for key, value in entry["trials"][c]["params"].items():
                assert config[key] == value
            assert (config["limit_train"], config["epochs"], config["seed"]) == (128, 2, 0)
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Tuned on validation: 2 trials per method" in md and "| sam | 1/1 |" in md
    # The tuned line gives sam's whole configuration: what was searched, and the rest as
    # samkit train --recipe digits --optimizer sam resolves it (the class's, the recipe's).
    c = record["tasks"]["digits"]["sam"]["chosen"]
    tuned = record["tasks"]["digits"]["sam"]["trials"][c]["params"]
    rest = optimizer_settings(recipe_config("digits", optimizer="sam"))
    fixed = {**{k: v for k, v in rest.items() if k not in tuned}, "base": "sgd"}
    assert sorted(tuned) == ["lr", "rho"] and len(fixed) > 2
    line = ", ".join(f"{k}={format_value(v)}" for k, v in fixed.items())
    assert f"sam trial {c} (tuned: " in md and f"; fixed: {line}; " in md, md
