"""samkit.train.loop / checkpoint / models: determinism, bit-exact resume, checkpoints,
every registered optimizer through the unchanged loop."""

from __future__ import annotations

import json

import pytest
import torch

import samkit
from samkit.train import (
    CheckpointError,
    ConfigError,
    DatasetInfo,
    TrainConfig,
    create_model,
    list_models,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    train,
)

# Tiny runs: 256 MNIST-1D samples, batches of 64 -> 4 steps per epoch.
TINY = dict(limit_train=256, limit_test=200, batch_size=64)
METRIC_KEYS_NOT_TIMING = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
    "grad_evals", "grad_evals_epoch", "steps",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest single-threaded; restore whatever the session had.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in METRIC_KEYS_NOT_TIMING} for r in rows]


def _weights(out):
    return read_checkpoint(out)["model"]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_of_a_run(tmp_path):
    out = tmp_path / "run"
    s = train(TrainConfig(epochs=2, out=str(out), **TINY), log=None)
    assert {p.name for p in out.iterdir()} == {
        "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"
    }  # fmt: skip
    assert 0.0 <= s["test_acc"] <= 1.0 and s["epochs"] == 2 and s["completed"]
    assert s["grad_evals"] == 2 * 2 * 4  # SAM: 2 full-batch gradients per step
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["grad_evals"] for r in rows] == [8.0, 16.0]
    assert rows[1]["grad_evals_epoch"] == 8.0
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["optimizer"] == "sam" and record["config"]["seed"] == 0
    # TrainConfig alone uses no recipe: SAM's class default radius, recorded explicitly.
    assert record["optimizer_kwargs"]["rho"] == 0.05 and record["optimizer_kwargs"]["lr"] == 0.05
    assert record["versions"]["torch"] == torch.__version__
    assert record["hardware"]["cpu_cores"] >= 1
    assert "hostname" not in json.dumps(record).lower()
    # Other commands rebuild the model from the run directory.
    model, cfg, ckpt = load_checkpoint(out)
    assert cfg.model == "cnn1d" and ckpt["epoch"] == 2 and not model.training
    data = samkit.train.build_dataset(cfg)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(s["test_acc"])


def test_checkpoint_loads_with_weights_only(tmp_path):
    train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), log=None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # The base optimizer's momentum buffers are in the optimizer state.
    assert ckpt["optimizer"]["base_optimizer"]["state"]
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python", "loader", "augment"}


def test_same_seed_same_run_different_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        train(TrainConfig(epochs=2, seed=seed, out=str(out), **TINY), log=None)
        runs[name] = (_metrics(out), _weights(out))
    assert runs["a"][0] == runs["b"][0]
    assert _same_state(runs["a"][1], runs["b"][1])
    assert runs["a"][0] != runs["c"][0]
    assert not _same_state(runs["a"][1], runs["c"][1])


