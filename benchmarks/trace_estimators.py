"""Hutch++ against Hutchinson: HVPs needed for a Hessian trace within 1 %.

Two Hessians, both measured through ``samkit.sharpness.hessian_trace`` (the real code path):

* **synthetic**: the quadratic ``½ wᵀAw`` with ``A = Q diag(λ) Qᵀ``, ``λ_i = 1/i²``,
  ``D = 3000`` (``Q`` a seeded random rotation), float64; exact trace ``Σ 1/i²``;
* **embedded CNN**: the ``mnist1d`` recipe's 1-D CNN (16,906 parameters) after ``--epochs``
  epochs of ``samkit train --optimizer sgd`` (the recipe's other settings), the Hessian of the
  mean cross-entropy on its first 512 training samples (one batch, eval mode: what
  ``samkit train --track-sharpness`` measures), float32. An exact trace would take 16,906
  HVPs (about an hour on this CPU), so the reference is the mean of ``--ref-runs`` Hutch++
  estimates with ``--ref-hvps`` HVPs each; its standard error is reported and is far below
  1 %.

Hutch++: for each ``m`` of a grid, ``--seeds`` independent estimates give the mean relative
error ``mean_s |est_s − tr| / |tr|``; "HVPs for 1 %" is the smallest ``m`` where it is ≤ 1 %.
Hutchinson: its samples ``zᵀHz`` are i.i.d., so one pool of ``--pool`` samples gives, for each
``m``, ``pool // m`` independent estimates (disjoint groups; at least 5); the CLT gives the
HVPs it needs for 1 %, ``(√(2/π) σ / (0.01 |tr|))²`` with ``σ²`` the variance of one sample
(exact for the quadratic: ``2(‖A‖_F² − Σ A_ii²)``; the pool's on the CNN); the grid's
measured errors check that formula.

Usage:  python benchmarks/trace_estimators.py [--seeds 20] [--epochs 30] [--pool 1000]
            [--out benchmarks/results/trace_estimators.json] [--skip-cnn]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import samkit.sharpness as S

PP_GRID = [6, 9, 15, 21, 30, 42, 51, 75, 99, 150, 201, 300, 450, 600, 900]
HUTCH_GRID = [10, 20, 30, 100, 300, 1000]


class Quadratic(nn.Module):
    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w + 0.0 * x.sum()


def _loss(out, _y):
    return out


def hutchpp_errors(model, loss, data, exact, grid, seeds, stop=0.004) -> dict:
    """Mean relative error of ``seeds`` Hutch++ estimates for each ``m`` of ``grid`` (up to
    the first ``m`` whose error is below ``stop``: larger ones only cost time)."""
    out = {}
    for m in grid:
        t0 = time.perf_counter()
        est = [
            S.hessian_trace(model, loss, data, m, method="hutch++", seed=s).trace
            for s in range(seeds)
        ]
        err = np.abs(np.array(est) - exact) / abs(exact)
        out[m] = {
            "mean_rel_error": float(err.mean()),
            "rms_rel_error": float(np.sqrt((err**2).mean())),
            "mean_estimate": float(np.mean(est)),
            "seconds": time.perf_counter() - t0,
        }
        print(f"  hutch++    m={m:5d}  mean rel. error {err.mean():.4%}", flush=True)
        if err.mean() < stop:
            break
    return out


def hutchinson_errors(samples, exact, grid, min_groups=5) -> dict:
    """Mean relative error of Hutchinson with ``m`` samples, from disjoint groups of a pool."""
    pool = np.asarray(samples)
    out = {}
    for m in grid:
        groups = pool.size // m
        if groups < min_groups:
            break
        est = pool[: groups * m].reshape(groups, m).mean(1)
        err = np.abs(est - exact) / abs(exact)
        out[m] = {
            "mean_rel_error": float(err.mean()),
            "rms_rel_error": float(np.sqrt((err**2).mean())),
            "estimates": int(groups),
        }
        print(f"  hutchinson m={m:5d}  mean rel. error {err.mean():.4%} ({groups} groups)")
    return out


def first_within(errors: dict, target: float = 0.01) -> int | None:
    for m in sorted(errors):
        if errors[m]["mean_rel_error"] <= target:
            return m
    return None


def clt_hvps(sigma: float, trace: float, target: float = 0.01) -> float:
    return (math.sqrt(2 / math.pi) * sigma / (target * abs(trace))) ** 2


def synthetic(seeds: int, pool: int, dim: int = 3000) -> dict:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64) ** 2
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    exact = float(lam.sum())
    sigma = math.sqrt(2 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum())))
    model, data = Quadratic(A), [(torch.zeros(1), torch.zeros(1))]
    print(f"synthetic: D={dim}, trace {exact:.6f}, Hutchinson σ {sigma:.4f}", flush=True)
    pp = hutchpp_errors(model, _loss, data, exact, PP_GRID, seeds)
    samples = S.hessian_trace(model, _loss, data, pool, method="hutchinson", seed=12345).samples
    hu = hutchinson_errors(samples, exact, HUTCH_GRID)
    return {
        "dim": dim,
        "spectrum": "1/i^2",
        "trace": exact,
        "hutchinson_sigma": sigma,
        "hutchinson_sigma_pool": float(np.std(samples, ddof=1)),
        "hutchinson_pool": pool,
        "hutch++": pp,
        "hutchinson": hu,
        "hutch++_hvps_for_1pct": first_within(pp),
        "hutchinson_hvps_for_1pct_clt": clt_hvps(sigma, exact),
        "hutchinson_hvps_for_1pct_measured": first_within(hu),
    }


def trained_cnn(epochs: int, folder: str):
    from samkit.train import TrainConfig, train
    from samkit.train.measure import measure_subset

    out = os.path.join(folder, "run")
    train(TrainConfig(optimizer="sgd", epochs=epochs, seed=0, out=out), log=None)
    model, subset, _, _ = measure_subset(out, 4, 128)
    x = torch.cat([b[0] for b in subset])
    y = torch.cat([b[1] for b in subset])
    return model.eval(), [(x, y)]


def cnn(seeds: int, epochs: int, pool: int, ref_hvps: int, ref_runs: int) -> dict:
    loss = nn.CrossEntropyLoss()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        model, data = trained_cnn(epochs, folder)
        train_s = time.perf_counter() - t0
    dim = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    refs = [
        S.hessian_trace(model, loss, data, ref_hvps, method="hutch++", seed=1000 + r)
        for r in range(ref_runs)
    ]
    exact = float(np.mean([r.trace for r in refs]))
    ref_se = math.sqrt(sum(r.std_error**2 for r in refs)) / len(refs)
    ref_s = time.perf_counter() - t0
    print(f"cnn: D={dim}, reference trace {exact:.6f} ± {ref_se:.2g} ({ref_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    samples = S.hessian_trace(model, loss, data, pool, method="hutchinson", seed=12345).samples
    pool_s = time.perf_counter() - t0
    sigma = float(np.std(samples, ddof=1))
    hu = hutchinson_errors(samples, exact, HUTCH_GRID)
    pp = hutchpp_errors(model, loss, data, exact, [20] + [m for m in PP_GRID if m >= 30], seeds)
    return {
        "model": "cnn1d (mnist1d recipe), SGD",
        "epochs": epochs,
        "dim": dim,
        "samples": int(data[0][1].shape[0]),
        "dtype": "float32",
        "reference_trace": exact,
        "reference_std_error": ref_se,
        "reference": f"mean of {ref_runs} Hutch++ estimates with {ref_hvps} HVPs each",
        "reference_seconds": ref_s,
        "train_seconds": train_s,
        "seconds_per_hvp": pool_s / pool,
        "hutchinson_sigma": sigma,
        "hutchinson_pool": pool,
        "hutch++": pp,
        "hutchinson": hu,
        "hutch++_hvps_for_1pct": first_within(pp),
        "hutchinson_hvps_for_1pct_clt": clt_hvps(sigma, exact),
        "hutchinson_hvps_for_1pct_measured": first_within(hu),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/trace_estimators.json")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cnn-seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--pool", type=int, default=5000, help="Hutchinson samples (synthetic)")
    ap.add_argument("--cnn-pool", type=int, default=1000, help="Hutchinson samples (CNN)")
    ap.add_argument("--ref-hvps", type=int, default=900)
    ap.add_argument("--ref-runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-cnn", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/trace_estimators.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds,
        "cnn_seeds": args.cnn_seeds,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "synthetic": synthetic(args.seeds, args.pool),
    }
    if not args.skip_cnn:
        result["cnn"] = cnn(
            args.cnn_seeds, args.epochs, args.cnn_pool, args.ref_hvps, args.ref_runs
        )
    result["seconds"] = time.perf_counter() - t0
    for name in ("synthetic", "cnn"):
        if name in result:
            r = result[name]
            print(
                f"{name}: Hutch++ reaches 1 % (mean relative error over seeds) with "
                f"{r['hutch++_hvps_for_1pct']} HVPs; Hutchinson needs "
                f"{r['hutchinson_hvps_for_1pct_clt']:.0f} (CLT from σ), measured: "
                f"{r['hutchinson_hvps_for_1pct_measured']} on its grid"
            )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
