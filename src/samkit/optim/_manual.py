"""SAM's two passes driven by hand: ``first_step()`` and ``second_step()``.

For a training loop that runs its own forward and backward passes (as the original SAM
code does), the two halves of a SAM step around the second backward pass, with the
guarantees of ``step(closure)``: every pass checked for NaN/inf with one decision in
``second_step``, the weights restored whatever happens, clipping, the step counted or
skipped. Only for methods that keep SAM's sequence of passes; the others refuse clearly.

:class:`ManualSteps` is a mixin of ``SharpnessAwareOptimizer``, built from its
``perturb``, ``restore``, ``base_step`` and finiteness checks.
"""

from __future__ import annotations

from typing import Any

import torch

from samkit.optim._finite import SkipStep

__all__ = ["ManualSteps"]


class ManualSteps:
    """``first_step`` / ``second_step`` (a mixin; see the module docstring)."""

    _perturbed: Any  # SavedWeights: true while the weights are perturbed
    _manual_step: bool
    on_nonfinite: str
    samkit_state: dict[str, Any]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Move to the perturbed weights using the clean gradients already in ``.grad``.

        The manual form of a SAM step::

            loss = loss_fn(model(x), y)
            loss.backward()
            opt.first_step(zero_grad=True, loss=loss)
            with samkit.frozen_bn_stats(model):
                loss2 = loss_fn(model(x), y)
                loss2.backward()
            opt.second_step(zero_grad=True, loss=loss2)

        ``loss`` (optional, a tensor or a number) is checked for NaN/inf like the loss a
        closure returns; the gradients are always checked. As with ``step(closure)`` the
        checks are read once, in :meth:`second_step`, which raises :class:`NonFiniteError`
        or (``on_nonfinite="skip"``) skips the step: a NaN found in the clean pass means
        ``second_step`` restores the weights and applies nothing.

        Only for methods with SAM's two passes (SAM, ASAM, F-SAM, ...); methods with their
        own sequence of passes need ``step(closure)``.
        """
        self._check_manual_steps_supported()
        self._check_sharding()
        if self._perturbed or self._manual_step:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called twice: the weights are already "
                "perturbed; call second_step() to finish the step (or restore() to abandon it)"
            )
        if not self._has_gradients():
            raise RuntimeError(
                f"{type(self).__name__}.first_step() found no gradient: call loss.backward() "
                "on the loss at the clean weights before first_step()"
            )
        self._begin_step()
        if self.on_nonfinite != "ignore":
            self._record_finite("clean", loss, check_grads=True)
        self._manual_step = True  # the loop runs the next pass (see kept())
        try:
            self.perturb()
        except BaseException:
            self.restore()
            self._end_step()
            raise
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Restore the clean weights and apply the base optimizer with the current ``.grad``.

        ``.grad`` must hold the gradient at the perturbed weights (a backward pass after
        :meth:`first_step`); ``loss`` (optional) is that pass's loss, checked for NaN/inf.
        Raises :class:`NonFiniteError` (weights restored, nothing applied) or, with
        ``on_nonfinite="skip"``, skips the step (counted in :attr:`skipped_steps`) if either
        pass was not finite. ``zero_grad=True`` clears the gradients in every case, an error
        included, so that a loop that catches it does not accumulate onto them.
        """
        self._check_manual_steps_supported()
        if not self._manual_step:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() called without first_step(): the "
                "weights are not perturbed, so this would be a plain base-optimizer step. Call "
                "first_step() after the clean backward pass, or use step(closure)"
            )
        self._manual_step = False
        try:
            if self.on_nonfinite != "ignore":
                self._record_finite("perturbed", loss, check_grads=True)
            has_grads = self._has_gradients()
            self.restore()
            if not has_grads:
                raise RuntimeError(
                    f"{type(self).__name__}.second_step() found no gradient: after "
                    "first_step(), compute the loss again (at the perturbed weights) and call "
                    "loss.backward() before second_step()"
                )
            self.base_step()
        except SkipStep:
            self.zero_grad(set_to_none=True)
            self.samkit_state["skipped_steps"] += 1
        finally:
            self.restore()
            self._end_step()
            if zero_grad:  # also when raising: a loop that goes on must not accumulate on them
                self.zero_grad(set_to_none=True)
