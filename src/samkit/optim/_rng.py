"""Random state in a sharpness-aware step: the passes' shared draws and an owned stream.

Two kinds of randomness meet in a step, and this module holds both:

* **The global generators, shared by the passes** (:class:`SharedRandomState`). Every pass
  of a step replays the random state the step's first pass started from, so the clean and
  the perturbed passes draw the same dropout masks (as the original SAM code, which
  evaluates both passes with one random key), and afterwards the generators stand where one
  plain forward/backward pass would have left them.
* **A seeded stream owned by the optimizer** (:class:`OwnedGenerator`). Methods that draw
  random choices every step (ESAM's weight masks, AUSAM's sample subsets) draw them from
  their own CPU ``torch.Generator``, never from the global RNG: the choices are reproducible
  from the optimizer's ``seed``, they do not shift the data order or the dropout masks of
  the training loop, and a resumed run draws exactly what the uninterrupted run would have
  drawn. The generator's state lives in ``optimizer.samkit_state[key]`` (a ``uint8``
  tensor), which the base class saves in ``state_dict()`` and restores in
  ``load_state_dict()``; the ``torch.Generator`` object itself is only a cache rebuilt from
  that state.
* **Stateless seeded draws** (:func:`draw_seed`): a draw keyed by (seed, epoch, group,
  purpose) needs no saved generator state at all (Sparse SAM's masks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from samkit.optim._validation import invalid_value

__all__ = [
    "GlobalState",
    "OwnedGenerator",
    "SharedRandomState",
    "check_seed",
    "cuda_devices",
    "draw_seed",
    "get_global_state",
    "initial_rng_state",
    "set_global_state",
]

#: The state of the CPU generator and of the CUDA generators of some devices.
GlobalState = tuple[Tensor, list[Tensor]]


# ------------------------------------------------------------------ the global generators
def cuda_devices(param_groups: Iterable[dict[str, Any]]) -> list[torch.device]:
    """The CUDA devices holding parameters of ``param_groups`` (their generators are shared)."""
    if not torch.cuda.is_initialized():  # no parameter can be on a GPU: skip the walk
        return []
    devices = {p.device for g in param_groups for p in g["params"] if p.is_cuda}
    return sorted(devices, key=lambda d: d.index or 0)


def get_global_state(cuda: list[torch.device]) -> GlobalState:
    """The state of the CPU generator and of the generators of the ``cuda`` devices."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def set_global_state(state: GlobalState, cuda: list[torch.device]) -> None:
    """Set the generators to ``state`` (from :func:`get_global_state` with the same devices)."""
    cpu, per_device = state
    torch.set_rng_state(cpu)
    for device, s in zip(cuda, per_device):
        torch.cuda.set_rng_state(s, device)


class SharedRandomState:
    """One step's random state: every pass after the first replays the first one's.

    The first pass records the global generators' state (CPU and the CUDA devices of the
    parameters); before each later pass the current state is kept aside and the recorded
    one set, and after the pass the kept state is set back. So every pass draws the same
    random numbers (the same dropout masks), and the stream outside the passes advances as
    if only the first pass had drawn: after a step the generators stand where one plain
    forward/backward pass would have left them.
    """

    __slots__ = ("devices", "first")

    def __init__(self, cuda: list[torch.device]) -> None:
        self.devices = cuda
        self.first: GlobalState | None = None

    def restart(self) -> None:
        """The next pass draws afresh, from where the generators stand, and the passes after
        it replay its state instead: passes over other samples (mSAM's micro-batches) get
        their own draws."""
        self.first = None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self.first is None:  # the step's first pass draws freely; remember where it began
            self.first = get_global_state(self.devices)
            yield
            return
        resume = get_global_state(self.devices)
        set_global_state(self.first, self.devices)
        try:
            yield
        finally:
            set_global_state(resume, self.devices)


# ------------------------------------------------------------------ a stream of one's own
def check_seed(seed: Any) -> int:
    """The seed as an ``int`` (``None``: ``torch.initial_seed()``); ``ValueError`` otherwise."""
    if seed is None:
        return int(torch.initial_seed())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise invalid_value("seed", seed, "an integer >= 0 or None")
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


#: The strides of :func:`draw_seed`'s key.
_SEED_STRIDE, _EPOCH_STRIDE, _GROUP_STRIDE = 1_000_003, 10_007, 101


def draw_seed(seed: int, epoch: int, group: int, purpose: int) -> int:
    """The seed of one draw, from its key: ``(seed·1000003 + (epoch + 1)·10007 + group·101
    + purpose) mod 2^63``. Nothing but ``seed`` needs saving: a resumed run draws the same."""
    value = seed * _SEED_STRIDE + (epoch + 1) * _EPOCH_STRIDE + group * _GROUP_STRIDE + purpose
    return value % (1 << 63)
