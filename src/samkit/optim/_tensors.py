"""Tensor-list kernels shared by every method: grouping, global norms and dot products, axpy, copies.

Each helper takes flat lists of tensors and works either with ``torch._foreach_*`` ops on
tensors grouped by (device, dtype) or with a plain Python loop (``foreach=False``). The two
paths are tested against each other in float64.

Grouping costs Python time per tensor, which matters on a GPU where the kernels themselves
take microseconds: a :class:`Buckets` plan is computed once for a parameter list and reused
for every list that runs parallel to it (gradients, saved weights, perturbations). Every helper
takes an optional ``buckets``; without one it groups the list it is given.

Sharded tensors. Every helper also takes ``DTensor`` lists (the parameters and gradients of a
model sharded with FSDP2's ``fully_shard``, or any ``torch.distributed.tensor`` layout whose
placements are ``Shard`` or ``Replicate``). Elementwise helpers (:func:`add`, :func:`add_`,
:func:`add_scaled_`, :func:`copy_`, :func:`mul_`, :func:`scaled`, :func:`masked`,
:func:`lerp_`) act on each rank's local shard (:func:`local`), so they never communicate;
:func:`add`, :func:`scaled` and :func:`masked` return DTensors laid out as their inputs
(:func:`like_layout`). The reductions
(:func:`global_norm`, :func:`dot`) reduce the local shards and then add the shards' sums with
one ``all_reduce`` over the mesh dimensions the tensors are sharded on, so every rank gets
the value of the whole (unsharded) tensors; nothing is ever gathered. Plain tensors in the
same list count once (they are the same on every rank). ``Partial`` placements are refused.
A method that builds its arithmetic from these helpers therefore runs unchanged on FSDP2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from samkit._dtensor import dtensor_class, reduce_key

__all__ = [
    "Buckets",
    "group_by_device_dtype",
    "global_norm",
    "dot",
    "add",
    "add_",
    "add_scaled_",
    "copy_",
    "mul_",
    "scaled",
    "slices",
    "where_",
    "masked",
    "masked_",
    "lerp_",
    "is_sharded",
    "in_shared_memory",
    "local",
    "like_layout",
]


def is_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor of ``tensors`` is a ``DTensor`` (e.g. an FSDP2 parameter)."""
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


class Buckets:
    """Index lists that split a tensor list into (device, dtype) groups, order preserved.

    ``sharded`` tells whether the list holds ``DTensor``s; the helpers then work on local
    shards (a DTensor's device and dtype are those of its local shard).
    """

    __slots__ = ("index", "single", "size", "sharded")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.size = len(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.index = list(groups.values())
        self.single = len(self.index) <= 1
        self.sharded = is_sharded(tensors)

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


def in_shared_memory(t: Tensor) -> bool:
    """Whether ``t`` is part of a larger buffer (its storage holds more than its elements),
    as a gradient that is a view into DDP's buckets (``gradient_as_bucket_view=True``)."""
    shard = getattr(t, "_local_tensor", t)  # a DTensor's local shard
    return shard.untyped_storage().nbytes() != shard.numel() * shard.element_size()


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor replaced by its local shard (a view: in-place changes reach the DTensor)."""
    cls = dtensor_class()
    if cls is None:
        return list(tensors)
    with torch.no_grad():
        return [t.to_local() if isinstance(t, cls) else t for t in tensors]


# ---------------------------------------------------------------------------- reductions
def global_norm(
    tensors: Sequence[Tensor], foreach: bool = True, buckets: Buckets | None = None
) -> Tensor:
    """L2 norm of the concatenation of ``tensors``, as a 0-dim float tensor.

    Computed in the widest floating dtype present and at least in float32, per tensor as
    well as across tensors: the norms of float16/bfloat16 tensors are taken in float32, so
    neither one large tensor (a float16 norm overflows above 65504) nor the combination of
    many tensors (bfloat16 keeps 8 significant bits) loses the result. float64 stays
    float64. On the device of the first tensor; an empty list gives 0.

    DTensors (sharded) count with their whole value: the local shards' squared norms are
    summed over the shards with one ``all_reduce`` (see the module docstring).
    """
    if len(tensors) == 0:
        return torch.zeros(())
    plan = _plan(tensors, buckets) if foreach or buckets is not None else None
    if plan.sharded if plan is not None else is_sharded(tensors):
        return _sharded_reduction(tensors, None, foreach)
    return _norm(tensors, foreach, plan)


def _norm(tensors: Sequence[Tensor], foreach: bool, plan: Buckets | None) -> Tensor:
    """:func:`global_norm` of plain tensors."""
    device = tensors[0].device
    if not foreach:
        norms = [torch.linalg.vector_norm(t, dtype=_at_least_float32(t.dtype)) for t in tensors]
        dtype = max((n.dtype for n in norms), key=_width)
        return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
    partial = []
    for bucket in _plan(tensors, plan).split(tensors):
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


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product ``sum_i <a[i], b[i]>`` of two parallel lists, as a 0-dim tensor.

    The whole lists seen as two vectors (global, over every tensor). Accumulated in the widest
    floating dtype present and at least float32 (float16/bfloat16 products are taken in
    float32), on the device of ``a[0]``; an empty list gives 0; no host synchronisation.
    DTensors count with their whole value (local inner products summed over the shards with
    one ``all_reduce``); ``a[i]`` and ``b[i]`` must then have the same layout.
    """
    if len(a) != len(b):
        raise ValueError(f"dot: lists of different lengths ({len(a)} and {len(b)})")
    if len(a) == 0:
        return torch.zeros(())
    if is_sharded(a) or is_sharded(b):
        return _sharded_reduction(a, b, True)
    return _dot(a, b)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """:func:`dot` of plain tensors."""
    device = a[0].device
    parts = []
    for x, y in zip(a, b):
        dtype = _at_least_float32(torch.promote_types(x.dtype, y.dtype))
        parts.append(torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)))
    dtype = max((p.dtype for p in parts), key=_width)
    return torch.stack([p.to(device, dtype) for p in parts]).sum()