@pytest.mark.parametrize(
    "dataset, extra",
    [("mnist1d", {}), ("digits", {"limit_train": 200, "optimizer": "asam"})],
    ids=["mnist1d-sam", "digits-bn-asam"],
)
def test_interrupted_run_resumes_bit_exactly(tmp_path, dataset, extra):
    settings = {**TINY, "dataset": dataset, "epochs": 4, "label_noise": 0.2, **extra}
    full, part = tmp_path / "full", tmp_path / "part"
    train(TrainConfig(out=str(full), **settings), log=None)
    s = train(TrainConfig(out=str(part), stop_after_epoch=2, **settings), log=None)
    assert s["epochs"] == 2 and not s["completed"]
    assert len(_metrics(part)) == 2
    s = train(TrainConfig(out=str(part), resume=True, **settings), log=None)
    assert s["epochs"] == 4 and s["completed"]
    assert _metrics(part) == _metrics(full)
    assert _same_state(_weights(part), _weights(full))  # includes BN running statistics
    opt_a = read_checkpoint(part)["optimizer"]["base_optimizer"]["state"]
    opt_b = read_checkpoint(full)["optimizer"]["base_optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    # With a constant schedule, 2 epochs + resume to 4 == 4 epochs.
    settings = {**TINY, "schedule": "constant", "optimizer": "sgd", "checkpoint_every": 0}
    short, long = tmp_path / "short", tmp_path / "long"
    train(TrainConfig(out=str(long), epochs=4, **settings), log=None)
    train(TrainConfig(out=str(short), epochs=2, **settings), log=None)
    train(TrainConfig(out=str(short), epochs=4, resume=True, **settings), log=None)
    assert _metrics(short) == _metrics(long)
    assert _same_state(_weights(short), _weights(long))


def test_resume_refuses_a_changed_setting_and_a_finished_run(tmp_path):
    train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), log=None)
    with pytest.raises(ConfigError, match="'lr'"):
        train(TrainConfig(epochs=2, lr=0.1, out=str(tmp_path), resume=True, **TINY), log=None)
    with pytest.raises(ConfigError, match="already done 1 epoch;"):
        train(TrainConfig(epochs=1, out=str(tmp_path), resume=True, **TINY), log=None)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), log=None)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), log=None)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: the file is truncated"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(TrainConfig(epochs=2, out=str(tmp_path), resume=True, **TINY), log=None)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "config": {}, "dataset_info": {}, "model": {}})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"epoch": 2, "config": {}, "dataset_info": {}, "model": {}})
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


@pytest.mark.parametrize("name", samkit.list_optimizers())
def test_every_registered_optimizer_runs_in_the_unchanged_loop(name):
    s = train(
        TrainConfig(optimizer=name, epochs=1, limit_train=96, limit_test=64, batch_size=32),
        log=None,
    )
    info = samkit.get_optimizer_info(name)
    assert 0.0 <= s["test_acc"] <= 1.0
    assert s["final_train_loss"] == s["final_train_loss"]  # not NaN
    assert s["steps"] == 3 and s["grad_evals"] > 0
    if not info.sharpness_aware:
        assert s["grad_evals"] == 3.0


def test_opt_args_reach_the_optimizer_and_bad_ones_are_config_errors():
    s = train(TrainConfig(optimizer="sam", opt_args={"adaptive": True}, epochs=1, **TINY), log=None)
    assert s["epochs"] == 1
    with pytest.raises(ConfigError, match="rejected"):
        train(TrainConfig(opt_args={"bogus": 1}, epochs=1, **TINY), log=None)
    with pytest.raises(ConfigError, match="rho"):
        TrainConfig(rho=-1.0).validate()


@pytest.mark.filterwarnings("ignore::samkit.train.TrainWarning")  # bf16 may be slow on a CPU
def test_bf16_autocast_and_accumulation_run():
    s = train(TrainConfig(amp="bf16", accumulation_steps=2, epochs=1, **TINY), log=None)
    assert 0.0 <= s["test_acc"] <= 1.0
    with pytest.raises(ConfigError, match="amp"):
        train(TrainConfig(amp="fp8"), log=None)


