"""A seeded random stream owned by an optimizer, saved in its ``state_dict``.

Methods that draw random choices every step (ESAM's weight masks, AUSAM's sample subsets)
draw them from their own CPU ``torch.Generator``, never from the global RNG: the choices are
reproducible from the optimizer's ``seed``, they do not shift the data order or the dropout
masks of the training loop, and a resumed run draws exactly what the uninterrupted run
would have drawn.

The generator's state lives in ``optimizer.samkit_state[key]`` (a ``uint8`` tensor), which the
base class saves in ``state_dict()`` and restores in ``load_state_dict()``; the
``torch.Generator`` object itself is only a cache rebuilt from that state.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_seed", "initial_rng_state", "OwnedGenerator"]


def check_seed(seed: Any) -> int:
    """The seed as an ``int`` (``None``: ``torch.initial_seed()``); ``ValueError`` otherwise."""
    if seed is None:
        return int(torch.initial_seed())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (an integer >= 0 or None)")
    return seed


def initial_rng_state(seed: int) -> torch.Tensor:
    """The state of a CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed).get_state()


class OwnedGenerator:
    """Draws from the generator whose state is ``samkit_state[key]`` and writes it back.

    Usage: ``gen = owned.take(samkit_state)`` before drawing, and
    ``optimizer.on_accept(lambda: owned.put(samkit_state))`` after: the advanced state is
    written back only when the step is accepted, so a step that raises or is skipped draws
    nothing (the next step draws what it would have drawn). The cached generator is reused
    as long as the stored state is the one written by the last :meth:`put` and no draw since
    went unwritten (a ``load_state_dict`` replaces the stored state, and the next
    :meth:`take` picks the loaded state up).
    """

    __slots__ = ("key", "_gen", "_written")

    def __init__(self, key: str) -> None:
        self.key = key
        self._gen = torch.Generator()
        self._written: torch.Tensor | None = None

    def take(self, samkit_state: dict[str, Any]) -> torch.Generator:
        state = samkit_state[self.key]
        if state is not self._written:
            self._gen.set_state(state)
        self._written = None  # drawn from: stale until put() writes the advanced state
        return self._gen

    def put(self, samkit_state: dict[str, Any]) -> None:
        self._written = self._gen.get_state()
        samkit_state[self.key] = self._written
