"""Fair comparisons across methods, seeds and tasks: ``samkit bench`` and ``samkit report``.

Typical use::

    from samkit.bench import bench, write_report
    bench("runs/cmp", tasks=["mnist1d", "mnist1d-noisy"], optimizers=["sgd", "sam"], seeds=5,
          workers=2)
    write_report("runs/cmp")   # runs/cmp/report.md, report.html, figures/*.png

Every (task, optimizer, seed) is an ordinary ``samkit train`` run directory; the sweep is
resumable (finished runs are skipped, interrupted ones resumed from their checkpoint).
``bench(..., trials=K)`` first tunes every method on a validation split
(:mod:`samkit.bench.tuning`).
"""

from samkit.bench.plan import BUDGETS, OptimizerSpec, PlannedRun, parse_spec, plan_sweep
from samkit.bench.report import collect, write_report
from samkit.bench.run import RunResult, SweepError, run_sweep
from samkit.bench.stats import (
    holm,
    median_time,
    paired_difference,
    performance_profile,
    summarize,
    t_quantile_975,
)
from samkit.bench.sweep import MANIFEST, QUICK, bench, read_manifest
from samkit.bench.tuning import TUNING, choose, validation_accuracy

__all__ = [
    "BUDGETS",
    "MANIFEST",
    "QUICK",
    "TUNING",
    "OptimizerSpec",
    "PlannedRun",
    "RunResult",
    "SweepError",
    "bench",
    "choose",
    "collect",
    "holm",
    "median_time",
    "paired_difference",
    "parse_spec",
    "performance_profile",
    "plan_sweep",
    "read_manifest",
    "run_sweep",
    "summarize",
    "t_quantile_975",
    "validation_accuracy",
    "write_report",
]
