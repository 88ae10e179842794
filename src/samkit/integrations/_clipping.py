"""Mapping a trainer's gradient clipping onto the samkit optimizer's ``max_grad_norm``.

A trainer clips the gradients between ``backward()`` and ``optimizer.step()``. A samkit
optimizer runs several backward passes inside one ``step(closure)``; clipping after each of
them would also rescale the ascent gradient (which changes F-SAM's and Bilateral SAM's
updates, and SAM's too when clipping by value). ``max_grad_norm`` clips the one gradient the
update uses, by its global norm, right before the base optimizer's step.
"""

from __future__ import annotations

from typing import Any

from samkit.optim.base import SharpnessAwareOptimizer

__all__ = ["is_samkit", "recorded_grad_norm", "set_max_grad_norm"]


def is_samkit(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a samkit sharpness-aware optimizer."""
    return isinstance(optimizer, SharpnessAwareOptimizer)


def set_max_grad_norm(optimizer: SharpnessAwareOptimizer, value: float | None) -> None:
    """Give ``optimizer`` the clipping threshold ``value`` a trainer's setting asks for
    (``None``, 0 or less: no clipping)."""
    optimizer.max_grad_norm = value if value is not None and value > 0 else None


def recorded_grad_norm(optimizer: SharpnessAwareOptimizer | None) -> float | None:
    """The global norm of the last step's update gradient before clipping, as the optimizer
    recorded it (``None`` before a step has clipped, or without an optimizer yet)."""
    norm = getattr(optimizer, "last_grad_norm", None)
    return None if norm is None else float(norm)
