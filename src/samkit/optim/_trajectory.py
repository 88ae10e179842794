"""The trajectory loss of SAF and MESA (Du et al., NeurIPS 2022).

Both replace SAM's second pass by a term added to the loss of a step's one ordinary
forward/backward pass: :math:`\\lambda\\,\tau^2` times the mean over the batch of
:math:`\\mathrm{KL}(\\mathrm{softmax}(\tilde z/\tau)\\,\\|\\,\\mathrm{softmax}(z/\tau))`, between
the model's logits :math:`z` and reference logits :math:`\tilde z` along the training
trajectory. :class:`TrajectoryLoss` is their common base: the hyperparameters of the term
(``lmbda``, ``tau``, ``start_epoch``, one value for the whole step), the closure it needs
and the term itself; :func:`trajectory_kl` is the per-sample KL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = ["TrajectoryLoss", "as_logits", "trajectory_kl"]


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

    def _term(
        self, reference: Callable[[Tensor, Tensor | None, int], tuple[Tensor | None, Any]]
    ) -> Callable[[Any, Tensor | None, Tensor], Tensor]:
        """The ``extra_loss`` of the pass: ``lmbda·tau²·mean_i KL_i`` on each micro-batch.

        ``reference(z, idx, rows)`` gives the reference logits of the micro-batch (or
        ``None``: no term) and a ``valid`` row mask (or ``None``: every row).
        """
        lmbda = float(self.step_global("lmbda"))
        tau = float(self.step_global("tau"))
        name = type(self).__name__

        def extra_loss(outputs: Any, indices: Tensor | None, targets: Tensor) -> Tensor:
            z = as_logits(outputs, name)
            ref, valid = reference(z, indices, z.shape[0])
            if ref is None or lmbda == 0.0:
                return z.new_zeros((), dtype=torch.promote_types(z.dtype, torch.float32))
            kl = trajectory_kl(z, ref, tau, valid)
            return (lmbda * tau * tau) * kl.sum() / z.shape[0]

        return extra_loss
