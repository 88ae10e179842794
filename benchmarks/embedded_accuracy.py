"""Test accuracy of SGD, SAM, F-SAM and Bilateral SAM on the embedded benchmark.

Superseded by ``samkit bench`` + ``samkit report`` (any registered method, resumable,
parallel, with confidence intervals and plots; ``docs/bench.md``). Kept for two things
``samkit bench`` does not do: Bilateral SAM's per-step diagnostics (``--engine local
--trace``, the investigation in ``docs/methods/bsam.md``) and re-running the historical tables
of ``docs/results.md`` with their exact commands.

Recipe (the embedded ``mnist1d`` recipe, docs/recipes.md): MNIST-1D (mnist1d's ``make_dataset``
with default arguments: 4,000 train / 1,000 test), the 3-conv 1-D CNN with 32 channels,
30 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4, lr 0.05 with a per-step cosine
schedule to 0, symmetric label noise on the training labels ("other class" convention).
Every method gets the same epochs, base optimizer, data order and initialisation for a
given seed; a method gets the values of the embedded ``mnist1d`` recipe (what ``samkit train
--optimizer NAME`` uses) unless a run sets hyperparameters.

Two engines:

* ``samkit`` (default when available): ``samkit.train.train(TrainConfig(...))``, i.e.
  exactly what ``samkit train --optimizer NAME`` runs;
* ``local``: the same recipe in a loop written here, which can also record Bilateral SAM's
  per-step diagnostics (``--trace``) for the investigation in ``docs/results.md``.

Examples::

    # the table in docs/results.md (4 methods x 5 seeds x 2 noise levels)
    python benchmarks/embedded_accuracy.py --methods sgd sam fsam bsam --seeds 0 1 2 3 4 \\
        --noise 0 0.25 --out benchmarks/results/embedded_accuracy.json

    # a sweep: one "variant" per --run, NAME[:key=value,...]
    python benchmarks/embedded_accuracy.py --engine local --seeds 0 1 --noise 0 \\
        --run bsam:rho=0.05 --run bsam:ratio=one --out benchmarks/results/bsam_sweep.json

Writes a JSON file (every run: config, accuracy, wall time, versions, hardware) and prints a
markdown table of mean ± std test accuracy and mean wall seconds per run.
"""

from __future__ import annotations

import argparse
import json
import math
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

RECIPE = dict(epochs=30, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.1)


# ----------------------------------------------------------------------------- helpers
def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``"bsam:rho=0.05,ratio=one"`` -> ``("bsam", {"rho": 0.05, "ratio": "one"})``."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = _value(value.strip())
    return name.strip(), kwargs


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    return text


def label(name: str, kwargs: dict[str, Any]) -> str:
    if not kwargs:
        return name
    return name + " (" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "samkit": samkit.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- engines
def run_samkit(name: str, kwargs: dict[str, Any], seed: int, noise: float) -> dict[str, Any]:
    from samkit.train import train
    from samkit.train.recipes import recipe_config

    kw = dict(kwargs)
    given: dict[str, Any] = {"optimizer": name, "seed": seed, "label_noise": noise}
    if "rho" in kw:
        given["rho"] = kw.pop("rho")
    if kw:
        given["opt_args"] = kw
    cfg = recipe_config("mnist1d", device="cpu", **given)
    t0 = time.perf_counter()
    summary = train(cfg, progress=False, log=None)
    wall = time.perf_counter() - t0
    acc = summary.get("test_acc", summary.get("final_test_acc"))
    if acc is not None and acc <= 1.0:
        acc = 100.0 * acc
    return {"test_acc": acc, "wall_s": wall, "summary": summary}


