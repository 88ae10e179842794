"""Step time and passes per step of any registered optimizers, relative to SGD, in one run.

Usage::

    python benchmarks/method_cost.py --methods sgd sam esam looksam:k=5
    python benchmarks/method_cost.py --methods sgd sam gsam msam:micro_batches=4 --rounds 60
    python benchmarks/method_cost.py --methods sam po-sam fsam po-fsam gsam po-gsam

Every method trains its own copy of the same model (``step_time.py``'s small ResNet) on a
fixed pool of batches through ``samkit.make_closure`` (with dataset indices), the way
``samkit train`` drives it. Rounds are interleaved (one step of every method in turn), so
machine noise hits all methods alike; the figures are medians of per-round ratios to SGD,
and ratios of mean step times (``mean x``: the one to read for methods whose steps differ,
such as LookSAM's refresh every k steps). ``po-sam``, ``po-fsam``, ``po-gsam`` are
pytorch-optimizer's SAM, FriendlySAM and GSAM, stepped by their own protocols.
The epoch advances every ``--steps-per-epoch`` steps (``opt.set_epoch``), so work that a
method does once per epoch (mask or bank refreshes) is amortised as in training.

Besides time, each method's cost is counted from its closures: backward and forward passes
per step in full-batch units (``BatchClosure.grad_evals`` / ``forward_evals``), and a
*pass-equivalent* cost with the convention forward = 1/3, backward = 2/3 of a pass.

Prints a table and saves JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import small_resnet, sync  # noqa: E402


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"looksam:k=5,alpha=0.7"`` -> ``("looksam", {"k": 5, "alpha": 0.7})``."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = _value(value.strip())
    return name, kwargs


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


#: pytorch-optimizer's versions (``pip install pytorch-optimizer``), at samkit's defaults.
PEERS = ("po-sam", "po-fsam", "po-gsam")


def build_peer(name: str, model: nn.Module, kw: dict[str, Any]) -> Any:
    """pytorch-optimizer's SAM, FriendlySAM or GSAM with SGD and samkit's default
    hyperparameters (SAM: rho 0.05; F-SAM: rho 0.05, sigma 1, lmbda 0.6; GSAM: rho 0.05
    constant, alpha 0.4)."""
    import pytorch_optimizer as po

    if name == "po-sam":
        return po.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    if name == "po-fsam":
        return po.FriendlySAM(
            model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.6, **kw
        )
    base = torch.optim.SGD(model.parameters(), **kw)
    constant = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
    rho = po.ProportionScheduler(
        constant, max_lr=kw["lr"], min_lr=0.0, max_value=0.05, min_value=0.05
    )
    return po.GSAM(model.parameters(), base, model, rho, alpha=0.4)


class PeerStep:
    """One step of a pytorch-optimizer method by its own protocol (SAM and F-SAM: the clean
    backward before ``step(closure)``; GSAM: ``set_closure`` then ``step()``); the passes
    are counted as ``BatchClosure`` counts them (full-batch units)."""

    def __init__(self, name, opt, model, loss_fn, x, y) -> None:
        self.name, self.opt, self.grad_evals, self.forward_evals = name, opt, 2.0, 2.0

        def mean_loss(out, target):
            return loss_fn(out, target).mean()

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = mean_loss(model(x), y)
            loss.backward()
            return loss

        self.closure = closure
        if name == "po-gsam":
            opt.set_closure(mean_loss, x, y)

    def step(self) -> None:
        if self.name == "po-gsam":
            self.opt.step()
            self.opt.update_rho_t()
        else:
            self.closure()
            self.opt.step(self.closure)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["sgd", "sam"],
                    help="registry names, each optionally NAME:key=value,... (sgd is added)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=16, help="input height/width")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage")
    ap.add_argument("--pool", type=int, default=8, help="distinct batches cycled through")
    ap.add_argument("--steps-per-epoch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/method_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    specs = list(dict.fromkeys(["sgd", *args.methods]))

    torch.manual_seed(0)
    pool = []
    for i in range(args.pool):
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        idx = torch.arange(i * args.batch, (i + 1) * args.batch, device=device)
        pool.append((x, y, idx))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    template = small_resnet(args.width).to(device)

    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for spec in specs:
        name, hp = parse_spec(spec)
        model = small_resnet(args.width).to(device)
        model.load_state_dict(template.state_dict())
        kw: dict[str, Any] = dict(lr=0.05, weight_decay=5e-4, **hp)
        if name != "adamw":
            kw.setdefault("momentum", 0.9)
        models[spec] = model
        if name in PEERS:
            opts[spec] = build_peer(name, model, kw)
        else:
            opts[spec] = samkit.create_optimizer(name, model.parameters(), model=model, **kw)

    times: dict[str, list[float]] = {s: [] for s in specs}
    grad_evals: dict[str, list[float]] = {s: [] for s in specs}
    forward_evals: dict[str, list[float]] = {s: [] for s in specs}
    for r in range(args.warmup + args.rounds):
        x, y, idx = pool[r % len(pool)]
        for spec in specs:
            opt = opts[spec]
            if hasattr(opt, "set_epoch"):
                opt.set_epoch(r // args.steps_per_epoch)
            closure = samkit.make_closure(models[spec], loss_fn, x, y, indices=idx)
            if spec in PEERS:
                closure = PeerStep(spec, opt, models[spec], loss_fn, x, y)
            sync(device)
            t0 = time.perf_counter()
            closure.step() if spec in PEERS else opt.step(closure)
            sync(device)
            if r >= args.warmup:
                times[spec].append(time.perf_counter() - t0)
                grad_evals[spec].append(closure.grad_evals)
                forward_evals[spec].append(closure.forward_evals)

    results: dict[str, Any] = {}
    for spec in specs:
        ratios = [t / s for t, s in zip(times[spec], times["sgd"])]
        g = statistics.mean(grad_evals[spec])
        f = statistics.mean(forward_evals[spec])
        results[spec] = {
            "median_step_s": statistics.median(times[spec]),
            "time_ratio_to_sgd": statistics.median(ratios),
            # Methods whose steps differ (LookSAM's refresh every k steps, periodic mask or
            # bank refreshes) need the ratio of the *mean* step times: a median of per-round
            # ratios picks their common cheap step and hides the expensive one.
            "mean_step_s": statistics.mean(times[spec]),
            "mean_time_ratio_to_sgd": statistics.mean(times[spec]) / statistics.mean(times["sgd"]),
            "backward_passes_per_step": g,
            "forward_passes_per_step": f,
            "pass_equivalents_per_step": f / 3 + 2 * g / 3,
            "step_s": times[spec],
        }
    for peer in PEERS:  # samkit's method over pytorch-optimizer's, round by round
        own = peer.removeprefix("po-")
        if peer in times and own in times:
            ratios = [a / b for a, b in zip(times[own], times[peer])]
            results[own][f"time_ratio_to_{peer}"] = statistics.median(ratios)
    print(
        f"{'method':<28} {'step ms':>8} {'x SGD':>6} {'mean x':>6} "
        f"{'fwd':>5} {'bwd':>5} {'pass-eq':>7}"
    )
    for spec, res in results.items():
        print(
            f"{spec:<28} {1e3 * res['median_step_s']:8.2f} {res['time_ratio_to_sgd']:6.3f} "
            f"{res['mean_time_ratio_to_sgd']:6.3f} "
            f"{res['forward_passes_per_step']:5.2f} {res['backward_passes_per_step']:5.2f} "
            f"{res['pass_equivalents_per_step']:7.3f}"
        )
    for spec, res in results.items():
        for key, value in res.items():
            if key.startswith("time_ratio_to_po-"):
                print(f"{spec} over {key.removeprefix('time_ratio_to_')}: {value:.3f}")
    record = {
        "command": "python benchmarks/method_cost.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args),
        "results": results,
        "torch": torch.__version__,
        "samkit": samkit.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
