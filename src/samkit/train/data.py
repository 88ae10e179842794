"""Datasets for ``samkit train``: a registry of records, two embedded sets and CIFAR from a
local folder.

Each dataset is one :class:`DatasetSpec` in :data:`DATASETS` (``register_dataset``): its name,
how to load it, its classes and input shape, whether it reads files from ``--data-dir``, the
model it trains by default. Adding a dataset is one record (and its loader).

* ``mnist1d`` — generated offline by the ``mnist1d`` package with its default arguments and
  its fixed default seed (42): 4,000 training and 1,000 test signals of length 40, 10
  classes. ``make_dataset`` already centres the signals and scales them to unit standard
  deviation (one global mean and std, as the authors do), so samkit only converts to
  float32. Stored as ``[N, 1, 40]`` (one channel).
* ``digits`` — scikit-learn's 8×8 digits (1,797 images), pixels scaled from 0..16 to [0, 1],
  stored as ``[N, 1, 8, 8]``; a fixed 80/20 split (seed 0, independent of the run's seed):
  1,437 train / 360 test.
* ``modular-add`` — the modular addition task of the grokking papers (Power et al. 2022),
  generated: every pair ``(a, b)`` with ``0 <= a, b < 97`` written as the three tokens
  ``a, b, =`` (ids 0..96 and 97 for ``=``), labelled ``(a + b) mod 97``; a fixed permutation
  (seed 0, whatever the run's seed) puts half of the 9,409 pairs in the training split
  (4,704; the validation split is carved from it, and ``limit_train`` takes the first pairs
  of it) and the other half in the test split (4,705). Stored as int64 ``[N, 3]``.
* ``cifar10`` / ``cifar100`` — the "python version" files (``cifar-10-batches-py`` or
  ``cifar-100-python``) from ``data_dir``, read with a restricted unpickler. Images stay
  uint8 ``[N, 3, 32, 32]`` in memory; batches are converted to float, scaled to [0, 1] and
  normalised per channel (training-set mean and std) on the fly, after the standard
  augmentation (random crop 32 with zero padding 4 of the [0, 1] image, horizontal flip,
  optional cutout).

The validation split (:func:`split_validation`): a stratified fraction of the training split,
drawn with the fixed :data:`SPLIT_SEED` (not the run's seed), so every run of a task holds out
the same samples; label noise never reaches them. Label noise (:func:`add_label_noise`) and the
in-memory loader (:class:`InMemoryLoader`) are here too. Nothing is cached on disk; the generated ``mnist1d`` arrays are cached in
memory for the life of the process.
"""

from __future__ import annotations

import _codecs
import dataclasses
import functools
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "InMemoryLoader",
    "SPLIT_SEED",
    "UnsafePickleError",
    "add_label_noise",
    "augment_batch",
    "dataset_spec",
    "list_datasets",
    "load_cifar",
    "load_dataset",
    "register_dataset",
    "restricted_load",
    "split_validation",
]

