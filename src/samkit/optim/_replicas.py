"""Collectives over the DDP replicas of a closure's model, for methods with long-lived state.

SAF's logit bank, MESA's averaged BatchNorm statistics and Sparse SAM's mask must be the
same on every replica. The base class averages gradients of a local pass
(:meth:`~samkit.SharpnessAwareOptimizer.all_reduce_mean_`); the state of these methods needs
a few other collectives, gathered here. Every helper is a no-op (returns its input) when the
closure's model is not a ``DistributedDataParallel`` module, when ``torch.distributed`` is
not initialised, or when the group has one process, so single-process code never pays.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Replicas", "replicas_of"]


class Replicas:
    """The process group of a DDP model (``group=None`` is the default group)."""

    __slots__ = ("group", "world", "src")

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        # broadcast() takes a global rank: that of the group's first process.
        self.src = 0 if group is None else dist.get_global_rank(group, 0)

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """In place: the sum of ``tensor`` over the replicas."""
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """In place: the first replica's ``tensor`` on every replica."""
        import torch.distributed as dist

        dist.broadcast(tensor, src=self.src, group=self.group)
        return tensor

    def all_gather_rows(self, tensor: Tensor) -> Tensor:
        """Every replica's ``tensor`` concatenated along dim 0, in rank order.

        The replicas may hold different numbers of rows (a last, smaller batch): rows are
        padded to the largest count for the collective and trimmed afterwards.
        """
        import torch.distributed as dist

        n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        counts = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(counts, n, group=self.group)
        sizes = [int(c) for c in counts]
        rows = max(sizes)
        if tensor.shape[0] < rows:
            pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def replicas_of(closure: Any) -> Replicas | None:
    """The replicas of ``closure.model`` if it is a multi-process DDP module, else ``None``."""
    model = getattr(closure, "model", None)
    if model is None or not hasattr(model, "no_sync"):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(model, "process_group", None)
    if dist.get_world_size(group) == 1:
        return None
    return Replicas(group)
