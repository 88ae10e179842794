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


def set_max_grad_norm(optimizer: SharpnessAwareOptimizer, value: float | None, source: str) -> None:
    """Give ``optimizer`` the clipping threshold ``value`` (``None`` or 0: no clipping) that
    the trainer's ``source`` setting asks for."""
    if value is not None and not value > 0:
        value = None
    if not hasattr(optimizer, "max_grad_norm"):
        if value is None:
            return
        raise RuntimeError(
            f"{source}={value} asks for gradient clipping, but this samkit's "
            f"{type(optimizer).__name__} has no max_grad_norm option to clip the update "
            f"gradient; set {source} to 0/None"
        )
    optimizer.max_grad_norm = value


def recorded_grad_norm(optimizer: Any) -> float | None:
    """The global norm of the last step's update gradient before clipping, as the optimizer
    recorded it (``None`` when it records none)."""
    for value in (
        getattr(optimizer, "last_grad_norm", None),
        getattr(optimizer, "samkit_state", {}).get("grad_norm"),
    ):
        if value is not None:
            return float(value)
    return None
