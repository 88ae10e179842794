"""What sharing one random state across the passes of a step costs (``share_rng``).

Usage::

    python benchmarks/rng_share_cost.py
    python benchmarks/rng_share_cost.py --device cuda --batch 256 --rounds 200

Two measurements in one run:

* the bookkeeping itself: the time of one SAM step's worth of generator calls (two reads and
  two writes of the global random state: ``torch.get_rng_state`` / ``set_rng_state`` and
  the CUDA generators of the parameters' devices), timed in a tight loop;
* whole SAM steps on a small MLP with dropout, ``share_rng=True`` against ``False``, rounds
  interleaved (one step of each in turn, so machine noise hits both alike); the figure is the
  median of the per-round ratios.

Prints a table and saves JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

import samkit
from samkit.optim._rng import get_global_state, set_global_state


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mlp(device: torch.device, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(40, width), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(width, 10),
    ).to(device)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/rng_share_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = [device] if device.type == "cuda" else []

    # 1. the bookkeeping of one SAM step: read, read, write, write
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        first = get_global_state(cuda)
        resume = get_global_state(cuda)
        set_global_state(first, cuda)
        set_global_state(resume, cuda)
    per_step_us = (time.perf_counter() - t0) / n * 1e6

    # 2. whole SAM steps, share_rng on and off, interleaved
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 40, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs = {}
    for share in (True, False):
        model = mlp(device, args.width)
        opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.05, momentum=0.9, share_rng=share)
        runs[share] = (model, opt)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.warmup + args.rounds):
        for share, (model, opt) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            opt.step(samkit.make_closure(model, loss_fn, x, y))
            sync(device)
            if r >= args.warmup:
                times[share].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times[True], times[False])]
    result = {
        "benchmark": "rng_share_cost",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "width": args.width,
        "rounds": args.rounds,
        "rng_bookkeeping_us_per_step": per_step_us,
        "sam_step_ms_share_rng": statistics.median(times[True]) * 1e3,
        "sam_step_ms_fresh_masks": statistics.median(times[False]) * 1e3,
        "median_ratio_share_over_fresh": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4),
    }  # fmt: skip
    print(f"device {result['device_name']}, torch {result['torch']}, "
          f"{result['threads']} thread(s)")  # fmt: skip
    print(f"random-state bookkeeping per SAM step: {per_step_us:.2f} us")
    print(f"SAM step, share_rng=True : {result['sam_step_ms_share_rng']:.3f} ms (median)")
    print(f"SAM step, share_rng=False: {result['sam_step_ms_fresh_masks']:.3f} ms (median)")
    q = result["ratio_quartiles"]
    print(f"median per-round ratio True/False: {result['median_ratio_share_over_fresh']:.4f} "
          f"(quartiles {q[0]:.4f} .. {q[2]:.4f})")  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
