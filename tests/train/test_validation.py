"""The validation split (samkit.train.data.split_validation, a run's val_* figures) and what
summary.json derives from it (samkit.train.validation): stratified, disjoint, the same for
every seed and method, never noisy; the best epoch chosen on validation; time to target."""

from __future__ import annotations

import json

import pytest
import torch

from samkit.train import ConfigError, TrainConfig, build_dataset, load_dataset, train
from samkit.train.checkpoint import read_checkpoint, save_checkpoint
from samkit.train.data import SPLIT_SEED, split_validation
from samkit.train.recipes import run_config
from samkit.train.validation import time_to_target, validation_summary

TINY = dict(limit_train=256, limit_test=200, batch_size=64)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the split


def test_split_is_stratified_with_largest_remainders():
    # Class counts 50, 30, 20 at 10 %: exactly 5, 3, 2 held out.
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]
    train_idx, val_idx = split_validation(labels, 0.1, 3)
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [5, 3, 2]
    # Counts 7, 7, 6 at 50 %: 10 held out, quotas 3.5, 3.5, 3.0 -> 3, 3, 3 and the one left
    # goes to the largest remainder, the lower class on a tie.
    labels = torch.tensor([0] * 7 + [1] * 7 + [2] * 6)
    _, val_idx = split_validation(labels, 0.5, 3)
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [4, 3, 3]


def test_split_is_disjoint_covers_the_training_split_and_leaves_test_alone():
    full = load_dataset("mnist1d")
    d = load_dataset("mnist1d", val_fraction=0.1)
    assert (d.info.num_train, d.info.num_val, d.info.num_test) == (3600, 400, 1000)
    assert torch.equal(d.x_test, full.x_test) and torch.equal(d.y_test, full.y_test)
    train_idx, val_idx = split_validation(full.y_train, 0.1, 10)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(4000))
    assert torch.equal(d.x_train, full.x_train[train_idx])
    assert full.x_val is None and torch.equal(d.x_val, full.x_train[val_idx])
    assert torch.equal(d.y_val, full.y_train[val_idx])
    # Stratified: every class's share within one sample of 10 % of its count.
    per_class = torch.bincount(d.y_val, minlength=10).float()
    assert ((per_class - 0.1 * torch.bincount(full.y_train, minlength=10)).abs() <= 1).all()


def test_split_is_the_same_for_every_seed_method_and_noise_and_its_labels_are_clean():
    a = build_dataset(TrainConfig(optimizer="sgd", seed=0))
    b = build_dataset(TrainConfig(optimizer="fsam", seed=7, label_noise=0.25))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_val, b.y_val)
    assert torch.equal(a.x_train, b.x_train)  # the same samples train ...
    assert b.label_noise_flipped > 0 and not torch.equal(a.y_train, b.y_train)  # ... noisy
    # Only the split's own seed moves it.
    _, other = split_validation(load_dataset("mnist1d").y_train, 0.1, 10, seed=SPLIT_SEED + 1)
    _, same = split_validation(load_dataset("mnist1d").y_train, 0.1, 10)
    assert not torch.equal(other, same)


def test_split_errors_name_the_problem():
    labels = torch.arange(10) % 2
    with pytest.raises(ValueError, match="no validation sample"):
        split_validation(labels, 0.01, 2)
    with pytest.raises(ValueError, match="no training sample"):
        split_validation(labels, 0.99, 2)
    with pytest.raises(ValueError, match=r"val_fraction value: 1\.5"):
        split_validation(labels, 1.5, 2)
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(val_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="val_target"):
        TrainConfig(val_target=90).validate()  # a fraction, not a percentage
    with pytest.raises(ConfigError, match="no validation sample"):
        train(TrainConfig(val_fraction=0.001, epochs=1, **TINY), log=None)


# ----------------------------------------------------------------------------- summary keys


def _row(epoch, val, test, seconds=1.0, grad_evals=None):
    return {
        "epoch": epoch,
        "val_acc": val,
        "val_loss": 1.0 - (val or 0),
        "test_acc": test,
        "train_seconds": seconds,
        "grad_evals": grad_evals if grad_evals is not None else 10.0 * epoch,
    }


