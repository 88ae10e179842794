"""Tensor-list kernels shared by every method: grouping, global norms, axpy, copies.

Each helper takes flat lists of tensors and works either with ``torch._foreach_*`` ops on
tensors grouped by (device, dtype) or with a plain Python loop (``foreach=False``). The two
paths are tested against each other in float64.

Grouping costs Python time per tensor, which matters on a GPU where the kernels themselves
take microseconds: a :class:`Buckets` plan is computed once for a parameter list and reused
for every list that runs parallel to it (gradients, saved weights, perturbations). Every helper
takes an optional ``buckets``; without one it groups the list it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Buckets",
    "group_by_device_dtype",
    "global_norm",
    "add_",
    "copy_",
    "mul_",
    "scaled",
]


class Buckets:
    """Index lists that split a tensor list into (device, dtype) groups, order preserved."""

    __slots__ = ("index", "single", "size")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.size = len(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.index = list(groups.values())
        self.single = len(self.index) <= 1

    def split(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """``tensors`` cut into the plan's groups."""
        if self.single:
            return [list(tensors)] if len(tensors) else []
        return [[tensors[i] for i in idx] for idx in self.index]


def group_by_device_dtype(*lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into buckets whose first list shares one device and dtype."""
    plan = Buckets(lists[0])
    return list(zip(*(plan.split(lst) for lst in lists)))


def _plan(tensors: Sequence[Tensor], buckets: Buckets | None) -> Buckets:
    return buckets if buckets is not None else Buckets(tensors)


def global_norm(
    tensors: Sequence[Tensor], foreach: bool = True, buckets: Buckets | None = None
) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, as a 0-dim float tensor.

    Computed in the widest floating dtype present and at least in float32, per tensor as
    well as across tensors: the norms of float16/bfloat16 tensors are taken in float32, so
    neither one large tensor (a float16 norm overflows above 65504) nor the combination of
    many tensors (bfloat16 keeps 8 significant bits) loses the result. float64 stays
    float64. On the device of the first tensor; an empty list gives 0.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    device = tensors[0].device
    if not foreach:
        norms = [torch.linalg.vector_norm(t, dtype=_at_least_float32(t.dtype)) for t in tensors]
        dtype = max((n.dtype for n in norms), key=_width)
        return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
    partial = []
    for bucket in _plan(tensors, buckets).split(tensors):
        dtype = _at_least_float32(bucket[0].dtype)
        if dtype == bucket[0].dtype:
            norms = torch._foreach_norm(bucket)
        else:  # float16/bfloat16: accumulate and return each norm in float32
            norms = torch._foreach_norm(bucket, 2, dtype=dtype)
        partial.append(torch.linalg.vector_norm(torch.stack(norms)))
    if len(partial) == 1:
        return partial[0]
    dtype = max((n.dtype for n in partial), key=_width)
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in partial]))


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _width(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 0


def scaled(
    tensors: Sequence[Tensor],
    scale: Tensor | float,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> list[Tensor]:
    """New tensors ``t * scale`` (``scale`` a python float or a 0-dim tensor)."""
    if not foreach:
        return [t * _like(scale, t) for t in tensors]
    plan = _plan(tensors, buckets)
    if plan.single:
        return list(torch._foreach_mul(list(tensors), _like(scale, tensors[0]))) if tensors else []
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, bucket in zip(plan.index, plan.split(tensors)):
        for i, r in zip(idx, torch._foreach_mul(bucket, _like(scale, bucket[0]))):
            out[i] = r
    return out


def add_(
    targets: Sequence[Tensor],
    others: Sequence[Tensor],
    alpha: float = 1.0,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``targets[i] += alpha * others[i]``."""
    if not foreach:
        for t, o in zip(targets, others):
            t.add_(o, alpha=alpha)
        return
    plan = _plan(targets, buckets)
    for t_bucket, o_bucket in zip(plan.split(targets), plan.split(others)):
        torch._foreach_add_(t_bucket, o_bucket, alpha=alpha)


def mul_(
    tensors: Sequence[Tensor], factor: float, foreach: bool = True, buckets: Buckets | None = None
) -> None:
    """In place ``tensors[i] *= factor``."""
    if not foreach:
        for t in tensors:
            t.mul_(factor)
        return
    for bucket in _plan(tensors, buckets).split(tensors):
        torch._foreach_mul_(bucket, factor)


def copy_(
    targets: Sequence[Tensor],
    sources: Sequence[Tensor],
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``targets[i].copy_(sources[i])``."""
    if not foreach:
        for t, s in zip(targets, sources):
            t.copy_(s)
        return
    plan = _plan(targets, buckets)
    for t_bucket, s_bucket in zip(plan.split(targets), plan.split(sources)):
        torch._foreach_copy_(t_bucket, s_bucket)


def _like(scale: Tensor | float, ref: Tensor) -> Tensor | float:
    if isinstance(scale, Tensor):
        return scale.to(device=ref.device, dtype=ref.dtype)
    return scale
