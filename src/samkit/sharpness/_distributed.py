"""Processes and shards: the one place where :mod:`samkit.sharpness` communicates.

Every measure works with *vectors* over the parameters it measures (probes, Lanczos vectors,
gradients, Hessian-vector products) and with sums over the batches. This module holds the
two objects that make those work across processes:

* :class:`Comm` — the processes a measurement spans. With ``torch.distributed`` initialised
  (and ``distributed`` left at ``None`` or set to ``True``) a measurement is over the *union*
  of every process's batches. Before anything else the processes compare what they were asked
  to do (:meth:`Comm.handshake`: the measure, its settings, the seed, the parameters, whether
  each has data, and any error in the arguments): a mismatch or a bad argument on one process
  raises the same error on every process, before any computation. Every later collective
  carries a failure flag, so an exception in one process's forward or backward pass is raised
  on every process (its own error there, :class:`PeerError` naming it elsewhere) instead of
  leaving the others waiting. Each collective issued here waits at most
  :func:`collective_timeout` seconds (the DTensor gathers and reduce-scatters of sharded
  parameters wait as long as their process group's timeout) (a process that never joins — for instance a measure
  called on rank 0 only — gives :class:`PeerError` after that time, not a hang).
* :class:`Space` — the vectors of one measurement, as flat tensors of this process's
  elements. For plain (replicated) parameters, a vector is the whole vector on every process;
  the arithmetic needs no communication, because every process holds the same values. For
  parameters that are ``DTensor`` shards (FSDP2's ``fully_shard``), a vector holds only this
  process's shards, laid out like the parameters; dot products and norms are local sums plus
  one all-reduce, and nothing is gathered. Random vectors are drawn identically on every
  process from one seeded stream over the whole (unsharded) vector, and each process keeps
  its elements, so that a sharded or data-parallel measurement equals a single process on all
  the data with the same seed.

The data-parallel sums (gradient, HVPs, losses) are reduced once per product: a replicated
model all-reduces its partial sums in one buffer with the sample count and the failure flag;
a sharded model reduce-scatters each parameter's partial sum into shards (its parameters are
gathered once per measurement, and each product gathers its input vector, one parameter at
a time, as FSDP's own forward and backward passes do).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from samkit._dtensor import dtensor_class, reduce_key

__all__ = [
    "Comm",
    "PeerError",
    "Space",
    "collective_timeout",
    "is_writer",
    "set_collective_timeout",
    "shard_batches",
]

#: Seconds a collective of samkit.sharpness waits for the other processes (see module docs).
_TIMEOUT_SECONDS = 600.0

#: Entries per draw of the seeded random stream (a multiple of 16: see ``Space.rand``).
_CHUNK = 1 << 20


class PeerError(RuntimeError):
    """Another process of the measurement failed, or did not answer in time."""


def collective_timeout() -> float:
    """Seconds each collective of :mod:`samkit.sharpness` waits for the other processes."""
    return _TIMEOUT_SECONDS


def set_collective_timeout(seconds: float) -> float:
    """Set the seconds each collective of :mod:`samkit.sharpness` waits (default 600);
    returns the previous value. The process group's own timeout also applies."""
    global _TIMEOUT_SECONDS
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a number, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
    previous, _TIMEOUT_SECONDS = _TIMEOUT_SECONDS, float(seconds)
    return previous


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_writer() -> bool:
    """Whether this process should write a measurement's results: rank 0 of an initialised
    ``torch.distributed`` group, or the only process.

    Every process of a distributed measurement gets the same result; call the measure on every
    process and write from the one where this is true::

        out = samkit.sharpness.measure_all(model, loss_fn, my_batches)   # on every rank
        if samkit.sharpness.is_writer():
            json.dump(out, open("sharpness.json", "w"))
    """
    if not _initialised():
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def shard_batches(data: Any, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of a list of batches: a contiguous block, the first
    ``len(data) % world_size`` processes taking one batch more.

    A distributed measurement over the shards equals one process measuring ``data`` in order
    (the union is ordered by rank). ``rank``/``world_size`` default to those of the initialised
    process group (one process: everything). Raises ValueError when there are fewer batches
    than processes (a process with no batch cannot take part).
    """
    batches = list(data)
    if rank is None or world_size is None:
        if _initialised():
            import torch.distributed as dist

            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    if len(batches) < world_size:
        raise ValueError(
            f"{len(batches)} batches cannot be shared by {world_size} processes: every process "
            "needs at least one batch"
        )
    base, extra = divmod(len(batches), world_size)
    start = rank * base + min(rank, extra)
    return batches[start : start + base + (1 if rank < extra else 0)]


# ----------------------------------------------------------------------------- processes


def _error_text(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class Comm:
    """The processes of one measurement: the ranks of ``group`` (None: the default group)."""

    def __init__(self, measure: str, group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.measure = measure
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and torch.cuda.is_available()
            else torch.device("cpu")
        )
        #: Batches of each process, and of the processes of lower rank (set by the handshake).
        self.counts = [0] * self.world
        self.offset = 0

    @staticmethod
    def resolve(distributed: Any, measure: str) -> Comm | None:
        """The processes for ``distributed``: None — all of them when ``torch.distributed`` is
        initialised (one process too: its DTensor parameters are then measured as shards of
        a mesh of one); True — the same, required; False — this one only; a
        ``ProcessGroup`` — its processes (e.g. the data-parallel replicas of a model whose
        tensor-parallel ranks see the same data)."""
        group = None
        if distributed is not None and not isinstance(distributed, bool):
            pg = getattr(sys.modules.get("torch.distributed"), "ProcessGroup", None)
            if pg is None or not isinstance(distributed, pg):
                raise TypeError(
                    f"distributed must be None, a bool or a ProcessGroup, got {distributed!r}"
                )
            group = distributed
        if distributed is False:
            return None
        if not _initialised():
            if distributed is not None:
                raise ValueError(
                    f"distributed={distributed!r} but torch.distributed is not initialised: "
                    "call torch.distributed.init_process_group first (torchrun does it for you)"
                )
            return None
        return Comm(measure, group)

    # -- collectives with a timeout ---------------------------------------------------
    def _wait(self, work: Any, what: str) -> None:
        timeout = datetime.timedelta(seconds=_TIMEOUT_SECONDS)
        try:
            work.wait(timeout=timeout)
        except RuntimeError as e:
            raise PeerError(
                f"{self.measure}: process {self.rank} waited {_TIMEOUT_SECONDS:g} s for the "
                f"other processes ({what}) without an answer, or lost them: every process must "
                "run the same measurement (call it on every rank and write from rank 0: "
                f"samkit.sharpness.is_writer()); {_error_text(e)}"
            ) from e

    def all_reduce(self, t: Tensor, what: str = "sum", group: Any = None) -> Tensor:
        """Sum over this measurement's processes (or over ``group``: a mesh dimension's)."""
        group = self.group if group is None else group
        self._wait(self.dist.all_reduce(t, group=group, async_op=True), what)
        return t

    def all_gather(self, t: Tensor, what: str) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(self.dist.all_gather(out, t, group=self.group, async_op=True), what)
        return out

    # -- agreement ------------------------------------------------------------------------
    def handshake(
        self, settings: Any, seed: int, num_batches: int, dim: int, error: Exception | None
    ) -> None:
        """Compare the call on every process; raise the same error everywhere on any
        mismatch or local error. Sets :attr:`offset` (batches of the lower ranks)."""
        crc = zlib.crc32(repr((self.measure, settings)).encode())
        mine = torch.tensor(
            [int(error is not None), seed, num_batches, dim, crc], dtype=torch.int64
        ).to(self.device)
        rows = torch.stack(self.all_gather(mine, "comparing the settings")).cpu().tolist()
        if any(row[0] for row in rows):
            self._raise_agreed(error, "the arguments")
        problems = []
        for column, name in ((1, "seed"), (3, "number of parameters measured")):
            values = [row[column] for row in rows]
            if len(set(values)) > 1:
                problems.append(f"the {name} differs between processes ({values} by rank)")
        if len({row[4] for row in rows}) > 1:
            problems.append(
                "the settings differ between processes (every process must call "
                f"{self.measure} with the same arguments)"
            )
        empty = [r for r, row in enumerate(rows) if row[2] == 0]
        if empty:
            problems.append(
                f"process(es) {empty} have no batch: a distributed measurement is over the "
                "union of every process's batches, and every process needs at least one "
                "(samkit.sharpness.shard_batches splits a list of batches)"
            )
        if problems:
            raise ValueError(f"{self.measure}: " + "; ".join(problems))
        self.counts = [row[2] for row in rows]
        self.offset = sum(self.counts[: self.rank])

    def _raise_agreed(self, error: BaseException | None, where: str) -> None:
        """Every process raises: the failing one its own error, the others the first failing
        process's error text (as a TypeError/ValueError when it was one, else PeerError)."""
        import torch.distributed as dist

        mine = None if error is None else (type(error).__name__, _error_text(error))
        texts: list[Any] = [None] * self.world
        dist.all_gather_object(texts, mine, group=self.group)
        if error is not None:
            raise error
        first = next(r for r, t in enumerate(texts) if t is not None)
        kind, text = texts[first]
        cls = {"TypeError": TypeError, "ValueError": ValueError}.get(kind)
        if cls is not None:
            raise cls(f"{self.measure}: on process {first}: {text}")
        raise PeerError(f"{self.measure}: process {first} failed in {where}: {text}")

    def check(self, error: Exception | None, flag: float, where: str) -> None:
        """Raise on every process when the summed failure ``flag`` is set."""
        if flag > 0:
            self._raise_agreed(error, where)

    def sum_scalars(
        self, values: Sequence[float], error: Exception | None, where: str
    ) -> list[float]:
        """Sum ``values`` over the processes (float64), with the failure flag."""
        t = torch.tensor([*values, float(error is not None)], dtype=torch.float64)
        t = self.all_reduce(t.to(self.device), where).cpu()
        self.check(error, float(t[-1]), where)
        return t[:-1].tolist()

    def gather_floats(self, values: Sequence[float], where: str) -> list[float]:
        """Every process's ``values`` (of the lengths the handshake recorded), in rank order."""
        longest = max(self.counts)
        pad = torch.full((longest,), math.nan, dtype=torch.float64)
        pad[: len(values)] = torch.tensor(list(values), dtype=torch.float64)
        parts = self.all_gather(pad.to(self.device), where)
        out: list[float] = []
        for n, part in zip(self.counts, parts):
            out.extend(part[:n].cpu().tolist())
        return out


