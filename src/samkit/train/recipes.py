"""Recipes: a task's settings and each method's tuned hyperparameters, in one TOML file.

A class carries its paper's defaults (``samkit.ASAM(...)`` is ASAM as published); values
tuned for a task live in a recipe, which ``samkit train --recipe NAME|FILE`` and
``samkit bench`` apply. A recipe file::

    description = "MNIST-1D, the 1-D CNN, 30 epochs"
    dataset = "mnist1d"            # every top-level key is a `samkit train` setting
    optimizer = "sam"              # the method a plain `samkit train` runs
    epochs = 30
    lr = 0.05

    [model_args]                   # keyword arguments of the model
    channels = 32

    [methods.sam]                  # applied only when the run's optimizer is `sam`
    rho = 0.1

    [methods.adamw]                # lr, momentum, weight_decay and base may differ per method
    lr = 0.003

    [search.sam]                   # optional: a method's search space on this task
    rho = {low = 0.01, high = 0.5, scale = "log"}

    [reported]                     # optional: what a paper reports for this recipe
    source = "Author et al., Venue Year, Table N"
    sam = 80.9

A method table holds the method's hyperparameters (any keyword argument its class or its
base optimizer takes) and the per-method training settings ``lr``, ``momentum``,
``weight_decay``, ``base``. A key that does not exist is an error naming the nearest valid
key. A ``[search.NAME]`` table replaces (or adds) ranges of the method's search space for
this task (:mod:`samkit.train.search`).

Order of precedence (later wins), :func:`resolve_settings`:

1. ``TrainConfig``'s field defaults;
2. the recipes, in the order given (``--recipe A --recipe B``: B's keys win), then the method
   table of the run's optimizer;
3. on ``--resume`` instead of 1-2: the settings stored in the checkpoint (a resumed run is the
   same computation; a recipe cannot be combined with ``--resume``), except its
   ``stop_after_epoch``: a resumed run continues to ``epochs`` unless stopped again;
4. the settings given explicitly (a ``--config`` file, then command-line flags).

When an explicit ``dataset`` differs from the recipe's (and no ``model`` is given), the
recipe's model and model arguments are dropped (the dataset's default model is used); an
explicit ``model`` drops the recipe's model arguments.

:func:`run_config` is the one resolver: it layers as above and completes the result (the
dataset's default model, known names, the files a dataset needs). ``samkit train``,
``samkit bench`` (once per run, when it plans the sweep) and :func:`recipe_config` call it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samkit.train.build import resolve_config
from samkit.train.config import (
    ConfigError,
    TrainConfig,
    accepted_kwargs,
    check_optimizer_name,
    check_resume,
    optimizer_classes,
    optimizer_settings,
    suggest,
)
from samkit.train.search import SearchDim, layered_space, parse_search_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_RECIPE",
    "METHOD_SETTINGS",
    "RECIPE_DIR",
    "DefaultsRow",
    "Recipe",
    "check_given",
    "defaults_rows",
    "format_value",
    "format_values",
    "list_recipes",
    "load_recipe",
    "merge_recipes",
    "method_table_settings",
    "parse_recipe",
    "recipe_config",
    "resolve_settings",
    "run_config",
]

#: Folder of the recipes shipped with samkit (``samkit/recipes/*.toml``).
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"

#: The recipe ``samkit train`` runs when no ``--recipe`` is given.
DEFAULT_RECIPE = "mnist1d"

#: Training settings a method table may set for its method alone (with ``rho``).
METHOD_SETTINGS = ("lr", "momentum", "weight_decay", "base", "rho")

_META = ("description", "reference")
_TABLES = ("model_args", "methods", "reported", "search")
#: Settings a recipe may not hold, and why.
_NOT_IN_RECIPES = {
    "out": "a recipe describes a task, not where a run is written: use --out",
    "resume": "a recipe describes a task, not a run: use --resume",
    "stop_after_epoch": "a recipe describes a task, not a run: use --stop-after-epoch",
    "recipe": "it is recorded by samkit, not set",
    "rho": "rho belongs to a method: put it in a [methods.NAME] table",
    "opt_args": "method hyperparameters go in a [methods.NAME] table",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe.

    Attributes:
        name: the embedded name, or the file's stem.
        path: the file it was read from.
        description: one line.
        reference: the paper or source of the settings, if any.
        settings: ``TrainConfig`` fields (underscored names), including ``model_args``.
        methods: per-method tables, ``{optimizer name: {key: value}}``.
        reported: what a paper reports for this recipe (``source`` and figures per method).
        search: per-method search ranges for this task, ``{optimizer name: {hyperparameter:
            SearchDim}}`` (:func:`samkit.train.search.search_space` layers them).
    """

    name: str
    path: str
    description: str = ""
    reference: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    reported: dict[str, Any] = dataclasses.field(default_factory=dict)
    search: dict[str, dict[str, SearchDim]] = dataclasses.field(default_factory=dict)


