"""What a ``samkit bench`` sweep runs: tasks × optimizer specs × seeds, under a budget.

Every run is an ordinary ``samkit train`` run directory, described by the settings given to it
(the same ones its ``samkit train`` command line gives) on top of its task's recipe:

    DIR/<task>/<optimizer spec>/seed<S>-<E>ep/    config.json, metrics.jsonl, summary.json, ...

The epochs are part of the name, so a sweep with other epochs (``--epochs``, or the longer runs
of ``--budget equal-grad-evals``) never mistakes one run for another.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samkit.optim import get_optimizer_info, list_optimizers
from samkit.train.config import ConfigError, TrainConfig, check_optimizer_name, parse_value
from samkit.train.data import DATASETS
from samkit.train.recipes import (
    RECIPE_DIR,
    Recipe,
    load_recipe,
    method_table_settings,
    resolve_settings,
    run_config,
)

__all__ = [
    "BUDGETS",
    "OptimizerSpec",
    "PlannedRun",
    "Task",
    "expand_optimizers",
    "parse_spec",
    "Sweep",
    "plan_sweep",
    "plural",
    "train_argv",
]

#: ``equal-epochs``: every method the task's epochs. ``equal-grad-evals``: every method as
#: many gradient evaluations as the most expensive one (cheaper ones run more epochs).
BUDGETS = ("equal-epochs", "equal-grad-evals")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """``name[:key=value,...]``: a registered optimizer and settings for it alone.

    The keys are those of a recipe's ``[methods.NAME]`` table: the method's hyperparameters,
    its base optimizer's arguments, and ``lr``, ``momentum``, ``weight_decay``, ``base``,
    ``rho``.
    """

    text: str
    name: str
    settings: dict[str, Any]
    raw: dict[str, str]

    @property
    def slug(self) -> str:
        """A folder name: ``fsam:rho=0.05,lr=0.1`` -> ``fsam_rho=0.05_lr=0.1``."""
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", self.text.replace(":", "_").replace(",", "_"))

    @property
    def passes(self) -> float:
        return get_optimizer_info(self.name).passes


def parse_spec(text: str) -> OptimizerSpec:
    """Parse ``"fsam:rho=0.05,lr=0.1"``; ``ConfigError`` naming the bad part."""
    name, sep, rest = str(text).strip().partition(":")
    name = check_optimizer_name(name.strip(), f"--optimizers {text!r}")
    settings: dict[str, Any] = {}
    raw: dict[str, str] = {}
    if sep:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key.isidentifier():
                raise ConfigError(f"--optimizers {text!r}: expected NAME:KEY=VALUE,KEY=VALUE")
            settings[key] = parse_value(value.strip())
            raw[key] = value.strip()
    canonical = name + (":" + ",".join(f"{k}={v}" for k, v in raw.items()) if raw else "")
    return OptimizerSpec(text=canonical, name=name, settings=settings, raw=raw)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task of the sweep: a recipe (embedded name or file) and the overlays over it."""

    name: str
    recipe: Recipe
    overlays: tuple[Recipe, ...] = ()

    @property
    def recipe_specs(self) -> list[str]:
        """What ``--recipe`` gets, in order: embedded names stay names, files become paths."""
        out = []
        for r in (self.recipe, *self.overlays):
            embedded = Path(r.path).resolve().parent == RECIPE_DIR
            out.append(r.name if embedded else str(Path(r.path).resolve()))
        return out


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One (task, optimizer spec, seed, epochs) of the sweep; with ``--trials``, also the
    trial whose drawn ``params`` (settings over the spec's) it trains."""

    task: str
    spec: OptimizerSpec
    seed: int
    epochs: int
    budgets: tuple[str, ...]
    out: Path
    given: dict[str, Any]
    config: TrainConfig
    recipe_specs: tuple[str, ...]
    trial: int | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a run of the search (``--trials``): selection reads it, the tables never do
    tuning: bool = False

    @property
    def key(self) -> str:
        what = self.spec.text if self.trial is None else f"{self.spec.text} trial {self.trial}"
        if self.tuning:
            return f"{self.task} {what} ({plural(self.epochs, 'epoch')})"
        return f"{self.task} {what} seed {self.seed} ({plural(self.epochs, 'epoch')})"

    @property
    def cost(self) -> float:
        """Planned passes (for ordering and the ETA; reports use measured figures)."""
        return self.spec.passes * self.epochs

    @property
    def argv(self) -> list[str]:
        """The equivalent ``samkit train`` arguments."""
        return train_argv(self.recipe_specs, self.given)


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def train_argv(recipe_specs: Sequence[str], given: dict[str, Any]) -> list[str]:
    """``samkit train`` arguments that give exactly ``given`` over ``recipe_specs``."""
    argv: list[str] = []
    for r in recipe_specs:
        argv += ["--recipe", r]
    for key, value in given.items():
        if key == "opt_args":
            for k, v in value.items():
                argv += ["--opt-arg", f"{k}={_flag_value(v)}"]
        elif key == "model_args":
            for k, v in value.items():
                argv += ["--model-arg", f"{k}={_flag_value(v)}"]
        elif key == "resume":
            if value:
                argv.append("--resume")
        else:
            argv += ["--" + key.replace("_", "-"), _flag_value(value)]
    return argv


def expand_optimizers(optimizers: Sequence[str]) -> list[str]:
    """``all`` stands for every registered optimizer: the plain baselines first (``sgd`` is the
    reference of the paired differences), then ``sam``, then the others by name. A name given
    before ``all`` keeps its place and is not repeated."""
    out: list[str] = []
    for o in optimizers:
        if o.strip().lower() != "all":
            out.append(o)
            continue
        names = list_optimizers()
        plain = [n for n in ("sgd", "adamw") if n in names]
        plain += [n for n in list_optimizers(sharpness_aware=False) if n not in plain]
        rest = ["sam"] if "sam" in names else []
        rest += [n for n in list_optimizers(sharpness_aware=True) if n != "sam"]
        given = {parse_spec(x).name for x in out if ":" not in x}
        out += [n for n in plain + rest if n not in given]
    return out


def _task(spec: str, overlays: Sequence[Recipe]) -> Task:
    recipe = load_recipe(spec)
    return Task(name=recipe.name, recipe=recipe, overlays=tuple(overlays))


def plan_sweep(
    out: str | Path,
    tasks: Sequence[str],
    optimizers: Sequence[str],
    seeds: int | Sequence[int],
    *,
    budget: str = "equal-epochs",
    epochs: int | None = None,
    overlays: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    data_dir: str | None = None,
) -> tuple[list[Task], list[OptimizerSpec], list[PlannedRun]]:
    """Every run of the sweep, its settings resolved (a bad spec or setting fails here,
    before any run).

    ``budget`` is one of :data:`BUDGETS` or ``"both"``; ``extra`` are settings given to every
    run (``limit_train``, ``device``, ``track_sharpness``...), except ``data_dir`` (also
    accepted as ``data_dir=``), given only to the runs whose dataset reads files.
    """
    sweep = Sweep.parse(
        out, tasks, optimizers, seeds, budget=budget, epochs=epochs, overlays=overlays,
        extra=extra, data_dir=data_dir,
    )  # fmt: skip
    runs = [r for task in sweep.tasks for spec in sweep.specs for r in sweep.runs(task, spec)]
    return list(sweep.tasks), list(sweep.specs), runs


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The checked options of a sweep; :meth:`runs` plans the runs of one (task, spec)."""

    out: Path
    tasks: tuple[Task, ...]
    specs: tuple[OptimizerSpec, ...]
    seeds: tuple[int, ...]
    budgets: tuple[str, ...]
    epochs: int | None
    extra: dict[str, Any]

    @classmethod
    def parse(
        cls,
        out: str | Path,
        tasks: Sequence[str],
        optimizers: Sequence[str],
        seeds: int | Sequence[int],
        *,
        budget: str = "equal-epochs",
        epochs: int | None = None,
        overlays: Sequence[str] = (),
        extra: dict[str, Any] | None = None,
        data_dir: str | None = None,
    ) -> Sweep:
        """Check the options (``ConfigError`` naming the bad one); load tasks and specs."""
        budgets = BUDGETS if budget == "both" else (budget,)
        for b in budgets:
            if b not in BUDGETS:
                raise ConfigError(
                    f"invalid --budget {budget!r}; choose from {', '.join(BUDGETS)}, both"
                )
        if isinstance(seeds, int):
            if isinstance(seeds, bool) or seeds < 1:
                raise ConfigError(f"invalid --seeds {seeds} (must be >= 1)")
            seeds = list(range(seeds))
        if not seeds:
            raise ConfigError("give at least one seed (--seeds)")
        if not tasks:
            raise ConfigError("give at least one task (--tasks)")
        if not optimizers:
            raise ConfigError("give at least one optimizer (--optimizers)")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
        ):
            raise ConfigError(f"invalid --epochs {epochs!r} (must be an integer >= 1)")
        overlay_recipes = [load_recipe(o) for o in overlays]
        task_list = [_task(t, overlay_recipes) for t in tasks]
        names = [t.name for t in task_list]
        if len(set(names)) != len(names):
            raise ConfigError(f"--tasks names a task twice: {names}")
        specs = [parse_spec(o) for o in expand_optimizers(optimizers)]
        texts = [s.text for s in specs]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"--optimizers names an optimizer twice: {texts}")
        extra = dict(extra or {})
        if data_dir is not None:
            extra["data_dir"] = data_dir
        return cls(
            Path(out), tuple(task_list), tuple(specs), tuple(seeds), tuple(budgets), epochs,
            extra,
        )  # fmt: skip

    def own(self, task: Task) -> TrainConfig:
        """The task's own settings (its recipes, no method table)."""
        return resolve_settings([task.recipe, *task.overlays], {})

    def epochs_of(self, task: Task, spec: OptimizerSpec, budget: str) -> int:
        """The epochs of ``spec``'s runs on ``task`` under ``budget``."""
        base_epochs = self.epochs or self.own(task).epochs
        if budget != "equal-grad-evals":
            return base_epochs
        max_passes = max(s.passes for s in self.specs)
        return max(1, math.floor(base_epochs * max_passes / spec.passes + 0.5))

    def runs(
        self,
        task: Task,
        spec: OptimizerSpec,
        *,
        seeds: Sequence[int] | None = None,
        budgets: Sequence[str] | None = None,
        trial: int | None = None,
        params: dict[str, Any] | None = None,
        tuning: bool = False,
    ) -> list[PlannedRun]:
        """The runs of ``spec`` on ``task``: every seed (default: the sweep's) under every
        budget (default: the sweep's); a run that is the same under two budgets is planned
        once. With ``trial``, the runs of that trial's drawn ``params``, in
        ``<spec>/trial<I>-seed<S>-<E>ep/``, else in ``<spec>/seed<S>-<E>ep/``; ``tuning``:
        runs of the search itself."""
        own = self.own(task)
        runs: dict[Path, PlannedRun] = {}
        for b in self.budgets if budgets is None else budgets:
            e = self.epochs_of(task, spec, b)
            for seed in self.seeds if seeds is None else seeds:
                name = f"seed{seed}-{e}ep" if trial is None else f"trial{trial}-seed{seed}-{e}ep"
                path = self.out / task.name / spec.slug / name
                if path in runs:
                    prev = runs[path]
                    runs[path] = dataclasses.replace(prev, budgets=(*prev.budgets, b))
                    continue
                runs[path] = dataclasses.replace(
                    _planned(task, own, spec, seed, e, b, path, self.extra, trial, params),
                    tuning=tuning,
                )
        return list(runs.values())


def _planned(
    task: Task,
    own: TrainConfig,
    spec: OptimizerSpec,
    seed: int,
    epochs: int,
    budget: str,
    path: Path,
    extra: dict[str, Any],
    trial: int | None = None,
    params: dict[str, Any] | None = None,
) -> PlannedRun:
    """The run, its settings resolved as ``samkit train`` resolves its command line."""
    what = f"--optimizers {spec.text!r}" + (f", trial {trial} {params}" if params else "")
    try:
        table = method_table_settings(spec.name, {**spec.settings, **(params or {})})
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from e
    given: dict[str, Any] = {"optimizer": spec.name, **table, "seed": seed, "epochs": epochs}
    given.update(extra)
    dataset = DATASETS.get(given.get("dataset", own.dataset))
    if dataset is None or not dataset.needs_data_dir:
        given.pop("data_dir", None)  # only the runs that read files get --data-dir
    given["out"] = str(path)
    try:
        config = run_config([task.recipe, *task.overlays], given)
    except ConfigError as e:
        raise ConfigError(f"task {task.name}, {what}: {e}") from e
    return PlannedRun(
        task=task.name,
        spec=spec,
        seed=seed,
        epochs=epochs,
        budgets=(budget,),
        out=path,
        given=given,
        config=config,
        recipe_specs=tuple(task.recipe_specs),
        trial=trial,
        params=dict(params or {}),
    )
