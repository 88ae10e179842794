"""Training: datasets, models, the training loop and checkpoints behind ``samkit train``.

Typical use::

    from samkit.train import TrainConfig, train, load_checkpoint
    summary = train(TrainConfig(optimizer="sam", epochs=30, out="runs/sam"))
    model, config, ckpt = load_checkpoint("runs/sam")
"""

from samkit.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from samkit.train.config import ConfigError, TrainConfig, optimizer_settings
from samkit.train.data import (
    Dataset,
    DatasetInfo,
    DatasetSpec,
    InMemoryLoader,
    UnsafePickleError,
    add_label_noise,
    augment_batch,
    dataset_spec,
    list_datasets,
    load_cifar,
    load_dataset,
    register_dataset,
)
from samkit.train.env import TrainWarning
from samkit.train.loop import build_dataset, resolve_config, train
from samkit.train.models import create_model, list_models
from samkit.train.rundir import RunWriteError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "InMemoryLoader",
    "RunWriteError",
    "TrainConfig",
    "TrainWarning",
    "UnsafePickleError",
    "add_label_noise",
    "augment_batch",
    "build_dataset",
    "create_model",
    "dataset_spec",
    "list_datasets",
    "list_models",
    "load_checkpoint",
    "load_cifar",
    "load_dataset",
    "optimizer_settings",
    "read_checkpoint",
    "register_dataset",
    "resolve_config",
    "save_checkpoint",
    "train",
]
