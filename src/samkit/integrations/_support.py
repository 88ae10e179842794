"""Which samkit methods the trainers (the Hugging Face ``Trainer``, Lightning) can drive.

Both trainers give the optimizer a plain closure: their own forward and backward over a batch
they own. A method whose registry entry needs a :class:`~samkit.BatchClosure`
(``OptimizerInfo.needs_batch_closure``: per-sample losses, sub-batch passes, the batch's
inputs or its sample indices) cannot run on it, with its published settings; every other
method can. Epoch-driven methods get ``set_epoch`` from the integrations. The rule is read
from the registry here, once: the integrations refuse what it refuses, and the table in
``docs/scaling.md`` is checked against it.
"""

from __future__ import annotations

from typing import Any

import samkit
from samkit.optim import OptimizerInfo

__all__ = ["check_supported", "registered_info", "unsupported_reason"]


def unsupported_reason(info: OptimizerInfo) -> str | None:
    """Why the trainers cannot drive the method of ``info`` (``None``: they can)."""
    if info.needs_batch_closure:
        return (
            f"{info.name} needs the batch itself (samkit.make_closure: per-sample losses, "
            "sub-batch passes, the inputs or the sample indices), and the trainer's closure "
            "is its own forward and backward"
        )
    return None


def registered_info(optimizer: Any) -> OptimizerInfo | None:
    """The registry entry of ``optimizer``'s class (the nearest registered class in its
    MRO; ``None`` for a class outside the registry)."""
    by_class = {}
    for name in samkit.list_optimizers(sharpness_aware=True):
        info = samkit.get_optimizer_info(name)
        by_class.setdefault(info.cls, info)
    for cls in type(optimizer).__mro__:
        if cls in by_class:
            return by_class[cls]
    return None


def check_supported(method: str | Any, trainer: str) -> None:
    """``ValueError`` naming the method, why ``trainer`` cannot drive it and what to use, for
    a method name or an optimizer whose registered class the trainers cannot drive."""
    info = samkit.get_optimizer_info(method) if isinstance(method, str) else registered_info(method)
    reason = None if info is None else unsupported_reason(info)
    if reason:
        raise ValueError(
            f"{trainer} cannot drive {info.name}: {reason}. Use samkit's own loop "
            "(optimizer.step(samkit.make_closure(model, loss_fn, inputs, targets, "
            "indices=idx))), or a method it supports (docs/scaling.md lists them)"
        )
