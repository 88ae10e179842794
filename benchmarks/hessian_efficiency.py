"""How many Hessian-vector products does samkit's Lanczos need for λ₁, compared with
PyHessian-style power iteration, and what does one HVP cost relative to one gradient?

Setup (no downloads, fixed seed): a small 1-D CNN on synthetic 40-sample signals labelled by a
random teacher network, briefly trained with SGD so that the Hessian is that of a partly fitted
model; the measurement data are 2 batches of 256.

* Reference λ₁: a long Lanczos run (tol 1e-7, up to 300 HVPs) in float64.
* samkit Lanczos: HVPs until the running top Ritz value is within 1% of the reference (and
  stays there), and the HVPs its default stopping rule uses (tol 1e-3 and 1e-2).
* Power iteration, PyHessian settings (maxIter 100, tol 1e-3 relative change): HVPs until the
  stopping rule fires and the error then; HVPs until within 1%.
* Cost: median wall time of one HVP over one gradient (``samkit.sharpness.gradient``),
  interleaved repeats on the same batch of 256: a standalone ``samkit.sharpness.hvp`` call
  (forward + backward with create_graph + second backward), and the time per HVP inside
  ``top_eigenvalues`` (20 Lanczos steps) and ``hessian_trace`` (16 probes), which build the
  first-order graph once and pay only the second backward for each further product.

Usage:  python benchmarks/hessian_efficiency.py [--out PATH] [--seeds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

import samkit.sharpness as S


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 10, 10),
    )


def make_data(seed: int, n: int = 2048, length: int = 40, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, length, generator=g)
    x = torch.nn.functional.avg_pool1d(x, 3, stride=1, padding=1) * 2  # smoother signals
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(length, 32), nn.Tanh(), nn.Linear(32, classes))
    torch.manual_seed(seed + 1000)
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def train(model, x, y, steps: int = 150, lr: float = 0.05, bs: int = 128, seed: int = 0):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (bs,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


def first_within(history: list[float], ref: float, rel: float = 0.01) -> int | None:
    """1-based HVP count from which the estimate stays within ``rel`` of ``ref``."""
    last_bad = None
    for i, v in enumerate(history):
        if abs(v - ref) > rel * abs(ref):
            last_bad = i
    if last_bad is None:
        return 1
    return None if last_bad == len(history) - 1 else last_bad + 2


def run_seed(seed: int, device: str) -> dict:
    x, y = make_data(seed)
    model = make_model(seed)
    train(model, x[:1536], y[:1536], seed=seed)
    model = model.to(device)
    loss_fn = nn.CrossEntropyLoss()
    data = [(x[1536:1792].to(device), y[1536:1792].to(device)),
            (x[1792:].to(device), y[1792:].to(device))]  # fmt: skip
    dim = sum(p.numel() for p in model.parameters())

    ref_model = make_model(seed).double().to(device)
    ref_model.load_state_dict(model.state_dict())
    ref_data = [(a.double(), b) for a, b in data]
    ref = S.top_eigenvalues(ref_model, loss_fn, ref_data, 1, max_iter=300, tol=1e-7, seed=123)
    lam = ref.eigenvalues[0]

    lz3 = S.top_eigenvalues(model, loss_fn, data, 1, max_iter=300, tol=1e-3, seed=seed)
    lz2 = S.top_eigenvalues(model, loss_fn, data, 1, max_iter=300, tol=1e-2, seed=seed)
    pw = S.top_eigenvalues(model, loss_fn, data, 1, method="power", max_iter=100, tol=1e-3,
                           seed=seed)  # fmt: skip
    # also: the 3 largest eigenvalues
    lz_k3 = S.top_eigenvalues(model, loss_fn, data, 3, max_iter=300, tol=1e-3, seed=seed)
    pw_k3 = S.top_eigenvalues(model, loss_fn, data, 3, method="power", max_iter=100, tol=1e-3,
                              seed=seed)  # fmt: skip

    def err(v):
        return abs(v - lam) / abs(lam)

    return {
        "seed": seed,
        "num_params": dim,
        "lambda_max_reference": lam,
        "reference_hvps": ref.num_hvp,
        "reference_converged": ref.converged,
        "lanczos_hvps_to_1pct": first_within(lz3.history, lam),
        "lanczos_tol1e-3_hvps": lz3.num_hvp,
        "lanczos_tol1e-3_rel_error": err(lz3.eigenvalues[0]),
        "lanczos_tol1e-2_hvps": lz2.num_hvp,
        "lanczos_tol1e-2_rel_error": err(lz2.eigenvalues[0]),
        "power_hvps_to_1pct": first_within(pw.history, lam),
        "power_pyhessian_hvps": pw.num_hvp,
        "power_pyhessian_rel_error": err(pw.eigenvalues[0]),
        "power_pyhessian_converged": pw.converged,
        "top3_lanczos_hvps": lz_k3.num_hvp,
        "top3_power_hvps": pw_k3.num_hvp,
        "top3_lanczos": lz_k3.eigenvalues,
        "top3_power": pw_k3.eigenvalues,
    }


def time_hvp_vs_grad(device: str, repeats: int) -> dict:
    x, y = make_data(0)
    model = make_model(0).to(device)
    train(model.cpu(), x[:1536], y[:1536])
    model = model.to(device)
    loss_fn = nn.CrossEntropyLoss()
    data = [(x[1536:1792].to(device), y[1536:1792].to(device))]
    v = [torch.randn_like(p) for p in model.parameters()]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def lanczos():  # 20 HVPs (tol below float32 resolution: runs to max_iter or breakdown)
        return S.top_eigenvalues(model, loss_fn, data, 1, max_iter=20, tol=1e-12).num_hvp

    def trace():
        S.hessian_trace(model, loss_fn, data, num_samples=16)
        return 16

    for _ in range(3):  # warm-up
        S.gradient(model, loss_fn, data)
        S.hvp(model, loss_fn, data, v)
        lanczos()
        trace()
    tg, th, tl, tt = [], [], [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        S.gradient(model, loss_fn, data)
        sync()
        t1 = time.perf_counter()
        S.hvp(model, loss_fn, data, v)
        sync()
        t2 = time.perf_counter()
        n_lz = lanczos()
        sync()
        t3 = time.perf_counter()
        n_tr = trace()
        sync()
        t4 = time.perf_counter()
        tg.append(t1 - t0)
        th.append(t2 - t1)
        tl.append((t3 - t2) / n_lz)
        tt.append((t4 - t3) / n_tr)
    mg, mh = statistics.median(tg), statistics.median(th)
    ml, mt = statistics.median(tl), statistics.median(tt)
    return {
        "batch_size": 256,
        "repeats": repeats,
        "gradient_ms": 1e3 * mg,
        "hvp_ms": 1e3 * mh,
        "hvp_over_gradient": mh / mg,
        "lanczos_ms_per_hvp": 1e3 * ml,
        "lanczos_hvp_over_gradient": ml / mg,
        "trace_ms_per_hvp": 1e3 * mt,
        "trace_hvp_over_gradient": mt / mg,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/hessian_efficiency.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    runs = [run_seed(s, args.device) for s in range(args.seeds)]
    timing = time_hvp_vs_grad(args.device, args.repeats)
    result = {
        "command": "python benchmarks/hessian_efficiency.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "device": args.device
        if args.device == "cpu"
        else torch.cuda.get_device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "runs": runs,
        "timing": timing,
        "seconds": time.perf_counter() - t0,
    }

    print(f"model: 1-D CNN, {runs[0]['num_params']} parameters; data: 2 batches of 256")
    hdr = (f"{'seed':>4} {'lambda_1 (ref)':>14} {'Lanczos HVPs to 1%':>19} {'Lanczos tol1e-3':>16} "
           f"{'Power HVPs to 1%':>17} {'Power (PyHessian)':>18}")  # fmt: skip
    print(hdr)
    for r in runs:
        lz = f"{r['lanczos_tol1e-3_hvps']} ({r['lanczos_tol1e-3_rel_error']:.1e})"
        pw = f"{r['power_pyhessian_hvps']} ({r['power_pyhessian_rel_error']:.1e})"
        print(f"{r['seed']:>4} {r['lambda_max_reference']:>14.5f} "
              f"{str(r['lanczos_hvps_to_1pct']):>19} {lz:>16} "
              f"{str(r['power_hvps_to_1pct']):>17} {pw:>18}")  # fmt: skip
    print("(in parentheses: relative error of the returned λ₁)")
    print(f"top-3: Lanczos {[r['top3_lanczos_hvps'] for r in runs]} HVPs, "
          f"power+deflation {[r['top3_power_hvps'] for r in runs]} HVPs")  # fmt: skip
    print(f"one gradient {timing['gradient_ms']:.2f} ms, one standalone HVP "
          f"{timing['hvp_ms']:.2f} ms ({timing['hvp_over_gradient']:.2f}x); per HVP inside "
          f"top_eigenvalues {timing['lanczos_ms_per_hvp']:.2f} ms "
          f"({timing['lanczos_hvp_over_gradient']:.2f}x), inside hessian_trace "
          f"{timing['trace_ms_per_hvp']:.2f} ms ({timing['trace_hvp_over_gradient']:.2f}x) "
          f"(medians of {timing['repeats']}, {result['device']}, "
          f"{result['threads']} threads)")  # fmt: skip

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"saved {args.out} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
