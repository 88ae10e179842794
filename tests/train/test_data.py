"""samkit.train.data: embedded datasets, CIFAR files, restricted unpickling, label noise,
augmentation and the in-memory loader."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from samkit.train import (
    ConfigError,
    InMemoryLoader,
    TrainConfig,
    UnsafePickleError,
    add_label_noise,
    augment_batch,
    build_dataset,
    load_cifar,
    load_dataset,
)
from samkit.train.data import restricted_load


def write_fake_cifar(root, name="cifar10", n_train=20, n_test=8, seed=0):
    """Small files in the CIFAR "python version" format; returns the labels written."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        per = n_train // 5
        labels = []
        for i in range(1, 6):
            y = rng.integers(0, 10, per).tolist()
            labels += y
            d = {b"batch_label": b"x", b"labels": y, b"filenames": [b"f"] * per,
                 b"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8)}  # fmt: skip
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump(d, f, protocol=2)
        yt = rng.integers(0, 10, n_test).tolist()
        d = {b"labels": yt, b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)}
        with open(folder / "test_batch", "wb") as f:
            pickle.dump(d, f, protocol=2)
        return labels, yt
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 100, n).tolist()
        d = {b"fine_labels": y, b"coarse_labels": [v // 5 for v in y],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}  # fmt: skip
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out.append(y)
    return out[0], out[1]


# ----------------------------------------------------------------------------- embedded sets


def test_mnist1d_matches_the_recipe():
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.long
    assert set(d.y_train.unique().tolist()) == set(range(10))
    # Fixed generation seed: the same data on every call, standardised by make_dataset.
    again = load_dataset("mnist1d")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    assert abs(float(d.x_train.mean())) < 0.05 and 0.9 < float(d.x_train.std()) < 1.1


def test_mnist1d_generation_leaves_global_rngs_alone():
    from samkit.train.data import _mnist1d_arrays

    _mnist1d_arrays.cache_clear()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    load_dataset("mnist1d")
    assert np.random.rand() == expected


def test_digits_split_and_scale():
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert torch.equal(d.y_test, load_dataset("digits").y_test)  # fixed split
    small = load_dataset("digits", limit_train=50, limit_test=20)
    assert small.info.num_train == 50 and small.info.num_test == 20


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        load_dataset("nope")


# ----------------------------------------------------------------------------- the registry


def _toy_arrays(data_dir):
    """Two Gaussian blobs in 6 dimensions: 48 training and 16 test samples."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = (rng.normal(size=(64, 6)) + 3.0 * y[:, None]).astype(np.float32)
    return x[:48], y[:48], x[48:], y[48:]


@pytest.fixture
def toy_dataset():
    """A dataset added by one record, removed again afterwards."""
    from samkit.train import DatasetSpec, register_dataset
    from samkit.train.data import DATASETS

    spec = register_dataset(
        DatasetSpec(name="toy", description="two blobs", load=_toy_arrays, num_classes=2,
                    input_shape=(6,), default_model="mlp")
    )  # fmt: skip
    yield spec
    del DATASETS["toy"]


def test_a_dataset_is_one_record(toy_dataset, tmp_path, capsys):
    from samkit.cli import main
    from samkit.train import list_datasets, register_dataset

    assert "toy" in list_datasets()
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(toy_dataset)
    d = load_dataset("toy", limit_test=10)
    assert (d.info.input_shape, d.info.num_classes, d.info.num_train, d.info.num_test) == (
        (6,), 2, 48, 10
    )  # fmt: skip
    # The command line takes it: --dataset, its default model, samkit list.
    out = tmp_path / "run"
    argv = ["train", "--dataset", "toy", "--optimizer", "sgd", "--epochs", "1", "--batch-size",
            "16", "--threads", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    saved = (out / "config.json").read_text()
    assert '"dataset": "toy"' in saved and '"model": "mlp"' in saved
    assert main(["list", "datasets"]) == 0
    assert "  toy          two blobs" in capsys.readouterr().out


def test_a_loader_that_breaks_its_record_is_refused(toy_dataset, monkeypatch):
    from samkit.train.data import DATASETS

    monkeypatch.setitem(DATASETS, "toy", dataclasses.replace(toy_dataset, input_shape=(1, 6)))
    with pytest.raises(ValueError, match=r"inputs of shape \[6\] \(train\).*expected \[1, 6\]"):
        load_dataset("toy")


def test_needs_data_dir_is_one_rule_of_the_record():
    from samkit.train import dataset_spec, resolve_config

    for name in ("cifar10", "cifar100"):
        with pytest.raises(ValueError, match=f"dataset '{name}' needs --data-dir"):
            load_dataset(name)
        with pytest.raises(ConfigError, match=f"dataset '{name}' needs --data-dir"):
            resolve_config(TrainConfig(dataset=name))
    assert not any(dataset_spec(n).needs_data_dir for n in ("mnist1d", "digits"))


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_on_fake_files(tmp_path, name):
    y_train, y_test = write_fake_cifar(tmp_path, name)
    x_tr, y_tr, x_te, y_te = load_cifar(name, tmp_path)
    assert x_tr.shape == (20, 3, 32, 32) and x_tr.dtype == np.uint8
    assert x_te.shape == (8, 3, 32, 32)
    assert y_tr.tolist() == y_train and y_te.tolist() == y_test
    # The extracted folder itself works too.
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert load_cifar(name, tmp_path / sub)[1].tolist() == y_train

    d = load_dataset(name, tmp_path)
    assert d.info.num_classes == (10 if name == "cifar10" else 100)
    assert d.augment and d.info.input_shape == (3, 32, 32)
    x = d.prepare(d.x_train)
    assert x.dtype == torch.float32
    # Normalised with the training set's per-channel statistics.
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_cifar_missing_folder_and_file_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar("cifar10", tmp_path)
    write_fake_cifar(tmp_path, "cifar10")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    # Sanity: the plain unpickler would run it.
    with pytest.raises(UnsafePickleError, match=r"system"):
        restricted_load(folder / "data_batch_1")
    with pytest.raises(UnsafePickleError):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()


def test_truncated_cifar_file(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar("cifar10", tmp_path)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_shapes_and_seeding():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment_batch(x, torch.Generator().manual_seed(1), cutout=8)
    b = augment_batch(x, torch.Generator().manual_seed(1), cutout=8)
    c = augment_batch(x, torch.Generator().manual_seed(2), cutout=8)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_is_a_shifted_window_and_flip_mirrors():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=2, flip=False)
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = augment_batch(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


# ----------------------------------------------------------------------------- label noise


def test_label_noise_flips_the_expected_fraction_to_other_classes():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = add_label_noise(y, 0.25, 10, torch.Generator().manual_seed(3))
    changed = noisy != y
    assert int(changed.sum()) == flipped  # "other class": every flip changes the label
    assert abs(flipped / len(y) - 0.25) < 0.015
    # Uniform over the other classes: every offset 1..9 appears about equally often.
    offsets = ((noisy - y) % 10)[changed]
    counts = torch.bincount(offsets, minlength=10)[1:].float()
    assert float(counts.min()) > 0.8 * float(counts.mean())
    again, _ = add_label_noise(y, 0.25, 10, torch.Generator().manual_seed(3))
    other, _ = add_label_noise(y, 0.25, 10, torch.Generator().manual_seed(4))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    assert torch.equal(add_label_noise(y, 0.0, 10, torch.Generator())[0], y)
    with pytest.raises(ValueError, match="label noise"):
        add_label_noise(y, 1.0, 10, torch.Generator())


def test_run_label_noise_is_seeded_and_leaves_test_labels_alone():
    cfg = TrainConfig(dataset="digits", label_noise=0.4, seed=5)
    clean = load_dataset("digits", val_fraction=cfg.val_fraction)
    d = build_dataset(cfg)
    assert torch.equal(d.y_test, clean.y_test)
    assert torch.equal(d.y_val, clean.y_val)  # validation labels stay clean too
    assert d.label_noise_flipped == int((d.y_train != clean.y_train).sum())
    assert abs(d.label_noise_flipped / len(d.y_train) - 0.4) < 0.05
    assert torch.equal(d.y_train, build_dataset(cfg).y_train)
    cfg.seed = 6
    assert not torch.equal(d.y_train, build_dataset(cfg).y_train)


def test_label_noise_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="label_noise"):
        TrainConfig(label_noise=1.0).validate()


# ----------------------------------------------------------------------------- loader


def test_loader_covers_every_sample_once_per_epoch_and_is_seeded():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    loader = InMemoryLoader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    epoch1 = [idx for _, _, idx in loader]
    epoch2 = [idx for _, _, idx in loader]
    assert [len(i) for i in epoch1] == [4, 4, 2]
    assert sorted(torch.cat(epoch1).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))  # reshuffled
    for xb, yb, idx in loader:
        assert torch.equal(xb[:, 0].long(), idx) and torch.equal(yb, idx)
    again = InMemoryLoader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([i for _, _, i in again]), torch.cat(epoch1))
