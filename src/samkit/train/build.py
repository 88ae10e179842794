"""Building a run from its config: data, loaders, model, optimizer, schedule, scaler, resume.

:func:`build_run` turns a resolved :class:`TrainConfig` into a :class:`Run`, the objects one
training run works with. The order in which it builds them is part of the run: the model's
initial weights come from torch's global RNG right after the data, so the same config gives
the same run. :meth:`Run.checkpoint` and :meth:`Run.restore` are inverses: together they are
everything the next epoch depends on (weights, optimizer and base-optimizer state, schedule,
gradient scaler, every RNG, the metrics so far), which is what makes a resumed run bit-exact.

Distributed training changes three things here: the loaders (each process takes its share of
every training batch and of the test set), the model the steps run through
(``DistributedDataParallel``), and the checkpoint (the random state of every process, and the
optimizer state of every process whose state differs from rank 0's). ``compile`` changes one:
the steps and the evaluation run through ``torch.compile(model)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import random
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

import samkit
from samkit.optim import OptimizerInfo, get_optimizer_info, is_sharpness_aware
from samkit.train.checkpoint import get_rng_state, set_rng_state
from samkit.train.config import (
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    optimizer_classes,
    optimizer_settings,
)
from samkit.train.data import (
    Dataset,
    InMemoryLoader,
    add_label_noise,
    augment_batch,
    dataset_spec,
    load_dataset,
)
from samkit.train.distributed import Launch, Processes
from samkit.train.models import MODELS, create_model

__all__ = [
    "Run",
    "RunState",
    "build_dataset",
    "build_run",
    "check_resumable",
    "compile_model",
    "compile_unavailable",
    "deterministic",
    "resolve_config",
]

# Independent random streams derived from the run's seed (model init uses torch's global RNG).
_STREAM_LOADER, _STREAM_AUGMENT, _STREAM_NOISE = 1, 2, 3


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- the config


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill what depends on other settings (the default model).

    Raises :class:`ConfigError` for any invalid or unknown value.
    """
    config.validate()
    config = dataclasses.replace(
        config, model_args=dict(config.model_args), opt_args=dict(config.opt_args)
    )
    try:
        dataset = dataset_spec(config.dataset)
        if config.model is None:
            config.model = dataset.default_model
        if config.model not in MODELS:
            raise ConfigError(f"unknown model {config.model!r}; available: {', '.join(MODELS)}")
        optimizer_classes(config.optimizer, config.base)
        dataset.check_data_dir(config.data_dir)
    except ConfigError:
        raise
    except ValueError as e:  # the dataset registry's: an unknown name, a missing --data-dir
        raise ConfigError(str(e)) from e
    return config


def build_dataset(config: TrainConfig) -> Dataset:
    """The run's data: loaded, limited, its validation split held out (the same samples
    whatever the run's seed), then the run's label noise (seeded) on the training labels
    only: validation and test labels stay clean, they measure the task itself."""
    data = load_dataset(
        config.dataset,
        config.data_dir,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
        val_fraction=config.val_fraction,
    )
    if config.label_noise > 0:
        gen = torch.Generator().manual_seed(_stream_seed(config.seed, _STREAM_NOISE))
        noisy, flipped = add_label_noise(
            data.y_train, config.label_noise, data.info.num_classes, gen
        )
        data = dataclasses.replace(data, y_train=noisy, label_noise_flipped=flipped)
    return data