#: ``(x_train, y_train, x_test, y_test)`` as a loader returns them: inputs as stored (float32,
#: or uint8 images that :meth:`Dataset.prepare` scales and normalises), integer labels.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset ``samkit train --dataset NAME`` can train on (one record of :data:`DATASETS`).

    Attributes:
        name: the ``--dataset`` name.
        description: one line for ``samkit list``.
        load: ``load(data_dir)`` -> :data:`Arrays`, both splits in full (``data_dir`` is
            ``None`` for a dataset that reads no files).
        num_classes: number of classes.
        input_shape: shape of one stored input, without the batch dimension.
        default_model: the model a run trains when neither ``--model`` nor its recipe names one.
        needs_data_dir: whether it reads files from ``--data-dir`` (nothing is downloaded).
        files: what ``--data-dir`` must hold, for the messages.
        augment: whether the standard image augmentation (crop + flip) is on by default.
        cpu_threads: torch CPU threads ``samkit train`` uses on a CPU when ``--threads`` is not
            given (``None``: torch's choice). The embedded tasks' models are so small that
            intra-op threads cost more in synchronisation than they save (the default recipe
            took 23 s with 1 thread, 313 s with 2 on a busy 2-core machine).
        vocab_size: for token inputs (integer ids, e.g. ``modular-add``), the number of
            distinct tokens; 0 for real-valued inputs.
    """

    name: str
    description: str
    load: Callable[[Path | None], Arrays]
    num_classes: int
    input_shape: tuple[int, ...]
    default_model: str
    needs_data_dir: bool = False
    files: str = ""
    augment: bool = False
    cpu_threads: int | None = None
    vocab_size: int = 0

    def check_data_dir(self, data_dir: str | Path | None) -> None:
        """``ValueError`` when the dataset reads files and no ``data_dir`` is given."""
        if self.needs_data_dir and not data_dir:
            raise ValueError(
                f"dataset {self.name!r} needs --data-dir (the folder with {self.files}; "
                "nothing is downloaded)"
            )


#: The registered datasets, by name (``register_dataset`` adds one).
DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` (``ValueError`` if its name is taken)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset name {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The record of dataset ``name`` (``ValueError`` listing the names if unknown)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data (also stored in checkpoints).

    Attributes:
        name: dataset name.
        input_shape: shape of one input, without the batch dimension (e.g. ``(1, 40)``).
        num_classes: number of classes.
        num_train, num_test: sizes of the training and test splits (after ``limit_*`` and
            the validation split).
        num_val: size of the validation split (0: none).
        vocab_size: number of distinct tokens of token inputs (0: real-valued inputs).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int
    num_val: int = 0
    vocab_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-container form (JSON and ``weights_only`` checkpoints)."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            num_train=int(d["num_train"]),
            num_test=int(d["num_test"]),
            # absent from checkpoints written before the validation split and token inputs
            num_val=int(d.get("num_val", 0)),
            vocab_size=int(d.get("vocab_size", 0)),
        )


@dataclasses.dataclass
class Dataset:
    """Both splits in memory, plus what the loop needs to turn stored inputs into batches.

    ``x_*`` are float32 for the embedded sets and uint8 images for CIFAR; :meth:`prepare`
    converts a batch of stored inputs into the model's input (token ids pass unchanged).
    ``augment`` says whether the standard image augmentation applies by default.
    ``label_noise_flipped`` is the number of training labels changed by
    :func:`add_label_noise` (0 without noise). ``x_val``/``y_val``: the validation split
    (:func:`split_validation`), ``None`` without one.
    """

    info: DatasetInfo
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    augment: bool = False
    mean: Tensor | None = None  # per-channel, applied by prepare() to [0, 1] images
    std: Tensor | None = None
    label_noise_flipped: int = 0

    def prepare(self, x: Tensor) -> Tensor:
        """Stored inputs -> float model inputs (uint8 images: scale to [0, 1], normalise)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.to(x.device).view(shape)) / self.std.to(x.device).view(shape)
        return x

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device``."""

        def moved(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            x_val=moved(self.x_val),
            y_val=moved(self.y_val),
        )


# ----------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    val_fraction: float = 0.0,
) -> Dataset:
    """Load a dataset by name (see the module docstring for each one).

    ``limit_train`` / ``limit_test`` keep the first N samples of a split (quick runs, tests).
    ``val_fraction`` > 0 then holds out that fraction of the (limited) training split as the
    validation split (:func:`split_validation`; ``ValueError`` when it would leave either
    part empty). ``data_dir`` is required by the datasets that read files (CIFAR) and
    ignored otherwise.
    """
    spec = dataset_spec(name)
    spec.check_data_dir(data_dir)
    x_np, y_np, x_te_np, y_te_np = spec.load(Path(data_dir) if data_dir else None)
    x_tr, x_te = torch.from_numpy(x_np), torch.from_numpy(x_te_np)
    if tuple(x_tr.shape[1:]) != spec.input_shape or tuple(x_te.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"dataset {name!r}: inputs of shape {list(x_tr.shape[1:])} (train) and "
            f"{list(x_te.shape[1:])} (test), expected {list(spec.input_shape)}"
        )
    y_tr = torch.as_tensor(np.array(y_np), dtype=torch.long)
    y_te = torch.as_tensor(np.array(y_te_np), dtype=torch.long)
    if limit_train is not None:
        x_tr, y_tr = x_tr[:limit_train], y_tr[:limit_train]
    if limit_test is not None:
        x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    x_val = y_val = None
    if val_fraction:
        keep, held = split_validation(y_tr, val_fraction, spec.num_classes)
        x_val, y_val = x_tr[held], y_tr[held]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    mean = std = None
    if x_tr.dtype == torch.uint8:
        # Per-channel statistics of the (possibly limited) training set, in [0, 1] units.
        xf = x_tr.float().div_(255.0)
        mean = xf.mean(dim=(0, 2, 3))
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    info = DatasetInfo(
        name=name,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        num_train=int(x_tr.shape[0]),
        num_test=int(x_te.shape[0]),
        num_val=0 if y_val is None else int(y_val.shape[0]),
        vocab_size=spec.vocab_size,
    )
    return Dataset(
        info, x_tr, y_tr, x_te, y_te, x_val, y_val, augment=spec.augment, mean=mean, std=std
    )


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> Arrays:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # optional dependency
        raise ImportError(
            "the mnist1d dataset needs the 'mnist1d' package: pip install 'samkit[cli]'"
        ) from e
    # make_dataset reseeds numpy's and python's global RNGs with args.seed (42); keep the
    # caller's RNG streams untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())  # default args, default seed: same data for all
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (
        d["x"].astype(np.float32),
        d["y"].astype(np.int64),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int64),
    )
    for a in arrays:
        a.setflags(write=False)  # shared by every call: never modified in place
    return arrays


def _load_mnist1d(data_dir: Path | None) -> Arrays:
    """The cached arrays, copied (writable; the cache stays untouched), as ``[N, 1, 40]``."""
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays()
    return np.array(x_tr[:, None]), y_tr, np.array(x_te[:, None]), y_te


def _load_digits(data_dir: Path | None) -> Arrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'samkit[cli]'") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))  # fixed split, whatever the run seed
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


#: The modulus of ``modular-add`` (a prime, as in Power et al. 2022).
MODULUS = 97


def _load_modular_add(data_dir: Path | None) -> Arrays:
    p = MODULUS
    a, b = np.divmod(np.arange(p * p, dtype=np.int64), p)
    x = np.stack([a, b, np.full_like(a, p)], axis=1)  # tokens a, b, "=" (id p)
    y = (a + b) % p
    perm = np.random.default_rng(0).permutation(p * p)  # fixed split, whatever the run seed
    n_train = (p * p) // 2
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


# ----------------------------------------------------------------------------- CIFAR


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR file never contains."""


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds what the CIFAR "python version" files contain.

    Those files are dicts of bytes keys, lists of ints and uint8 numpy arrays; the arrays are
    rebuilt through ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype``; files re-saved by Python 3 with protocol 2 also need
    ``_codecs.encode`` (how that protocol stores ``bytes``). Any other global (``os.system``, ``subprocess.Popen``, ``eval``, ...) is
    refused before it is imported.
    """

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed: dict[tuple[str, str], Callable[[], Any]] = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            # Python 3 writes bytes objects into protocol-2 pickles as _codecs.encode(s, "latin1").
            ("_codecs", "encode"): lambda: _codecs.encode,
            ("builtins", "dict"): lambda: dict,
            ("__builtin__", "dict"): lambda: dict,
            ("builtins", "list"): lambda: list,
            ("__builtin__", "list"): lambda: list,
            ("builtins", "tuple"): lambda: tuple,
            ("__builtin__", "tuple"): lambda: tuple,
        }
        factory = allowed.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to load {module}.{name} from this pickle; CIFAR "
                "files only contain dicts, lists and numpy uint8 arrays (is the file what "
                "you think it is?)"
            )
        return factory()


def restricted_load(path: str | Path) -> Any:
    """Unpickle a CIFAR "python version" file with :class:`_CifarUnpickler`.

    Raises ``FileNotFoundError`` naming the path if it is missing and
    :class:`UnsafePickleError` if the file asks for anything but containers and arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with open(path, "rb") as f:
        try:
            return _CifarUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable CIFAR pickle ({e})") from e


