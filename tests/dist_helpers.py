"""Run a function in several CPU processes (gloo) for the DDP and FSDP2 tests.

One launch per test module (a module-scoped fixture) keeps the cost of starting processes,
which import torch, to one per file. What made the earlier launcher fail about one run in
ten on a loaded machine, and what this one does instead:

* the rendezvous went through a TCP port chosen by binding port 0, closing the socket and
  handing the number to the workers, which bind it again seconds later (importing torch in a
  spawned process takes seconds under load): any other process on the machine may take the
  port in between, and two test runs may even meet on one store. Here the processes meet in
  a file (``FileStore``, ``init_method="file://..."``) in the test's own temporary folder:
  no port is chosen, nothing is shared between runs;
* gloo picked its network interface from the host name, which in containers may resolve to
  an address other than loopback; here it is pinned to loopback (``GLOO_SOCKET_IFNAME=lo``
  on Linux, unless set);
* every process used as many threads as cores, next to the other tests; here one thread
  (``OMP_NUM_THREADS=1`` before the workers import torch, and ``torch.set_num_threads(1)``);
* a hang (a collective that one rank never reaches) waited for gloo's default 30 minutes;
  here collectives time out after ``timeout`` seconds, so a broken test fails instead.

* a worker aborted at exit now and then (``terminate called without an active
  exception``): gloo's threads were still alive when the interpreter shut down, and one
  that needed the GIL to drop a tensor was ended inside C++ code. Here the group is left in
  order, as ``samkit train`` leaves it: a barrier, the workers' models collected, then the
  group destroyed, which joins its threads (``samkit.train.distributed.processes``).

A worker's exception reaches the test through ``torch.multiprocessing`` (with its
traceback); the other processes are then terminated.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import sys
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import samkit

#: Seconds a collective may wait for the other processes before the test fails.
TIMEOUT = 180


def launch(fn: Callable[..., None], world: int, *args: Any, timeout: float = TIMEOUT) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes joined in a gloo group.

    ``fn`` must be importable by name (a module-level function of a test module). The group
    is created before and destroyed after ``fn``; results go through files (``args``).
    """
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the workers when they start (spawn copies the env)
    try:
        with tempfile.TemporaryDirectory(prefix="samkit-dist-") as folder:
            init = "file://" + os.path.join(folder, "rendezvous")
            mp.start_processes(
                _entry,
                args=(fn, world, init, timeout, args),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_and_load(fn: Callable[..., None], world: int, out_dir: Any) -> list[dict]:
    """:func:`launch` ``fn(rank, world, str(out_dir))``, which saves ``out_dir/rank{r}.pt``
    on each process; the saved results, one per process."""
    launch(fn, world, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def method_results(results: dict, label: str) -> dict:
    """A worker's results for one method (``results["methods"][label]``); the method's test
    fails with the worker's traceback if the worker recorded an error for it."""
    import pytest

    entry = results["methods"][label]
    if "error" in entry:
        pytest.fail(f"{label} failed in a worker:\n{entry['error']}")
    return entry


def _entry(
    rank: int, fn: Callable[..., None], world: int, init: str, timeout: float, args: tuple
) -> None:
    torch.set_num_threads(1)
    # Before the group exists: its functions' group=group.WORLD defaults would hold the group
    # (and its threads) until the interpreter exits (samkit.train.distributed.processes).
    importlib.import_module("torch.distributed.nn")

    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    fn(rank, world, *args)  # an error: the launcher reports it and ends the processes
    dist.barrier()  # nobody tears the group down while another still uses it
    # fn's models are gone (collect their cycles: DDP holds the group), so destroying the
    # group joins its threads now, while Python is alive, not in the interpreter's shutdown.
    group = weakref.ref(dist.group.WORLD)
    gc.collect()
    dist.destroy_process_group()
    if group() is not None:
        # Still held, so its threads live on: by DTensor's caches of sharding plans, which
        # keep FSDP2's device mesh. This worker's results are saved; it ends without the
        # interpreter's shutdown, where such a thread could abort it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def gather_full(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter of ``model`` as a whole tensor (sharded ones gathered), detached."""
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


class PoisonedLoss:
    """Per-sample cross-entropy that a test can make non-finite on one process.

    ``poison`` (a float or ``None``) applies to the calls of ``loss_fn`` while it is set,
    or only to call number ``only_call`` (0 for the first call after :meth:`arm`). A NaN is
    *added* to every sample's loss: the loss is NaN but the gradients stay finite (only the
    loss check can see it). An inf *multiplies* the losses: loss and gradients are non-finite.
    """

    def __init__(self) -> None:
        self.poison: float | None = None
        self.only_call: int | None = None
        self.calls = 0

    def arm(self, poison: float | None, only_call: int | None = None) -> None:
        self.poison, self.only_call, self.calls = poison, only_call, 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
        call, self.calls = self.calls, self.calls + 1
        if self.poison is None or (self.only_call is not None and call != self.only_call):
            return losses
        if self.poison != self.poison:  # NaN: the loss only
            return losses + torch.tensor(self.poison, dtype=losses.dtype)
        return losses * self.poison


class SubsetSAM(samkit.SAM):
    """SAM whose perturbed (last) pass runs on the first half of the batch.

    A stand-in for the methods whose last pass runs on a subset (ESAM's selected samples,
    AUSAM's sample): their checks see only part of the batch.
    """

    method_name = "subset-sam"

    def sharpness_step(self, closure):
        loss = self.run_pass(closure, "clean")
        self.perturb()
        half = torch.arange(closure.batch_size // 2)
        self.run_pass(closure, "perturbed", perturbed=True, subset=half)
        self.restore()
        self.base_step()
        return loss


def method_class(label: str) -> type:
    """A registered method's class, or the test-local :class:`SubsetSAM`."""
    return SubsetSAM if label == SubsetSAM.method_name else samkit.get_optimizer_info(label).cls
