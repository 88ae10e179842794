"""Step time of SAM relative to SGD under 2-process DDP and FSDP2 (gloo, CPU), interleaved.

Usage::

    python benchmarks/ddp_step_time.py                  # 2 processes, small ResNet, 16x16
    python benchmarks/ddp_step_time.py --rounds 40 --batch 32 --width 16

Two processes (one thread each) train the same architecture with every optimizer in turn:
each round times one step of each (a barrier before every timed step, the time taken on rank
0), so machine noise hits them alike; the figures are medians of per-round ratios.

* ``ddp_sam / ddp_sgd``: samkit SAM at its defaults (the ascent pass local, in ``no_sync()``;
  the update pass all-reduced; the finiteness flags agreed with one all-reduce of one number)
  against DDP SGD. Target (issue 13): <= 2.05.
* ``ddp_sam_sync / ddp_sgd``: SAM with ``sync_ascent=True`` (both passes all-reduced).
* ``fsdp_sam / fsdp_sgd``: both on an FSDP2 (``fully_shard``) model: FSDP2 all-gathers the
  weights and reduce-scatters the gradients in every pass, and SAM's norms reduce shards.

Results are printed and saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import samkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import small_resnet  # noqa: E402

KINDS = ("ddp_sgd", "ddp_sam", "ddp_sam_sync", "fsdp_sgd", "fsdp_sam")
TARGETS = {"ddp_sam_over_ddp_sgd": 2.05}


def _build(kind: str, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = small_resnet(width)
    if kind.startswith("ddp"):
        model = nn.parallel.DistributedDataParallel(model)
    else:
        for block in list(model)[2:-3]:  # the residual blocks, then the whole model
            fully_shard(block)
        fully_shard(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if kind.endswith("sgd"):
        return model, torch.optim.SGD(model.parameters(), **kw)
    return model, samkit.SAM(
        model.parameters(), "sgd", rho=0.05, sync_ascent=kind.endswith("sync"), **kw
    )


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )  # fmt: skip
    try:
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        loss_fn = nn.CrossEntropyLoss(reduction="none")
        runs = {kind: _build(kind, args.width) for kind in KINDS}

        def step(kind: str) -> None:
            model, opt = runs[kind]
            closure = samkit.make_closure(model, loss_fn, x, y)
            opt.step(closure)  # plain SGD runs the closure's one pass, then steps

        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for r in range(args.warmup + args.rounds):
            for kind in KINDS:
                dist.barrier()
                t0 = time.perf_counter()
                step(kind)
                elapsed = time.perf_counter() - t0
                if r >= args.warmup:
                    times[kind].append(elapsed)
        if rank == 0:
            torch.save(times, out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="input height/width")
    ap.add_argument("--batch", type=int, default=32, help="samples per process")
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/ddp_step_time.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as folder:
        init = "file://" + os.path.join(folder, "rendezvous")
        raw = os.path.join(folder, "times.pt")
        mp.start_processes(
            _worker, args=(args.world, init, args, raw), nprocs=args.world, start_method="spawn"
        )
        times = torch.load(raw)

    def ratio(a: str, b: str) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    model = small_resnet(args.width)
    result = {
        "command": "python benchmarks/ddp_step_time.py " + " ".join(argv or sys.argv[1:]),
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "processes": args.world,
        "threads_per_process": 1,
        "backend": "gloo",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "model": f"small_resnet(width={args.width}), "
        f"{len(list(model.parameters()))} tensors, {sum(p.numel() for p in model.parameters())} "
        "params",
        "input_per_process": [args.batch, 3, args.size, args.size],
        "rounds": args.rounds,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "ddp_sam_over_ddp_sgd": ratio("ddp_sam", "ddp_sgd"),
        "ddp_sam_sync_over_ddp_sgd": ratio("ddp_sam_sync", "ddp_sgd"),
        "fsdp_sam_over_fsdp_sgd": ratio("fsdp_sam", "fsdp_sgd"),
        "fsdp_sgd_over_ddp_sgd": ratio("fsdp_sgd", "ddp_sgd"),
    }
    result["targets"] = {
        k: {"target": v, "value": result[k], "met": result[k] <= v} for k, v in TARGETS.items()
    }
    print(
        f"{result['model']}, input {result['input_per_process']} per process, "
        f"{args.world} processes x 1 thread (gloo, CPU), {args.rounds} rounds, "
        f"load average {result['load_average_1min']}"
    )
    for k, v in result["median_step_s"].items():
        print(f"  median {k:14s} {v * 1e3:8.2f} ms")
    for k in ("ddp_sam_over_ddp_sgd", "ddp_sam_sync_over_ddp_sgd", "fsdp_sam_over_fsdp_sgd"):
        line = f"  {k:28s} {result[k]:.3f}"
        if k in TARGETS:
            t = result["targets"][k]
            line += f"  (target <= {t['target']}: {'met' if t['met'] else 'NOT met'})"
        print(line)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
