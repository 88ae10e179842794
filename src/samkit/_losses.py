"""What a ``loss_fn`` returns, and how samkit reduces it: one rule for the whole library.

The optimizers' :class:`~samkit.BatchClosure` and every :mod:`samkit.sharpness` function call
``loss_fn(outputs, targets)`` and reduce the result with :class:`LossReduction`, so a loss
function means the same objective on both sides. This module imports nothing from samkit:
``samkit.optim`` and ``samkit.sharpness`` may not import each other.

The rule. ``loss_fn(outputs, targets)`` returns a floating-point tensor, either

* the **unreduced** losses, with the batch as first dimension: ``[B]`` per sample
  (``nn.CrossEntropyLoss(reduction="none")`` on ``[B, C]`` logits) or ``[B, ...]`` per element
  (per token: ``[B, T]`` from ``[B, C, T]`` logits; per output: ``[B, D]`` from
  ``nn.MSELoss(reduction="none")``), or
* their **mean** (a 0-dim tensor, ``reduction="mean"``).

The batch objective is what torch's ``reduction="mean"`` gives on the whole batch: the sum of
the counted elements' losses divided by their count. An element is not counted when its target
equals ``ignore_index`` (padding); with class weights (``weight=`` of
``nn.CrossEntropyLoss``/``nn.NLLLoss``) the count is the sum of the targets' weights, as in
torch. ``ignore_index`` and ``weight`` are read from an ``nn.CrossEntropyLoss`` or
``nn.NLLLoss`` module when the targets are class indices; ``ignore_index`` can also be given
explicitly (for a plain function).

The loss of one sample is that same mean over the sample's own counted elements (what
``reduction="mean"`` gives on that sample alone; 0 for a sample with nothing counted). With
``c_i`` the count of sample ``i``, the batch objective is ``Σ c_i ℓ_i / Σ c_i``: the plain mean
of the per-sample losses when every sample counts the same (no padding, no class weights),
a count-weighted mean otherwise (a sequence with 30 real tokens weighs three times one with
10, exactly as in a token-level mean).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LOSS_RULE", "LossReduction"]

#: The rule, in the words every error message about a loss_fn's return value uses.
LOSS_RULE = (
    "loss_fn(outputs, targets) must return a floating-point tensor: the unreduced losses with "
    "the batch as first dimension (e.g. nn.CrossEntropyLoss(reduction='none')) or their mean "
    "(a 0-dim tensor)"
)

#: Methods that select or weight samples need the unreduced losses.
PER_SAMPLE_NEEDED = (
    "this optimizer needs per-sample losses: build the closure with a loss_fn that returns "
    "the unreduced losses, e.g. nn.CrossEntropyLoss(reduction='none')"
)

_MODULES_WITH_IGNORE_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)


class LossReduction:
    """The reduction of one ``loss_fn``'s return value (see the module docstring).

    Args:
        loss_fn: the loss function; an ``nn.CrossEntropyLoss`` or ``nn.NLLLoss`` module lends
            its ``ignore_index`` and ``weight``.
        ignore_index: targets equal to it count for nothing. ``None``: the module's, if any.
            Giving one that differs from the module's is an error.
    """

    def __init__(self, loss_fn: Any, ignore_index: int | None = None) -> None:
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.from_module = isinstance(loss_fn, _MODULES_WITH_IGNORE_INDEX)
        self.class_weight: Tensor | None = None
        if self.from_module:
            own = int(loss_fn.ignore_index)
            if ignore_index is not None and ignore_index != own:
                raise ValueError(
                    f"ignore_index={ignore_index} differs from the loss module's "
                    f"ignore_index={own}; set it in one place"
                )
            ignore_index = own
            self.class_weight = loss_fn.weight
        #: Targets equal to this value are not counted (``None``: every element counts).
        self.ignore_index = ignore_index

    # ------------------------------------------------------------------ counting
    def counts_by_target(self, targets: Any) -> bool:
        """Whether the targets decide what counts (padding or class weights apply)."""
        if not isinstance(targets, Tensor) or self.ignore_index is None:
            return False
        if self.from_module:  # the module ignores nothing for class-probability targets
            return not (targets.is_floating_point() or targets.is_complex())
        return True

    def element_weights(self, targets: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(counted, weight)``: which target elements count, and what each weighs."""
        counted = targets != self.ignore_index
        if self.class_weight is None:
            return counted, counted.to(dtype)
        w = self.class_weight.to(device=targets.device, dtype=dtype)
        return counted, torch.where(counted, w[torch.where(counted, targets, 0)], 0)

    # ------------------------------------------------------------------ reducing
    def check(self, raw: Any, rows: int, targets: Any) -> Tensor:
        """Validate a return value of ``loss_fn``; returns it in at least float32."""
        if not isinstance(raw, Tensor):
            raise TypeError(f"{LOSS_RULE}; got {type(raw).__name__}")
        if not raw.is_floating_point():
            raise TypeError(f"{LOSS_RULE}; got a tensor of dtype {raw.dtype}")
        if raw.dim() > 0:
            if raw.shape[0] != rows:
                raise ValueError(
                    f"{LOSS_RULE}; got a tensor of shape {tuple(raw.shape)} for a batch of {rows}"
                )
            if self.counts_by_target(targets) and raw.shape != targets.shape:
                raise ValueError(
                    f"{LOSS_RULE}; with ignore_index={self.ignore_index} the unreduced losses "
                    f"must have the targets' shape {tuple(targets.shape)} (one loss per target "
                    f"element), got {tuple(raw.shape)}"
                )
        return raw.to(torch.promote_types(raw.dtype, torch.float32))

    def terms(self, raw: Tensor, targets: Any, rows: int) -> tuple[Tensor, Tensor | int]:
        """``(sum, count)`` of a checked batch (or micro-batch): its mean is ``sum / count``.

        Sums and counts of micro-batches add up to those of the whole batch, so dividing
        each micro-batch's ``sum`` by the whole batch's count gives torch's mean exactly.
        """
        if self.counts_by_target(targets):
            counted, weight = self.element_weights(targets, raw.dtype)
            count = weight.sum()
            if raw.dim() == 0:
                return raw * count, count
            return torch.where(counted, raw, 0).sum(), count
        if raw.dim() == 0:  # a mean over samples that all count the same
            return raw * rows, rows
        return raw.sum(), raw.numel()

    def count(self, targets: Any, rows: int, elements_per_row: int, dtype: torch.dtype):
        """The count of a batch whose losses have ``elements_per_row`` elements per sample
        (1 for a 0-dim mean), without evaluating it."""
        if self.counts_by_target(targets):
            return self.element_weights(targets, dtype)[1].sum()
        return rows * elements_per_row

    def shares(self, targets: Any, parts: list[Tensor]) -> list[float]:
        """Each part's share of the batch objective: its count over the batch's.

        ``parts`` are index tensors into the batch (a partition, as micro-batches are). Since
        the batch objective is the counted elements' sum over their count, it is
        ``Σ_S share_S · L_S`` with ``L_S`` part ``S``'s own objective: the weighting of
        gradient accumulation (each micro-batch's sum over the whole batch's count), for
        methods that need each part's own mean. Without padding or class weights a share is
        the part's fraction of the samples; with them, one device synchronisation (``nan``
        when nothing in the batch counts, as torch's mean).
        """
        n = int(targets.shape[0]) if isinstance(targets, Tensor) else 0
        if not self.counts_by_target(targets):
            return [len(idx) / n for idx in parts]
        weight = self.element_weights(targets, torch.float64)[1].reshape(n, -1).sum(1)
        counts = torch.stack([weight[idx.to(weight.device)].sum() for idx in parts])
        return (counts / counts.sum()).tolist()

    def mean(self, raw: Any, targets: Any, rows: int) -> Tensor:
        """The batch objective: torch's ``reduction="mean"`` of the batch (0-dim)."""
        raw = self.check(raw, rows, targets)
        total, count = self.terms(raw, targets, rows)
        return total / count

    def per_sample(self, raw: Tensor, targets: Any, rows: int) -> Tensor:
        """Each sample's loss ``[rows]``: the mean over its own counted elements."""
        if raw.dim() == 0:
            raise ValueError(PER_SAMPLE_NEEDED)
        if not self.counts_by_target(targets):
            return raw.reshape(rows, -1).mean(1)
        counted, weight = self.element_weights(targets, raw.dtype)
        total = torch.where(counted, raw, 0).reshape(rows, -1).sum(1)
        count = weight.reshape(rows, -1).sum(1)
        return torch.where(count > 0, total / torch.where(count > 0, count, 1), 0)
