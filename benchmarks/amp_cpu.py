"""Epoch time of ``samkit train`` on CPU with ``--amp off``, ``bf16`` and ``fp16``, interleaved.

Usage::

    python benchmarks/amp_cpu.py                          # the embedded recipe's data and model
    python benchmarks/amp_cpu.py --dataset digits --rounds 5

Every round trains one short run per AMP mode in turn (same seed, same data, same model), so
machine noise hits all three alike; the figures are medians over rounds of the per-round ratio
of each mode's training time (``train_time_s``: the epochs' seconds, evaluation included) to
``--amp off``. It backs the warning ``samkit train`` prints for ``--amp fp16`` on a CPU.
Results are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch

from samkit.train import TrainConfig, TrainWarning, train
from samkit.train.env import hardware_info, versions_info

MODES = ("off", "bf16", "fp16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--optimizer", default="sam")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit-train", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/amp_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", TrainWarning)  # the warning this script measures

    def run(amp: str) -> float:
        config = TrainConfig(
            dataset=args.dataset,
            optimizer=args.optimizer,
            epochs=args.epochs,
            limit_train=args.limit_train,
            limit_test=256,
            amp=amp,
            device="cpu",
        )
        return float(train(config, log=None)["train_time_s"])

    for amp in MODES:  # warm-up: data generation, first-call costs
        run(amp)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for amp in MODES:
            times[amp].append(run(amp))
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES))
    ratios = {
        m: statistics.median(t / o for t, o in zip(times[m], times["off"], strict=True))
        for m in MODES
    }
    result = {
        "settings": vars(args),
        "median_seconds": {m: statistics.median(times[m]) for m in MODES},
        "ratio_to_off": ratios,
        "seconds": times,
        "versions": versions_info(),
        "hardware": hardware_info(torch.device("cpu")),
        "python": platform.python_version(),
    }
    for m in MODES:
        print(f"--amp {m:<4}: {result['median_seconds'][m]:.2f} s, {ratios[m]:.1f}x off")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
