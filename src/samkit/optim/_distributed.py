"""The process groups a step must act in together, and the collectives over them.

A sharpness-aware step meets several processes in two ways: the replicas of a
``DistributedDataParallel`` model (one process group, the model's) and the device mesh of
FSDP2's sharded (``DTensor``) parameters (one process group per mesh dimension). This module
is the one place that finds those groups (:func:`replicas_of`, :func:`mesh_groups`) and runs
collectives over them (:class:`Group`), with:

* one rule for where a collective's tensor lives: NCCL only moves CUDA tensors, so a CPU
  tensor (a flag, a random draw) goes through the current CUDA device and comes back
  (:func:`on_backend_device`);
* one way to run a collective on many tensors at once: flatten them into one buffer, run
  the collective, cut the buffer back into views shaped like the tensors
  (:func:`through_flat`).

Every lookup answers ``None`` or ``[]`` when ``torch.distributed`` is not initialised or a
group has one process, so single-process code never pays. :class:`ProcessGroups`, a mixin of
``SharpnessAwareOptimizer``, is the optimizer's side: whether the last pass's gradients are
a replica's own, averaging them, and agreeing on a random draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import Buckets, is_sharded

__all__ = [
    "Group",
    "ProcessGroups",
    "first_replica_flags",
    "initialized",
    "mesh_groups",
    "on_backend_device",
    "replica_group",
    "replicas_of",
    "through_flat",
    "unique",
]


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def on_backend_device(tensor: Tensor, group: Any) -> Tensor:
    """``tensor``, or a copy on the current CUDA device if ``group``'s backend is NCCL.

    NCCL runs collectives on CUDA tensors only; gloo takes tensors where they are.
    """
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def through_flat(
    tensors: Sequence[Tensor],
    collective: Callable[[Tensor], Any],
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """One collective for many tensors: flatten, run ``collective`` in place, cut back.

    ``tensors`` (on one device) are concatenated into one flat buffer (in ``dtype``, default
    their own), ``collective(buffer)`` changes it in place, and the buffer is returned as
    views shaped like ``tensors``. The caller copies them back (``t.copy_(v)``), casts them
    or keeps them, as it needs.
    """
    flat = torch.cat([t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors])
    collective(flat)
    views, offset = [], 0
    for t in tensors:
        n = t.numel()
        views.append(flat[offset : offset + n].view(t.shape))
        offset += n
    return views


class Group:
    """A process group (``group=None``: the default group) and its collectives.

    Collectives change their tensor in place and return it; :meth:`all_reduce_` and
    :meth:`broadcast_` take a tensor on any device (:func:`on_backend_device`).
    """

    __slots__ = ("group", "world")

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)

    @property
    def src(self) -> int:
        """The global rank of the group's first process (``broadcast`` takes a global rank)."""
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def all_reduce_(self, tensor: Tensor, op: Any = None) -> Tensor:
        """In place: ``tensor`` reduced over the group (``op`` default: the sum)."""
        import torch.distributed as dist

        buf = on_backend_device(tensor, self.group)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """In place: the group's first process's ``tensor`` on every process."""
        import torch.distributed as dist

        buf = on_backend_device(tensor, self.group)
        dist.broadcast(buf, src=self.src, group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def broadcast_flags(self, flags: list[Tensor]) -> list[Tensor]:
        """The first process's ``bool`` tensors, bit for bit: one broadcast of their bytes."""
        views = through_flat(flags, self.broadcast_, torch.uint8)
        return [v.to(torch.bool) for v in views]

    @torch.no_grad()
    def mean_(self, tensors: list[Tensor]) -> None:
        """In place: each of ``tensors`` averaged over the group, one all-reduce per
        (device, dtype). For gradients, which live where the backend runs collectives."""
        import torch.distributed as dist

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)

        for bucket in Buckets(tensors).split(tensors):
            for t, v in zip(bucket, through_flat(bucket, mean)):
                t.copy_(v)

    def all_gather_rows(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` concatenated along dim 0, in rank order.

        The processes may hold different numbers of rows (a last, smaller batch): rows are
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


# ------------------------------------------------------------------ the lookups
def replica_group(model: Any) -> Any:
    """The process group of the replicas of a DDP ``model`` (``None``: the default group)."""
    return getattr(model, "process_group", None)


def replicas_of(model: Any) -> Group | None:
    """The replicas of ``model`` if it is a multi-process DDP module, else ``None``."""
    if model is None or not hasattr(model, "no_sync") or not initialized():
        return None
    group = Group(replica_group(model))
    return group if group.world > 1 else None


def mesh_groups(params: Sequence[Tensor]) -> list[Group]:
    """The multi-process groups of every dimension of the meshes of sharded parameters."""
    if not is_sharded(params):
        return []
    meshes: list[Any] = []
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None and mesh not in meshes:
            meshes.append(mesh)
    groups: list[Group] = []
    for mesh in meshes:
        for d in range(mesh.ndim):
            group = Group(mesh.get_group(d))
            if group.world > 1:
                groups.append(group)
    return unique(groups)


def first_replica_flags(flags: dict[Any, Tensor], replicas: Group | None) -> dict[Any, Tensor]:
    """``flags`` (``bool`` tensors) as the first replica has them, bit for bit; unchanged in
    one process (``replicas`` ``None``)."""
    if replicas is None or not flags:
        return flags
    return dict(zip(flags, replicas.broadcast_flags(list(flags.values()))))


def unique(groups: Iterable[Group | None]) -> list[Group]:
    """``groups`` without ``None`` and without a second entry for the same process group."""
    out: list[Group] = []
    for g in groups:
        if g is not None and g.group not in [h.group for h in out]:
            out.append(g)
    return out


class ProcessGroups:
    """The optimizer's side of several processes (a mixin of ``SharpnessAwareOptimizer``).

    It keeps ``_local_grads`` and ``_replica_group`` (set by ``run_pass``: the last backward
    pass ran in DDP's ``no_sync()``, and the group of its model) and ``_sharding_groups``
    (the mesh groups of sharded parameters, cached); the optimizer provides ``model``,
    ``_pass_model`` and ``param_groups``.
    """

    _local_grads: bool
    _replica_group: Any
    _sharding_groups: list[Group] | None
    _pass_model: Any
    model: Any
    param_groups: list[dict[str, Any]]

    @property
    def local_gradients(self) -> bool:
        """Whether the gradients of the last backward pass are this replica's own.

        True after a pass that ran inside DDP's ``no_sync()`` (by default the clean pass of a
        :class:`~samkit.BatchClosure` on a ``DistributedDataParallel`` model). Only the
        *perturbation* may come from such gradients: any quantity built from them that
        enters the *update* (Bilateral SAM's ``g0``, GSAM's ``g``, LookSAM's cached
        direction) must first go through :meth:`all_reduce_mean_`, or the replicas drift
        apart.
        """
        return self._local_grads

    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        """In place: average ``tensors`` over the DDP replicas of the last local pass.

        Does nothing unless the last backward pass was local (:attr:`local_gradients`) and
        ``torch.distributed`` is initialised, so single-process code can call it freely.
        The tensors are flattened into one buffer per (device, dtype): one all-reduce each.
        """
        if not self._local_grads or not tensors or not initialized():
            return
        replicas = Group(self._replica_group)
        if replicas.world > 1:
            replicas.mean_(tensors)

    def replicas_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The replicas' mean of ``tensors`` as new tensors when the last backward pass was
        local (:attr:`local_gradients`), else ``tensors`` themselves (already the mean)."""
        if not self.local_gradients:
            return tensors
        mean = [t.clone() for t in tensors]
        self.all_reduce_mean_(mean)
        return mean

    def _agreement_groups(self, models: tuple[Any, ...] | None = None) -> list[Group]:
        """The process groups whose members must take this step's decisions together.

        The group of each multi-process DDP model among ``models`` (default: ``model=`` and
        the last closure's model; ``()``: none), and every dimension's group of the device
        meshes of sharded (DTensor) parameters. Empty in a single process.
        """
        if not initialized():
            return []
        if self._sharding_groups is None:
            self._sharding_groups = mesh_groups([p for g in self.param_groups for p in g["params"]])
        models = (self.model, self._pass_model) if models is None else models
        return unique([*(replicas_of(m) for m in models), *self._sharding_groups])

    def agree(self, values: Tensor, model: Any = None, replicas: bool = True) -> Tensor:
        """``values`` as the first process has them, in every process that must agree.

        For random draws that decide which tensors a synchronised pass computes (ESAM's
        weight mask): under FSDP2 every pass is synchronised, so the processes sharing a
        sharded parameter's mesh always take the first one's draw; under DDP the processes
        of ``model``'s group (or of ``model=``) do too when ``replicas`` is true (a method
        passes ``replicas=self.sync_ascent``: local ascent passes may differ). One
        ``broadcast`` per process group, in place; a single process returns ``values``
        unchanged.
        """
        for group in self._agreement_groups((model, self.model) if replicas else ()):
            group.broadcast_(values)
        return values