def test_track_sharpness_records_measurements(tmp_path):
    pytest.importorskip("samkit.sharpness")
    if not hasattr(samkit.sharpness, "measure_all"):
        with pytest.raises(ConfigError, match="not available yet"):
            train(TrainConfig(track_sharpness=1), log=None)
        return
    settings = dict(epochs=2, sharpness_samples=64, **TINY)
    s = train(TrainConfig(track_sharpness=2, out=str(tmp_path / "a"), **settings), log=None)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert "lambda_max" not in rows[0]
    assert rows[1]["lambda_max"] > 0 and rows[1]["hessian_trace"] is not None
    assert 0.0 <= rows[1]["grad_eig_alignment"] <= 1.0
    assert s["lambda_max"] == rows[1]["lambda_max"]
    # Measuring does not change the training trajectory.
    train(TrainConfig(out=str(tmp_path / "b"), **settings), log=None)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_every_model_builds_for_its_data():
    infos = {
        "cnn1d": DatasetInfo("mnist1d", (1, 40), 10, 0, 0),
        "mlp": DatasetInfo("mnist1d", (1, 40), 10, 0, 0),
        "cnn_small": DatasetInfo("digits", (1, 8, 8), 10, 0, 0),
        "resnet18": DatasetInfo("cifar10", (3, 32, 32), 10, 0, 0),
        "wrn": DatasetInfo("cifar100", (3, 32, 32), 100, 0, 0),
        "wrn28_10": DatasetInfo("cifar10", (3, 32, 32), 10, 0, 0),
        "transformer": DatasetInfo("modular-add", (3,), 97, 0, 0, vocab_size=98),
    }
    assert set(infos) == set(list_models())
    small = {"resnet18": {"width": 4}, "wrn": {"depth": 10, "widen": 1}}
    for name, info in infos.items():
        if name == "wrn28_10":
            n = sum(p.numel() for p in create_model(name, info).parameters())
            assert 36.4e6 < n < 36.6e6  # WRN-28-10 has 36.5M parameters
            continue
        model = create_model(name, info, **small.get(name, {}))
        dtype = torch.long if info.vocab_size else torch.float  # token ids or real values
        out = model(torch.zeros(2, *info.input_shape, dtype=dtype))
        assert out.shape == (2, info.num_classes)
    n18 = sum(p.numel() for p in create_model("resnet18", infos["resnet18"]).parameters())
    assert 11.1e6 < n18 < 11.2e6  # ResNet-18 (CIFAR) has 11.17M parameters
    with pytest.raises(ValueError, match="depth"):
        create_model("wrn", infos["wrn"], depth=11)
    with pytest.raises(ValueError, match="needs inputs"):
        create_model("cnn_small", infos["cnn1d"])
    with pytest.raises(ValueError, match="holds token ids"):
        create_model("mlp", infos["transformer"])
    with pytest.raises(ValueError, match="holds real-valued inputs"):
        create_model("transformer", infos["mlp"])


def test_cifar_run_on_fake_files(tmp_path):
    from tests.train.test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", "cifar10", n_train=20)
    s = train(
        TrainConfig(
            dataset="cifar10",
            data_dir=str(tmp_path / "data"),
            model="resnet18",
            model_args={"width": 4},
            epochs=1,
            batch_size=10,
            cutout=8,
        ),
        log=None,
    )
    assert s["steps"] == 2 and 0.0 <= s["test_acc"] <= 1.0


def test_every_epoch_starts_with_set_epoch_and_resume_continues_the_count(tmp_path, monkeypatch):
    from samkit.optim.base import SharpnessAwareOptimizer

    calls = []  # (epoch given, optimizer steps taken before the call)
    original = SharpnessAwareOptimizer.set_epoch

    def spy(self, epoch):
        calls.append((epoch, self.samkit_state["step"]))
        original(self, epoch)

    monkeypatch.setattr(SharpnessAwareOptimizer, "set_epoch", spy)
    settings = {**TINY, "epochs": 4}  # 4 steps per epoch
    full, part = tmp_path / "full", tmp_path / "part"
    train(TrainConfig(out=str(full), **settings), log=None)
    assert calls == [(0, 0), (1, 4), (2, 8), (3, 12)]  # from 0, before the epoch's first step
    calls.clear()
    train(TrainConfig(out=str(part), stop_after_epoch=2, **settings), log=None)
    assert read_checkpoint(part)["optimizer"]["samkit"]["epoch"] == 1
    train(TrainConfig(out=str(part), resume=True, **settings), log=None)
    assert calls == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert (
        read_checkpoint(part)["optimizer"]["samkit"] == read_checkpoint(full)["optimizer"]["samkit"]
    )
    assert read_checkpoint(full)["optimizer"]["samkit"]["epoch"] == 3


def test_the_loop_reads_in_phases():
    # Issue 13: each phase reads top to bottom in a screen or two.
    import inspect

    from samkit.train import build, epoch, loop, progress, rundir

    for fn in (loop.train, build.build_run, epoch.train_epoch, epoch.run_epoch):
        assert len(inspect.getsource(fn).splitlines()) <= 100, fn.__qualname__
    for cls in (rundir.RunDirectory, progress.EpochDisplay):
        assert len(inspect.getsource(cls).splitlines()) <= 130, cls.__qualname__
