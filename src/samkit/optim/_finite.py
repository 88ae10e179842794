"""The non-finite policy of a step: every pass checked for NaN/inf, one decision per step.

Each pass queues on-device flags (is its loss finite, are its gradients finite) without
synchronising; :meth:`FiniteChecks.verify_finite`, called once before the base step, reads
them all at once and raises :class:`NonFiniteError` naming the first bad pass
(``on_nonfinite="raise"``), abandons the step (``"skip"``, or a GradScaler's routine
overflow) or does nothing (``"ignore"``, which queues nothing). In several processes (DDP
replicas, FSDP2 meshes) the flags are combined over the processes first, so every process
takes the same decision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from samkit.optim._distributed import Group
from samkit.optim._tensors import global_norm

__all__ = ["FiniteChecks", "NonFiniteError", "SkipStep"]


class NonFiniteError(FloatingPointError):
    """A pass produced a NaN or infinite loss or gradient."""


class SkipStep(Exception):
    """Internal: abandon the current step (``on_nonfinite='skip'``); carries the step's loss."""


#: One pass's queued checks: its name, its loss (for the message) and on-device bool flags.
Check = tuple[str, Any, list[Tensor]]


class FiniteChecks:
    """The checks of the step in progress (a mixin of ``SharpnessAwareOptimizer``).

    It keeps ``_pending_checks`` (the queued flags) and ``_unchecked`` (the pass whose
    gradients are still to be checked); the optimizer provides ``on_nonfinite``,
    ``foreach``, ``collect()``, ``_grad_scaler`` and ``_agreement_groups()``.
    """

    _pending_checks: list[Check]
    _unchecked: tuple[str, Any] | None
    on_nonfinite: str
    foreach: bool
    _grad_scaler: Any

    def _record_finite(self, name: str, loss: Any, check_grads: bool) -> None:
        """Queue on-device finiteness flags for this pass; :meth:`verify_finite` reads them.

        Nothing is synchronised here: on a GPU the flags are read once per step, just
        before the base step, so the passes queue without stalls. The gradients' flag is
        taken lazily: from the norm ``perturb`` computes of them anyway, or just before
        the next pass or the base step (one norm fewer per step for SAM). ``loss`` may be a
        tensor, a Python number or ``None`` (not checked).
        """
        if isinstance(loss, Tensor):
            self._pending_checks.append((name, loss, [torch.isfinite(loss.detach()).all()]))
        elif isinstance(loss, (int, float)):
            self._pending_checks.append((name, loss, [torch.tensor(math.isfinite(loss))]))
        if check_grads:
            self._unchecked = (name, loss)

    def _check_unchecked_grads(self, norm: Tensor | None = None) -> None:
        """Queue the finiteness flag of the last pass's gradients (``norm``: of them)."""
        if self._unchecked is None:
            return
        name, loss = self._unchecked
        self._unchecked = None
        if norm is None:
            grads = [g for gp in self.collect() for g in gp.grads]  # type: ignore[attr-defined]
            if not grads:
                return
            norm = global_norm(grads, self.foreach)
        self._pending_checks.append((name, loss, [torch.isfinite(norm)]))

    def finite_so_far(self, device: torch.device) -> Tensor:
        """On ``device``, whether every pass of this step so far was finite (0-dim bool).

        No synchronisation: for state a method updates in place before its last pass with
        ``torch.where`` on this flag, so a non-finite pass never reaches it. The last pass's
        gradients are checked here if they were not yet (their norm is queued once).
        ``on_nonfinite="ignore"`` queues no check: the flag is then true.
        """
        self._check_unchecked_grads()
        flags = [f.to(device) for _, _, fs in self._pending_checks for f in fs]
        if not flags:
            return torch.ones((), dtype=torch.bool, device=device)
        return torch.stack(flags).all()

    def verify_finite(self) -> None:
        """Raise (or skip the step) if any pass so far in this step was not finite.

        Called by ``base_step``; one device synchronisation for all passes.

        In several processes (a ``DistributedDataParallel`` model, or sharded parameters
        under FSDP2) every process takes the same decision: the flags are combined over the
        processes with one ``all_reduce`` of a single number, so a NaN in one process's loss,
        or in a pass whose gradients stayed local (the ascent pass in ``no_sync()``), makes
        every process raise or skip the same step. The DDP model is found through
        ``model=`` or the closure (a :class:`~samkit.BatchClosure`); a plain closure over a
        DDP model needs ``model=`` for this.
        """
        self._check_unchecked_grads()
        pending, self._pending_checks = self._pending_checks, []
        if self.on_nonfinite == "ignore":
            return
        groups = self._agreement_groups()  # type: ignore[attr-defined]
        if not pending and not groups:
            return
        flags = [f for _, _, fs in pending for f in fs]
        device = next((f.device for f in flags if f.device.type != "cpu"), None)
        if device is None:
            device = flags[0].device if flags else torch.device("cpu")
        local = (
            torch.stack([f.to(device) for f in flags])
            if flags
            else torch.ones(0, dtype=torch.bool, device=device)
        )
        if groups:
            everyone = _all_processes_ok(local, groups)
            ok = torch.cat([local.to(everyone.dtype), everyone.to(local.device).view(1)]).tolist()
            ok, everyone_ok = ok[:-1], bool(ok[-1])
        else:
            ok, everyone_ok = local.tolist(), True
        if all(ok) and everyone_ok:
            return
        scaler = self._grad_scaler
        first_loss = pending[0][1] if pending else None
        if self.on_nonfinite == "skip" or (scaler is not None and scaler.is_enabled()):
            # With a GradScaler, overflowing scaled gradients are routine: skip the step.
            raise SkipStep(first_loss)
        if all(ok):
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite loss or gradient in another process of "
                "the distributed group (every process stops at this step); the weights were "
                "left unchanged. Pass on_nonfinite='skip' to skip such steps."
            )
        k = 0
        name, loss = pending[-1][0], pending[-1][1]
        for name, loss, pass_flags in pending:  # noqa: B007 (the first failing one is reported)
            if not all(ok[k : k + len(pass_flags)]):
                break
            k += len(pass_flags)
        raise NonFiniteError(
            f"{type(self).__name__}: non-finite loss or gradient in the {name} pass "
            f"(loss={_loss_text(loss)}); the weights were left unchanged. Pass "
            "on_nonfinite='skip' to skip such steps."
        )


def _all_processes_ok(local: Tensor, groups: list[Group]) -> Tensor:
    """1 if every flag of every process in ``groups`` is true, else 0 (an int32 tensor)."""
    import torch.distributed as dist

    everyone = local.all().to(torch.int32).reshape(1)
    for group in groups:
        group.all_reduce_(everyone, op=dist.ReduceOp.MIN)
    return everyone[0]


def _loss_text(loss: Any) -> str:
    if isinstance(loss, Tensor):
        return f"{float(loss.detach().float().mean()):g}"
    if isinstance(loss, (int, float)):
        return f"{loss:g}"
    return "?"
