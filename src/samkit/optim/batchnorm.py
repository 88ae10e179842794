"""BatchNorm in sharpness-aware steps: running statistics kept out of the extra (perturbed)
passes, and the smallest sub-batch a training pass may run on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_bn_stats", "bn_layers", "smallest_sub_batch"]


def bn_layers(model: nn.Module | None) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` (any ``_BatchNorm`` subclass, SyncBatchNorm too)."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module | list[_BatchNorm] | None) -> Iterator[None]:
    """Run forward passes without touching any BatchNorm layer's running statistics.

    Inside the context every BatchNorm layer of ``model`` that tracks running statistics
    still normalises with the statistics of the current batch (as in training mode), but
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are left exactly as they
    were: the layer's ``track_running_stats`` flag is switched off for the duration and
    restored afterwards, even when the body raises. Layers in eval mode are unaffected
    (they use the running statistics and never update them).

    Sharpness-aware optimizers use this for every pass after the first, so the running
    statistics come from the clean weights only, as in the original SAM code. Use it
    yourself when you drive ``first_step`` / ``second_step`` by hand::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with samkit.frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    ``None`` is accepted and does nothing; a list of layers (from :func:`bn_layers`) saves
    walking the module tree on every call.
    """
    layers = model if isinstance(model, list) else bn_layers(model)
    switched = [m for m in layers if m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def smallest_sub_batch(layers: list[_BatchNorm]) -> int:
    """The fewest samples a method may give a pass on part of the batch: 2 while a BatchNorm
    layer is in train mode, else 1.

    A BatchNorm layer in train mode normalises with the statistics of the samples it sees;
    on one sample they are degenerate (``BatchNorm1d`` raises "Expected more than 1 value
    per channel", a convolution's BatchNorm normalises one image by itself). So a method
    that evaluates a sub-batch (ESAM's selected samples, AUSAM's subset, mSAM's
    micro-batches) keeps at least 2 samples there; a batch of one sample is run whole, as
    the training loop gave it.
    """
    return 2 if any(m.training for m in layers) else 1