def _sharded_reduction(a: Sequence[Tensor], b: Sequence[Tensor] | None, foreach: bool) -> Tensor:
    """``global_norm(a)`` (``b`` is None) or ``dot(a, b)`` of lists holding DTensors.

    Tensors are grouped by how they must be summed over ranks: plain tensors and replicated
    DTensors not at all, sharded DTensors over the process groups of the mesh dimensions they
    are sharded on. Each group reduces its local shards (sums of squares, or inner products);
    the sums of all sharded groups are then added over ranks, one ``all_reduce`` per distinct
    set of process groups (one for FSDP2).
    """
    import torch.distributed as dist

    cls = dtensor_class()
    kinds: dict[Any, list[int]] = {}
    for i, t in enumerate(a):
        key = reduce_key(
            t,
            cls,
            "a DTensor",
            "cannot be reduced shard by shard: redistribute it to Shard or Replicate "
            "placements first",
        )
        if b is not None and not _same_layout(t, b[i], cls):
            raise ValueError(
                f"dot: tensor {i} of the two lists has different layouts "
                f"({_layout(t, cls)} and {_layout(b[i], cls)}); their local shards do not match"
            )
        kinds.setdefault(key, []).append(i)
    device = a[0].device  # a DTensor's device is its local shard's
    local_a = local(a)
    local_b = local(b) if b is not None else None
    sums: dict[Any, Tensor] = {}
    for key, idx in kinds.items():
        xs = [local_a[i] for i in idx]
        if local_b is None:
            sums[key] = _norm(xs, foreach, None).square() if xs else torch.zeros(())
        else:
            sums[key] = _dot(xs, [local_b[i] for i in idx])
    dtype = max((s.dtype for s in sums.values()), key=_width)
    total = sums.pop(None, None)
    total = (
        total.to(device, dtype)
        if total is not None
        else torch.zeros((), device=device, dtype=dtype)
    )
    for key, value in sums.items():
        value = value.to(device, dtype).clone()
        mesh, dims = key
        for d in dims:
            dist.all_reduce(value, group=mesh.get_group(d))
        total = total + value
    return total.sqrt() if b is None else total


def _same_layout(x: Tensor, y: Tensor, cls: type | None) -> bool:
    """Whether the local values of ``x`` and ``y`` cover the same elements on every rank."""
    x_dt = cls is not None and isinstance(x, cls)
    y_dt = cls is not None and isinstance(y, cls)
    if not (x_dt or y_dt):
        return True
    return (
        x_dt
        and y_dt
        and tuple(x.placements) == tuple(y.placements)
        and x.device_mesh == y.device_mesh
    )


def _layout(t: Tensor, cls: type | None) -> str:
    if cls is not None and isinstance(t, cls):
        return f"DTensor {tuple(t.placements)} on {t.device_mesh}"
    return "a plain tensor"


