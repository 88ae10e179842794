"""Peak memory of one SAM step on language-model-sized logits, with and without kept outputs.

Usage::

    python benchmarks/closure_memory.py            # logits 16x256x8000 (131 MB in float32)
    python benchmarks/closure_memory.py --batch 8 --seq 128 --vocab 4000

The model is an embedding and a linear read-out (``[B, T]`` token ids -> ``[B, V, T]``
logits), so the logits dominate the memory of a step. Each configuration runs in a fresh
subprocess (peak RSS only grows within a process) with glibc told to serve every allocation
above 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident
set at once and the peak RSS tracks the peak of live tensors. Reported: peak RSS during two
SAM steps (SGD base, a fresh closure per step as in a training loop) minus the RSS before
the first step, in MB, and the bytes the closure holds after its step.

Configurations: a standard closure (nothing kept: the floor), ``make_closure`` with
``keep_outputs=True`` (what every BatchClosure did before: the clean pass's logits kept, and
concatenated across micro-batches) and ``make_closure`` by default (predicted classes only),
the last two also with 4 micro-batches of gradient accumulation. To measure the code before
a change, run one configuration against that tree:
``PYTHONPATH=old/src MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/closure_memory.py --one
default 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import torch
from torch import nn

CONFIGS = [
    ("standard closure", "plain", 1),
    ("keep_outputs=True", "keep", 1),
    ("default (predictions)", "default", 1),
    ("keep_outputs=True, 4 micro-batches", "keep", 4),
    ("default (predictions), 4 micro-batches", "default", 4),
]


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x)).transpose(1, 2)  # [B, V, T]: classes second


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _held_bytes(closure) -> int:
    total = 0
    for name in ("outputs", "predictions", "correct", "counted"):
        t = getattr(closure, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def run_one(kind: str, accumulation: int, args: argparse.Namespace) -> dict:
    import samkit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyLM(args.vocab, args.dim)
    crit = nn.CrossEntropyLoss(reduction="none")
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    base = _rss_mb()
    held = 0
    for _ in range(2):
        if kind == "plain":

            def closure():
                opt.zero_grad()
                loss = crit(model(x), y).mean()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            kw = {"keep_outputs": True} if kind == "keep" else {}
            c = samkit.make_closure(model, crit, x, y, accumulation_steps=accumulation, **kw)
            opt.step(c)
            held = _held_bytes(c)
            del c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"peak_minus_start_mb": peak - base, "closure_holds_mb": held / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/closure_memory.json")
    p.add_argument("--one", nargs=2, metavar=("KIND", "ACCUMULATION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    shape = [args.batch, args.vocab, args.seq]
    logits_mb = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"logits {args.batch}x{args.seq}x{args.vocab} float32 = {logits_mb:.0f} MB")
    rows = []
    for label, kind, acc in CONFIGS:
        cmd = [sys.executable, __file__, "--one", kind, str(acc)]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--vocab", str(args.vocab), "--dim", str(args.dim)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        row = {"config": label, "kind": kind, "accumulation_steps": acc, **json.loads(out)}
        rows.append(row)
        print(
            f"{label:42s} peak {row['peak_minus_start_mb']:7.1f} MB   "
            f"closure holds {row['closure_holds_mb']:7.2f} MB"
        )
    by = {(r["kind"], r["accumulation_steps"]): r["peak_minus_start_mb"] for r in rows}
    ratios = {
        "keep_over_default": by[("keep", 1)] / by[("default", 1)],
        "keep_over_default_4_micro_batches": by[("keep", 4)] / by[("default", 4)],
        "default_over_standard_closure": by[("default", 1)] / by[("plain", 1)],
        "default_4_micro_batches_over_1": by[("default", 4)] / by[("default", 1)],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    result = {
        "benchmark": "closure_memory",
        "logits_shape": shape,
        "logits_mb": logits_mb,
        "rows": rows,
        "ratios": ratios,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
