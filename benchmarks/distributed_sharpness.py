"""samkit.sharpness across processes: equality with one process, and the cost of a
distributed HVP (2 gloo processes on the CPU, launched with torchrun; rank 0 writes).

1. **Data parallel, float64.** An MLP 20 → 64 → 64 → 5 (5,829 parameters); 6 batches of
   sizes 50, 70, 30, 90, 40, 60, the first 4 on rank 0 and the last 2 on rank 1 (uneven
   counts and sizes). λ₁ (Lanczos, tol 1e-10), and the trace (Hutch++ and Hutchinson, 30 HVPs,
   seed 0) measured by both processes together, against one process measuring all 6 batches
   (``distributed=False`` on their concatenation in rank order): relative differences, and
   whether both processes got bit-identical results.
2. **FSDP2, float64.** The same model with every ``Linear`` and the root ``fully_shard``-ed:
   λ₁ and the trace against the same single-process values.
3. **Cost of a distributed HVP, float32.** An MLP 784 → 1024 → 512 → 10 (1,333,770
   parameters), one batch of 256 samples per process. Medians of ``--repeats`` interleaved
   repeats of: a local HVP (``hvp(..., distributed=False)``), a distributed HVP (``hvp``),
   an all-reduce of a parameter-sized float32 vector; and per HVP inside
   ``top_eigenvalues`` (10 Lanczos steps) with and without ``distributed``, and with a local
   product followed by an all-reduce of its size inside the same loop (the processes then
   wait for each other at every product, as the distributed run does). Ratio = distributed /
   (local + all-reduce); the target is ≤ 1.1.

Usage:  python benchmarks/distributed_sharpness.py [--repeats 15]
            [--out benchmarks/results/distributed_sharpness.json]
        (re-launches itself as ``torchrun --standalone --nproc-per-node 2``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import samkit.sharpness as S
from samkit.sharpness.hessian import _Hessian

SIZES = [50, 70, 30, 90, 40, 60]
SPLIT = [4, 2]
LOSS = nn.CrossEntropyLoss()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5)
    ).double()


def union() -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in SIZES:
        x = torch.randn(n, 20, generator=g, dtype=torch.float64)
        out.append((x, (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5] > 0.5).long()))
    return out


def measures(model, data, distributed) -> dict:
    eig = S.top_eigenvalues(model, LOSS, data, max_iter=200, tol=1e-10, distributed=distributed)
    out = {"lambda_max": eig.eigenvalues[0], "lambda_hvps": eig.num_hvp}
    for method in ("hutch++", "hutchinson"):
        tr = S.hessian_trace(model, LOSS, data, 30, method=method, distributed=distributed)
        out[f"trace_{method}"] = tr.trace
    return out


def gathered(value: float) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [float(p) for p in parts]


def equality(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    start = sum(SPLIT[:rank])
    mine = union()[start : start + SPLIT[rank]]
    single = measures(small_model(), union(), distributed=False)
    ddp = measures(small_model(), mine, distributed=None)
    model = small_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    fsdp = measures(model, mine, distributed=None)
    out = {"single": single, "data_parallel": ddp, "fsdp2": fsdp}
    for name, res in (("data_parallel", ddp), ("fsdp2", fsdp)):
        out[f"{name}_relative_difference"] = {
            k: abs(res[k] - single[k]) / abs(single[k]) for k in single if k != "lambda_hvps"
        }
        out[f"{name}_identical_on_every_rank"] = all(
            len(set(gathered(res[k]))) == 1 for k in single
        )
    return out


def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)
    )


def cost(rank: int, repeats: int) -> dict:
    model = big_model()
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(256, 784, generator=g)
    data = [(x, (x[:, :10].argmax(1)))]
    v = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    dim = sum(p.numel() for p in model.parameters())
    buf = torch.randn(dim)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def lanczos(distributed):
        r = S.top_eigenvalues(model, LOSS, data, max_iter=10, tol=1e-30, distributed=distributed)
        return r.num_hvp

    local_matvec = _Hessian.matvec_many

    def with_all_reduce(self, flats):  # a local product, then one all-reduce of its size
        out = local_matvec(self, flats)
        for o in out:
            dist.all_reduce(o.clone())
        return out

    def lanczos_local_plus_all_reduce():
        _Hessian.matvec_many = with_all_reduce
        try:
            return lanczos(False)
        finally:
            _Hessian.matvec_many = local_matvec

    for _ in range(2):  # warm-up
        S.hvp(model, LOSS, data, v, distributed=False)
        S.hvp(model, LOSS, data, v)
        dist.all_reduce(buf)
    keys = ("local", "distributed", "all_reduce", "lanczos_local", "lanczos_dist", "lanczos_ar")
    t = {k: [] for k in keys}
    for _ in range(repeats):
        t["local"].append(timed(lambda: S.hvp(model, LOSS, data, v, distributed=False)))
        t["distributed"].append(timed(lambda: S.hvp(model, LOSS, data, v)))
        t["all_reduce"].append(timed(lambda: dist.all_reduce(buf)))
        t["lanczos_local"].append(timed(lambda: lanczos(False)) / 10)
        t["lanczos_dist"].append(timed(lambda: lanczos(None)) / 10)
        t["lanczos_ar"].append(timed(lanczos_local_plus_all_reduce) / 10)
    med = {k: statistics.median(vs) for k, vs in t.items()}
    return {
        "dim": dim,
        "samples_per_process": 256,
        "repeats": repeats,
        "median_seconds": med,
        "ratio_hvp": med["distributed"] / (med["local"] + med["all_reduce"]),
        "ratio_per_hvp_in_lanczos": med["lanczos_dist"]
        / (med["lanczos_local"] + med["all_reduce"]),
        "ratio_per_hvp_in_lanczos_lockstep": med["lanczos_dist"] / med["lanczos_ar"],
    }


def worker(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/distributed_sharpness.py " + " ".join(sys.argv[1:]),
        "world_size": dist.get_world_size(),
        "backend": "gloo",
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads_per_process": 1,
        "equality": equality(rank),
        "hvp_cost": cost(rank, args.repeats),
    }
    result["seconds"] = time.perf_counter() - t0
    if S.is_writer():
        eq, c = result["equality"], result["hvp_cost"]
        for name in ("data_parallel", "fsdp2"):
            diffs = eq[f"{name}_relative_difference"]
            print(
                f"{name}: relative differences to one process "
                + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                + f"; identical on every rank: {eq[f'{name}_identical_on_every_rank']}"
            )
        m = c["median_seconds"]
        print(
            f"HVP (D={c['dim']:,}): local {1e3 * m['local']:.1f} ms, distributed "
            f"{1e3 * m['distributed']:.1f} ms, all-reduce {1e3 * m['all_reduce']:.1f} ms: ratio "
            f"{c['ratio_hvp']:.3f}; per HVP in Lanczos: local {1e3 * m['lanczos_local']:.1f} ms, "
            f"distributed {1e3 * m['lanczos_dist']:.1f} ms: ratio {c['ratio_per_hvp_in_lanczos']:.3f}; "
            f"against a local HVP followed by an all-reduce in the same loop "
            f"({1e3 * m['lanczos_ar']:.1f} ms): {c['ratio_per_hvp_in_lanczos_lockstep']:.3f}"
        )
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/distributed_sharpness.json")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", __file__, *sys.argv[1:]]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)


if __name__ == "__main__":
    main()
