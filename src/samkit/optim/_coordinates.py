"""A param group's parameters as one flat vector of coordinates, for coordinate masks.

Sparse SAM perturbs the top-k coordinates of a param group, chosen over the whole group as
if its parameters were one vector (the concatenation of the flattened parameters, in group
order). :func:`coordinates` gives that vector's operations, with one interface whether the
parameters are whole tensors or FSDP2 shards:

* :class:`Coordinates` (whole tensors): ``flat`` concatenates, ``count`` sums, ``top``
  selects the ``k`` largest scores, given per parameter, without concatenating them
  (:func:`select_top`), ``masks`` cuts a flat selection back into tensors shaped like the
  parameters, ``random`` draws one uniform score per coordinate from a seed;
* :class:`ShardedCoordinates` (``DTensor`` parameters laid out by FSDP2): the same, on each
  process's part of the vector, with nothing gathered: ``count`` all-reduces, ``top`` is a
  radix selection over the shards (:func:`select_top`), ``masks`` are ``bool`` DTensors laid
  out as the parameters, and ``random`` streams the same seeded draws and keeps this
  process's slice, so every layout selects the coordinates one process would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import dot, is_sharded, like_layout, local

__all__ = [
    "Coordinates",
    "ShardedCoordinates",
    "coordinates",
    "kept_count",
    "live_fraction",
    "select_top",
]

#: Draws of other processes' coordinates are discarded in chunks of at most this many.
_DISCARD_CHUNK = 1 << 25


def kept_count(d: int, sparsity: float) -> int:
    """The ``k = d - round(d·s)`` coordinates of ``d`` that a mask of sparsity ``s`` keeps
    (Sparse SAM's rule)."""
    return d - min(d, int(round(d * sparsity)))


def live_fraction(masks: list[Tensor]) -> float:
    """The fraction of ``True`` entries of ``masks`` (``bool`` tensors or FSDP2 shards of
    them: the count is over every shard); ``nan`` without any entry."""
    flags = [m.double() for m in masks]
    total = sum(m.numel() for m in flags)
    return float(dot(flags, flags)) / total if total else float("nan")


def coordinates(params: list[Tensor]) -> Coordinates:
    """The flat coordinates of ``params`` (one param group), sharded or not."""
    return ShardedCoordinates(params) if is_sharded(params) else Coordinates(params)


class Coordinates:
    """The coordinates of whole (unsharded) parameters."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.device = params[0].device

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """Tensors shaped like the parameters, as this process's part of the flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def count(self, flags: Tensor) -> int:
        """How many of the whole vector's ``flags`` (this process's part) are true."""
        return int(flags.sum())

    def top(self, scores: Tensor | Sequence[Tensor], k: int) -> Tensor:
        """Which entries are among the ``k`` largest ``scores`` (a ``bool`` flat vector).

        ``scores``: the flat vector, or its parts in order (tensors shaped like the
        parameters: nothing is concatenated). The rule is :func:`select_top`'s."""
        if k >= self.numel:
            return torch.ones(self.numel, dtype=torch.bool, device=self.device)
        return select_top(scores, k, None)

    def masks(self, chosen: Tensor) -> list[Tensor]:
        """A flat ``bool`` selection as one mask per parameter, shaped and placed like it."""
        out, i = [], 0
        for p in self.params:
            out.append(chosen[i : i + p.numel()].view(p.shape).to(p.device))
            i += p.numel()
        return out

    def random(self, seed: int) -> Tensor:
        """One uniform score per coordinate, drawn by a CPU generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(self.numel, generator=gen).to(self.device)


class ShardedCoordinates(Coordinates):
    """The coordinates of FSDP2-sharded parameters: each process holds a part of the vector.

    Supported layouts are FSDP2's: every parameter a ``DTensor`` on one mesh with one
    placement list, ``Shard(0)`` on at most one mesh dimension and ``Replicate`` on the
    others (HSDP), so each local shard is one contiguous range of its parameter's flattened
    elements.
    """

    def __init__(self, params: list[Tensor]) -> None:
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        layouts = {
            (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None for p in params
        }
        mesh_placements = layouts.pop() if len(layouts) == 1 else None
        sharded = (
            []
            if mesh_placements is None
            else [d for d, pl in enumerate(mesh_placements[1]) if not pl.is_replicate()]
        )
        if (
            mesh_placements is None
            or len(sharded) > 1
            or any(mesh_placements[1][d] != Shard(0) for d in sharded)
        ):
            raise TypeError(
                "SSAM mode='dynamic' on sharded parameters needs every parameter of a param "
                "group to be a DTensor with the same mesh and placements, Shard(0) on at most "
                "one mesh dimension and Replicate on the others (FSDP2's layouts); got "
                f"{sorted(map(str, layouts | {mesh_placements}))}"
            )
        mesh, placements = mesh_placements
        super().__init__(params)
        #: The processes the vector is split over (``None``: not split).
        self.group = mesh.get_group(sharded[0]) if sharded else None
        #: Per parameter, where its local shard starts in the whole vector and its length.
        self.ranges: list[tuple[int, int]] = []
        self.local_shapes: list[tuple[int, ...]] = []
        offset = 0
        for p in params:
            shape, origin = compute_local_shape_and_global_offset(p.shape, mesh, placements)
            row = math.prod(p.shape[1:])
            length = math.prod(shape)
            self.ranges.append((offset + origin[0] * row if length else offset, length))
            self.local_shapes.append(tuple(shape))
            offset += p.numel()
        self.local_numel = sum(n for _, n in self.ranges)

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        return super().flat(local(tensors))

    def count(self, flags: Tensor) -> int:
        import torch.distributed as dist

        n = flags.sum().to(torch.int64).reshape(1)
        if self.group is not None:
            dist.all_reduce(n, group=self.group)
        return int(n)

    def top(self, scores: Tensor | Sequence[Tensor], k: int) -> Tensor:
        return select_top(scores if isinstance(scores, Tensor) else local(scores), k, self.group)

    def masks(self, chosen: Tensor) -> list[Tensor]:
        out, i = [], 0
        for shape, (_, n) in zip(self.local_shapes, self.ranges):
            out.append(chosen[i : i + n].view(shape).clone())
            i += n
        return like_layout(out, self.params)

    def random(self, seed: int) -> Tensor:
        """This process's entries of the whole vector's draws (the same draws, streamed)."""
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(self.local_numel)
        drawn = filled = 0
        for begin, length in self.ranges:
            while drawn < begin:  # draws of other processes' shards: discarded
                n = min(begin - drawn, _DISCARD_CHUNK)
                torch.rand(n, generator=gen)
                drawn += n
            if length:
                out[filled : filled + length] = torch.rand(length, generator=gen)
                drawn, filled = drawn + length, filled + length
        return out.to(self.device)


def select_top(scores: Tensor | Sequence[Tensor], k: int, group: Any) -> Tensor:
    """Which local entries are among the ``k`` largest of every process's ``scores``.

    ``scores`` (compared as float32) are this process's part of a vector split over the
    processes of ``group`` (``None``: not split), given whole or as its parts in order
    (nothing is concatenated). The rule: the ``k``-th largest score is found by a radix
    selection on the scores' order-preserving 32-bit keys, one byte at a time (four
    all-reduces of a 256-bin histogram; nothing is gathered); every entry above it is taken,
    and entries tied with it are taken by process rank, then in local order (one all-gather
    of one count), until ``k`` are taken. Without ties at the ``k``-th value the selection
    equals ``torch.topk``'s. The keys are computed in chunks of at most
    ``_KEY_CHUNK`` entries, again in each pass, so the memory beyond the selection itself
    (one ``bool`` per entry) does not grow with the vector.
    """
    import torch.distributed as dist

    parts = [scores] if isinstance(scores, Tensor) else list(scores)
    numel = sum(p.numel() for p in parts)
    device = parts[0].device if parts else torch.device("cpu")
    chosen = torch.zeros(numel, dtype=torch.bool, device=device)
    if k <= 0:
        return chosen
    prefix, remaining = 0, k  # the k-th largest key's bytes found so far; left to take
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for _, key in _keyed_chunks(parts):
            if shift < 24:  # the candidates: keys that start with the bytes found so far
                key = key[(key >> (shift + 8)) == prefix]
            hist += torch.bincount((key >> shift) & 255, minlength=256)
        local_ties = hist.clone() if group is not None and shift == 0 else hist
        if group is not None:
            dist.all_reduce(hist, group=group)
        counts = hist.tolist()
        above = 0
        for b in range(255, -1, -1):
            if above + counts[b] >= remaining:
                break
            above += counts[b]
        prefix = (prefix << 8) | b
        remaining -= above
    ties = int(local_ties[b])  # local entries whose key is the k-th largest
    before = 0
    if group is not None:
        count = torch.tensor([ties], dtype=torch.int64, device=device)
        counts_all = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts_all, count, group=group)
        rank = dist.get_rank(group)
        before = sum(int(c) for c in counts_all[:rank])
    take = max(0, min(ties, remaining - before))
    for begin, key in _keyed_chunks(parts):
        part = chosen[begin : begin + key.numel()]
        part |= key > prefix
        if take > 0:
            tied = (key == prefix).nonzero().reshape(-1)[:take]
            part[tied] = True
            take -= tied.numel()
    return chosen


#: :func:`select_top` keys its scores in chunks of at most this many entries (a few
#: megabytes of temporaries, whatever the vector's length).
_KEY_CHUNK = 1 << 16


def _keyed_chunks(parts: list[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """``(offset in the flat vector, keys)`` of consecutive chunks of ``parts``: each score's
    float32 bits as an int64 in ``[0, 2^32)`` ordered as the floats (``-0.0 < +0.0``)."""
    offset = 0
    for part in parts:
        flat = part.reshape(-1)
        for i in range(0, flat.numel(), _KEY_CHUNK):
            bits = flat[i : i + _KEY_CHUNK].float().view(torch.int32).to(torch.int64)
            yield offset + i, torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
        offset += flat.numel()
