"""One epoch of a run: the training steps, the evaluation, the sharpness measurement.

Every optimizer — plain or sharpness-aware, registered now or later — is driven by the
same two lines, so this never looks at the method's name::

    closure = samkit.make_closure(model, loss_fn, x, y, indices=idx)
    loss = opt.step(closure)

Distributed training changes three places here: the sums of :func:`train_epoch` and
:func:`evaluate` are added over the processes before they are divided (sums and counts, never
a mean of means), at the end of an epoch every process takes rank 0's BatchNorm statistics,
so all of them evaluate (and rank 0 saves) the same model, and each process measures the
sharpness on its share of the tracked subset (the measures combine the shares). The running
figures a progress bar shows during an epoch are rank 0's own share.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import samkit
from samkit.sharpness import measure_all
from samkit.train.build import Run
from samkit.train.data import InMemoryLoader
from samkit.train.distributed import Processes

__all__ = ["evaluate", "measure_sharpness", "run_epoch", "train_epoch"]

#: ``on_step(stats)``: called after every step; ``stats()`` computes the running
#: ``(train loss, train accuracy)`` of the epoch (a host sync: call it only when shown).
StepCallback = Callable[[Callable[[], tuple[float, float | None]]], None]


def _correct(closure: samkit.BatchClosure, y: torch.Tensor) -> torch.Tensor | None:
    """Correct predictions of the clean pass the optimizer already ran (no extra forward);
    ``None`` when the closure recorded no predictions."""
    if closure.predictions is None:
        return None
    return (closure.predictions == y).sum()


def train_epoch(run: Run, on_step: StepCallback | None = None) -> dict[str, Any]:
    """One pass over the training data; returns ``train_loss``, ``train_acc`` (against the
    labels trained on), ``lr`` (of the epoch's last step) and ``grad_evals_epoch``."""
    net, opt, scaler = run.net, run.opt, run.scaler
    net.train()
    # Running sums stay on the device: no host sync per step.
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = counted = 0
    grad_evals = 0.0
    lr = opt.param_groups[0]["lr"]

    def running() -> tuple[float, float | None]:  # the epoch so far (syncs with the device)
        # None while no pass covered a whole batch (e.g. AUSAM's sub-batch passes).
        return float(loss_sum) / max(seen, 1), int(correct) / counted if counted else None

    for x, y, idx in run.train_loader:
        # x: [B, *input_shape], y: [B], idx: [B] dataset indices (some methods use them)
        closure = samkit.make_closure(
            net,
            run.loss_fn,
            x,
            y,
            indices=idx,
            accumulation_steps=run.config.accumulation_steps,
            autocast_dtype=run.autocast_dtype,
            grad_scaler=scaler,
        )
        lr = opt.param_groups[0]["lr"]
        if run.plain_step:  # torch's GradScaler.step takes no closure
            loss = closure()
            scaler.step(opt)
        else:
            loss = opt.step(closure)  # every pass of the method; returns the clean loss
        if scaler is not None:
            scaler.update()
        run.scheduler.step()  # per-step schedule

        n = y.shape[0]
        if loss is not None:
            loss_sum += torch.as_tensor(loss).detach().double() * n
            seen += n
        batch_correct = _correct(closure, y)
        if batch_correct is not None:
            correct += batch_correct
            counted += n
        grad_evals += closure.grad_evals
        if on_step is not None:
            on_step(running)
    loss_total, seen, correct_total, counted = run.procs.sum(
        [float(loss_sum), seen, int(correct), counted]
    )
    return {
        "train_loss": loss_total / seen if seen else float("nan"),
        "train_acc": correct_total / counted if counted else None,
        "lr": lr,
        "grad_evals_epoch": grad_evals,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: InMemoryLoader,
    autocast: Callable[[], Any],
    procs: Processes | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader, in eval mode (BN running stats);
    with ``procs``, over the union of every process's loader."""
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
    total, correct, n = (
        procs.sum([float(loss_sum), correct, n]) if procs else (loss_sum, correct, n)
    )
    return float(total) / n, correct / n


def measure_sharpness(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    procs: Processes | None = None,
) -> dict[str, Any]:
    """lambda_1, Hessian trace and gradient/top-eigenvector alignment on fixed batches.

    Measured by ``samkit.sharpness.measure_all`` in eval mode on the mean cross-entropy (no
    label smoothing). It leaves the model and the global RNG as they were and seeds its own
    random vectors, so tracking sharpness does not change the training trajectory.

    Under several processes every process calls it with its share of the batches
    (:func:`~samkit.train.build.build_run` splits the tracked subset): the measures are over
    the union of the shares, the same on every process; an error of the measurement ends
    every process (:meth:`Processes.measuring`).
    """
    with procs.measuring() if procs is not None else contextlib.nullcontext():
        res = measure_all(
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


def run_epoch(
    run: Run, epoch: int, totals: dict[str, Any], on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Epoch ``epoch`` (counted from 1): train, evaluate, measure sharpness when due.

    Adds the epoch's cost to ``totals`` and returns its ``metrics.jsonl`` row: the
    validation split's ``val_loss``/``val_acc`` (``None`` without one) beside the test
    split's. ``train_seconds`` covers the training steps alone (the time a method spends
    training, what time-to-target counts); ``seconds`` adds the evaluation of both splits;
    neither includes the sharpness measurement.
    """
    t0 = time.perf_counter()
    set_epoch = getattr(run.opt, "set_epoch", None)  # samkit optimizers; torch's have none
    if set_epoch is not None:
        set_epoch(epoch - 1)
    stats = train_epoch(run, on_step)
    run.procs.broadcast_buffers(run.model)
    train_seconds = time.perf_counter() - t0
    val_loss = val_acc = None
    if run.val_loader is not None:
        val_loss, val_acc = evaluate(run.eval_net, run.val_loader, run.autocast, run.procs)
    test_loss, test_acc = evaluate(run.eval_net, run.test_loader, run.autocast, run.procs)
    seconds = time.perf_counter() - t0

    totals["grad_evals"] += stats["grad_evals_epoch"]
    totals["steps"] += run.steps_per_epoch
    totals["train_time_s"] += seconds
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": stats["train_loss"],
        "train_acc": stats["train_acc"],
        "val_loss": val_loss,
        "val_acc": val_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "lr": stats["lr"],
        "seconds": seconds,
        "train_seconds": train_seconds,
        "grad_evals": totals["grad_evals"],
        "grad_evals_epoch": stats["grad_evals_epoch"],
        "steps": totals["steps"],
    }
    track = run.config.track_sharpness
    if track and epoch % track == 0:
        t1 = time.perf_counter()
        row.update(measure_sharpness(run.model, run.sharpness_batches, run.config.seed, run.procs))
        row["sharpness_seconds"] = time.perf_counter() - t1
    return row
