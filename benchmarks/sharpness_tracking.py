"""Does SAM end flatter than SGD? λ₁, Hessian trace and gradient/top-eigenvector alignment
tracked during training on MNIST-1D (``samkit train --track-sharpness``).

Default recipe of ``samkit train`` (MNIST-1D 4,000/1,000, cnn1d, 30 epochs, batch 128, SGD
momentum 0.9, weight decay 5e-4, lr 0.05 cosine, SAM rho 0.1), for SGD and SAM, 3 seeds,
sharpness measured every 5 epochs on the first 512 training samples (eval mode, mean
cross-entropy; λ₁ by Lanczos ≤ 30 HVPs, trace by 20 Hutchinson probes). Prints the final values
per run and mean ± std per method, writes the runs' histories to JSON and a figure of λ₁ over
the epochs.

Usage:  python benchmarks/sharpness_tracking.py [--seeds 0 1 2] [--epochs 30] [--every 5]
            [--out benchmarks/results/sharpness_tracking.json] [--png docs/sharpness_tracking.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from samkit.train import TrainConfig, train

KEYS = ("lambda_max", "hessian_trace", "grad_eig_alignment")


def run(method: str, seed: int, epochs: int, every: int, folder: str) -> dict:
    out = os.path.join(folder, f"{method}_seed{seed}")
    cfg = TrainConfig(optimizer=method, epochs=epochs, seed=seed, track_sharpness=every, out=out)
    t0 = time.perf_counter()
    summary = train(cfg, progress=False, log=None)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    history = [
        {"epoch": r["epoch"], **{k: r[k] for k in KEYS}, "test_acc": r.get("test_acc")}
        for r in rows
        if r.get("lambda_max") is not None
    ]
    final = history[-1]
    return {
        "method": method,
        "seed": seed,
        "test_acc": summary["test_acc"],
        "final": final,
        "history": history,
        "seconds": time.perf_counter() - t0,
    }


def _mean_std(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def plot(runs: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    colors = {"sgd": "tab:blue", "sam": "tab:red"}
    for i, (key, label) in enumerate(
        [
            ("lambda_max", "λ₁ (top Hessian eigenvalue)"),
            ("hessian_trace", "Hessian trace"),
            ("grad_eig_alignment", "|cos(∇L, v₁)|"),
        ]  # fmt: skip
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        for r in runs:
            xs = [h["epoch"] for h in r["history"]]
            ys = [h[key] for h in r["history"]]
            ax.plot(xs, ys, color=colors.get(r["method"], "k"), marker="o", ms=3, alpha=0.8,
                    label=r["method"].upper() if r["seed"] == runs[0]["seed"] else None)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=9)
        if key != "grad_eig_alignment":
            ax.set_yscale("log")
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle("MNIST-1D, cnn1d, default recipe: sharpness during training (one line per seed)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["sgd", "sam"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/sharpness_tracking.json")
    ap.add_argument("--png", default="docs/sharpness_tracking.png")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            for seed in args.seeds:
                r = run(method, seed, args.epochs, args.every, folder)
                f = r["final"]
                print(f"{method:>4} seed {seed}: epoch {f['epoch']} λ₁ {f['lambda_max']:.3f} "
                      f"trace {f['hessian_trace']:.2f} alignment {f['grad_eig_alignment']:.3f} "
                      f"test acc {100 * r['test_acc']:.2f}% ({r['seconds']:.1f} s)",
                      flush=True)  # fmt: skip
                runs.append(r)

    table = {}
    print(f"\n{'method':<6} {'λ₁':>16} {'trace':>16} {'alignment':>16} {'test acc %':>16}")
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        row = {k: [r["final"][k] for r in rs] for k in KEYS}
        row["test_acc"] = [100 * r["test_acc"] for r in rs]
        table[method] = row
        print(f"{method:<6} " + " ".join(f"{_mean_std(row[k]):>16}" for k in (*KEYS, "test_acc")))
    if "sgd" in table and "sam" in table:
        pairs = list(zip(table["sam"]["lambda_max"], table["sgd"]["lambda_max"]))
        below = sum(a < b for a, b in pairs)
        print(f"SAM's final λ₁ below SGD's (same seed): {below} of {len(pairs)}")
    result = {
        "command": "python benchmarks/sharpness_tracking.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        ),  # fmt: skip
        "torch": torch.__version__,
        "platform": platform.platform(),
        "runs": runs,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    if args.png:
        plot(runs, args.png)
    print(f"saved {args.out}" + (f" and {args.png}" if args.png else "")
          + f" ({result['seconds']:.0f} s)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
