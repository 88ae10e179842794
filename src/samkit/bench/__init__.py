"""Fair comparisons across methods, seeds and tasks: ``samkit bench`` and ``samkit report``.

Typical use::

    from samkit.bench import bench, write_report
    bench("runs/cmp", tasks=["mnist1d", "mnist1d-noisy"], optimizers=["sgd", "sam"], seeds=5,
          workers=2)
    write_report("runs/cmp")   # runs/cmp/report.md, report.html, figures/*.png

Every (task, optimizer, seed) is an ordinary ``samkit train`` run directory; the sweep is
resumable (finished runs are skipped, interrupted ones resumed from their checkpoint).
"""

from samkit.bench.plan import BUDGETS, OptimizerSpec, PlannedRun, parse_spec, plan_sweep
from samkit.bench.report import collect, write_report
from samkit.bench.run import RunResult, SweepError, run_sweep
from samkit.bench.stats import paired_difference, summarize, t_quantile_975
from samkit.bench.sweep import MANIFEST, bench, read_manifest

__all__ = [
    "BUDGETS",
    "MANIFEST",
    "OptimizerSpec",
    "PlannedRun",
    "RunResult",
    "SweepError",
    "bench",
    "collect",
    "paired_difference",
    "parse_spec",
    "plan_sweep",
    "read_manifest",
    "run_sweep",
    "summarize",
    "t_quantile_975",
    "write_report",
]
