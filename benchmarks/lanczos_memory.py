"""Bounded-memory Lanczos: λ₁ with at most 20 Lanczos vectors (thick restart) against full
reorthogonalisation, on a model with more than a million parameters, with peak memory.

Model: an MLP 784 → 1024 → 512 → 10 (tanh; 1,333,770 parameters), float64, trained for
``--steps`` SGD steps on synthetic data labelled by a random teacher; the Hessian of the mean
cross-entropy on one batch of 256 held-out samples (eval mode). Each configuration runs in a
fresh process, so that its peak resident memory (``ru_maxrss``) is its own:

* ``full``: ``top_eigenvalues(k=1, tol, max_iter)``, every Lanczos vector kept;
* ``bounded``: the same with ``max_vectors=20`` (thick restart);
* ``baseline``: the same with ``max_iter=2`` (two vectors): the memory of the model, the data
  and the first-order graph, which both runs also hold.

Prints and saves λ₁ of each, their relative difference, HVPs, seconds, peak memory, and the
peak memory above the baseline against the size of the vectors held (``vectors × D × 8``
bytes).

Usage:  python benchmarks/lanczos_memory.py [--tol 1e-10] [--max-iter 300] [--bound 20]
            [--out benchmarks/results/lanczos_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import nn

import samkit.sharpness as S


def make(steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)
    )
    teacher = nn.Sequential(nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 9, 784, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        i = slice(256 * (step % 8), 256 * (step % 8 + 1))
        opt.zero_grad()
        loss_fn(model(x[i]), y[i]).backward()
        opt.step()
    return model.double().eval(), [(x[-256:].double(), y[-256:])]


def child(kind: str, args) -> dict:
    torch.set_num_threads(args.threads)
    model, data = make(args.steps)
    dim = sum(p.numel() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kw = {"max_iter": args.max_iter, "tol": args.tol, "seed": 0}
    if kind == "bounded":
        kw["max_vectors"] = args.bound
    if kind == "baseline":
        kw["max_iter"] = 2
    t0 = time.perf_counter()
    r = S.top_eigenvalues(model, nn.CrossEntropyLoss(), data, 1, **kw)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    held = min(r.num_hvp, args.bound) if kind == "bounded" else r.num_hvp
    return {
        "kind": kind,
        "dim": dim,
        "lambda_max": r.eigenvalues[0],
        "num_hvp": r.num_hvp,
        "converged": r.converged,
        "seconds": seconds,
        "peak_rss_mib": peak / 1024,
        "rss_before_mib": before / 1024,
        "vectors_held": held,
        "vectors_mib": held * dim * 8 / 2**20,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/lanczos_memory.json")
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--bound", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=["full", "bounded", "baseline"])
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    runs = {}
    for kind in ("baseline", "full", "bounded"):
        cmd = [sys.executable, __file__, "--child", kind] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[kind] = json.loads(out.strip().splitlines()[-1])
        r = runs[kind]
        print(
            f"{kind:9s} λ₁ = {r['lambda_max']:.12g}  HVPs {r['num_hvp']:4d}  "
            f"{r['seconds']:.0f} s  peak {r['peak_rss_mib']:.0f} MiB  "
            f"(vectors held {r['vectors_held']}: {r['vectors_mib']:.0f} MiB)",
            flush=True,
        )
    full, bounded, base = runs["full"], runs["bounded"], runs["baseline"]
    result = {
        "command": "python benchmarks/lanczos_memory.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "tol": args.tol,
        "bound": args.bound,
        "runs": runs,
        "relative_difference": abs(bounded["lambda_max"] - full["lambda_max"])
        / abs(full["lambda_max"]),
        "extra_peak_mib": {
            k: runs[k]["peak_rss_mib"] - base["peak_rss_mib"] for k in ("full", "bounded")
        },
    }
    print(
        f"relative difference {result['relative_difference']:.2e}; peak above the baseline: "
        f"full {result['extra_peak_mib']['full']:.0f} MiB, bounded "
        f"{result['extra_peak_mib']['bounded']:.0f} MiB"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