def check_resumable(
    config: TrainConfig, ckpt: dict[str, Any], where: Any, launch: Launch | None = None
) -> None:
    """ConfigError unless ``config`` continues the run saved in ``ckpt`` (from ``where``).

    A resumed run must be the same computation: only ``RESUMABLE_KEYS`` may change, it must
    run on as many processes (``launch``) as the saved one, and it must have epochs left.
    """
    saved = ckpt["config"]
    for key, value in config.to_dict().items():
        if key not in RESUMABLE_KEYS and saved.get(key) != value:
            raise ConfigError(
                f"--resume: setting {key!r} is {value!r} but the checkpoint in {where} was "
                f"trained with {saved.get(key)!r}"
            )
    saved_world = int(ckpt.get("world_size", 1))
    world = launch.world_size if launch is not None else 1
    if saved_world != world:
        raise ConfigError(
            f"--resume: the run in {where} was trained by {_processes(saved_world)} and this "
            f"command runs {_processes(world)}: resume it with the same count (each process's "
            "share of the batch and its own ascent gradient are part of the computation)"
        )
    done = int(ckpt["epoch"])
    if done >= config.epochs:
        raise ConfigError(
            f"--resume: the run in {where} has already done {_epochs(done)}; "
            f"pass --epochs larger than that to continue it"
        )
    if config.stop_after_epoch is not None and config.stop_after_epoch <= done:
        raise ConfigError(
            f"--resume: --stop-after-epoch {config.stop_after_epoch} is already behind the "
            f"run in {where} ({_epochs(done)} done); give a later epoch or leave it out"
        )


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` (warn-only) inside, the previous mode after."""
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_deterministic, warn_only=prev_warn_only)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps."""
    if schedule == "cosine":  # from 1 to 0 over the run, updated every step
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":  # x0.1 at 50% and 75% of the steps
        return lambda step: 0.1 ** ((step >= total_steps // 2) + (step >= (3 * total_steps) // 4))
    return lambda step: 1.0


def _new_totals() -> dict[str, Any]:
    return {"grad_evals": 0.0, "steps": 0, "train_time_s": 0.0}


@dataclasses.dataclass
class RunState:
    """How far a run has got: epochs done, one metrics row per epoch, running totals."""

    epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    totals: dict[str, Any] = dataclasses.field(default_factory=_new_totals)


@dataclasses.dataclass
class Run:
    """The objects of one training run, as :func:`build_run` made them."""

    config: TrainConfig
    device: torch.device
    data: Dataset
    train_loader: InMemoryLoader
    test_loader: InMemoryLoader
    val_loader: InMemoryLoader | None  # None without a validation split
    loader_gen: torch.Generator  # shuffling
    aug_gen: torch.Generator  # augmentation
    sharpness_batches: list[tuple[torch.Tensor, torch.Tensor]]
    model: nn.Module  # the plain module: its state_dict, the sharpness measurements
    net: nn.Module  # what the training steps run: model, compiled and/or wrapped in DDP
    eval_net: nn.Module  # what the evaluation runs: model, or compiled
    procs: Processes
    opt: torch.optim.Optimizer
    opt_info: OptimizerInfo
    opt_settings: dict[str, Any]  # the optimizer's resolved settings (recipe, method table, flags)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.amp)

    def autocast(self) -> Any:
        """The run's autocast context (disabled with ``amp="off"``)."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def plain_step(self) -> bool:
        """fp16 with a plain torch optimizer: ``closure(); scaler.step(opt)`` (no closure)."""
        return self.scaler is not None and not is_sharpness_aware(self.opt)

    def unreached_start(self) -> str | None:
        """A warning when the run ends before its optimizer's ``start_epoch`` (SAF, MESA:
        their term starts there, counted from 0; before it they are the base optimizer), so
        the whole run would be the base optimizer under the method's name; else ``None``."""
        start = self.opt.param_groups[0].get("start_epoch")
        epochs, name = self.config.epochs, self.config.optimizer
        if start is None or epochs > start:
            return None
        return (
            f"{name} adds its term from start_epoch {start} (counted from 0: epoch "
            f"{start + 1} of this run) but the run has {_epochs(epochs)}, so it trains as "
            f"plain {self.config.base}; use --epochs {start + 1} or more, or a lower "
            "start_epoch (--opt-arg start_epoch=N)"
        )

    def wrap_for_processes(self) -> None:
        """Under several processes, put ``DistributedDataParallel`` around the model the
        steps run (around the compiled module with ``compile``: ``no_sync`` stays DDP's).
        A collective: every process calls it once, after building its run."""
        self.net = self.procs.wrap(self.net)

    def checkpoint(self, state: RunState, versions: dict[str, Any]) -> dict[str, Any]:
        """Everything the next epoch depends on, as plain tensors and containers.

        Under several processes every process must call it (it gathers their random
        states and the optimizer states that differ from rank 0's, e.g. an EMA of each
        process's own ascent gradient); only rank 0's return value is complete.
        """
        optimizer = self.opt.state_dict()
        rng = get_rng_state(loader=self.loader_gen, augment=self.aug_gen)
        payload = {
            "epoch": state.epoch,
            "config": self.config.to_dict(),
            "dataset_info": self.data.info.to_dict(),
            "model_name": self.config.model,
            "model": self.model.state_dict(),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "history": state.history,
            "totals": dict(state.totals),
            "versions": versions,
        }
        if self.procs.distributed:
            payload["world_size"] = self.procs.world_size
            payload["rng_ranks"] = self.procs.gather(rng)
            payload["optimizer_ranks"] = self.procs.gather_differing(optimizer)
        return payload

    def restore(self, ckpt: dict[str, Any]) -> RunState:
        """Load a :meth:`checkpoint` into this run; returns where the run stands."""
        rank = self.procs.rank
        own_optimizer = (ckpt.get("optimizer_ranks") or [None] * (rank + 1))[rank]
        own_rng = (ckpt.get("rng_ranks") or [ckpt["rng"]] * (rank + 1))[rank]
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(own_optimizer if own_optimizer is not None else ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(own_rng, loader=self.loader_gen, augment=self.aug_gen)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        totals = _new_totals()
        totals.update(ckpt["totals"])
        return RunState(epoch=int(ckpt["epoch"]), history=list(ckpt["history"]), totals=totals)


def _sharpness_batches(
    config: TrainConfig, data: Dataset, num_train: int, procs: Processes
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's batches of the subset ``--track-sharpness`` measures (none without it).

    Sharpness is measured on a fixed subset of the (possibly noisy) training set: its first
    ``sharpness_samples`` samples, without augmentation. Each process holds a contiguous share
    of it (:meth:`Processes.shard`), in batches of at most ``batch_size``; the measurement is
    over the union of the shares (samkit.sharpness under torch.distributed). ConfigError
    when the subset has fewer samples than there are processes."""
    if not config.track_sharpness:
        return []
    n = min(config.sharpness_samples, num_train)
    if n < procs.world_size:
        fix = (
            f"use --sharpness-samples {procs.world_size} or more"
            if n == config.sharpness_samples
            else f"the training split has {n}"
        )
        raise ConfigError(
            f"--track-sharpness: {n} training samples (--sharpness-samples "
            f"{config.sharpness_samples}) cannot be shared by {procs.world_size} processes: "
            f"each process measures at least one; {fix}"
        )
    first, last = procs.shard(n)
    return [
        (data.prepare(data.x_train[lo : min(lo + config.batch_size, last)]),
         data.y_train[lo : min(lo + config.batch_size, last)])
        for lo in range(first, last, config.batch_size)
    ]  # fmt: skip


def build_run(config: TrainConfig, device: torch.device, procs: Processes | None = None) -> Run:
    """Seed every RNG, then build the run's data, model and optimizer in a fixed order.

    ``config`` is resolved (:func:`resolve_config`); ``procs``: the run's processes (default
    one). Every process builds the same run: the same data, initial weights and random
    streams; only the loaders' shares and the DDP wrapper differ. Raises
    :class:`ConfigError` for data that cannot be loaded, a model that does not fit the data,
    or settings the optimizer rejects.
    """
    procs = procs if procs is not None else Processes(Launch(), device)
    _seed_everything(config.seed)

    # Data: stored tensors on the device; batches are prepared (and augmented) on the fly.
    try:
        data = build_dataset(config).to(device)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    info = data.info
    augment = data.augment if config.augment is None else config.augment
    if augment and len(info.input_shape) != 3:
        raise ConfigError(f"augment needs image data; {info.name!r} is not")
    aug_gen = torch.Generator().manual_seed(_stream_seed(config.seed, _STREAM_AUGMENT))
    loader_gen = torch.Generator().manual_seed(_stream_seed(config.seed, _STREAM_LOADER))

    def train_transform(x: torch.Tensor) -> torch.Tensor:
        if augment:
            x = augment_batch(x, aug_gen, cutout=config.cutout)
        return data.prepare(x)

    train_loader = InMemoryLoader(
        data.x_train,
        data.y_train,
        config.batch_size,
        shuffle=True,
        generator=loader_gen,
        transform=train_transform,
        shard=(procs.rank, procs.world_size),
    )
    eval_batch = max(config.batch_size, 512)
    lo, hi = procs.shard(info.num_test)  # the test set is split; its sums are added up
    test_loader = InMemoryLoader(
        data.x_test[lo:hi], data.y_test[lo:hi], eval_batch, transform=data.prepare
    )
    val_loader = None
    if data.x_val is not None and data.y_val is not None:
        lo, hi = procs.shard(info.num_val)  # so is the validation set
        val_loader = InMemoryLoader(
            data.x_val[lo:hi], data.y_val[lo:hi], eval_batch, transform=data.prepare
        )
    sharpness_batches = _sharpness_batches(config, data, info.num_train, procs)

    # Model (initialised from torch's global RNG, seeded above) and optimizer.
    try:
        model = create_model(config.model, info, **config.model_args).to(device)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e  # create_model's messages name the model
    opt_kwargs = optimizer_settings(config)
    try:
        opt = samkit.create_optimizer(
            config.optimizer, model.parameters(), base=config.base, model=model, **opt_kwargs
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {config.optimizer!r} rejected its settings: {e}") from e
    opt_info = get_optimizer_info(config.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_factor(config.schedule, config.epochs * len(train_loader))
    )
    eval_net = compile_model(model) if config.compile else model
    return Run(
        config=config,
        device=device,
        data=data,
        train_loader=train_loader,
        test_loader=test_loader,
        val_loader=val_loader,
        loader_gen=loader_gen,
        aug_gen=aug_gen,
        sharpness_batches=sharpness_batches,
        model=model,
        net=eval_net,  # wrap_for_processes() puts DDP around it
        eval_net=eval_net,
        procs=procs,
        opt=opt,
        opt_info=opt_info,
        opt_settings=opt_kwargs,
        scheduler=scheduler,
        # fp16: a GradScaler. Sharpness-aware methods take their base step through it (the
        # closure carries it); plain torch optimizers step as `closure(); scaler.step(opt)`.
        scaler=torch.amp.GradScaler(device.type) if config.amp == "fp16" else None,
        # Per-sample losses: some methods (ESAM, AUSAM) select samples by their loss.
        loss_fn=nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing),
    )


# ----------------------------------------------------------------------------- torch.compile


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (``None`` if it can): dynamo must
    support this Python, and on a CPU inductor needs a C++ compiler."""
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return f"torch.compile does not support Python {platform.python_version()} here"
    except ImportError as e:  # pragma: no cover - part of torch
        return f"torch.compile is unavailable: {e}"
    compilers = ("g++", "c++", "clang++")
    if device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, compilers))):
        return "torch.compile needs a C++ compiler on a CPU (none found: g++, c++, clang++)"
    return None


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` with shapes allowed to vary after the first recompile (a last,
    smaller batch, or a pass on part of the batch, compiles one general graph more)."""
    return torch.compile(model, dynamic=None)
