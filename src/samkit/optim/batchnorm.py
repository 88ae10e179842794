"""Keeping BatchNorm running statistics out of the extra (perturbed) passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_bn_stats", "bn_layers"]


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
