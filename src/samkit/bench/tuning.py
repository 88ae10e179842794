"""What ``samkit bench --trials K`` runs and how it chooses: the tuning stage of a sweep.

For each (task, method): K settings drawn from the method's search space by one seeded,
scrambled Sobol sequence (the same K and the same sequence for every method), each trained
as an ordinary run directory at the trial seed :data:`TRIAL_SEED`::

    DIR/<task>/<optimizer spec>/trial<I>-seed<TRIAL_SEED>-<E>ep/

The trial with the best validation accuracy (``best_val_acc`` of its ``summary.json``; ties:
the lowest index) is then run with the sweep's seeds (0..N-1, never the trial seed) as fresh
runs, ``DIR/<task>/<spec>/trial<C>-seed<S>-<E>ep/``, and those make the report's tables.
``DIR/tuning.json`` records every trial and the choice.

Selection sees validation accuracy only: :func:`validation_accuracy` reads one key of a
run's summary, and :func:`choose` takes the list of those numbers. Nothing here runs
anything: a stage is a list of planned runs handed to the sweep's executor
(:func:`samkit.bench.run.run_sweep`), and the results are read back from the run
directories.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samkit.bench.plan import OptimizerSpec, PlannedRun, Sweep, Task
from samkit.train.checkpoint import atomic_write_json
from samkit.train.config import ConfigError, TrainConfig

__all__ = [
    "SEARCH_SEED",
    "TRIAL_SEED",
    "TUNING",
    "VALIDATION_KEY",
    "Tuning",
    "choose",
    "plan_trials",
    "read_tuning",
    "tuning_record",
    "validation_accuracy",
]

#: The tuning record in DIR.
TUNING = "tuning.json"
#: The run seed of every trial; the final runs use the sweep's seeds, which may not include it.
TRIAL_SEED = 1000
#: The seed of the scrambled Sobol sequence: the same draws for every method's space.
SEARCH_SEED = 0
#: The one key of a trial's summary.json that selection reads.
VALIDATION_KEY = "best_val_acc"


# ----------------------------------------------------------------------------- the train side
# A method's search space is declared once, next to the method, and a task's recipe may
# override it; the draws are a pure function of (space, k, seed). Both live in samkit.train
# (issue 18's train-side half); these four functions are the only places bench touches them.


def search_space(task: Task, method: str, base: str) -> Any:
    """The search space of ``method`` over ``base`` on ``task``: its declaration, as the
    task's recipes' ``[search.NAME]`` tables override it. ``ConfigError`` naming the
    problem for an invalid space."""
    try:
        from samkit.train.search import search_space as declared
    except ImportError as e:
        raise ConfigError(
            "--trials needs the methods' search spaces (samkit.train.search), which this "
            "build of samkit does not have"
        ) from e
    try:
        return declared(method, [task.recipe, *task.overlays], base=base)
    except ValueError as e:  # ConfigError included
        raise ConfigError(f"task {task.name}, search space of {method}: {e}") from e


def draw_trials(space: Any, k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` settings from ``space``: a seeded, scrambled Sobol sequence."""
    from samkit.train.search import draw_trials as draw

    return draw(space, k, seed)


def has_validation(config: TrainConfig) -> bool:
    """Whether a run of ``config`` holds out a validation split."""
    return bool(getattr(config, "val_fraction", None))


def declared_target(config: TrainConfig) -> float | None:
    """The validation target a run of ``config`` measures its time-to-target against."""
    return getattr(config, "val_target", None)


# ----------------------------------------------------------------------------- selection


def validation_accuracy(run_dir: str | Path) -> float | None:
    """A finished run's best validation accuracy (``summary.json``'s
    :data:`VALIDATION_KEY`), ``None`` if it did not finish or has none. This is the only
    metric selection ever reads."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not summary.get("completed"):
        return None
    value = summary.get(VALIDATION_KEY)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def choose(val_accs: Sequence[float | None]) -> int | None:
    """Index of the best validation accuracy (ties: the lowest index); ``None`` entries
    (failed trials) are passed over; ``None`` if there is none."""
    best: int | None = None
    for i, v in enumerate(val_accs):
        if v is not None and (best is None or v > val_accs[best]):  # type: ignore[operator]
            best = i
    return best


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The trial stage of a sweep: ``k`` trials per (task, spec), in index order."""

    k: int
    trials: dict[tuple[str, str], list[PlannedRun]]

    @property
    def runs(self) -> list[PlannedRun]:
        return [r for runs in self.trials.values() for r in runs]


