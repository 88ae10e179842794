"""CPU cost of one run of each embedded bench task, and the provisional validation targets.

Runs ``samkit train --recipe TASK --optimizer NAME --seed S --threads 1 --quiet --out DIR``
as a child process for each task's reference optimizer on every seed and each other optimizer
on the first seed (seeds in the outer loop, so the tasks and methods share the machine's load
alike; ``--workers 2`` runs two at a time, as a 2-core study does) and records, per run, the
child's CPU seconds
(user + system, from ``os.wait4``: imports, data generation and evaluation included, what
``time samkit train ...`` reports), its wall seconds, and from ``summary.json`` the training
time, the final and best validation accuracy and the time to target.

The study budget this checks (issue 18): 14 methods x 4 tasks x (K trials + N final seeds)
runs in 75 minutes on 2 cores, i.e. about 15 s of CPU per run on average, two-pass methods
included: an SGD run of about 6-8 s per task.

Provisional targets: for each task, the validation accuracy its reference optimizer (SGD;
AdamW on ``modular-add``, where SGD stays at chance) reaches at 80 % of its epochs, median
over the seeds (AlgoPerf sets its targets from tuned runs; these use the recipe's values).

    python benchmarks/task_cost.py --seeds 0 1 2 --workers 2 --out benchmarks/results/task_cost.json

Prints a table (median CPU seconds per task and optimizer; each reference optimizer's
validation accuracy at 80 % of its epochs) and saves every run to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS = ("mnist1d", "mnist1d-noisy", "digits", "modular-add")
#: The optimizer whose runs set a task's provisional target.
REFERENCE = {"modular-add": "adamw"}


def run_once(task: str, optimizer: str, seed: int, folder: Path) -> dict[str, Any]:
    out = folder / f"{task}-{optimizer}-{seed}"
    cmd = [sys.executable, "-m", "samkit", "train", "--recipe", task, "--optimizer", optimizer,
           "--seed", str(seed), "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.strip()}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    at80 = rows[round(0.8 * len(rows)) - 1]
    return {
        "task": task,
        "optimizer": optimizer,
        "seed": seed,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "train_time_s": summary["train_time_s"],
        "epochs": summary["epochs"],
        "val_acc": summary["val_acc"],
        "best_val_acc": summary["best_val_acc"],
        "best_val_epoch": summary["best_val_epoch"],
        "val_acc_at_80pct": at80["val_acc"],
        "epoch_at_80pct": at80["epoch"],
        "final_train_acc": summary["final_train_acc"],
        "time_to_target": summary["time_to_target"],
        "last_line": stdout.strip().splitlines()[-1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--optimizers", nargs="+", default=["sgd", "sam"],
                   help="besides each task's reference optimizer (default sgd sam)")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="of the reference optimizers; the others run the first one only")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--out", default=None, help="JSON file for every run")
    args = p.parse_args(argv)
    load_at_start = os.getloadavg()

    plan = []
    for seed in args.seeds:
        for task in args.tasks:
            ref = REFERENCE.get(task, "sgd")
            others = args.optimizers if seed == args.seeds[0] else []
            plan += [(task, opt, seed) for opt in dict.fromkeys([ref, *others])]
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.workers) as pool,
    ):
        futures = [pool.submit(run_once, task, opt, seed, Path(tmp)) for task, opt, seed in plan]
        for future in futures:
            r = future.result()
            runs.append(r)
            print(f"{r['task']:<14} {r['optimizer']:<6} seed {r['seed']}: {r['cpu_s']:5.1f} s "
                  f"CPU, {r['wall_s']:5.1f} s wall | {r['last_line']}", flush=True)  # fmt: skip

    print("\n| task | optimizer | median CPU s (1 thread) | median training s | reference: val acc at 80 % of epochs, median (seeds) |")  # fmt: skip
    print("|---|---|---|---|---|")
    targets: dict[str, Any] = {}
    for task in args.tasks:
        ref = REFERENCE.get(task, "sgd")
        for opt in dict.fromkeys([ref, *args.optimizers]):
            mine = [r for r in runs if r["task"] == task and r["optimizer"] == opt]
            cpu = statistics.median(r["cpu_s"] for r in mine)
            train_s = statistics.median(r["train_time_s"] for r in mine)
            ref_text = ""
            if opt == ref:
                at80 = [r["val_acc_at_80pct"] for r in mine]
                targets[task] = {"reference": ref, "val_acc_at_80pct": at80,
                                 "median": statistics.median(at80),
                                 "epoch": mine[0]["epoch_at_80pct"]}  # fmt: skip
                ref_text = f"{statistics.median(at80):.4f} ({', '.join(f'{a:.4f}' for a in at80)})"
            print(f"| `{task}` | {opt} | {cpu:.1f} | {train_s:.1f} | {ref_text} |")
    if args.out:
        record = {
            "command": " ".join(["python", "benchmarks/task_cost.py", *(argv or sys.argv[1:])]),
            "workers": args.workers,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_avg_at_start": load_at_start,
                "load_avg_at_end": os.getloadavg(),
            },
            "targets": targets,
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