_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _cifar_folder(name: str, data_dir: Path) -> Path:
    folder, train_files, _, _ = _CIFAR_LAYOUT[name]
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir not found: {data_dir}")
    for candidate in (data_dir / folder, data_dir):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {name} files in {data_dir}: expected {data_dir / folder / train_files[0]} "
        f"(the 'python version' archive, extracted)"
    )


def _read_cifar_file(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ValueError(
            f"{path}: expected a dict with b'data' and {label_key!r} entries "
            "(the CIFAR 'python version' format)"
        )
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' should be uint8 N x 3072, got {x.dtype} {x.shape}")
    y = np.asarray(d[label_key], dtype=np.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: {len(y)} labels for {x.shape[0]} images")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(
    name: str, data_dir: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of ``cifar10``/``cifar100`` from ``data_dir``.

    ``data_dir`` is the extracted folder (``cifar-10-batches-py``) or its parent. Images
    are uint8 ``[N, 3, 32, 32]``, labels int64 (CIFAR-100: the fine labels).
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"not a CIFAR dataset: {name!r}")
    folder = _cifar_folder(name, Path(data_dir))
    _, train_files, test_files, key = _CIFAR_LAYOUT[name]
    splits = []
    for files in (train_files, test_files):
        parts = [_read_cifar_file(folder / f, key) for f in files]
        splits.append(np.concatenate([p[0] for p in parts]))
        splits.append(np.concatenate([p[1] for p in parts]))
    x_tr, y_tr, x_te, y_te = splits
    num_classes = DATASETS[name].num_classes
    for y, split in ((y_tr, "train"), (y_te, "test")):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{folder}: {split} labels outside 0..{num_classes - 1}")
    return x_tr, y_tr, x_te, y_te


# ----------------------------------------------------------------------------- the datasets

register_dataset(
    DatasetSpec(
        name="mnist1d",
        description="MNIST-1D, generated offline (4,000 train / 1,000 test, length 40, 10 classes)",
        load=_load_mnist1d,
        num_classes=10,
        input_shape=(1, 40),
        default_model="cnn1d",
        cpu_threads=1,
    )
)
register_dataset(
    DatasetSpec(
        name="digits",
        description="scikit-learn 8x8 digits (1,437 train / 360 test, 10 classes)",
        load=_load_digits,
        num_classes=10,
        input_shape=(1, 8, 8),
        default_model="cnn_small",
        cpu_threads=1,
    )
)


register_dataset(
    DatasetSpec(
        name="modular-add",
        description=f"(a + b) mod {MODULUS} as tokens a, b, = (4,704 / 4,705 of the "
        f"{MODULUS}x{MODULUS} pairs, {MODULUS} classes)",
        load=_load_modular_add,
        num_classes=MODULUS,
        input_shape=(3,),
        default_model="transformer",
        cpu_threads=1,
        vocab_size=MODULUS + 1,
    )
)


def _cifar(name: str, num_classes: int, description: str) -> DatasetSpec:
    """CIFAR-10 and CIFAR-100 differ only in their files and classes."""
    return DatasetSpec(
        name=name,
        description=description,
        load=functools.partial(load_cifar, name),
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        default_model="resnet18",
        needs_data_dir=True,
        files=_CIFAR_LAYOUT[name][0],
        augment=True,
    )


register_dataset(
    _cifar(
        "cifar10", 10, "CIFAR-10 from --data-dir (cifar-10-batches-py), 50,000 / 10,000, 10 classes"
    )
)
register_dataset(
    _cifar(
        "cifar100",
        100,
        "CIFAR-100 from --data-dir (cifar-100-python), 50,000 / 10,000, 100 classes",
    )
)


# ----------------------------------------------------------------------------- validation split

#: Seed of every validation split. A constant, not the run's ``seed``: every run of a task
#: (every method, every seed) holds out the same samples, so their validation figures are
#: comparable and a value chosen on them is chosen on the same data.
SPLIT_SEED = 0


def split_validation(
    labels: Tensor, fraction: float, num_classes: int, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of a stratified split of samples with these ``labels``.

    ``round(fraction · N)`` samples are held out, shared between the classes in proportion
    to their counts (largest remainders get the samples left over; ties to the lower class),
    each class's share drawn uniformly at random from its samples by a numpy generator
    seeded with ``seed``. Both index tensors are sorted (the samples keep their order). The
    split depends only on the labels, ``fraction`` and ``seed``. ``ValueError`` when
    ``fraction`` is outside (0, 1) or leaves either part empty.

    (Hand-written rather than scikit-learn's ``train_test_split(stratify=...)``, which
    refuses a held-out part smaller than the number of classes, as small ``--limit-train``
    runs ask for, and would make scikit-learn a dependency of every dataset.)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"Invalid val_fraction value: {fraction!r} (must be a number)")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"Invalid val_fraction value: {fraction!r} (must be in (0, 1))")
    y = labels.detach().cpu().numpy().astype(np.int64)
    n = int(y.shape[0])
    n_val = int(np.floor(fraction * n + 0.5))
    if n_val < 1 or n_val >= n:
        part = "no validation sample" if n_val < 1 else "no training sample"
        raise ValueError(
            f"val_fraction {fraction:g} of {n} training samples leaves {part}; change "
            "val_fraction (0 disables the split) or train on more samples"
        )
    counts = np.bincount(y, minlength=num_classes)
    quota = n_val * counts / n
    share = np.floor(quota).astype(np.int64)
    left = n_val - int(share.sum())
    by_remainder = sorted(range(len(counts)), key=lambda c: (-(quota[c] - share[c]), c))
    for c in by_remainder[:left]:
        share[c] += 1
    order = np.random.default_rng(seed).permutation(n)
    held = np.zeros(n, dtype=bool)
    for c, k in enumerate(share):
        if k:
            members = order[y[order] == c]  # class c's samples in the random order
            held[members[:k]] = True
    idx = torch.arange(n)
    return idx[torch.from_numpy(~held)], idx[torch.from_numpy(held)]