def _plain(value: Any) -> Any:
    """A JSON/TOML-friendly Python value (numpy scalars from the draws become floats/ints)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def plan_trials(sweep: Sweep, k: int) -> Tuning:
    """Every trial of every (task, spec), resolved (any problem is a ``ConfigError`` here,
    before anything is written): ``k`` draws from each method's space, trained at
    :data:`TRIAL_SEED` for the epochs of the sweep's first budget."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"invalid --trials {k!r} (must be an integer >= 1; 0: no tuning)")
    if TRIAL_SEED in sweep.seeds:
        raise ConfigError(
            f"--seeds includes {TRIAL_SEED}, the seed of the trials: the final runs must "
            "use other seeds than the runs that chose their settings"
        )
    trials: dict[tuple[str, str], list[PlannedRun]] = {}
    for task in sweep.tasks:
        for spec in sweep.specs:
            (plain,) = sweep.runs(task, spec, seeds=[TRIAL_SEED], budgets=sweep.budgets[:1])
            space = search_space(task, spec.name, plain.config.base)
            draws = [{key: _plain(v) for key, v in d.items()}
                     for d in draw_trials(space, k, SEARCH_SEED)]  # fmt: skip
            _check_fixed(spec, draws)
            runs = []
            for i, params in enumerate(draws):
                (run,) = sweep.runs(task, spec, seeds=[TRIAL_SEED],
                                    budgets=sweep.budgets[:1], trial=i, params=params,
                                    tuning=True)  # fmt: skip
                if not has_validation(run.config):
                    raise ConfigError(
                        f"--trials: task {task.name} has no validation split to choose on "
                        "(its recipe sets none); selection never looks at test accuracy"
                    )
                runs.append(run)
            trials[(task.name, spec.text)] = runs
    return Tuning(k, trials)


def _check_fixed(spec: OptimizerSpec, draws: Sequence[dict[str, Any]]) -> None:
    searched = sorted({key for d in draws for key in d} & set(spec.settings))
    if searched:
        raise ConfigError(
            f"--optimizers {spec.text!r} fixes {', '.join(searched)}, which --trials "
            f"searches: drop it from the spec, or narrow {spec.name}'s search space in a "
            "recipe"
        )


def tuning_record(tuning: Tuning, out: str | Path) -> dict[str, Any]:
    """``tuning.json``'s content, from the trials' run directories: every trial's params,
    validation accuracy (``null``: it did not finish) and run folder; the chosen index."""
    out = Path(out)
    record: dict[str, Any] = {"tasks": {}}
    for (task, spec), runs in tuning.trials.items():
        accs = [validation_accuracy(r.out) for r in runs]
        record["tasks"].setdefault(task, {})[spec] = {
            "trials": [
                {"params": dict(r.params), "val_acc": acc, "run": str(r.out.relative_to(out))}
                for r, acc in zip(runs, accs)
            ],
            "chosen": choose(accs),
        }
    return record


def write_tuning(out: str | Path, record: dict[str, Any]) -> Path:
    path = Path(out) / TUNING
    atomic_write_json(path, record)
    return path


def read_tuning(out: str | Path) -> dict[str, Any]:
    """``DIR/tuning.json`` (``ValueError`` naming it if damaged)."""
    path = Path(out) / TUNING
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); rerun samkit bench to rewrite it") from e


def final_runs(sweep: Sweep, tuning: Tuning, record: dict[str, Any]) -> list[PlannedRun]:
    """The runs that make the tables: each (task, spec)'s chosen trial at the sweep's seeds
    under its budgets (nothing for a spec none of whose trials finished)."""
    runs = []
    for task in sweep.tasks:
        for spec in sweep.specs:
            chosen = record["tasks"][task.name][spec.text]["chosen"]
            if chosen is None:
                continue
            params = tuning.trials[(task.name, spec.text)][chosen].params
            runs += sweep.runs(task, spec, trial=chosen, params=params)
    return runs
