"""Cost of zeroing every gradient a pass will write (the autograd-graph walk of BatchClosure).

Usage::

    python benchmarks/closure_zeroing.py                  # CIFAR ResNet-18, batch 8, 32x32
    python benchmarks/closure_zeroing.py --batch 32 --rounds 10

Before each micro-batch's backward, ``BatchClosure`` walks the backward graph from the
objective and sets ``.grad = None`` on every leaf it reaches (so a loss module's parameter, or
any tensor captured by the loss, starts the pass clean). Per round this script times

* the walk alone on a ResNet-18 graph (median of 50 walks over the same graph), and
* one SAM step through ``make_closure``, with the walk on and, in turn, replaced by a no-op,

and reports the walk's share of a SAM step (two walks per step: one per pass) and the ratio of
the two step times, medians over rounds measured in this one run.
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
import samkit.optim.closure as closure_module
from samkit.train.models import ResNet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/closure_zeroing.json")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = ResNet(3, 10, (2, 2, 2, 2), width=64)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    crit = nn.CrossEntropyLoss(reduction="none")
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.01, momentum=0.9)
    walk = closure_module._zero_new_leaves

    loss = crit(model(x), y).mean()
    nodes: set = set()
    stack = [loss.grad_fn]
    while stack:  # count the graph's nodes, for the record
        for node, _ in stack.pop().next_functions:
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.append(node)

    walks, with_walk, without_walk = [], [], []
    for r in range(args.rounds + 1):
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            walk(loss, set())
            times.append(time.perf_counter() - t0)
        for on in (True, False) if r % 2 else (False, True):
            closure_module._zero_new_leaves = walk if on else (lambda root, zeroed: None)
            t0 = time.perf_counter()
            opt.step(samkit.make_closure(model, crit, x, y))
            (with_walk if on else without_walk).append(time.perf_counter() - t0)
        closure_module._zero_new_leaves = walk
        if r:  # round 0 warms up
            walks.append(statistics.median(times))
        else:
            with_walk.clear()
            without_walk.clear()
    walk_ms = statistics.median(walks) * 1e3
    step_ms = statistics.median(with_walk) * 1e3
    ratios = [a / b for a, b in zip(with_walk, without_walk)]
    result = {
        "benchmark": "closure_zeroing",
        "model": "CIFAR ResNet-18 (samkit.train.models.ResNet, width 64)",
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "graph_nodes": len(nodes),
        "parameter_tensors": len(list(model.parameters())),
        "walk_ms_median": walk_ms,
        "sam_step_ms_median": step_ms,
        "walk_share_of_sam_step": 2 * walk_ms / step_ms,
        "step_with_walk_over_without_median": statistics.median(ratios),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for k, v in result.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
