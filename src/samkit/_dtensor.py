"""``DTensor`` helpers shared by :mod:`samkit.optim` and :mod:`samkit.sharpness` (which may not
import each other): finding the class without importing it, and how a tensor's local values
are summed over the processes. This module imports nothing from samkit.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["dtensor_class", "reduce_key"]


def dtensor_class() -> type | None:
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` is not imported.

    No DTensor can exist before that module is imported (by FSDP2, tensor parallelism or
    the user), and importing it costs seconds: it is never imported here.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def reduce_key(t: Tensor, cls: type | None, what: str, refusal: str) -> Any:
    """How the local values of ``t`` add up to its whole value over the processes: ``None``
    when they are whole already (a plain tensor, a replicated DTensor), else ``(mesh,
    sharded mesh dims)``, the process groups its shards' sums are reduced over. ``cls`` is
    :func:`dtensor_class`'s. A ``Partial`` placement is a ValueError: ``"{what} with a
    Partial placement (...) {refusal}"``."""
    if cls is None or not isinstance(t, cls):
        return None
    dims = []
    for d, placement in enumerate(t.placements):
        if placement.is_shard():
            dims.append(d)
        elif placement.is_partial():
            raise ValueError(f"{what} with a Partial placement ({t.placements}) {refusal}")
    return (t.device_mesh, tuple(dims)) if dims else None
