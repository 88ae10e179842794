"""A lower bound on mSAM's step time over SGD's, and the cost of ESAM's partial passes.

Usage::

    python benchmarks/msam_bound.py --batch 32 --micro-batches 4 --rounds 30 --threads 1

On ``step_time.py``'s small ResNet (the model of ``method_cost.py``), in one run with every
measurement interleaved round by round (medians of per-round times), it times:

* ``sgd step``: a pass and ``torch.optim.SGD``'s update (momentum 0.9): SGD's step;
* ``pass``: one forward and backward pass over the whole batch (SGD's work, less its update);
* ``forward``: one forward pass without a graph (``torch.no_grad``);
* ``half pass``: a forward and backward pass over half of the batch;
* ``vmap pass``: one forward and backward pass over ``M`` micro-batches at once, each at its
  own weights (``torch.func.vmap`` of a ``functional_call``, weights ``[M, ...]``), as mSAM's
  batched path runs each of its two passes;
* ``loop pass``: ``M`` forward and backward passes over one micro-batch each (mSAM's loop).

and prints the bounds these give over SGD's step, each method's passes plus the same update
(``u = sgd step - pass``):

* mSAM (batched) needs two ``vmap pass`` es per step: at least ``(2 vmap + u) / sgd step``,
  before any arithmetic on the gradients (the loop: ``(2 loop + u) / sgd step``);
* ESAM (no bound: its SWP skips part of the weight gradients): what its selection
  ``forward`` and its ``half pass`` over γ = 1/2 of the batch cost against a full pass. A
  target that counts a forward as 1/3 and half a batch as 1/2 of a pass misses what a CPU
  charges for small batches.

The mSAM bound is what its batched step cannot beat on this machine whatever its code does,
to set beside ``method_cost.py``'s measured ratio. Saves JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import small_resnet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/msam_bound.json")
    args = ap.parse_args(argv)
    if args.batch % (2 * args.micro_batches):
        ap.error(f"--batch {args.batch} must split into halves and into --micro-batches")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from torch.func import functional_call, vmap

    torch.manual_seed(0)
    model = small_resnet(args.width)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    m, n = args.micro_batches, args.batch
    x = torch.randn(n, 3, args.size, args.size)
    y = torch.randint(0, 10, (n,))
    xs, ys = x.reshape(m, n // m, *x.shape[1:]), y.reshape(m, n // m)
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def sgd_step() -> None:
        full_pass()
        sgd.step()

    def full_pass() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def half_pass() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[: n // 2]), y[: n // 2]).backward()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def loop_pass() -> None:
        for j in range(m):
            model.zero_grad(set_to_none=True)
            loss_fn(model(xs[j]), ys[j]).backward()

    def objective(ws: list[torch.Tensor], st: dict, xj: torch.Tensor, yj: torch.Tensor):
        return loss_fn(functional_call(model, ({**dict(zip(names, ws)), **st},), (xj,)), yj)

    def vmap_pass() -> None:
        ws = [p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())).requires_grad_() for p in params]
        st = {k: b.unsqueeze(0).repeat(m, *([1] * b.dim())) for k, b in buffers.items()}
        losses = vmap(objective, in_dims=(0, 0, 0, 0), randomness="error")(ws, st, xs, ys)
        torch.autograd.grad(losses.sum(), ws)

    runs = {
        "sgd step": sgd_step,
        "pass": full_pass,
        "forward": forward,
        "half pass": half_pass,
        "vmap pass": vmap_pass,
        "loop pass": loop_pass,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.warmup + args.rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratio = {
        k: statistics.median(t / p for t, p in zip(v, times["sgd step"])) for k, v in times.items()
    }
    update = ratio["sgd step"] - ratio["pass"]  # SGD's update, in units of its step
    bounds = {
        "msam_batched_over_sgd": 2 * ratio["vmap pass"] + update,
        "msam_loop_over_sgd": 2 * ratio["loop pass"] + update,
    }
    print(
        f"small_resnet(width={args.width}), batch {n}, {m} micro-batches, {args.threads} thread(s)"
    )
    for k in runs:
        print(f"{k:<12} {ms[k]:8.2f} ms  {ratio[k]:5.2f} x SGD step")
    for k, v in bounds.items():
        print(f"bound {k:<26} {v:5.2f} x SGD")
    out = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "median_ms": ms,
        "median_ratio_to_sgd_step": ratio,
        "bounds": bounds,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
