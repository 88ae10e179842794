"""Training time of ``samkit train`` on CPU with and without ``--compile``, interleaved.

Usage::

    python benchmarks/compile_cpu.py                     # the embedded recipe: MNIST-1D, cnn1d, SAM
    python benchmarks/compile_cpu.py --optimizer sgd --rounds 7

One process, with a fresh compile cache (``--warm-cache``: torch's usual one). A warm-up trains one eager run and one compiled run: the compiled one pays for
compiling every graph the recipe needs (training, BatchNorm-frozen perturbed passes where there
is BatchNorm, the last smaller batch, evaluation), which is reported as the compile overhead.
Then every round trains one eager and one compiled run of the same settings in turn (same
seed, data and model; the compiled graphs are reused, as in the later epochs of a long run), so
machine noise hits both alike. The figure is the median over rounds of the per-round ratio of
the compiled run's training time (``train_time_s``: the epochs' seconds, evaluation included)
to the eager one's. Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from samkit.train import TrainConfig, train
from samkit.train.env import hardware_info, versions_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--optimizer", default="sam")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compile_cpu.json")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use torch's on-disk compile cache (default: a fresh one, so the "
                         "overhead is that of a first compile)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="samkit-inductor-")

    def run(compiled: bool) -> float:
        config = TrainConfig(
            dataset=args.dataset,
            optimizer=args.optimizer,
            epochs=args.epochs,
            limit_train=args.limit_train,
            compile=compiled,
            device="cpu",
        )
        return float(train(config, log=None)["train_time_s"])

    run(False)  # data generation, first-call costs
    eager_first = run(False)
    t0 = time.perf_counter()
    compiled_first = run(True)
    compile_wall = time.perf_counter() - t0
    print(f"warm-up: eager {eager_first:.2f} s, first compiled run {compiled_first:.2f} s")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        times["eager"].append(run(False))
        times["compiled"].append(run(True))
        print(
            f"round {r + 1}: eager {times['eager'][-1]:.2f} s, compiled {times['compiled'][-1]:.2f} s"
        )
    ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"], strict=True))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "settings": vars(args),
        "median_seconds": median,
        "ratio_compiled_to_eager": ratio,
        "first_compiled_run_seconds": compiled_first,
        "first_compiled_run_wall_seconds": compile_wall,
        "compile_overhead_seconds": compiled_first - median["compiled"],
        "seconds": times,
        "versions": versions_info(),
        "hardware": hardware_info(torch.device("cpu")),
        "python": platform.python_version(),
    }
    print(
        f"eager {median['eager']:.2f} s, compiled {median['compiled']:.2f} s per run: "
        f"{ratio:.2f}x; compiling cost {result['compile_overhead_seconds']:.1f} s once"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