def run_local(
    name: str, kwargs: dict[str, Any], seed: int, noise: float, trace: bool = False
) -> dict[str, Any]:
    from samkit.train.data import add_label_noise, load_dataset
    from samkit.train.models import CNN1D

    ds = load_dataset("mnist1d")
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    gen = torch.Generator().manual_seed(seed)
    y_tr, _ = add_label_noise(y_tr, noise, 10, gen)
    torch.manual_seed(seed)
    model = CNN1D(1, x_tr.shape[-1], 10, channels=32)
    info = samkit.get_optimizer_info(name)
    opt_kw = dict(kwargs)
    if info.sharpness_aware:
        opt_kw.setdefault("rho", RECIPE["rho"])
        opt_kw["model"] = model
    opt = samkit.create_optimizer(
        name,
        model.parameters(),
        lr=RECIPE["lr"],
        momentum=RECIPE["momentum"],
        weight_decay=RECIPE["weight_decay"],
        **opt_kw,
    )
    n = x_tr.shape[0]
    steps_per_epoch = math.ceil(n / RECIPE["batch_size"])
    total = RECIPE["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    )
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if trace and hasattr(opt, "collect_stats"):
        opt.collect_stats = True
    traces: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(RECIPE["epochs"]):
        model.train()
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        for k in range(steps_per_epoch):
            idx = order[k * RECIPE["batch_size"] : (k + 1) * RECIPE["batch_size"]]
            closure = samkit.make_closure(model, loss_fn, x_tr[idx], y_tr[idx])
            opt.step(closure)
            sched.step()
            if trace and getattr(opt, "last_stats", None):
                for key, v in opt.last_stats.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
        if trace and sums:
            row = {key: v / steps_per_epoch for key, v in sums.items()}
            row["epoch"] = epoch + 1
            row["train_loss"] = _eval(model, x_tr, y_tr)[0]
            traces.append(row)
    wall = time.perf_counter() - t0
    test_loss, test_acc = _eval(model, x_te, y_te)
    train_loss, train_acc = _eval(model, x_tr, y_tr)
    out = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "train_acc_noisy_labels": train_acc,
        "train_loss": train_loss,
        "wall_s": wall,
    }
    if traces:
        out["trace"] = traces
    return out


@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    acc = 100.0 * float((logits.argmax(1) == y).float().mean())
    model.train()
    return loss, acc


# ----------------------------------------------------------------------------- main
def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        table.setdefault((r["label"], r["noise"]), []).append(r)
    rows = []
    for (lab, noise), rs in table.items():
        accs = [r["test_acc"] for r in rs]
        rows.append(
            {
                "label": lab,
                "noise": noise,
                "n": len(accs),
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "wall_s": statistics.mean(r["wall_s"] for r in rs),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    noises = sorted({r["noise"] for r in rows})
    cell = {(r["label"], r["noise"]): r for r in rows}
    head = "| method | " + " | ".join(f"noise {n:g}" for n in noises) + " | s/run |"
    lines = [head, "|---" * (len(noises) + 2) + "|"]
    for lab in labels:
        cells, walls = [], []
        for nz in noises:
            r = cell.get((lab, nz))
            cells.append(f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "")
            if r:
                walls.append(r["wall_s"])
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {statistics.mean(walls):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="*", default=[], help="registry names, defaults only")
    ap.add_argument("--run", action="append", default=[], help="NAME[:key=value,...]")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.25])
    ap.add_argument("--engine", choices=["samkit", "local"], default=None)
    ap.add_argument("--trace", action="store_true", help="per-epoch BSAM diagnostics (local)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [(m, {}) for m in args.methods] + [parse_run(s) for s in args.run]
    if not specs:
        ap.error("give --methods and/or --run")
    engine = args.engine
    if engine is None:
        try:
            from samkit.train import train  # noqa: F401

            engine = "samkit"
        except ImportError:
            engine = "local"
    if args.trace:
        engine = "local"
    runs: list[dict[str, Any]] = []
    for noise in args.noise:
        for name, kwargs in specs:
            for seed in args.seeds:
                if engine == "samkit":
                    res = run_samkit(name, kwargs, seed, noise)
                else:
                    res = run_local(name, kwargs, seed, noise, trace=args.trace)
                res.update(
                    label=label(name, kwargs), method=name, kwargs=kwargs, seed=seed, noise=noise
                )
                runs.append(res)
                print(
                    f"{res['label']:<40} noise {noise:<5g} seed {seed}: "
                    f"{res['test_acc']:.2f}%  {res['wall_s']:.1f}s",
                    flush=True,
                )
                if args.out:  # write as we go: a long sweep can be inspected or resumed
                    _write(args, engine, runs)
    print()
    print(markdown(summarise(runs)))
    return 0


def _write(args: argparse.Namespace, engine: str, runs: list[dict[str, Any]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "engine": engine,
        "recipe": RECIPE,
        "environment": environment(),
        "summary": summarise(runs),
        "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs],
    }
    args.out.write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