def list_recipes() -> list[str]:
    """Names of the embedded recipes, sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".toml") or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_recipe(spec: str | Path) -> Recipe:
    """An embedded recipe by name (``samkit list recipes``) or a TOML file by path.

    Raises :class:`ConfigError` naming the file and the key for anything invalid.
    """
    spec = str(spec)
    if _is_file_spec(spec):
        path = Path(spec).expanduser()
        name = path.stem
    else:
        path = RECIPE_DIR / f"{spec}.toml"
        name = spec
        if not path.is_file():
            raise ConfigError(
                f"unknown recipe {spec!r}{suggest(spec, list_recipes())}; embedded: "
                f"{', '.join(list_recipes())} (or give a .toml file)"
            )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML (not UTF-8 text: {e.reason})") from e
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML ({e})") from e
    return parse_recipe(data, name=name, path=str(path))


def _key(key: Any) -> str:
    return str(key).replace("-", "_")


def parse_recipe(data: Mapping[str, Any], *, name: str, path: str = "<recipe>") -> Recipe:
    """Validate the parsed TOML ``data`` of a recipe and build a :class:`Recipe`."""
    where = f"recipe {path}"
    fields = set(TrainConfig.field_names())
    top_valid = (fields - set(_NOT_IN_RECIPES)) | set(_META) | set(_TABLES)
    settings: dict[str, Any] = {}
    meta: dict[str, str] = {}
    methods: dict[str, dict[str, Any]] = {}
    reported: dict[str, Any] = {}
    search: dict[str, dict[str, SearchDim]] = {}
    for raw, value in data.items():
        key = _key(raw)
        if key in _NOT_IN_RECIPES:
            raise ConfigError(
                f"{where}: {raw!r} cannot be set in a recipe ({_NOT_IN_RECIPES[key]})"
            )
        if key not in top_valid:
            raise ConfigError(f"{where}: unknown key {raw!r}{suggest(key, top_valid)}")
        if key in _META:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {raw!r} must be a string")
            meta[key] = value
        elif key == "methods":
            methods = _parse_methods(value, where)
        elif key == "reported":
            reported = _parse_reported(value, where)
        elif key == "search":
            search = _parse_search(value, where)
        elif key == "model_args":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [model_args] must be a table of model arguments")
            settings[key] = {_key(k): v for k, v in value.items()}
        else:
            settings[key] = value
    # Types and ranges: the same checks as any run's settings.
    try:
        TrainConfig.from_dict(settings).validate()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e
    base = settings.get("base", TrainConfig.base)
    for method, table in methods.items():
        _check_method_table(method, table, table.get("base", base), where)
    for method in search:
        method_base = methods.get(method, {}).get("base", base)
        try:
            layered_space(method, method_base if isinstance(method_base, str) else "sgd", search)
        except ConfigError as e:
            raise ConfigError(f"{where}: [search.{method}] {e}") from e
    return Recipe(
        name=name,
        path=path,
        description=meta.get("description", ""),
        reference=meta.get("reference", ""),
        settings=settings,
        methods=methods,
        reported=reported,
        search=search,
    )


def _parse_search(value: Any, where: str) -> dict[str, dict[str, SearchDim]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [search] must hold one table per optimizer")
    out: dict[str, dict[str, SearchDim]] = {}
    for method, table in value.items():
        name = check_optimizer_name(method, f"{where}: [search.{method}]")
        out[name] = parse_search_table(method, table, where)
    return out


def _parse_methods(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [methods] must hold one table per optimizer")
    out: dict[str, dict[str, Any]] = {}
    for method, table in value.items():
        name = check_optimizer_name(method, f"{where}: [methods.{method}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [methods.{method}] must be a table of settings")
        out[name] = {_key(k): v for k, v in table.items()}
    return out


def _parse_reported(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [reported] must be a table")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"{where}: [reported] {k!r} must be a number or a string")
    return dict(value)


def _check_method_table(method: str, table: Mapping[str, Any], base: Any, where: str) -> None:
    """Names and setting types of one ``[methods.NAME]`` table."""
    from samkit.optim import get_optimizer_info

    accepted = accepted_kwargs(method, base) if isinstance(base, str) else set()
    # Settings the method would not use are refused, not ignored: a plain optimizer has no
    # base and no rho; AdamW (or a method over it) has no momentum.
    valid = accepted | {"lr", "weight_decay"}
    if get_optimizer_info(method).sharpness_aware:
        valid.add("base")
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(
                f"{where}: [methods.{method}] unknown key {key!r}{suggest(key, valid)}"
            )
        if key in METHOD_SETTINGS:
            try:
                TrainConfig(**{key: value}).validate()
            except ConfigError as e:
                raise ConfigError(f"{where}: [methods.{method}] {e}") from e
    try:
        method_table_settings(method, table, base=base)
    except ConfigError as e:
        raise ConfigError(f"{where}: [methods.{method}] {e}") from e


def method_table_settings(
    method: str, table: Mapping[str, Any], *, base: str = "sgd"
) -> dict[str, Any]:
    """A method table as ``TrainConfig`` settings: ``lr``, ``momentum``, ``weight_decay``,
    ``base``, ``rho`` as themselves, every other key into ``opt_args``."""
    out: dict[str, Any] = {}
    opt_args: dict[str, Any] = {}
    for key, value in table.items():
        if key in METHOD_SETTINGS:
            out[key] = value
        else:
            opt_args[key] = value
    if opt_args:
        out["opt_args"] = opt_args
    # The same rule a run applies (a rho the method does not take, unknown names).
    probe = TrainConfig(optimizer=method, base=out.get("base", base), **out)
    optimizer_settings(probe)
    return out


def merge_recipes(recipes: Sequence[Recipe]) -> Recipe:
    """One recipe from several, later ones winning key by key (a later ``dataset`` or
    ``model`` that differs drops the earlier model arguments, as flags do); method tables
    merge key by key."""
    if not recipes:
        raise ValueError("merge_recipes needs at least one recipe")
    if len(recipes) == 1:
        return recipes[0]
    settings: dict[str, Any] = {}
    methods: dict[str, dict[str, Any]] = {}
    reported: dict[str, Any] = {}
    search: dict[str, dict[str, SearchDim]] = {}
    for r in recipes:
        settings = _overlay(settings, r.settings)
        for m, table in r.methods.items():
            methods[m] = {**methods.get(m, {}), **table}
        for m, dims in r.search.items():
            search[m] = {**search.get(m, {}), **dims}
        reported = r.reported or reported
    return Recipe(
        name="+".join(r.name for r in recipes),
        path=", ".join(r.path for r in recipes),
        description=" + ".join(r.description for r in recipes if r.description),
        reference="; ".join(r.reference for r in recipes if r.reference),
        settings=settings,
        methods=methods,
        reported=reported,
        search=search,
    )


def _overlay(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """``above`` over ``below`` with the model rule and dict-wise ``model_args``/``opt_args``."""
    out = dict(below)
    if "dataset" in above and above["dataset"] != out.get("dataset") and "model" not in above:
        out.pop("model", None)
        out.pop("model_args", None)
    if "model" in above and above["model"] != out.get("model"):
        out.pop("model_args", None)
    for key, value in above.items():
        if key in ("model_args", "opt_args") and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def run_config(
    recipes: Sequence[Recipe | str | Path] | None = None,
    given: Mapping[str, Any] | None = None,
    *,
    checkpoint: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The complete :class:`TrainConfig` of ``samkit train --recipe R ... <given as flags>``:
    the one resolver of ``samkit train``, ``samkit bench`` (at plan time) and
    :func:`recipe_config`.

    ``recipes``: embedded names, files or parsed recipes; ``None`` means the default recipe
    (none when resuming). ``given``: the explicit settings (``TrainConfig`` field names, or
    flag names with ``-``). With ``resume=True`` the settings come from the checkpoint in
    ``given["out"]`` (or ``checkpoint``, the settings stored in it, when the caller has read
    it) instead of recipes. The result is layered (:func:`resolve_settings`) and completed
    (:func:`~samkit.train.build.resolve_config`: the dataset's default model, known names, the
    files a dataset needs). Raises :class:`ConfigError`, or
    :class:`~samkit.train.CheckpointError` for a checkpoint that cannot be read.
    """
    given = {_key(k): v for k, v in (given or {}).items()}
    if recipes is None:
        resuming = given.get("resume") is True or checkpoint is not None
        recipes = [] if resuming else [DEFAULT_RECIPE]
    parsed = [r if isinstance(r, Recipe) else load_recipe(r) for r in recipes]
    return resolve_config(resolve_settings(parsed, given, checkpoint=checkpoint))


