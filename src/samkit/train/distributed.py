"""``samkit train`` on several processes: torchrun's environment, the process group, and the
few collective operations the loop needs.

Launched by ``torchrun --nproc-per-node N -m samkit train ...`` (or ``python -m
torch.distributed.run``), every process runs the same command; the variables torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) tell each one its place. :func:`processes` joins the
process group (gloo on a CPU, nccl on GPUs, each process on ``cuda:LOCAL_RANK``) and gives a
:class:`Processes` object; with one process it is a stand-in whose operations do nothing, so
the loop reads the same either way.

What differs under several processes, and only there:

* the training loader gives each process its share of every global batch
  (:meth:`Processes.shard`), and the test set is split between the processes;
* the model the steps run through is wrapped in ``DistributedDataParallel``;
* the epoch's loss and accuracy are sums and counts added over the processes
  (:meth:`Processes.sum`) before they are divided;
* only rank 0 writes the run directory and prints; a checkpoint holds the random state of
  every process and the optimizer state of every process whose state differs from rank 0's
  (:meth:`Processes.gather`);
* setup errors are agreed on (:meth:`Processes.agree`): every process stops with the same
  error instead of waiting for a peer that has already stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from samkit.train.checkpoint import CheckpointError
from samkit.train.config import ConfigError

__all__ = [
    "Launch",
    "PeerFailure",
    "Processes",
    "launch_from_env",
    "leave_process_group",
    "processes",
]

T = TypeVar("T")

#: The process group :func:`processes` joined, until :func:`leave_process_group` leaves it
#: (weakly: a reference would keep the group, and its threads, alive).
_joined: weakref.ReferenceType[Any] | None = None


class PeerFailure(RuntimeError):
    """Another process of the run failed; its own message says why."""


#: Errors a user fixes: every process raises the same class (see :meth:`Processes.agree`).
_USER_ERRORS: dict[str, type[Exception]] = {
    "ConfigError": ConfigError,
    "CheckpointError": CheckpointError,
}


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in the run: ``rank`` of ``world_size``, ``local_rank`` on
    its machine (its GPU). One process: ``Launch()``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Any, name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"invalid {name} in the environment: {text!r} (an integer)") from None


def launch_from_env(environ: Any = None) -> Launch:
    """The :class:`Launch` that torchrun's variables describe, or the process group the
    caller already joined (``torch.distributed.init_process_group``); ``Launch()`` when
    neither says there are several processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        env = os.environ if environ is None else environ
        return Launch(
            world_size=dist.get_world_size(),
            rank=dist.get_rank(),
            local_rank=_env_int(env, "LOCAL_RANK", 0),
        )
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ConfigError(
            f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local_rank}"
        )
    return Launch(world_size=world, rank=rank, local_rank=local_rank)


def check_launch(launch: Launch, batch_size: int, device: str) -> None:
    """ConfigError for settings that cannot be split over ``launch``'s processes (every
    process finds the same error, before any of them joins the group)."""
    w = launch.world_size
    if not launch.distributed:
        return
    if batch_size % w:
        lower, upper = max(w, batch_size - batch_size % w), batch_size + w - batch_size % w
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the "
            f"number of processes ({w}): each process takes an equal share; use {lower} or "
            f"{upper}"
        )
    check_launch_device(launch, device)


def check_launch_device(launch: Launch, device: str) -> None:
    """ConfigError for a device that ``launch``'s processes cannot share (one GPU named for
    all of them), or several processes without ``torch.distributed``."""
    w = launch.world_size
    if not launch.distributed:
        return
    if device.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} names one GPU, but {w} processes run: pass --device cuda "
            "(or auto), and each process uses cuda:LOCAL_RANK"
        )
    if not (torch.distributed.is_available()):
        raise ConfigError(f"{w} processes need torch.distributed, which this torch lacks")


def device_for(launch: Launch, name: str) -> str:
    """The device name of this process: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` with
    several processes and a GPU, ``name`` otherwise."""
    if launch.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank}"
    return name