# ----------------------------------------------------------------------------- label noise


def add_label_noise(
    labels: Tensor, p: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, int]:
    """Symmetric label noise, "other class" convention.

    Each label is replaced, with probability ``p``, by a class drawn uniformly from the
    ``num_classes - 1`` *other* classes, so the expected fraction of wrong labels is exactly
    ``p`` (with the "any class" convention it would be ``p·(K-1)/K``). Returns the new
    labels (a copy) and the number of labels changed. Draws from ``generator`` only.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Invalid label noise value: {p} (must be in [0, 1))")
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    labels = labels.clone()
    if p == 0.0:
        return labels, 0
    n = labels.shape[0]
    flip = torch.rand(n, generator=generator) < p
    # An offset in 1..K-1 added modulo K is a uniform draw among the other classes.
    offset = torch.randint(1, num_classes, (n,), generator=generator)
    noisy = (labels.cpu() + offset) % num_classes
    labels[flip.to(labels.device)] = noisy[flip].to(labels.device)
    return labels, int(flip.sum())


# ----------------------------------------------------------------------------- augmentation


def augment_batch(
    x: Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> Tensor:
    """Standard CIFAR augmentation of a batch of images ``[B, C, H, W]`` (any dtype).

    Random crop of the original size from the image zero-padded by ``padding`` on each side,
    horizontal flip with probability 1/2, and (``cutout > 0``) a ``cutout × cutout`` square
    of zeros at a uniformly random centre (clipped at the border). Every random number
    comes from ``generator`` (a CPU generator), drawn in a fixed order: identical results
    for identical generator states.
    """
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        # Per-sample offsets into the padded image, gathered with one advanced index.
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B,1,H,1]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [B,1,1,W]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if cutout > 0:
        cy = torch.randint(0, h, (b,), generator=generator).to(dev)
        cx = torch.randint(0, w, (b,), generator=generator).to(dev)
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        lo_y, lo_x = (cy - cutout // 2)[:, None, None], (cx - cutout // 2)[:, None, None]
        inside = (ys >= lo_y) & (ys < lo_y + cutout) & (xs >= lo_x) & (xs < lo_x + cutout)
        x = x.masked_fill(inside[:, None], 0)
    return x


# ----------------------------------------------------------------------------- loader


class InMemoryLoader:
    """Batches ``(x, y, idx)`` from tensors in memory, without worker processes.

    Args:
        x, y: inputs and labels (first dimension = samples), on any device.
        batch_size: samples per batch; the last batch may be smaller (``drop_last=False``).
        shuffle: draw a new permutation at the start of every pass over the data from
            ``generator`` (a seeded CPU ``torch.Generator``); otherwise keep the order.
        transform: applied to each batch of inputs (e.g. augmentation + normalisation).

        shard: ``(rank, world_size)`` under several processes: every process draws the same
            permutation and builds the same *global* batch of ``batch_size`` samples
            (``transform`` included, so augmentation draws the same random numbers as one
            process would), then keeps its contiguous share of ``batch_size / world_size``
            samples. A last, smaller batch is cut to a multiple of ``world_size`` (at most
            ``world_size - 1`` samples of an epoch left out; a batch cut to nothing is
            dropped). ``batch_size`` must be divisible by ``world_size``.

    ``idx`` holds the dataset indices of the batch's samples (``LongTensor``, on the data's
    device). The generator's state after a pass fully determines the next pass, which is
    what makes resumed runs exact, and the shares of all processes together are the batch
    one process would train on.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size value: {batch_size}")
        rank, world = shard
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"Invalid shard value: {shard} (rank, world_size)")
        if batch_size % world:
            raise ValueError(
                f"Invalid batch_size value: {batch_size} (not divisible by the {world} "
                "processes that share each batch)"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if shuffle and generator is None:
            raise ValueError("shuffle=True needs a seeded torch.Generator")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.transform = transform
        self.drop_last = drop_last
        self.shard = (rank, world)

    def _global_batches(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        full = self._global_batches()
        world = self.shard[1]
        last = self.x.shape[0] - (full - 1) * self.batch_size  # samples in the last batch
        return full - 1 if full and last < world else full  # a last batch cut to nothing

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        order = order.to(self.x.device)
        rank, world = self.shard
        for k in range(self._global_batches()):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            xb = self.x[idx]
            if self.transform is not None:
                xb = self.transform(xb)  # on the global batch: the same draws on every rank
            if world > 1:
                per = idx.shape[0] // world
                if per == 0:
                    continue
                mine = slice(rank * per, (rank + 1) * per)
                xb, idx = xb[mine], idx[mine]
            yield xb, self.y[idx], idx