def resolve_settings(
    recipes: Sequence[Recipe],
    given: Mapping[str, Any],
    *,
    checkpoint: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The run's settings: recipes (or a checkpoint's settings) below the settings ``given``
    explicitly (see the module docstring for the order), not yet completed (the model may be
    ``None``: the dataset's default; :func:`run_config` completes them).

    ``given`` uses ``TrainConfig`` field names; ``model_args`` and ``opt_args`` merge key by
    key. Explicit settings the run's optimizer would ignore are refused
    (:func:`check_given`). With ``resume=True`` given, or ``checkpoint`` (the settings stored
    in a checkpoint), a run is resumed: its settings are the checkpoint's (read from
    ``given["out"]`` when ``checkpoint`` is not given) except where it stopped, which is the
    resuming command's own ``stop_after_epoch`` (none: to ``epochs``). Raises
    :class:`ConfigError`.
    """
    given = {_key(k): v for k, v in given.items()}
    if given.get("resume") is True or checkpoint is not None:
        if checkpoint is None:
            check_resume(True, given.get("out"))
        if recipes:
            raise ConfigError(
                "--recipe cannot be combined with --resume: a resumed run continues with the "
                "settings stored in its checkpoint"
            )
        if checkpoint is None:
            from samkit.train.checkpoint import read_checkpoint, run_checkpoint_path

            checkpoint = read_checkpoint(run_checkpoint_path(given["out"]))["config"]
        # Where the earlier command stopped is not where this one stops: a resumed run
        # continues to its epochs unless the resuming command gives its own stop.
        settings = {**checkpoint, "stop_after_epoch": None}
    elif recipes:
        recipe = merge_recipes(recipes)
        settings = {**recipe.settings, "recipe": recipe.name}
        optimizer = given.get("optimizer", settings.get("optimizer", TrainConfig.optimizer))
        TrainConfig(optimizer=optimizer).validate()  # a string, before its table is looked up
        table = recipe.methods.get(optimizer.lower(), {})
        if table:
            base = given.get("base", table.get("base", settings.get("base", TrainConfig.base)))
            settings = _overlay(
                settings, method_table_settings(optimizer.lower(), table, base=base)
            )
    else:
        settings = {}
    settings = _overlay(settings, given)
    config = TrainConfig.from_dict(settings)
    check_given(config, given)
    return config


def check_given(config: TrainConfig, given: Mapping[str, Any]) -> None:
    """Refuse explicit settings the run's optimizer would ignore: ``rho`` or ``base`` for a
    plain optimizer, ``momentum`` for an optimizer without momentum (AdamW, or a method
    over AdamW), an optimizer argument it does not take. A user who types a value expects
    it to act; silently dropping it would report results of another setting."""
    config.validate()
    info, step_cls = optimizer_classes(config.optimizer, config.base)
    if not info.sharpness_aware and given.get("rho") is not None:
        raise ConfigError(
            f"--rho {given['rho']} has no effect with optimizer {config.optimizer!r} (a plain "
            "optimizer has no neighbourhood radius); drop --rho or choose a sharpness-aware "
            "method"
        )
    if not info.sharpness_aware and "base" in given:
        raise ConfigError(
            f"--base {given['base']} has no effect with optimizer {config.optimizer!r} (a plain "
            "optimizer takes its own steps); drop --base or choose a sharpness-aware method"
        )
    if "momentum" in given and "momentum" not in accepted_kwargs(config.optimizer, config.base):
        what = config.optimizer if not info.sharpness_aware else f"base {config.base}"
        raise ConfigError(
            f"--momentum {given['momentum']} has no effect: {what} ({step_cls.__name__}) takes "
            "no momentum argument"
        )
    optimizer_settings(config)  # rho and opt_args the optimizer does not take
    if given.get("val_target") is not None and config.val_fraction == 0:
        raise ConfigError(
            f"--val-target {given['val_target']:g} needs a validation split, and val_fraction "
            "is 0: give --val-fraction > 0, or drop the target"
        )


def recipe_config(recipe: str | Path = DEFAULT_RECIPE, **given: Any) -> TrainConfig:
    """The :class:`TrainConfig` of ``samkit train --recipe RECIPE`` with ``given`` settings as
    flags, e.g. ``recipe_config("mnist1d", optimizer="fsam", seed=3)`` (:func:`run_config`)."""
    return run_config([recipe], given)


# ----------------------------------------------------------------------------- defaults table


@dataclasses.dataclass(frozen=True)
class DefaultsRow:
    """One optimizer's class defaults and what a recipe's run uses, for ``samkit list`` and
    the docs (generated from the classes and the recipe, so they cannot drift)."""

    name: str
    description: str
    passes: float
    sharpness_aware: bool
    class_defaults: dict[str, Any]
    recipe_values: dict[str, Any]
    base: str = "sgd"  # the base optimizer of the recipe's run (the optimizer's own if plain)
    search_space: tuple[SearchDim, ...] = ()  # on the recipe's task (search_space)


def defaults_rows(recipe: str | Path = DEFAULT_RECIPE) -> list[DefaultsRow]:
    """For every registered optimizer: its class defaults (``samkit.NAME(...)``,
    ``create_optimizer``) and the values ``samkit train --recipe RECIPE --optimizer NAME``
    passes (the same hyperparameters, plus whatever the recipe's method table sets), and its
    search space on the recipe's task (over the base optimizer that run uses)."""
    from samkit.optim import get_optimizer_info, list_optimizers

    r = load_recipe(recipe)
    rows = []
    for name in list_optimizers():
        info = get_optimizer_info(name)
        config = resolve_settings([r], {"optimizer": name})
        kwargs = optimizer_settings(config)
        table = method_table_settings(
            name, r.methods.get(name, {}), base=r.settings.get("base", TrainConfig.base)
        )
        shown = list(info.hyperparameters)
        shown += [k for k in table if k not in ("opt_args", "base") and k not in shown]
        shown += [k for k in table.get("opt_args", {}) if k not in shown]
        values = {k: kwargs[k] for k in shown if k in kwargs}
        if "base" in table:
            values["base"] = table["base"]
        rows.append(
            DefaultsRow(
                name=name,
                description=info.description,
                passes=info.passes,
                sharpness_aware=info.sharpness_aware,
                class_defaults=dict(info.hyperparameters),
                recipe_values=values,
                base=config.base if info.sharpness_aware else name,
                search_space=layered_space(name, config.base, r.search),
            )
        )
    return rows


def format_value(value: Any) -> str:
    """A value as the tables show it (floats with ``:g``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_values(values: Mapping[str, Any], differ_from: Mapping[str, Any] | None = None) -> str:
    """``rho=0.1, eta=0.01``; with ``differ_from``, values that differ are starred."""
    parts = []
    for k, v in values.items():
        star = (
            "*" if differ_from is not None and (k not in differ_from or differ_from[k] != v) else ""
        )
        parts.append(f"{k}={format_value(v)}{star}")
    return ", ".join(parts) if parts else "-"
