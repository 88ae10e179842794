"""Reproduce the abort of a gloo process at exit, and show the order that prevents it.

A gloo worker thread drops its reference to a tensor that Python also holds (the tensor of the
last collective) by taking the GIL. If the interpreter has begun to shut down when it gets the
GIL, Python ends the thread inside C++ code and the process aborts: ``terminate called
without an active exception``, SIGABRT, exit status 134, after all its work is done. Under
load it happens now and then (issue 20.0: ``samkit train`` under torchrun, the distributed
tests); here the window is widened so it happens often: each process runs on one core and the
GIL's switch interval is 30 s from the last collective on, so a worker that lost the race for
the GIL gets it only during the shutdown.

    python tools/gloo_exit_abort.py --launches 20            all three orders, 20 launches each
    python tools/gloo_exit_abort.py --orders samkit --launches 40

Orders: ``exit`` (the group is never destroyed), ``destroy`` (``destroy_process_group()`` while
the DDP model lives: samkit train's order before the fix; torch.distributed.nn, imported by DDP
after the group exists, also keeps the group alive through its default arguments), ``samkit``
(``samkit.train.distributed.processes``'s order: torch.distributed.nn imported before the group,
then a barrier, the model collected, and ``destroy_process_group()``, which joins the group's
threads while Python is alive). Linux (``taskset``), 2 CPU processes per launch.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import subprocess
import sys
import tempfile

ORDERS = ("exit", "destroy", "samkit")


def worker(order: str, rank: int, init: str) -> None:
    import torch
    import torch.distributed as dist

    if order == "samkit":
        importlib.import_module("torch.distributed.nn")
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.ones(8, 4)).sum().backward()
    sys.setswitchinterval(30)  # from here on, the main thread keeps the GIL
    t = torch.ones(3)
    dist.all_reduce(t)  # the last collective, on a tensor Python holds
    if order == "destroy":
        dist.destroy_process_group()
    elif order == "samkit":
        del model
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def launch(order: str) -> tuple[int, int]:
    """One 2-process launch; the exit statuses of the two processes."""
    with tempfile.TemporaryDirectory() as folder:
        init = "file://" + os.path.join(folder, "rendezvous")
        procs = [
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(rank % (os.cpu_count() or 1)),
                    sys.executable,
                    __file__,
                    "--worker",
                    order,
                    str(rank),
                    init,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for rank in (0, 1)
        ]
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=300))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes[0], codes[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        order, rank, init = args.worker
        worker(order, int(rank), init)
        return
    for order in args.orders:
        failed = 0
        for _ in range(args.launches):
            codes = launch(order)
            failed += any(c != 0 for c in codes)
            if any(c != 0 for c in codes):
                print(f"  {order}: exit statuses {codes[0]} {codes[1]}", flush=True)
        print(f"{order}: {failed} of {args.launches} launches failed", flush=True)


if __name__ == "__main__":
    main()
