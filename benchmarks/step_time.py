"""Per-step time of SGD, samkit SAM and pytorch-optimizer's SAM, interleaved in one process.

Usage::

    python benchmarks/step_time.py                       # CPU, small ResNet, 16x16 input
    python benchmarks/step_time.py --device cuda --size 32 --batch 128 --width 64

Every round times one step of each optimizer in turn (same model architecture, same batch),
so machine noise hits all three alike; the figures are medians of per-round ratios.
Targets (issue 2): SAM <= 2.05x SGD, samkit SAM <= 1.0x pytorch-optimizer SAM, and
perturb + restore + global norm <= 3% of a SAM step. Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import samkit


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


def small_resnet(width: int, blocks: int = 2, classes: int = 10) -> nn.Module:
    """A ResNet-18-shaped network (4 stages x ``blocks``), ~62 parameter tensors."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append(Block(cin, width * mult, stride))
            cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=16, help="input height/width")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument(
        "--on-nonfinite",
        default="raise",
        choices=["raise", "skip", "ignore"],
        help="samkit's NaN check ('ignore' saves one device sync per step)",
    )
    ap.add_argument("--out", default="benchmarks/results/step_time.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    models = {name: small_resnet(args.width).to(device) for name in ("sgd", "samkit", "peer")}
    for m in models.values():
        m.load_state_dict(models["sgd"].state_dict())
    opts: dict[str, torch.optim.Optimizer] = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), **kw),
        "samkit": samkit.SAM(
            models["samkit"].parameters(),
            torch.optim.SGD,
            rho=0.05,
            on_nonfinite=args.on_nonfinite,
            **kw,
        ),
    }
    have_peer = True
    try:
        import pytorch_optimizer as po

        opts["peer"] = po.SAM(models["peer"].parameters(), torch.optim.SGD, rho=0.05, **kw)
    except ImportError:
        have_peer = False
        del models["peer"]

    def plain_closure(name: str):
        model, opt = models[name], opts[name]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            return loss

        return closure

    def step(name: str) -> None:
        if name == "sgd":
            opts["sgd"].step(plain_closure("sgd"))
        elif name == "samkit":
            opts["samkit"].step(samkit.make_closure(models["samkit"], loss_fn, x, y))
        else:  # pytorch-optimizer's protocol: the first backward happens before step()
            plain_closure("peer")()
            opts["peer"].step(plain_closure("peer"))

    def perturb_restore() -> None:
        opts["samkit"].perturb()
        opts["samkit"].restore()

    times: dict[str, list[float]] = {name: [] for name in [*opts, "perturb_restore"]}
    for r in range(args.warmup + args.rounds):
        for name in opts:
            sync(device)
            t0 = time.perf_counter()
            step(name)
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        # gradients of the samkit model are in place after its step's second pass
        plain_closure("samkit")()
        sync(device)
        t0 = time.perf_counter()
        perturb_restore()
        sync(device)
        if r >= args.warmup:
            times["perturb_restore"].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    n_tensors = len(list(models["samkit"].parameters()))
    n_params = sum(p.numel() for p in models["samkit"].parameters())
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "model": f"small_resnet(width={args.width}), {n_tensors} tensors, {n_params} params",
        "input": [args.batch, 3, args.size, args.size],
        "rounds": args.rounds,
        "on_nonfinite": args.on_nonfinite,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "sam_over_sgd": ratio("samkit", "sgd"),
        "perturb_restore_over_sam_step": ratio("perturb_restore", "samkit"),
    }
    if have_peer:
        result["samkit_over_peer_sam"] = ratio("samkit", "peer")
        result["peer_sam_over_sgd"] = ratio("peer", "sgd")
    targets = {
        "sam_over_sgd": 2.05,
        "samkit_over_peer_sam": 1.0,
        "perturb_restore_over_sam_step": 0.03,
    }
    result["targets"] = {
        k: {"target": v, "value": result[k], "met": result[k] <= v}
        for k, v in targets.items()
        if k in result
    }
    print(
        f"{result['model']}, input {result['input']}, {result['device']} ({result['device_name']}), "
        f"{result['threads']} threads, {args.rounds} rounds"
    )
    for k, v in result["median_step_s"].items():
        print(f"  median {k:16s} {v * 1e3:8.2f} ms")
    for k, t in result["targets"].items():
        print(
            f"  {k:30s} {t['value']:.3f}  (target <= {t['target']}: {'met' if t['met'] else 'NOT met'})"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