# ---------------------------------------------------------------------------- elementwise
def scaled(
    tensors: Sequence[Tensor],
    scale: Tensor | float,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> list[Tensor]:
    """New tensors ``t * scale`` (``scale`` a python float or a 0-dim tensor).

    DTensors give DTensors with the same layout (computed shard by shard).
    """
    plan = _plan(tensors, buckets)
    scale = _scalar(scale)
    if plan.sharded:
        return like_layout(_scaled(local(tensors), scale, foreach, plan), tensors)
    return _scaled(tensors, scale, foreach, plan)


def _scaled(
    tensors: Sequence[Tensor], scale: Tensor | float, foreach: bool, plan: Buckets
) -> list[Tensor]:
    if not foreach:
        return [t * _like(scale, t) for t in tensors]
    if plan.single:
        return list(torch._foreach_mul(list(tensors), _like(scale, tensors[0]))) if tensors else []
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, bucket in zip(plan.index, plan.split(tensors)):
        for i, r in zip(idx, torch._foreach_mul(bucket, _like(scale, bucket[0]))):
            out[i] = r
    return out


def add(
    tensors: Sequence[Tensor],
    others: Sequence[Tensor],
    alpha: float = 1.0,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> list[Tensor]:
    """New tensors ``tensors[i] + alpha * others[i]`` (one kernel per bucket; DTensors give
    DTensors with the same layout, computed shard by shard)."""
    plan = _plan(tensors, buckets)
    if plan.sharded:
        return like_layout(add(local(tensors), local(others), alpha, foreach), tensors)
    if not foreach:
        return [t.add(o, alpha=alpha) for t, o in zip(tensors, others)]
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, t_bucket, o_bucket in zip(plan.index, plan.split(tensors), plan.split(others)):
        for i, r in zip(idx, torch._foreach_add(t_bucket, o_bucket, alpha=alpha)):
            out[i] = r
    return out


def add_(
    targets: Sequence[Tensor],
    others: Sequence[Tensor],
    alpha: float = 1.0,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``targets[i] += alpha * others[i]`` (DTensors: shard by shard)."""
    plan = _plan(targets, buckets)
    if plan.sharded:
        targets, others = local(targets), local(others)
    if not foreach:
        for t, o in zip(targets, others):
            t.add_(o, alpha=alpha)
        return
    for t_bucket, o_bucket in zip(plan.split(targets), plan.split(others)):
        torch._foreach_add_(t_bucket, o_bucket, alpha=alpha)


def add_scaled_(
    targets: Sequence[Tensor],
    others: Sequence[Tensor],
    scale: Tensor | float,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``targets[i] += scale * others[i]``, with no temporary the size of ``others``.

    ``scale`` is a python float or a 0-dim tensor (no host synchronisation): the product is
    formed inside the addition (``addcmul_``), never stored, so adding a scaled direction to
    the weights costs no buffer. DTensors: shard by shard.
    """
    plan = _plan(targets, buckets)
    scale = _scalar(scale)
    if not isinstance(scale, Tensor):
        add_(targets, others, alpha=scale, foreach=foreach, buckets=plan)
        return
    if plan.sharded:
        targets, others = local(targets), local(others)
    if not foreach:
        for t, o in zip(targets, others):
            t.addcmul_(o, _like(scale, t))
        return
    for t_bucket, o_bucket in zip(plan.split(targets), plan.split(others)):
        torch._foreach_addcmul_(t_bucket, o_bucket, [_like(scale, t_bucket[0])] * len(t_bucket))


def mul_(
    tensors: Sequence[Tensor],
    factor: Tensor | float,
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``tensors[i] *= factor`` (a python float or a 0-dim tensor; no host sync)."""
    plan = _plan(tensors, buckets)
    factor = _scalar(factor)
    if plan.sharded:
        tensors = local(tensors)
    if not foreach:
        for t in tensors:
            t.mul_(_like(factor, t))
        return
    for bucket in plan.split(tensors):
        torch._foreach_mul_(bucket, _like(factor, bucket[0]))


#: The temporaries of an update made in place (``slices``) hold at most this many values
#: at a time, and at least one tensor: 2**20 values, 4 MiB in float32.
SLICE_VALUES = 1 << 20


def slices(tensors: Sequence[Tensor], max_values: int = SLICE_VALUES) -> list[list[int]]:
    """Consecutive runs of indices into ``tensors``, each run holding at most ``max_values``
    values (a larger tensor is a run of its own; a DTensor counts its local shard).

    An update that needs temporaries (a value computed from the old state before it is
    overwritten) runs slice by slice, so its extra memory is one slice, not one model."""
    runs: list[list[int]] = []
    size = max_values + 1
    for i, t in enumerate(local(tensors)):
        n = t.numel()
        if size + n > max_values:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += n
    return runs


def where_(targets: Sequence[Tensor], condition: Tensor, sources: Sequence[Tensor]) -> None:
    """In place ``targets[i] = sources[i] if condition else targets[i]``, with ``condition``
    a 0-dim bool tensor on the targets' device (no host synchronisation; NaN-safe, unlike a
    product with 0 or 1). DTensors: shard by shard."""
    for t, s in zip(local(targets), local(sources)):
        t.copy_(torch.where(condition, s, t))


def copy_(
    targets: Sequence[Tensor],
    sources: Sequence[Tensor],
    foreach: bool = True,
    buckets: Buckets | None = None,
) -> None:
    """In place ``targets[i].copy_(sources[i])`` (DTensors: shard by shard)."""
    plan = _plan(targets, buckets)
    if plan.sharded:
        targets, sources = local(targets), local(sources)
    if not foreach:
        for t, s in zip(targets, sources):
            t.copy_(s)
        return
    for t_bucket, s_bucket in zip(plan.split(targets), plan.split(sources)):
        torch._foreach_copy_(t_bucket, s_bucket)


def lerp_(
    targets: Sequence[Tensor], sources: Sequence[Tensor], weight: float, foreach: bool = True
) -> None:
    """In place ``targets[i] += weight·(sources[i] - targets[i])``, the sources cast to the
    targets' dtypes (DTensors: shard by shard)."""
    if not targets:
        return
    if is_sharded(targets) or is_sharded(sources):
        targets, sources = local(targets), local(sources)
    if not foreach:
        for t, s in zip(targets, sources):
            t.lerp_(s.to(t.dtype), weight)
        return
    for t_bucket, s_bucket in group_by_device_dtype(targets, sources):
        torch._foreach_lerp_(t_bucket, [s.to(t.dtype) for s, t in zip(s_bucket, t_bucket)], weight)


def masked(
    tensors: Sequence[Tensor], masks: Sequence[Tensor | None], foreach: bool = True
) -> list[Tensor]:
    """New tensors ``t ⊙ m`` (``m`` shaped and laid out as ``t``; ``None``: ``t`` itself).

    DTensors give DTensors with the same layout (computed shard by shard).
    """
    pairs = [(i, t, m) for i, (t, m) in enumerate(zip(tensors, masks)) if m is not None]
    out = list(tensors)
    if not pairs:
        return out
    idx = [i for i, _, _ in pairs]
    ts = [t for _, t, _ in pairs]
    ms = [m for _, _, m in pairs]
    if is_sharded(ts):  # shard by shard (the masks share the layout)
        products = like_layout(masked(local(ts), local(ms), foreach), ts)
    elif foreach:
        products = [None] * len(ts)  # type: ignore[list-item]
        plan = Buckets(ts)
        for index, t_bucket, m_bucket in zip(plan.index, plan.split(ts), plan.split(ms)):
            for k, r in zip(index, torch._foreach_mul(t_bucket, m_bucket)):
                products[k] = r
    else:
        products = [t * m for t, m in zip(ts, ms)]
    for i, r in zip(idx, products):
        out[i] = r
    return out


def masked_(
    tensors: Sequence[Tensor], masks: Sequence[Tensor | None], foreach: bool = True
) -> None:
    """In place ``t ⊙ m`` (the same values as :func:`masked`; ``None``: ``t`` unchanged)."""
    pairs = [(t, m) for t, m in zip(tensors, masks) if m is not None]
    if not pairs:
        return
    ts, ms = [t for t, _ in pairs], [m for _, m in pairs]
    if is_sharded(ts):  # shard by shard (the masks share the layout)
        ts, ms = local(ts), local(ms)
    if not foreach:
        for t, m in zip(ts, ms):
            t.mul_(m)
        return
    plan = Buckets(ts)
    for t_bucket, m_bucket in zip(plan.split(ts), plan.split(ms)):
        torch._foreach_mul_(t_bucket, m_bucket)


def _like(scale: Tensor | float, ref: Tensor) -> Tensor | float:
    if isinstance(scale, Tensor):
        return scale.to(device=ref.device, dtype=ref.dtype)
    return scale


def _scalar(scale: Tensor | float) -> Tensor | float:
    """A replicated 0-dim DTensor (e.g. a norm computed with DTensor ops) as a plain tensor."""
    cls = dtensor_class()
    if cls is not None and isinstance(scale, cls):
        return scale.full_tensor()
    return scale


def like_layout(shards: list[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Local shards wrapped as DTensors with the layout of ``like`` (plain tensors stay)."""
    cls = dtensor_class()
    assert cls is not None
    out = []
    for r, t in zip(shards, like):
        if isinstance(t, cls):
            r = cls.from_local(
                r, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        out.append(r)
    return out


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _width(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 0