class Processes:
    """The processes of a run and the collective operations of the loop.

    With one process every operation is the identity (``sum`` returns its input, ``agree``
    runs the function, ``gather`` returns ``[obj]``), so single-process code pays nothing.
    """

    def __init__(self, launch: Launch, device: torch.device, backend: str | None = None):
        self.launch = launch
        self.device = device
        self.backend = backend

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    def _comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU under nccl, the CPU under gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: list[float | int]) -> list[float | int]:
        """``values`` added over the processes (float64 for floats, int64 for integers)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        dev = self._comm_device()
        floats = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        ints = torch.tensor([int(v) for v in values], dtype=torch.int64, device=dev)
        dist.all_reduce(floats)
        dist.all_reduce(ints)
        return [
            int(i) if isinstance(v, int) else float(f)
            for v, f, i in zip(values, floats.tolist(), ints.tolist())
        ]

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process; if it raises on any of them, raise on all of them.

        ``fn`` must not run collectives itself. The process whose ``fn`` raised re-raises its
        own exception; the others raise an error of the same class when it is one a user
        fixes (ConfigError, CheckpointError), else :class:`PeerFailure`, with the message of
        the first failing rank (prefixed with that rank unless it is 0). Every exception
        raised here carries ``samkit_agreed = True``: the CLI prints it once, on rank 0.
        One all-gather of a short string per call.
        """
        error: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
        if not self.distributed:
            if error is not None:
                raise error
            return result
        import torch.distributed as dist

        mine = None if error is None else (type(error).__name__, str(error))
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, mine)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return result
        rank, (kind, message) = failed[0]
        if error is None or rank != self.rank:
            text = message if rank == 0 else f"rank {rank} of {self.world_size}: {message}"
            error = _USER_ERRORS.get(kind, PeerFailure)(text)
        error.samkit_agreed = True  # type: ignore[attr-defined]
        raise error

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Around a :mod:`samkit.sharpness` measurement that every process runs on its share
        of the data: the errors such a measurement raises on every process — ValueError and
        TypeError (a bad setting, or another process's, whose message it quotes) and
        :class:`~samkit.sharpness.PeerError` (another process failed, or did not answer in
        time; its message names that process and its error) — become :class:`PeerFailure`
        marked ``samkit_agreed``: the CLI prints it once, on rank 0. With one process
        nothing changes. A process whose own exception is of another kind (a bug) raises it
        as it is; the others learn of it as a PeerError."""
        if not self.distributed:
            yield
            return
        from samkit.sharpness import PeerError

        try:
            yield
        except (ValueError, TypeError, PeerError) as e:
            error = PeerFailure(" ".join(str(e).split()))
            error.samkit_agreed = True  # type: ignore[attr-defined]
            raise error from e

    def gather(self, obj: Any) -> list[Any] | None:
        """Rank 0 gets ``[obj of rank 0, obj of rank 1, ...]``; the others get ``None``."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def gather_differing(self, obj: Any) -> list[Any] | None:
        """Like :meth:`gather`, but only the objects that differ from rank 0's travel: rank 0
        gets ``[None, obj of rank 1 or None, ...]`` (``None`` where equal to its own).

        Equality is judged on a digest of the contents (tensors bit for bit), exchanged
        first; so a state every process shares (the optimizer's momentum) is sent once."""
        if not self.distributed:
            return [None]
        import torch.distributed as dist

        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, _digest(obj))
        differs = self.rank > 0 and digests[self.rank] != digests[0]
        return self.gather(obj if differs else None)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics).

        Each process updates its statistics from its own share of the batch; DDP copies
        rank 0's at the start of every training forward pass, and this copies them at the
        end of an epoch, so every process evaluates, and rank 0 saves, the same model.
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` under several processes, else ``model``."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, n: int) -> tuple[int, int]:
        """This process's contiguous share ``[lo, hi)`` of ``n`` items (sizes differ by at
        most one; for the test set, whose sums are added over the processes)."""
        w, r = self.world_size, self.rank
        return r * n // w, (r + 1) * n // w


@contextlib.contextmanager
def processes(launch: Launch, device: torch.device) -> Iterator[Processes]:
    """Join the process group ``launch`` describes for the duration (nothing to join for
    one process). A group the caller already joined is used and left as it is.

    A group joined here must not keep a thread alive into the interpreter's shutdown: gloo
    runs collectives on worker threads, and a worker that drops its reference to a tensor
    Python also holds takes the GIL to do so; if the interpreter has begun to shut down by
    then, Python ends that thread inside C++ code and the process aborts (``terminate called
    without an active exception``, SIGABRT), after the run has finished. The group's threads
    are joined when its last reference goes, so it is left in this order: after the run, a
    barrier (no process tears down while another still communicates), then the run's
    objects are collected (the DDP model holds the group) and the group is destroyed, which
    joins its threads while Python is alive. After an error the group stays joined: the
    run's objects live as long as the error, and the group must go after them
    (:func:`leave_process_group`, which ``samkit train`` calls once it has reported the error).
    """
    if not launch.distributed:
        yield Processes(launch, device)
        return
    import torch.distributed as dist

    # torch.distributed.nn's functions take group=group.WORLD as a default argument: imported
    # after the group exists (DDP imports it), they would hold it, and its threads, until
    # the interpreter exits. Imported first, they hold None.
    importlib.import_module("torch.distributed.nn")

    if dist.is_initialized():
        yield Processes(launch, device, str(dist.get_backend()))
        return
    global _joined
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    _joined = weakref.ref(dist.group.WORLD)
    yield Processes(launch, device, backend)  # after an error the group stays (see above)
    try:
        dist.barrier(device_ids=[torch.cuda.current_device()] if backend == "nccl" else None)
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Leave the default process group if :func:`processes` joined it, once nothing else
    holds it: collect what is left of a run in reference cycles (a DDP model holds the
    group), then destroy the group, which joins its threads (see :func:`processes`). Waits
    for no other process. A group samkit did not join (the caller's) is left as it is.

    After a run that raised under several processes, call it once the error is dropped
    (the error's traceback holds the run); ``samkit train`` does.
    """
    global _joined
    import torch.distributed as dist

    gc.collect()
    ours, _joined = _joined, None
    if (
        ours is not None
        and dist.is_available()
        and dist.is_initialized()
        and ours() is dist.group.WORLD
    ):
        dist.destroy_process_group()


def _digest(obj: Any) -> str:
    """A SHA-256 of nested containers of tensors and plain values (tensors by dtype, shape
    and bytes; dict entries in their order)."""
    import hashlib

    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"{")
            for k, v in o.items():
                h.update(repr(k).encode())
                walk(v)
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()
