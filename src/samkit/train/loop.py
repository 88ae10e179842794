"""The training loop behind ``samkit train``: :func:`train`, read top to bottom.

A run is four phases, each in its own module:

* building the run from its config — data, model, optimizer, schedule, gradient scaler and,
  when resuming, the state saved in the checkpoint (:mod:`samkit.train.build`);
* one epoch: the training steps, the evaluation, sharpness tracking
  (:mod:`samkit.train.epoch`);
* what the user sees: a header, then a progress bar or one line per epoch
  (:mod:`samkit.train.progress`);
* writing the run directory: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``,
  ``summary.json`` (:mod:`samkit.train.rundir`).

``resume=True`` continues bit-exactly from the checkpoint: model, optimizer (with the base
optimizer's state), scheduler, gradient scaler, every RNG.

Under torchrun every process runs :func:`train`; what differs is confined to the loaders, the
DDP wrapper, the sums of the metrics, the checkpoint's per-process states and who writes and
prints (:mod:`samkit.train.distributed`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from samkit.train.build import (
    Run,
    RunState,
    build_dataset,
    build_run,
    check_resumable,
    compile_unavailable,
    deterministic,
    resolve_config,
)
from samkit.train.config import ConfigError, TrainConfig
from samkit.train.distributed import (
    Launch,
    Processes,
    check_launch,
    device_for,
    launch_from_env,
    processes,
)
from samkit.train.env import TrainWarning, amp_warning, resolve_device
from samkit.train.epoch import run_epoch
from samkit.train.progress import EpochDisplay, header_lines
from samkit.train.rundir import RunDirectory, run_record
from samkit.train.validation import time_to_target, validation_summary

__all__ = ["build_dataset", "resolve_config", "train"]

Log = Callable[[str], None]


def train(
    config: TrainConfig, *, progress: bool = False, log: Log | None = print
) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``out/summary.json``).

    Args:
        config: every setting (see :class:`TrainConfig`); validated first.
        progress: show a tqdm bar per epoch (when tqdm is installed); otherwise ``log``
            gets one line per epoch.
        log: where human-readable lines go (``None``: silent).

    Returns a dict with ``test_acc`` (a fraction in [0, 1]), the validation split's
    ``val_acc``, ``best_val_acc``, ``best_val_epoch``, ``test_acc_at_best_val`` and
    ``time_to_target`` (``None`` without a split or a ``val_target``), ``train_time_s``,
    ``epochs``, ``grad_evals``, ``final_train_loss`` and more.

    Launched by torchrun (``WORLD_SIZE`` > 1 in the environment) or inside a process group
    the caller joined, every process calls this with the same config: it trains with DDP,
    ``batch_size`` is the global batch, and only rank 0 logs and writes ``out``
    (:mod:`samkit.train.distributed`). Every process returns the same summary. A group this
    call joined is left when it returns; if it raises, the group stays joined until the
    caller drops the error and calls :func:`samkit.train.distributed.leave_process_group`
    (``samkit train`` does), so that the group's threads end before Python shuts down.

    Raises :class:`ConfigError` for invalid settings (before any training),
    :class:`~samkit.train.CheckpointError` for a damaged checkpoint on resume and
    :class:`~samkit.train.rundir.RunWriteError` when a result file cannot be written.
    Warns (:class:`~samkit.train.env.TrainWarning`) about settings that work but are slow.
    """
    wall_start = time.perf_counter()
    config, launch, device = _where(config)
    say: Log = log if log is not None and launch.is_main else (lambda _msg: None)
    slow = amp_warning(config.amp, device)
    if slow and launch.is_main:
        warnings.warn(slow, TrainWarning, stacklevel=2)

    rundir = RunDirectory(config.out, epochs=config.epochs, write=launch.is_main)
    with processes(launch, device) as procs, deterministic(config.deterministic):
        # The run (the DDP model among it) lives in _run's frame only: it is gone by the
        # time the process group is left (see processes()).
        summary = _run(config, device, procs, rundir, progress, say, wall_start)
    return summary


