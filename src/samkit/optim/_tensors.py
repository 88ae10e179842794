"""Tensor-list kernels shared by every method: grouping, global norms, axpy, copies.

Each helper takes flat lists of tensors and works either with ``torch._foreach_*`` ops on
tensors grouped by (device, dtype) or with a plain Python loop (``foreach=False``). The two
paths are tested against each other in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "group_by_device_dtype",
    "global_norm",
    "add_",
    "copy_",
    "scaled",
]


def group_by_device_dtype(*lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into buckets whose first list shares one device and dtype.

    Returns a list of tuples ``(bucket_of_list0, bucket_of_list1, ...)``, order preserved.
    """
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        if key not in buckets:
            buckets[key] = tuple([] for _ in lists)
        for bucket, item in zip(buckets[key], items):
            bucket.append(item)
    return list(buckets.values())


def global_norm(tensors: Sequence[Tensor], foreach: bool = True) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, as a 0-dim float tensor.

    Computed in the widest floating dtype present (float64 stays float64) on the device of
    the first tensor. An empty list gives 0.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    device = tensors[0].device
    dtype = torch.promote_types(torch.float32, max((t.dtype for t in tensors), key=_width))
    if foreach:
        norms: list[Tensor] = []
        for (bucket,) in group_by_device_dtype(tensors):
            norms.extend(torch._foreach_norm(bucket))
    else:
        norms = [torch.linalg.vector_norm(t) for t in tensors]
    stacked = torch.stack([n.to(device=device, dtype=dtype) for n in norms])
    return torch.linalg.vector_norm(stacked)


def _width(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 0


def scaled(tensors: Sequence[Tensor], scale: Tensor | float, foreach: bool = True) -> list[Tensor]:
    """New tensors ``t * scale`` (``scale`` a python float or a 0-dim tensor)."""
    if not foreach:
        return [t * _like(scale, t) for t in tensors]
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    index = {id(t): i for i, t in enumerate(tensors)}
    for (bucket,) in group_by_device_dtype(tensors):
        results = torch._foreach_mul(bucket, _like(scale, bucket[0]))
        for t, r in zip(bucket, results):
            out[index[id(t)]] = r
    return out


def add_(
    targets: Sequence[Tensor], others: Sequence[Tensor], alpha: float = 1.0, foreach: bool = True
) -> None:
    """In place ``targets[i] += alpha * others[i]``."""
    if not foreach:
        for t, o in zip(targets, others):
            t.add_(o, alpha=alpha)
        return
    for t_bucket, o_bucket in group_by_device_dtype(targets, others):
        torch._foreach_add_(t_bucket, o_bucket, alpha=alpha)


def copy_(targets: Sequence[Tensor], sources: Sequence[Tensor], foreach: bool = True) -> None:
    """In place ``targets[i].copy_(sources[i])``."""
    if not foreach:
        for t, s in zip(targets, sources):
            t.copy_(s)
        return
    for t_bucket, s_bucket in group_by_device_dtype(targets, sources):
        torch._foreach_copy_(t_bucket, s_bucket)


def _like(scale: Tensor | float, ref: Tensor) -> Tensor | float:
    if isinstance(scale, Tensor):
        return scale.to(device=ref.device, dtype=ref.dtype)
    return scale
