"""How large and how stale is LookSAM's reused direction on the embedded benchmark?

LookSAM caches ``g_v``, the part of SAM's gradient ``g_s`` orthogonal to the clean gradient
``g``, every ``k`` steps, and adds ``alpha·‖g‖·g_v/‖g_v‖`` on the steps in between. The
paper's premise is that ``g_v`` changes slowly. This script trains the embedded recipe's
model (MNIST-1D, ``cnn1d``, batch 128, SGD momentum 0.9, wd 5e-4, lr 0.05 cosine over 30
epochs) with LookSAM's update and, as a diagnostic, also computes SAM's gradient at *every*
step (one extra pass, not part of the method) to report per epoch:

* ``gv_over_g``: ‖g_v‖/‖g‖ of the current batch (how large SAM's orthogonal part is; the
  reuse step always adds ``alpha·‖g‖``);
* ``cos_cached_current``: cosine between the cached ``g_v`` and the current batch's own
  ``g_v`` (1 = the premise holds);
* ``cos_cached_g``: cosine between the cached ``g_v`` and the current ``g``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/looksam_reuse.py --epochs 10 --alpha 0.7 \\
        --out benchmarks/results/looksam_reuse_geometry.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

import samkit
from samkit.train.data import add_label_noise, load_dataset
from samkit.train.models import CNN1D


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--epochs", type=int, default=10, help="epochs to trace (of the 30 of the recipe)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    ds = load_dataset("mnist1d")
    x_tr, y_tr = ds.x_train, ds.y_train
    gen = torch.Generator().manual_seed(args.seed)
    y_tr, _ = add_label_noise(y_tr, args.noise, 10, gen)
    torch.manual_seed(args.seed)
    model = CNN1D(1, x_tr.shape[-1], 10, channels=32)  # no BatchNorm: plain passes suffice
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    n, batch = x_tr.shape[0], 128
    steps_per_epoch = math.ceil(n / batch)
    total = 30 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    )

    def grad(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))

    def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return float(sum((s * t).sum() for s, t in zip(a, b)))

    def norm(a: list[torch.Tensor]) -> float:
        return math.sqrt(dot(a, a))

    rows = []
    cached: list[torch.Tensor] | None = None
    step = 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        sums = {"gv_over_g": [], "cos_cached_current": [], "cos_cached_g": []}
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            x, y = x_tr[idx], y_tr[idx]
            g = grad(x, y)
            ng = norm(g)
            unit = [t / (ng + 1e-12) for t in g]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, u in zip(params, unit):
                    p.add_(args.rho * u)
            g_s = grad(x, y)  # the diagnostic pass on reuse steps
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            proj = dot(g_s, unit)
            g_v = [s - proj * u for s, u in zip(g_s, unit)]
            sums["gv_over_g"].append(norm(g_v) / ng)
            if step % args.k == 0:
                cached, update = g_v, g_s
            else:
                assert cached is not None
                nc = norm(cached)
                sums["cos_cached_current"].append(dot(cached, g_v) / (nc * norm(g_v)))
                sums["cos_cached_g"].append(dot(cached, g) / (nc * ng))
                update = [a + args.alpha * ng / (nc + 1e-12) * v for a, v in zip(g, cached)]
            for p, u in zip(params, update):
                p.grad = u
            opt.step()
            sched.step()
            step += 1
        row = {key: sum(v) / len(v) for key, v in sums.items() if v}
        row["epoch"] = epoch + 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "args": vars(args) | {"out": str(args.out)},
        "per_epoch": rows,
        "wall_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "samkit": samkit.__version__,
        "platform": platform.platform(),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
