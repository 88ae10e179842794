"""The training loop behind ``samkit train``: one function, read top to bottom.

Every optimizer — plain or sharpness-aware, registered now or later — is driven by the
same two lines, so the loop never looks at the method's name::

    closure = samkit.make_closure(model, loss_fn, x, y, indices=idx)
    loss = opt.step(closure)

A run with ``out`` set writes ``config.json`` (settings, versions, hardware),
``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``checkpoint.pt`` (atomic, every
``checkpoint_every`` epochs and at the end). ``resume=True`` continues bit-exactly from the
checkpoint: model, optimizer (with the base optimizer's state), scheduler, every RNG.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import samkit
from samkit.optim import get_optimizer_info, is_sharpness_aware, resolve_base_optimizer
from samkit.train.checkpoint import (
    CHECKPOINT_NAME,
    append_bytes,
    atomic_write_bytes,
    atomic_write_json,
    get_rng_state,
    read_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    set_rng_state,
)
from samkit.train.config import RECIPE_RHO, RESUMABLE_KEYS, ConfigError, TrainConfig
from samkit.train.data import (
    DEFAULT_MODELS,
    Dataset,
    InMemoryLoader,
    add_label_noise,
    augment_batch,
    load_dataset,
)
from samkit.train.env import hardware_info, resolve_device, versions_info
from samkit.train.models import create_model

__all__ = ["build_dataset", "optimizer_kwargs", "resolve_config", "train"]

Log = Callable[[str], None]

# Independent random streams derived from the run's seed (model init uses torch's global RNG).
_STREAM_LOADER, _STREAM_AUGMENT, _STREAM_NOISE = 1, 2, 3


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- setup helpers


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill what depends on other settings (the default model).

    Raises :class:`ConfigError` for any invalid or unknown value.
    """
    config.validate()
    config = dataclasses.replace(
        config, model_args=dict(config.model_args), opt_args=dict(config.opt_args)
    )
    if config.dataset not in DEFAULT_MODELS:
        raise ConfigError(
            f"unknown dataset {config.dataset!r}; available: {', '.join(DEFAULT_MODELS)}"
        )
    if config.model is None:
        config.model = DEFAULT_MODELS[config.dataset]
    from samkit.train.models import MODELS

    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; available: {', '.join(MODELS)}")
    try:
        get_optimizer_info(config.optimizer)
        resolve_base_optimizer(config.base)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    if config.dataset.startswith("cifar") and not config.data_dir:
        raise ConfigError(f"dataset {config.dataset!r} needs --data-dir")
    if config.track_sharpness:
        _sharpness_api()  # fail now, not after the first N epochs
    return config


def build_dataset(config: TrainConfig) -> Dataset:
    """The run's data: loaded, limited, and with the run's label noise (seeded)."""
    data = load_dataset(
        config.dataset,
        config.data_dir,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
    )
    if config.label_noise > 0:
        gen = torch.Generator().manual_seed(_stream_seed(config.seed, _STREAM_NOISE))
        noisy, flipped = add_label_noise(
            data.y_train, config.label_noise, data.info.num_classes, gen
        )
        data = dataclasses.replace(data, y_train=noisy, label_noise_flipped=flipped)
    return data


