"""Peak memory of SAF's logit bank at CIFAR-100 and ImageNet-1k sizes, measured.

Usage::

    python benchmarks/saf_bank_memory.py --out benchmarks/results/saf_bank_memory.json
    python benchmarks/saf_bank_memory.py --device cuda --imagenet-scale 1 \\
        --out benchmarks/results/saf_bank_memory_cuda.json

Each configuration runs in a fresh process: ``samkit.SAF`` trains a one-layer model with
``C`` outputs (so almost all memory is the bank) through ``samkit.make_closure`` for
``horizon + 1`` epochs over ``N`` dataset indices in shuffled batches, which fills every slot
of the bank. Measured: the bank's allocated bytes (``opt.bank.nbytes``) and the peak memory
increase of the process over the whole run (host: ``VmHWM`` - ``VmRSS`` before the first
step, from ``/proc/self/status``; CUDA: ``torch.cuda.max_memory_allocated`` - allocated
before the first step). The peak includes the transient of a growth (old and new bank both
exist while the rows are copied), which ``bank_rows=N`` avoids.

The ImageNet-1k bank (1,281,167 × 4 × 1000 values) takes 20.5 GB in float32: on a host
with less memory, ``--imagenet-scale 16`` measures 1/16 of the samples and the JSON also
gives the value scaled back (memory is linear in ``N``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samkit

SIZES = {"cifar100": (50_000, 100), "imagenet1k": (1_281_167, 1000)}


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process."""
    torch.set_num_threads(1)
    device = torch.device(cfg["device"])
    n, classes, horizon, batch = cfg["n"], cfg["classes"], cfg["horizon"], cfg["batch"]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        cfg["bank_dtype"]
    ]
    torch.manual_seed(0)
    model = nn.Linear(16, classes).to(device)
    opt = samkit.SAF(
        model.parameters(),
        lr=0.01,
        momentum=0.9,
        start_epoch=horizon,
        horizon=horizon,
        bank_dtype=dtype,
        bank_rows=n if cfg["announce"] else None,
    )
    x = torch.randn(batch, 16, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    gen = torch.Generator().manual_seed(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(horizon + 1):
        opt.set_epoch(epoch)
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch):
            idx = order[lo : lo + batch]
            k = idx.numel()
            closure = samkit.make_closure(model, loss_fn, x[:k], y[:k], indices=idx)
            opt.step(closure)
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_kib("VmHWM") * 1024 - base
    seconds = time.perf_counter() - t0
    bank = opt.bank
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        **cfg,
        "bank_rows_allocated": int(bank.values.shape[0]),
        "bank_bytes": bank.nbytes,
        "formula_bytes": n * (horizon + 1) * (classes * itemsize + 4),
        "peak_increase_bytes": int(peak),
        "steps": steps,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--imagenet-scale", type=int, default=16, help="measure N / this")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    ap.add_argument("--out", default="benchmarks/results/saf_bank_memory.json")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0

    configs = []
    for size, (n, classes) in SIZES.items():
        scale = args.imagenet_scale if size == "imagenet1k" else 1
        for dtype in args.dtypes:
            for announce in (False, True):
                configs.append(
                    {
                        "size": size,
                        "scale": scale,
                        "n": n // scale,
                        "classes": classes,
                        "horizon": args.horizon,
                        "batch": args.batch,
                        "bank_dtype": dtype,
                        "announce": announce,
                        "device": args.device,
                    }
                )
    results = []
    print(f"{'size':<11} {'scale':>5} {'dtype':<9} {'rows':<9} {'bank MB':>9} {'peak MB':>9}")
    for cfg in configs:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(cfg)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["bank_bytes_full_size"] = res["bank_bytes"] * res["scale"]
        res["peak_increase_bytes_full_size"] = res["peak_increase_bytes"] * res["scale"]
        results.append(res)
        rows = "announced" if res["announce"] else "grown"
        print(
            f"{res['size']:<11} {res['scale']:>5} {res['bank_dtype']:<9} {rows:<9} "
            f"{res['bank_bytes'] / 1e6:9.1f} {res['peak_increase_bytes'] / 1e6:9.1f}",
            flush=True,
        )
    record = {
        "command": "python benchmarks/saf_bank_memory.py " + " ".join(argv or sys.argv[1:]),
        "results": results,
        "torch": torch.__version__,
        "samkit": samkit.__version__,
        "platform": platform.platform(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
