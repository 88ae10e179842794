"""Every registered method on one GPU: step time over SGD and peak memory, then the CUDA tests.

Usage::

    python benchmarks/gpu_suite.py --out gpu_suite.json          # one GPU, unattended
    python benchmarks/gpu_suite.py --device cpu --quick --out x.json   # dry run, no GPU

Model and data: ``step_time.py``'s ResNet-18-shaped network (4 stages x 2 basic blocks,
first stage 64 channels, BatchNorm) on CIFAR-shaped synthetic batches (128 x 3 x 32 x 32,
10 classes), every method with SGD (lr 0.05, momentum 0.9, weight decay 5e-4) as its base
and its class defaults, driven through ``samkit.make_closure`` with dataset indices as
``samkit train`` does; the epoch advances every 8 steps (``set_epoch``), starting past
SAF's and MESA's ``start_epoch``.

For each precision (float32, then bfloat16 autocast), every method trains its own copy of
the model; rounds are interleaved (one step of every method in turn, SGD included), so
machine noise hits all alike. Reported per method: the median over rounds of its step time
over SGD's in the same round, the median step time, and the peak CUDA memory of a step
(``torch.cuda.max_memory_allocated`` above the memory allocated at the step's start, the
largest over the measured steps; also as a ratio to SGD's). A method that raises is
recorded with its error and the suite goes on. Then ``tests/optim/test_cuda.py`` runs
(pytest), and its outcome is saved too.

Budget: about 14 methods x 2 precisions x (3 warm-up + 20 rounds) steps of ResNet-18 at
batch 128, well under the 8 minutes allowed on one GPU. ``--quick`` shrinks everything (a
narrow network, batches of 8 at 8 x 8, one warm-up step and one round, one thread) for a dry run of the whole path on a
CPU; its numbers mean nothing. Without CUDA and without ``--device cpu`` it exits with one
line and status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samkit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_time import small_resnet, sync  # noqa: E402

FIRST_EPOCH = 10  # past SAF's and MESA's default start_epoch
STEPS_PER_EPOCH = 8
BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def methods() -> list[str]:
    """SGD, then every registered sharpness-aware method at its class defaults."""
    return ["sgd", *samkit.list_optimizers(sharpness_aware=True)]


def build(name: str, model: nn.Module) -> Any:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **BASE)
    return samkit.create_optimizer(name, model.parameters(), model=model, **BASE)


def make_step(name: str, opt: Any, model: nn.Module, loss_fn: Any, autocast: Any):
    """One training step of ``opt`` on a batch ``(x, y, idx)``, as ``samkit train`` runs it."""
    device_type = next(model.parameters()).device.type

    def step(x, y, idx):
        if name == "sgd":
            opt.zero_grad(set_to_none=True)
            if autocast is None:
                loss = loss_fn(model(x), y).mean()
            else:
                with torch.autocast(device_type=device_type, dtype=autocast):
                    loss = loss_fn(model(x), y).mean()
            loss.backward()
            opt.step()
            return loss
        closure = samkit.make_closure(model, loss_fn, x, y, indices=idx, autocast_dtype=autocast)
        return opt.step(closure)

    return step


def peak_of(step: Any, device: torch.device) -> int | None:
    """Peak CUDA memory of one call above what was allocated when it began (None on CPU)."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def run_precision(args: argparse.Namespace, autocast: torch.dtype | None) -> dict[str, Any]:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    pool = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device),
            torch.randint(0, 10, (args.batch,), generator=g).to(device),
            torch.arange(args.batch, device=device) + k * args.batch,
        )
        for k in range(STEPS_PER_EPOCH)
    ]
    torch.manual_seed(0)
    template = small_resnet(args.width).to(device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    names = args.methods or methods()
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        model = small_resnet(args.width).to(device)
        model.load_state_dict(template.state_dict())
        try:
            opt = build(name, model)
        except Exception as e:  # noqa: BLE001 - unattended: record and go on
            runs[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        runs[name] = {
            "opt": opt,
            "step": make_step(name, opt, model, loss_fn, autocast),
            "times": [],
            "peaks": [],
        }
    for r in range(args.warmup + args.rounds):
        for run in runs.values():
            if "error" in run:
                continue
            k = r % len(pool)
            if hasattr(run["opt"], "set_epoch"):
                run["opt"].set_epoch(FIRST_EPOCH + r // STEPS_PER_EPOCH)
            x, y, idx = pool[k]
            try:
                sync(device)
                t0 = time.perf_counter()
                if r >= args.warmup and r - args.warmup < args.peak_steps:
                    peak = peak_of(functools.partial(run["step"], x, y, idx), device)
                    if peak is not None:
                        run["peaks"].append(peak)
                else:
                    run["step"](x, y, idx)
                sync(device)
                elapsed = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - unattended: record and go on
                run.clear()
                run["error"] = f"{type(e).__name__}: {e}"
                continue
            if r >= args.warmup:
                run["times"].append(elapsed)
    base = runs.get("sgd", {})
    table: dict[str, Any] = {}
    for name, run in runs.items():
        if "error" in run:
            table[name] = {"error": run["error"]}
            continue
        row: dict[str, Any] = {"median_step_s": statistics.median(run["times"])}
        if base.get("times") and len(base["times"]) == len(run["times"]):
            row["over_sgd"] = statistics.median(t / b for t, b in zip(run["times"], base["times"]))
        row["peak_bytes"] = max(run["peaks"]) if run["peaks"] else None
        if row["peak_bytes"] is not None and base.get("peaks"):
            row["peak_over_sgd"] = row["peak_bytes"] / max(base["peaks"])
        table[name] = row
    return table


def run_cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    test = HERE.parent / "tests" / "optim" / "test_cuda.py"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", str(test)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "command": "python -m pytest -rfEs tests/optim/test_cuda.py",
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "output_tail": lines[-40:],
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every path")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-steps", type=int, default=3, help="measured steps that sample peaks")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-tests", action="store_true", help="skip tests/optim/test_cuda.py")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_suite.py: no CUDA device here (torch.cuda.is_available() is False); "
            "for a dry run use --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        args.batch, args.size, args.width = 8, 8, 4
        args.rounds, args.warmup, args.peak_steps = 1, 1, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods()]
        if unknown:
            print(f"gpu_suite.py: unknown method(s) {unknown}; known: {methods()}", file=sys.stderr)
            return 2
        args.methods = list(dict.fromkeys(["sgd", *args.methods]))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "samkit": samkit.__version__ if hasattr(samkit, "__version__") else None,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "model": f"small_resnet(width={args.width}) (ResNet-18-shaped)",
        "input": [args.batch, 3, args.size, args.size],
        "rounds": args.rounds,
        "warmup": args.warmup,
        "precisions": {},
    }
    for label, autocast in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        t0 = time.perf_counter()
        table = run_precision(args, autocast)
        result["precisions"][label] = {"seconds": time.perf_counter() - t0, "methods": table}
        print(f"{label}: {result['model']}, input {result['input']}, {device}")
        print(f"  {'method':10s} {'x SGD':>7s} {'ms':>9s} {'peak MiB':>9s} {'peak x SGD':>10s}")
        for name, row in table.items():
            if "error" in row:
                print(f"  {name:10s} error: {row['error']}")
                continue
            peak = row["peak_bytes"]
            print(
                f"  {name:10s} {row.get('over_sgd', float('nan')):7.3f} "
                f"{row['median_step_s'] * 1e3:9.2f} "
                f"{'-' if peak is None else f'{peak / 2**20:.1f}':>9s} "
                f"{row.get('peak_over_sgd', float('nan')):10.2f}"
            )
    if not args.no_tests:
        result["cuda_tests"] = run_cuda_tests(args)
        print(f"tests/optim/test_cuda.py: {result['cuda_tests']['summary']}")
    result["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out} ({result['seconds']:.0f} s)")
    errors = [
        f"{label}/{name}"
        for label, p in result["precisions"].items()
        for name, row in p["methods"].items()
        if "error" in row
    ]
    failed_tests = result.get("cuda_tests", {}).get("returncode", 0) not in (0, 5)
    return 1 if errors or failed_tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