def test_validation_summary_picks_the_best_epoch_on_validation_earliest_tie(tmp_path):
    # Test accuracy peaks at epoch 2; validation at epochs 3 and 5 (a tie: the earliest).
    rows = [
        _row(1, 0.50, 0.52),
        _row(2, 0.60, 0.90),
        _row(3, 0.80, 0.70),
        _row(4, 0.75, 0.71),
        _row(5, 0.80, 0.72),
        _row(6, 0.78, 0.73),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = [json.loads(line) for line in path.read_text().splitlines()]
    assert validation_summary(read) == {
        "val_acc": 0.78,
        "val_loss": pytest.approx(0.22),
        "best_val_acc": 0.80,
        "best_val_epoch": 3,
        "test_acc_at_best_val": 0.70,
    }


def test_validation_summary_without_a_split_is_all_null():
    rows = [_row(1, None, 0.5), _row(2, None, 0.6)]
    assert set(validation_summary(rows).values()) == {None}
    assert set(validation_summary([]).values()) == {None}


def test_time_to_target_by_hand_and_censored():
    rows = [
        _row(1, 0.50, 0.9, seconds=2.0),
        _row(2, 0.89, 0.9, seconds=3.0),
        _row(3, 0.90, 0.1, seconds=4.0),  # reached here (>=), whatever the test accuracy
        _row(4, 0.95, 0.1, seconds=5.0),
    ]
    got = time_to_target(rows, 0.9)
    assert got == {"target": 0.9, "epoch": 3, "grad_evals": 30.0, "wall_s": 9.0}
    assert time_to_target(rows, 0.5)["epoch"] == 1
    censored = {"target": 0.96, "epoch": None, "grad_evals": None, "wall_s": None}
    assert time_to_target(rows, 0.96) == censored
    assert time_to_target([_row(1, None, 0.99)], 0.5)["epoch"] is None  # no split
    old = [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]
    assert time_to_target(old, 0.9)["wall_s"] is None and time_to_target(old, 0.9)["epoch"] == 3
    for bad in (0, 1.5, 90, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="val_target"):
            time_to_target(rows, bad)


# ----------------------------------------------------------------------------- a run


def test_a_run_reports_its_validation_split(tmp_path):
    out = tmp_path / "run"
    s = train(TrainConfig(epochs=2, val_target=0.05, out=str(out), **TINY), log=None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert all(0 < r["train_seconds"] <= r["seconds"] for r in rows)
    assert {k: s[k] for k in validation_summary(rows)} == validation_summary(rows)
    assert s["time_to_target"] == time_to_target(rows, 0.05)
    assert s["num_val"] == 26 and s["val_fraction"] == 0.1  # 10 % of 256
    record = json.loads((out / "config.json").read_text())
    assert record["dataset"]["num_val"] == 26 and record["dataset"]["num_train"] == 230

    # Without a split the val keys are null, and so is the time to target.
    s = train(TrainConfig(epochs=1, val_fraction=0.0, val_target=0.5, **TINY), log=None)
    assert s["val_acc"] is None and s["best_val_acc"] is None and s["time_to_target"] is None
    assert s["test_acc"] is not None


def test_a_checkpoint_from_before_the_split_resumes_without_one(tmp_path):
    # A run written before val_fraction existed trained on its whole training split: it
    # resumes, and is measured, as that run.
    train(TrainConfig(epochs=1, val_fraction=0.0, out=str(tmp_path), **TINY), log=None)
    ckpt = read_checkpoint(tmp_path)
    for key in ("val_fraction", "val_target"):
        del ckpt["config"][key]
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    assert read_checkpoint(tmp_path)["config"]["val_fraction"] == 0.0
    # As `samkit train --out DIR --resume --epochs 2` resolves it: the checkpoint's settings.
    config = run_config(None, {"out": str(tmp_path), "resume": True, "epochs": 2})
    s = train(config, log=None)
    assert s["epochs"] == 2 and s["num_val"] == 0 and s["val_acc"] is None
