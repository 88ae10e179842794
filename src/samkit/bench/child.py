"""One run of a sweep, in a process of its own: train the settings the sweep resolved.

A forked child calls :func:`train_planned` directly; elsewhere the sweep starts
``python -m samkit.bench.child SETTINGS_JSON THREADS``. Either way the settings arrive
resolved (``samkit.bench.plan``, or the resumption in ``samkit.bench.run``): the child
resolves nothing. Its output (the run's header, a line per epoch, ``samkit: error: ...`` for
a failure) goes to the run's log, and its exit code says how the run ended.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from samkit.train.config import TrainConfig

__all__ = ["main", "train_planned"]


def train_planned(config: TrainConfig, threads: int) -> int:
    """Train ``config`` with ``threads`` torch threads, printing what ``samkit train
    --no-progress`` prints; the exit code (0 done, 1 diverged, 2 any other failure)."""
    import torch

    from samkit.optim import NonFiniteError
    from samkit.train import train

    torch.set_num_threads(threads)
    try:
        summary = train(config, progress=False, log=print)
    except NonFiniteError as e:
        print(f"samkit: error: training diverged: {' '.join(str(e).split())}", flush=True)
        return 1
    except Exception as e:  # every failure is one line in the log, the sweep goes on
        print(f"samkit: error: {' '.join(str(e).split())}", flush=True)
        return 2
    print(f"test accuracy {100 * summary['test_acc']:.2f}%", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.bench.child SETTINGS_JSON THREADS``."""
    settings, threads = sys.argv[1:] if argv is None else argv
    return train_planned(TrainConfig.from_dict(json.loads(settings)), int(threads))


if __name__ == "__main__":
    sys.exit(main())