def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def optimizer_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``samkit.create_optimizer`` (without ``model``).

    ``lr`` and ``weight_decay`` always; ``momentum`` when the (base) optimizer takes one;
    ``rho`` when given, else the registry's default for the method, else the recipe's 0.1
    if the method takes a ``rho``; then ``opt_args`` on top. The registry's other defaults
    are merged in by ``create_optimizer``.
    """
    info = get_optimizer_info(config.optimizer)
    update_cls = resolve_base_optimizer(config.base) if info.sharpness_aware else info.cls
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if _accepts(update_cls, "momentum"):
        kwargs["momentum"] = config.momentum
    rho = config.rho
    if rho is None and info.sharpness_aware and "rho" not in info.defaults:
        rho = RECIPE_RHO if _accepts(info.cls, "rho") else None
    if rho is not None and info.sharpness_aware:
        kwargs["rho"] = rho
    kwargs.update(config.opt_args)
    return kwargs


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps."""
    if schedule == "cosine":  # from 1 to 0 over the run, updated every step
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":  # x0.1 at 50% and 75% of the steps
        return lambda step: 0.1 ** ((step >= total_steps // 2) + (step >= (3 * total_steps) // 4))
    return lambda step: 1.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _sharpness_api() -> Any:
    """``samkit.sharpness``, or ConfigError if it lacks what tracking needs."""
    try:
        import samkit.sharpness as sharpness
    except ImportError as e:  # pragma: no cover - package always present
        raise ConfigError(f"--track-sharpness is not available: {e}") from e
    if not hasattr(sharpness, "measure_all"):
        raise ConfigError(
            "--track-sharpness is not available yet: samkit.sharpness has no measure_all"
        )
    return sharpness


def _measure_sharpness(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int
) -> dict[str, Any]:
    """lambda_1, Hessian trace and gradient/top-eigenvector alignment on fixed batches.

    Measured by ``samkit.sharpness.measure_all`` in eval mode on the mean cross-entropy (no
    label smoothing). It leaves the model and the global RNG as they were and seeds its own
    random vectors, so tracking sharpness does not change the training trajectory.
    """
    sharpness = _sharpness_api()
    res = sharpness.measure_all(
        model,
        nn.CrossEntropyLoss(),
        batches,
        measures=("lambda_max", "trace", "alignment"),
        seed=seed,
    )
    return {
        "lambda_max": res.get("lambda_max"),
        "lambda_max_converged": res.get("lambda_max_converged"),
        "hessian_trace": res.get("trace"),
        "grad_eig_alignment": res.get("alignment"),
    }


@torch.no_grad()
def _evaluate(
    model: nn.Module, loader: InMemoryLoader, autocast: Callable[[], Any]
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader, in eval mode (BN running stats)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    n = 0
    for x, y, _ in loader:
        with autocast():
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").cpu()
        correct += int((logits.argmax(1) == y).sum())
        n += y.shape[0]
    model.train(was_training)
    return float(loss_sum) / n, correct / n


def _progress(iterable: Any, enabled: bool, desc: str, total: int) -> Any:
    """A tqdm bar when tqdm is installed and ``enabled``; else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency: fall back to one line per epoch
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=True, dynamic_ncols=True, unit="step")


def _prepare_out(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror or e}") from e
    if not resume:
        taken = [n for n in (CHECKPOINT_NAME, "metrics.jsonl") if (out / n).exists()]
        if taken:
            raise ConfigError(
                f"--out {out} already holds a run ({taken[0]}); use --resume to continue it "
                "or choose another --out"
            )
    if not os.access(out, os.W_OK):
        raise ConfigError(f"cannot write to --out {out}: permission denied")
    remove_stale_temp_files(out)  # left by a process killed while writing


def _write_result(
    write: Callable[[Path, Any], None], path: Path, data: Any, saved_epoch: int, epochs: int
) -> None:
    """Run ``write(path, data)``; an OSError (full disk, ...) is re-raised naming ``path``
    and saying what is still intact, for the CLI's one-line message."""
    try:
        write(path, data)
    except OSError as e:
        if saved_epoch >= epochs:
            hint = f"; {CHECKPOINT_NAME} of the final epoch {saved_epoch} is intact"
        elif saved_epoch:
            hint = f"; {CHECKPOINT_NAME} of epoch {saved_epoch} is intact: continue with --resume"
        else:
            hint = "; no checkpoint was written yet"
        raise OSError(e.errno, f"{e.strerror or e}{hint}", str(path)) from e


# ----------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig, *, progress: bool = False, log: Log | None = print
) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``out/summary.json``).

    Args:
        config: every setting (see :class:`TrainConfig`); validated first.
        progress: show a tqdm bar per epoch (when tqdm is installed).
        log: where human-readable lines go (``None``: silent).

    Returns a dict with ``test_acc`` (a fraction in [0, 1]), ``best_test_acc``,
    ``train_time_s``, ``epochs``, ``grad_evals``, ``final_train_loss`` and more.

    Raises :class:`ConfigError` for invalid settings (before any training) and
    :class:`~samkit.train.CheckpointError` for a damaged checkpoint on resume.
    """
    wall_start = time.perf_counter()
    say: Log = log if log is not None else (lambda _msg: None)
    config = resolve_config(config)
    out = Path(config.out) if config.out else None
    try:
        device = resolve_device(config.device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)

    def autocast() -> Any:
        if autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=autocast_dtype)

    # A resumed run must be the same computation: only RESUMABLE_KEYS may change.
    ckpt = None
    if out is not None:
        _prepare_out(out, config.resume)
    if config.resume:
        assert out is not None
        ckpt = read_checkpoint(out / CHECKPOINT_NAME, map_location="cpu")
        saved = ckpt["config"]
        for key, value in config.to_dict().items():
            if key not in RESUMABLE_KEYS and saved.get(key) != value:
                raise ConfigError(
                    f"--resume: setting {key!r} is {value!r} but the checkpoint in {out} was "
                    f"trained with {saved.get(key)!r}"
                )
        if ckpt["epoch"] >= config.epochs:
            raise ConfigError(
                f"--resume: the run in {out} has already done {ckpt['epoch']} epochs; "
                f"pass --epochs larger than that to continue it"
            )

    # Determinism: seed every RNG; deterministic kernels for the duration of the run.
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
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
        )
        test_loader = InMemoryLoader(
            data.x_test, data.y_test, max(config.batch_size, 512), transform=data.prepare
        )
        # Sharpness is measured on a fixed subset of the (possibly noisy) training set:
        # its first `sharpness_samples` samples, without augmentation.
        sharp_batches = []
        if config.track_sharpness:
            n_sharp = min(config.sharpness_samples, info.num_train)
            for lo in range(0, n_sharp, config.batch_size):
                hi = min(lo + config.batch_size, n_sharp)
                sharp_batches.append((data.prepare(data.x_train[lo:hi]), data.y_train[lo:hi]))

        # Model (initialised from torch's global RNG, seeded above) and optimizer.
        try:
            model = create_model(config.model, info, **config.model_args).to(device)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model {config.model!r}: {e}") from e
        num_params = sum(p.numel() for p in model.parameters())
        opt_kwargs = optimizer_kwargs(config)
        try:
            opt = samkit.create_optimizer(
                config.optimizer, model.parameters(), base=config.base, model=model, **opt_kwargs
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"optimizer {config.optimizer!r} rejected its settings: {e}") from e
        opt_info = get_optimizer_info(config.optimizer)
        resolved_opt = {**opt_info.defaults, **opt_kwargs}
        steps_per_epoch = len(train_loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_factor(config.schedule, config.epochs * steps_per_epoch)
        )
        # Per-sample losses: some methods (ESAM, AUSAM) select samples by their loss.
        loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing)

        # fp16: a GradScaler. Sharpness-aware methods take their base step through it (the
        # closure carries it); plain torch optimizers step as `closure(); scaler.step(opt)`.
        scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        plain_step = scaler is not None and not is_sharpness_aware(opt)

        # Resume: restore every piece of state the next epoch depends on.
        history: list[dict[str, Any]] = []
        totals = {"grad_evals": 0.0, "steps": 0, "train_time_s": 0.0}
        start_epoch = 0
        saved_epoch = 0  # epoch of the checkpoint on disk
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"], loader=loader_gen, augment=aug_gen)
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            history = list(ckpt["history"])
            totals.update(ckpt["totals"])
            start_epoch = saved_epoch = int(ckpt["epoch"])

        # Record the run before it starts (config, resolved optimizer settings, where it ran).
        record = {
            "config": config.to_dict(),
            "optimizer_kwargs": _jsonable(resolved_opt),
            "optimizer_info": {
                "name": opt_info.name,
                "description": opt_info.description,
                "sharpness_aware": opt_info.sharpness_aware,
                "passes": opt_info.passes,
                "reference": opt_info.reference,
            },
            "dataset": {**info.to_dict(), "label_noise_flipped": data.label_noise_flipped},
            "model": {"name": config.model, "params": num_params},
            "steps_per_epoch": steps_per_epoch,
            "versions": versions_info(),
            "hardware": hardware_info(device),
            "resumed_from_epoch": start_epoch if ckpt is not None else None,
        }
        if out is not None:
            try:
                atomic_write_json(out / "config.json", record)
                # metrics.jsonl = the checkpoint's history: drops epochs that ran after the
                # last checkpoint of an interrupted run.
                _write_metrics(out / "metrics.jsonl", history)
            except OSError as e:
                raise ConfigError(f"cannot write to --out {out}: {e.strerror or e}") from e

        rho_text = f", rho {resolved_opt['rho']:g}" if "rho" in resolved_opt else ""
        say(
            f"samkit train | {config.optimizer} (base {config.base}{rho_text}) | "
            f"{info.name} ({info.num_train}/{info.num_test}) | {config.model} "
            f"({num_params:,} params) | {config.epochs} epochs x {steps_per_epoch} steps | "
            f"seed {config.seed}"
        )
        hw, ver = record["hardware"], record["versions"]
        say(
            f"  {hw['device']} | {hw['cpu']} ({hw['cpu_cores']} cores)"
            + (f" | {hw['gpu']}" if hw["gpu"] else "")
            + f" | torch {ver['torch']} | samkit {ver['samkit']}"
            + (f" | resumed at epoch {start_epoch}" if ckpt is not None else "")
        )

        last_epoch = config.epochs
        if config.stop_after_epoch is not None:
            last_epoch = min(last_epoch, config.stop_after_epoch)
        model.train()
        for epoch in range(start_epoch + 1, last_epoch + 1):
            t0 = time.perf_counter()
            if is_sharpness_aware(opt):  # the epoch signal, counted from 0 (SAF, SSAM, ...)
                opt.set_epoch(epoch - 1)
            # Running sums stay on the device: no host sync per step.
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = counted = 0
            epoch_grad_evals = 0.0
            lr_used = opt.param_groups[0]["lr"]
            bar = _progress(
                train_loader, progress, f"epoch {epoch}/{config.epochs}", steps_per_epoch
            )
            for step, (x, y, idx) in enumerate(bar):
                # x: [B, *input_shape], y: [B], idx: [B] dataset indices (some methods use them)
                closure = samkit.make_closure(
                    model,
                    loss_fn,
                    x,
                    y,
                    indices=idx,
                    accumulation_steps=config.accumulation_steps,
                    autocast_dtype=autocast_dtype,
                    grad_scaler=scaler,
                )
                lr_used = opt.param_groups[0]["lr"]
                if plain_step:  # torch's GradScaler.step takes no closure
                    loss = closure()
                    scaler.step(opt)
                else:
                    loss = opt.step(closure)  # every pass of the method; returns the clean loss
                if scaler is not None:
                    scaler.update()
                scheduler.step()  # per-step schedule

                # Metrics from the clean pass the optimizer already ran (no extra forward).
                n = y.shape[0]
                if loss is not None:
                    loss_sum += torch.as_tensor(loss).detach().double() * n
                    seen += n
                if closure.outputs is not None:
                    correct += (closure.outputs.argmax(1) == y).sum()
                    counted += n
                epoch_grad_evals += closure.grad_evals
                if bar is not train_loader and (step % 8 == 0 or step == steps_per_epoch - 1):
                    bar.set_postfix(
                        loss=f"{float(loss_sum) / max(seen, 1):.4f}",
                        acc=f"{int(correct) / max(counted, 1):.3f}",
                    )
            train_loss = float(loss_sum) / seen if seen else float("nan")
            train_acc = int(correct) / counted if counted else None
            test_loss, test_acc = _evaluate(model, test_loader, autocast)
            seconds = time.perf_counter() - t0

            totals["grad_evals"] += epoch_grad_evals
            totals["steps"] += steps_per_epoch
            totals["train_time_s"] += seconds
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": lr_used,
                "seconds": seconds,
                "grad_evals": totals["grad_evals"],
                "grad_evals_epoch": epoch_grad_evals,
                "steps": totals["steps"],
            }
            if config.track_sharpness and epoch % config.track_sharpness == 0:
                t1 = time.perf_counter()
                row.update(_measure_sharpness(model, sharp_batches, seed=config.seed))
                row["sharpness_seconds"] = time.perf_counter() - t1
            history.append(row)

            if bar is not train_loader:
                bar.set_postfix(
                    loss=f"{train_loss:.4f}", acc=f"{train_acc or 0:.3f}", test=f"{test_acc:.4f}"
                )
                bar.close()
            else:
                say(
                    f"epoch {epoch:>3}/{config.epochs} | train loss {train_loss:.4f} "
                    f"acc {100 * (train_acc or 0):.2f}% | test loss {test_loss:.4f} "
                    f"acc {100 * test_acc:.2f}% | lr {lr_used:.4g} | {seconds:.2f}s"
                )

            if out is not None:
                line = (json.dumps(row) + "\n").encode()
                _write_result(
                    append_bytes,
                    out / "metrics.jsonl",
                    line,
                    saved_epoch,
                    config.epochs,
                )
                if (
                    config.checkpoint_every and epoch % config.checkpoint_every == 0
                ) or epoch == last_epoch:
                    payload = {
                        "epoch": epoch,
                        "config": config.to_dict(),
                        "dataset_info": info.to_dict(),
                        "model_name": config.model,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": get_rng_state(loader=loader_gen, augment=aug_gen),
                        "history": history,
                        "totals": dict(totals),
                        "versions": record["versions"],
                    }
                    _write_result(
                        save_checkpoint,
                        out / CHECKPOINT_NAME,
                        payload,
                        saved_epoch,
                        config.epochs,
                    )
                    saved_epoch = epoch
    finally:
        torch.use_deterministic_algorithms(prev_deterministic, warn_only=prev_warn_only)

    # Summary: the final epoch's figures and the best test accuracy seen.
    final = history[-1] if history else {}
    best = max(history, key=lambda r: r["test_acc"]) if history else {}
    summary: dict[str, Any] = {
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        "best_test_acc": best.get("test_acc"),
        "best_epoch": best.get("epoch"),
        "final_train_loss": final.get("train_loss"),
        "final_train_acc": final.get("train_acc"),
        "epochs": final.get("epoch", 0),
        "epochs_planned": config.epochs,
        "completed": final.get("epoch", 0) == config.epochs,
        "steps": totals["steps"],
        "grad_evals": totals["grad_evals"],
        "train_time_s": totals["train_time_s"],
        "wall_time_s": time.perf_counter() - wall_start,
        "optimizer": config.optimizer,
        "base": config.base,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "num_params": num_params,
        "label_noise": config.label_noise,
        "label_noise_flipped": data.label_noise_flipped,
        "skipped_steps": int(getattr(opt, "samkit_state", {}).get("skipped_steps", 0)),
        "out": str(out) if out is not None else None,
    }
    for key in ("lambda_max", "hessian_trace", "grad_eig_alignment"):
        measured = [r[key] for r in history if key in r]
        if measured:
            summary[key] = measured[-1]
    if out is not None:
        _write_result(
            atomic_write_json,
            out / "summary.json",
            summary,
            saved_epoch,
            config.epochs,
        )
    return summary


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_bytes(path, text.encode())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Values as JSON can hold them (repr for anything exotic)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out