# ----------------------------------------------------------------------------- vectors


class Space:
    """Flat vectors over the measured parameters (this process's elements; see module docs).

    ``params`` are the module's parameters (plain tensors or DTensors); ``compute`` the tensors
    the forward and backward passes see: the parameters themselves, or for DTensors their
    gathered values (set by :meth:`gather_compute`).
    """

    def __init__(self, params: Sequence[Tensor], comm: Comm | None) -> None:
        cls = dtensor_class()
        self.cls = cls
        self.comm = comm
        self.params = list(params)
        self.sharded = cls is not None and any(isinstance(p, cls) for p in self.params)
        self.local = [p.to_local() if self._is_d(p) else p for p in self.params]
        self.numels = [t.numel() for t in self.local]
        self.local_dim = sum(self.numels)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.local[0].dtype
        self.device = self.local[0].device
        self.offsets = np.cumsum([0, *self.numels]).tolist()
        # Elements to sum over processes in dot products, grouped by process groups.
        self.keys: dict[Any, list[int]] = {}
        for i, p in enumerate(self.params):
            key = reduce_key(p, cls, "a parameter", "cannot be measured")
            self.keys.setdefault(key, []).append(i)
        if self.sharded:
            if comm is None:
                raise TypeError(
                    "the model's parameters are sharded (DTensor, e.g. FSDP2's fully_shard): "
                    "they can only be measured by every process together (distributed=None or "
                    "True with torch.distributed initialised), not with distributed=False"
                )
            for p in self.params:
                if self._is_d(p) and p.device_mesh.size() != comm.world:
                    raise TypeError(
                        f"a parameter is sharded over a mesh of {p.device_mesh.size()} "
                        f"processes, but the measurement spans {comm.world}: only meshes of "
                        "every process are supported"
                    )

    def _is_d(self, t: Tensor) -> bool:
        return self.cls is not None and isinstance(t, self.cls)

    # -- layout -----------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Local elements of a list shaped like the parameters (DTensors: their shards)."""
        parts = []
        for t in tensors:
            local = t.to_local() if self._is_d(t) else t
            parts.append(local.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """A list shaped like the parameters (DTensors laid out like them, when sharded)."""
        out = []
        for i, (p, local) in enumerate(zip(self.params, self.local)):
            piece = flat[self.offsets[i] : self.offsets[i + 1]].view(local.shape)
            if self._is_d(p):
                piece = self.cls.from_local(
                    piece, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
            out.append(piece)
        return out

    def check_vectors(self, vectors: Any, name: str) -> Tensor:
        """Validate a user's list of tensors shaped (and, when sharded, laid out) like the
        parameters; returns it as a flat local vector."""
        if isinstance(vectors, Tensor) or not isinstance(vectors, (list, tuple)):
            raise TypeError(
                f"{name} must be a list of tensors shaped like the parameters measured, "
                f"got {type(vectors).__name__}"
            )
        if len(vectors) != len(self.params):
            raise ValueError(
                f"{name} has {len(vectors)} tensors but the model has {len(self.params)} "
                "parameters measured (those that require grad, or the params= selection)"
            )
        for i, (v, p) in enumerate(zip(vectors, self.params)):
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(v).__name__}")
            if v.shape != p.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(v.shape)}, expected {tuple(p.shape)}"
                )
            if self._is_d(p) and not (
                self._is_d(v)
                and tuple(v.placements) == tuple(p.placements)
                and v.device_mesh == p.device_mesh
            ):
                raise ValueError(
                    f"{name}[{i}] must be a DTensor laid out like its parameter "
                    f"({tuple(p.placements)}), got "
                    + (f"{tuple(v.placements)}" if self._is_d(v) else "a plain tensor")
                )
        return self.flatten([v.detach() for v in vectors])

    # -- algebra ----------------------------------------------------------------------------
    def _reduce(self, partial: Tensor, key: Any, what: str) -> Tensor:
        mesh, dims = key
        out = partial.to(self.comm.device) if self.comm is not None else partial
        for d in dims:
            self.comm.all_reduce(out, what, group=mesh.get_group(d))
        return out.to(partial.device)

    def dots(self, rows: Tensor | Sequence[Tensor], z: Tensor) -> np.ndarray:
        """``rows @ z`` over the whole vectors; ``rows`` is a matrix of vectors or a list of
        such blocks (their products are concatenated). One all-reduce per process-group set
        (one for FSDP2, none for plain parameters)."""
        blocks = [rows] if isinstance(rows, Tensor) else list(rows)
        blocks = [r.reshape(-1, self.local_dim) for r in blocks]
        total = torch.zeros(sum(r.shape[0] for r in blocks), dtype=torch.float64, device=z.device)
        for key, idx in self.keys.items():
            if len(self.keys) == 1:  # one layout for all (every plain case; FSDP2)
                part = torch.cat([(r @ z).double() for r in blocks])
            else:
                part = torch.zeros_like(total)
                for i in idx:
                    s = slice(self.offsets[i], self.offsets[i + 1])
                    part += torch.cat([(r[:, s] @ z[s]).double() for r in blocks])
            total += part if key is None else self._reduce(part, key, "dot products")
        return total.cpu().numpy()

    def dot(self, a: Tensor, b: Tensor) -> float:
        return float(self.dots(a.unsqueeze(0), b)[0])

    def pair_dots(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> np.ndarray:
        """``[a_i · b_i]`` with one all-reduce for all pairs."""
        if not a:
            return np.zeros(0)
        A, B = torch.stack(list(a)), torch.stack(list(b))
        if len(self.keys) == 1:
            ((key, _),) = self.keys.items()
            part = (A * B).sum(1).double()
            return (part if key is None else self._reduce(part, key, "dot products")).cpu().numpy()
        total = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
        for key, idx in self.keys.items():
            part = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
            for i in idx:
                s = slice(self.offsets[i], self.offsets[i + 1])
                part += (A[:, s] * B[:, s]).sum(1).double()
            total += part if key is None else self._reduce(part, key, "dot products")
        return total.cpu().numpy()

    def norm(self, a: Tensor) -> float:
        return math.sqrt(max(self.dot(a, a), 0.0))

    # -- random vectors ---------------------------------------------------------------------
    def rand(self, gen: torch.Generator, kind: str = "normal") -> Tensor:
        """A random vector drawn from ``gen``: the whole (unsharded) vector is drawn in
        parameter order, in chunks of 2**20 entries on the CPU in float64; each process keeps
        its elements. The same on every process, and the same as a single process would draw.
        """
        out = torch.empty(self.local_dim, dtype=self.dtype, device=self.device)
        stream = _Stream(gen, kind, self.dim)
        for i, p in enumerate(self.params):
            full = stream.take(p.numel())
            if self._is_d(p):
                from torch.distributed.tensor import distribute_tensor

                piece = distribute_tensor(
                    full.view(p.shape), p.device_mesh, p.placements, src_data_rank=None
                ).to_local()
            else:
                piece = full
            out[self.offsets[i] : self.offsets[i + 1]] = piece.reshape(-1).to(
                device=self.device, dtype=self.dtype
            )
        return out

    # -- products: gathering and reducing ---------------------------------------------------
    def to_compute(self, flat: Tensor) -> list[Tensor]:
        """A flat local vector as tensors shaped like the compute tensors (each DTensor part
        gathered, one parameter at a time)."""
        out = []
        for i, (p, local) in enumerate(zip(self.params, self.local)):
            piece = flat[self.offsets[i] : self.offsets[i + 1]].view(local.shape)
            if self._is_d(p):
                piece = self.cls.from_local(
                    piece, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                ).full_tensor()  # fmt: skip
            out.append(piece)
        return out

    def reduce(
        self,
        partials: Sequence[Sequence[Tensor]],
        scalars: Sequence[float],
        error: Exception | None,
        where: str,
    ) -> tuple[list[Tensor], list[float]]:
        """Sum over processes of per-process partial sums shaped like the compute tensors, and
        of ``scalars``; returns flat local vectors and the summed scalars. One all-reduce
        (replicated parameters) or an all-reduce of the scalars plus one reduce-scatter per
        sharded parameter; ``error`` (this process's exception, if any) is raised on every
        process before the vectors are reduced."""
        comm = self.comm
        if comm is None:
            if error is not None:
                raise error
            flats = [torch.cat([t.reshape(-1) for t in ts]) for ts in partials]
            return flats, list(scalars)
        plain = [i for i, p in enumerate(self.params) if not self._is_d(p)]
        sharded = [i for i, p in enumerate(self.params) if self._is_d(p)]
        head = torch.tensor([*scalars, float(error is not None)], dtype=torch.float64)
        pieces = [t.reshape(-1) for ts in partials for i, t in enumerate(ts) if i in plain]
        if pieces:  # one buffer: the vectors' elements, the scalars, the failure flag
            body = torch.cat(pieces)
            dtype = torch.promote_types(body.dtype, torch.float32)
            buffer = torch.cat([body.to(comm.device, dtype), head.to(comm.device, dtype)])
        else:
            body = None
            buffer = head.to(comm.device)
        comm.all_reduce(buffer, where)
        tail = buffer[-len(head) :].double().cpu()
        comm.check(error, float(tail[-1]), where)
        summed = tail[:-1].tolist()
        flats = [
            torch.empty(self.local_dim, dtype=self.dtype, device=self.device) for _ in partials
        ]
        if body is not None:
            pos = 0
            values = buffer[: body.numel()].to(self.device, self.dtype)
            for flat in flats:
                for i in plain:
                    n = self.numels[i]
                    flat[self.offsets[i] : self.offsets[i + 1]] = values[pos : pos + n]
                    pos += n
        if sharded:
            from torch.distributed.tensor import Partial

            for flat, ts in zip(flats, partials):
                for i in sharded:
                    p = self.params[i]
                    whole = self.cls.from_local(
                        ts[i].contiguous(), p.device_mesh, [Partial()] * p.device_mesh.ndim,
                        run_check=False, shape=p.shape, stride=p.stride(),
                    )  # fmt: skip
                    local = whole.redistribute(p.device_mesh, p.placements).to_local()
                    flat[self.offsets[i] : self.offsets[i + 1]] = local.reshape(-1)
        return flats, summed


class _Stream:
    """Seeded random numbers of a vector of ``total`` entries, drawn in fixed chunks."""

    def __init__(self, gen: torch.Generator, kind: str, total: int) -> None:
        self.gen, self.kind, self.left = gen, kind, total
        self.buf = torch.empty(0, dtype=torch.float64)
        self.pos = 0

    def _draw(self, n: int) -> Tensor:
        g = self.gen
        if self.kind == "normal":
            return torch.randn(n, generator=g, dtype=torch.float64)
        if self.kind == "rademacher":
            return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        if self.kind == "uniform":
            return torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        raise ValueError(self.kind)  # pragma: no cover - internal

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos == self.buf.numel():
                size = min(_CHUNK, self.left)
                self.buf, self.pos, self.left = self._draw(size), 0, self.left - size
            k = min(n, self.buf.numel() - self.pos)
            parts.append(self.buf[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ----------------------------------------------------------------------------- FSDP2


@contextlib.contextmanager
def without_fsdp_hooks(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s forward without FSDP2's forward hooks (which would gather and free the
    parameters around every module and cannot run a double backward: gradients with respect
    to its sharded parameters are None). The measurement passes the gathered parameters
    itself (``functional_call``); the hooks are put back, in order, on exit."""
    saved = []
    for m in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(m, attr)
            drop = [
                key
                for key, hook in hooks.items()
                if str(getattr(hook, "__module__", "")).startswith("torch.distributed.fsdp")
            ]
            if drop:
                saved.append((hooks, hooks.copy()))
                for key in drop:
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, copy in saved:
            hooks.clear()
            hooks.update(copy)


def gather_parameters(model: nn.Module) -> Mapping[str, Tensor]:
    """``{name: whole value}`` of every DTensor parameter of ``model`` (detached)."""
    cls = dtensor_class()
    out = {}
    if cls is None:
        return out
    for name, p in model.named_parameters():
        if isinstance(p, cls):
            out[name] = p.detach().full_tensor()
    return out


def unsupported_wrapper(model: nn.Module) -> str | None:
    """The reason a model cannot be measured, for wrappers that hide the parameters."""
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(fsdp1, "FullyShardedDataParallel", None) if fsdp1 is not None else None
    if cls is not None and any(isinstance(m, cls) for m in model.modules()):
        return (
            "FullyShardedDataParallel (FSDP1) flattens the parameters: use FSDP2's fully_shard "
            "(DTensor parameters), or measure the unwrapped module"
        )
    return None
