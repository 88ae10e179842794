"""The trajectory loss of SAF and MESA (Du et al., NeurIPS 2022).

Both replace SAM's second pass by a term added to the loss of a step's one ordinary
forward/backward pass: :math:`\\lambda\\,\tau^2` times the mean over the batch of
:math:`\\mathrm{KL}(\\mathrm{softmax}(\tilde z/\tau)\\,\\|\\,\\mathrm{softmax}(z/\tau))`, between
the model's logits :math:`z` and reference logits :math:`\tilde z` along the training
trajectory. :class:`TrajectoryLoss` is their common base: the hyperparameters of the term
(``lmbda``, ``tau``, ``start_epoch``, one value for the whole step), the closure it needs,
the term itself, and the checks of what the term will need, made from the first step on
(logits ``[batch, classes]``; the epoch signal, :class:`EpochSamples`), not only once the
term starts; :func:`trajectory_kl` is the per-sample KL.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = [
    "EpochSamples",
    "RepeatedSampleWarning",
    "TrajectoryLoss",
    "as_logits",
    "trajectory_kl",
]


class RepeatedSampleWarning(UserWarning):
    """A sample came back within one epoch of SAF or MESA: most likely ``set_epoch`` was not
    called at the start of the epoch."""


class EpochSamples:
    """The dataset indices the accepted steps of the current epoch have seen.

    A sample seen twice in one epoch is what a loop that forgets ``set_epoch(e)`` after the
    first epoch produces: the epoch never advances, so SAF and MESA stay the base optimizer
    (the term never starts) or SAF compares with stale records. :meth:`check` warns
    (:class:`RepeatedSampleWarning`, once per epoch) rather than raising, because a sampler
    may repeat samples within an epoch on purpose (sampling with replacement, repeated
    augmentation). Samples repeated within one batch are not counted. The record is a
    ``bool`` per index up to the largest seen, on the CPU; it is not part of ``state_dict``
    (after a resume, the samples seen before it are not known).
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.warned: int | None = None  # the epoch already warned about

    def check(self, indices: Tensor, epoch: int, method: str, what: str) -> None:
        """Warn if any of ``indices`` (CPU, ``>= 0``) was seen earlier in ``epoch``."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.seen.zero_()
        if self.warned == epoch or indices.numel() == 0:
            return
        inside = indices[indices < self.seen.numel()]
        repeated = inside[self.seen[inside]]
        if repeated.numel():
            self.warned = epoch
            warnings.warn(
                f"{method}: {repeated.numel()} sample(s) of this batch (dataset indices "
                f"{repeated[:5].tolist()}...) were already seen in epoch {epoch}: call "
                "optimizer.set_epoch(epoch) at the start of every epoch; without it the epoch "
                f"stays at {epoch} and {what}. (A sampler that repeats samples within an epoch "
                "on purpose also triggers this warning: filter RepeatedSampleWarning.)",
                RepeatedSampleWarning,
                stacklevel=5,  # the caller of optimizer.step()
            )

    def add(self, indices: Tensor) -> None:
        """Mark ``indices`` (CPU, ``>= 0``) as seen in the current epoch."""
        if indices.numel() == 0:
            return
        needed = int(indices.max()) + 1
        if needed > self.seen.numel():
            grown = torch.zeros(max(needed, self.seen.numel() * 5 // 4), dtype=torch.bool)
            grown[: self.seen.numel()] = self.seen
            self.seen = grown
        self.seen[indices] = True


def trajectory_kl(logits: Tensor, reference: Tensor, tau: float, valid: Tensor | None = None):
    r"""Per-sample :math:`\mathrm{KL}(\mathrm{softmax}(r/\tau)\,\|\,\mathrm{softmax}(z/\tau))`.

    ``logits`` ``z`` and ``reference`` ``r`` are ``[B, C]``; the reference is treated as a
    constant (no gradient). Computed in float32 at least (float64 stays float64). Rows where
    ``valid`` is False give 0. Returns ``[B]``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype) / tau, dim=-1)
    log_q = F.log_softmax(reference.detach().to(logits.device, dtype) / tau, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    if valid is not None:
        kl = torch.where(valid.to(kl.device), kl, kl.new_zeros(()))
    return kl


def as_logits(outputs: Any, method: str) -> Tensor:
    """``outputs`` if they are logits of shape ``[batch, classes]``, else a ``TypeError``."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise TypeError(
            f"{method}'s trajectory loss needs the model to return logits of shape "
            f"[batch, classes]; got {shape}"
        )
    return outputs


class TrajectoryLoss(SharpnessAwareOptimizer):
    """Shared by SAF and MESA: one pass per step, loss + lmbda·tau²·KL(reference ‖ current).

    A subclass gives the reference logits of each micro-batch (:meth:`_term`) and keeps
    them (SAF: a bank of past logits; MESA: an average of the weights).
    """

    needs_epoch = True
    #: The hyperparameters of the one loss term.
    step_globals = ("lmbda", "tau", "start_epoch")
    own_passes = "one pass per step with a loss term"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The samples seen in the current epoch (the check of the epoch signal).
        self._epoch_samples = EpochSamples()

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        lmbda = group.get("lmbda")
        if not is_finite_nonnegative(lmbda):
            raise invalid_value("lmbda", lmbda, "a finite number >= 0")
        tau = group.get("tau")
        if not (is_finite_nonnegative(tau) and tau > 0):
            raise invalid_value("tau", tau, "a temperature > 0")
        if not is_count(group.get("start_epoch")):
            raise invalid_value("start_epoch", group.get("start_epoch"), "an integer >= 1")

    def _check_closure(self, closure: Any) -> BatchClosure:
        if not isinstance(closure, BatchClosure):
            raise TypeError(
                f"{type(self).__name__} adds a trajectory loss to the batch's loss and needs "
                "the batch: build the closure with samkit.make_closure(model, loss_fn, inputs, "
                "targets, indices=idx)"
            )
        return closure

    def _check_indices(self, indices: Tensor, epoch: int, what: str) -> Tensor:
        """The batch's dataset indices on the CPU, checked (``>= 0``), and the epoch signal.

        Warns (:class:`EpochSamples`) when a sample was already seen in this epoch; the
        batch's samples count as seen once the step is accepted. ``what`` says what a stuck
        epoch does to the method. One copy of the indices to the CPU (a device sync when
        they live on an accelerator).
        """
        name = type(self).__name__
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(
                f"{name} needs dataset indices as a 1-D integer tensor, got {indices.dtype} of "
                f"shape {tuple(indices.shape)}"
            )
        idx = indices.detach().to("cpu", torch.long)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"{name}: dataset indices must be >= 0, got {int(idx.min())}")
        samples = self._epoch_samples
        samples.check(idx, epoch, name, what)
        self.on_accept(lambda: samples.add(idx))
        return idx

    def _term(
        self,
        reference: Callable[[Tensor, Tensor | None, int], tuple[Tensor | None, Any]] | None,
    ) -> Callable[[Any, Tensor | None, Tensor], Tensor | None]:
        """The ``extra_loss`` of the pass: ``lmbda·tau²·mean_i KL_i`` on each micro-batch.

        ``reference(z, idx, rows)`` gives the reference logits of the micro-batch (or
        ``None``: no term) and a ``valid`` row mask (or ``None``: every row). With
        ``reference=None`` (the term is off this epoch) it adds nothing; either way it
        checks that the model returns logits ``[batch, classes]``, from the first step on.
        """
        lmbda = float(self.step_global("lmbda"))
        tau = float(self.step_global("tau"))
        name = type(self).__name__

        def extra_loss(outputs: Any, indices: Tensor | None, targets: Tensor) -> Tensor | None:
            z = as_logits(outputs, name)
            if reference is None:
                return None
            ref, valid = reference(z, indices, z.shape[0])
            if ref is None or lmbda == 0.0:
                return None
            kl = trajectory_kl(z, ref, tau, valid)
            return (lmbda * tau * tau) * kl.sum() / z.shape[0]

        return extra_loss