def _run(
    config: TrainConfig,
    device: Any,
    procs: Processes,
    rundir: RunDirectory,
    progress: bool,
    say: Log,
    wall_start: float,
) -> dict[str, Any]:
    """The run inside its process group: open the run directory, build, train, summarise."""
    launch = procs.launch
    # Setup errors stop every process with the same message (agree), not one of them.
    ckpt = procs.agree(lambda: _open_rundir(rundir, config, launch))
    run, state = procs.agree(lambda: _build(config, device, procs, ckpt))
    unreached = run.unreached_start()
    if unreached and launch.is_main:
        warnings.warn(unreached, TrainWarning, stacklevel=3)
    run.wrap_for_processes()  # DDP (a collective: after every process built its run)
    resumed_at = state.epoch if ckpt is not None else None
    record = run_record(run, resumed_from=resumed_at)
    procs.agree(lambda: rundir.start(record, state.history))
    for line in header_lines(run, record, resumed_at):
        say(line)

    last_epoch = config.epochs
    if config.stop_after_epoch is not None:
        last_epoch = min(last_epoch, config.stop_after_epoch)
    display = EpochDisplay(
        bar=progress and launch.is_main,
        log=say,
        epochs=config.epochs,
        steps_per_epoch=run.steps_per_epoch,
    )
    for epoch in range(state.epoch + 1, last_epoch + 1):
        display.start(epoch)
        row = run_epoch(run, epoch, state.totals, display.step if display.shows_bar else None)
        state.history.append(row)
        state.epoch = epoch
        display.end(row)
        rundir.append_metrics(row)
        every = config.checkpoint_every
        if (every and epoch % every == 0) or epoch == last_epoch:
            rundir.save_checkpoint(run.checkpoint(state, record["versions"]))

    summary = _summary(run, state, out=rundir.path, wall_start=wall_start)
    rundir.write_summary(summary)
    return summary


def _where(config: TrainConfig) -> tuple[TrainConfig, Launch, Any]:
    """The resolved config, this process's place in the launch, its device. The errors
    raised here are the same on every process (``samkit_agreed``: reported once)."""
    try:
        config = resolve_config(config)
        launch = launch_from_env()
        check_launch(launch, config.batch_size, config.device)
        try:
            device = resolve_device(device_for(launch, config.device))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        why_not = compile_unavailable(device) if config.compile else None
        if why_not:
            raise ConfigError(f"--compile: {why_not}")
    except ConfigError as e:
        e.samkit_agreed = True  # type: ignore[attr-defined]
        raise
    return config, launch, device


def _build(config: TrainConfig, device: Any, procs: Any, ckpt: dict | None) -> tuple[Run, RunState]:
    run = build_run(config, device, procs)
    return run, (run.restore(ckpt) if ckpt is not None else RunState())


def _open_rundir(rundir: RunDirectory, config: TrainConfig, launch: Launch) -> dict | None:
    """Prepare ``out`` (rank 0) and read the checkpoint to resume from (every process)."""
    rundir.prepare(resume=config.resume)
    if not config.resume:
        return None
    ckpt = rundir.read_checkpoint()
    check_resumable(config, ckpt, rundir.path, launch)
    return ckpt


def _summary(run: Run, state: RunState, out: Any, wall_start: float) -> dict[str, Any]:
    """The final epoch's figures, the validation split's (:mod:`samkit.train.validation`:
    the best epoch by validation accuracy, the time to the target) and, for the record
    only, the best test accuracy seen (choosing by it would select on test)."""
    config, history, totals = run.config, state.history, state.totals
    final = history[-1] if history else {}
    best = max(history, key=lambda r: r["test_acc"]) if history else {}
    has_val = run.val_loader is not None
    reached = None
    if has_val and config.val_target is not None:
        reached = time_to_target(history, config.val_target)
    summary: dict[str, Any] = {
        "test_acc": final.get("test_acc"),
        "test_loss": final.get("test_loss"),
        **validation_summary(history),
        "time_to_target": reached,
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
        "num_params": run.num_params,
        "label_noise": config.label_noise,
        "label_noise_flipped": run.data.label_noise_flipped,
        "val_fraction": config.val_fraction,
        "num_val": run.data.info.num_val,
        "skipped_steps": int(getattr(run.opt, "samkit_state", {}).get("skipped_steps", 0)),
        "out": str(out) if out is not None else None,
    }
    for key in ("lambda_max", "hessian_trace", "grad_eig_alignment"):
        measured = [r[key] for r in history if key in r]
        if measured:
            summary[key] = measured[-1]
    return summary
