"""Search spaces of a task and quasi-random trials drawn from them (for ``samkit bench
--trials``, AlgoPerf's external tuning: every method gets the same number of trials, each
drawn from its own declared space, and is judged on validation).

The space of a method over a base optimizer is, later layers replacing a dimension of the
same name or adding one:

1. the base optimizer's record (``sgd``, ``adamw``: its learning rate), for a
   sharpness-aware method;
2. the method's own record (:attr:`samkit.optim.OptimizerInfo.search_space`);
3. a recipe's ``[search.BASE]`` table (a sharpness-aware method inherits its base's), then
   its ``[search.METHOD]`` table::

       [search.sam]
       rho = {low = 0.01, high = 0.5, scale = "log"}
       [search.bsam]
       ratio = {choices = ["max_min", "one"]}

A trial is a dict ``{name: value}``: exactly a recipe's ``[methods.NAME]`` table, which a run
applies with :func:`samkit.train.recipes.method_table_settings`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from samkit.optim.search import SCALES, SearchDim
from samkit.train.config import ConfigError, accepted_kwargs, optimizer_classes, suggest

__all__ = [
    "SearchDim",
    "check_space",
    "draw_trials",
    "layered_space",
    "parse_search_table",
    "search_space",
]

#: A recipe's ``[search.NAME]`` tables: ``{optimizer name: {hyperparameter: SearchDim}}``.
Overrides = Mapping[str, Mapping[str, SearchDim]]


def search_space(
    method: str, recipes: Sequence[Any] = (), *, base: str | None = None
) -> tuple[SearchDim, ...]:
    """The search space of ``method`` on the task of ``recipes`` (embedded names, files or
    parsed :class:`~samkit.train.recipes.Recipe`, layered as ``--recipe`` layers them; none:
    the registry's declarations alone): the declarations of ``method`` and of the base
    optimizer a run of it on that task uses (``base`` overrides it; default ``sgd`` without
    recipes), with the recipes' ``[search.NAME]`` overrides. Raises :class:`ConfigError`."""
    from samkit.train.recipes import Recipe, load_recipe, merge_recipes, resolve_settings

    parsed = [r if isinstance(r, Recipe) else load_recipe(r) for r in recipes]
    overrides: Overrides = {}
    if parsed:
        overrides = merge_recipes(parsed).search
        if base is None:
            base = resolve_settings(parsed, {"optimizer": method}).base
    return layered_space(method, base or "sgd", overrides)


def layered_space(
    method: str, base: str = "sgd", overrides: Overrides | None = None
) -> tuple[SearchDim, ...]:
    """The space of ``method`` over ``base`` (see the module docstring for the layers),
    checked by :func:`check_space`. ``overrides``: a recipe's ``[search.NAME]`` tables,
    ``{optimizer name: {hyperparameter: SearchDim}}``. Raises :class:`ConfigError`."""
    info, _ = optimizer_classes(method, base)
    layers: list[Sequence[SearchDim]] = []
    if info.sharpness_aware:
        base_name = base.lower()
        layers.append(optimizer_classes(base_name, base_name)[0].search_space)
    layers.append(info.search_space)
    overrides = overrides or {}
    if info.sharpness_aware:
        layers.append(list(overrides.get(base.lower(), {}).values()))
    layers.append(list(overrides.get(info.name, {}).values()))
    dims: dict[str, SearchDim] = {}
    for layer in layers:
        for dim in layer:
            dims[dim.name] = dim
    space = tuple(dims.values())
    check_space(method, base, space)
    return space


def check_space(method: str, base: str, space: Sequence[SearchDim]) -> None:
    """:class:`ConfigError` unless every dimension is a hyperparameter ``method`` over
    ``base`` takes (a keyword argument of the method or of its base optimizer), named once.
    (Each range's own shape, :class:`SearchDim` checks when it is made.)"""
    accepted = accepted_kwargs(method, base)
    seen: set[str] = set()
    for dim in space:
        if not isinstance(dim, SearchDim):
            raise ConfigError(f"search space of {method!r}: {dim!r} is not a SearchDim")
        if dim.name in seen:
            raise ConfigError(f"search space of {method!r}: {dim.name!r} appears twice")
        seen.add(dim.name)
        if dim.name not in accepted:
            raise ConfigError(
                f"search space of {method!r} (base {base}): unknown hyperparameter "
                f"{dim.name!r}{suggest(dim.name, accepted)}; it takes {', '.join(sorted(accepted))}"
            )


def draw_trials(space: Sequence[SearchDim], k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` trials from ``space``: the first ``k`` points of a scrambled Sobol sequence
    (``scipy.stats.qmc.Sobol(d, scramble=True)``, its scrambling seeded by ``seed``), one
    coordinate per dimension in the order of ``space``, each mapped into its range
    (:meth:`SearchDim.value`: log-uniform, uniform, equal-width integer bins, choices by
    index). The same ``(space, k, seed)`` always gives the same trials; the same ``k`` and
    ``seed`` for every method gives each the same number of evenly spread trials. An empty
    space gives ``k`` empty trials (the defaults, ``k`` times)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid number of trials: {k!r} (an integer >= 1)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid trial seed: {seed!r} (an integer >= 0)")
    space = list(space)
    if not space:
        return [{} for _ in range(k)]
    from scipy.stats import qmc

    rng = np.random.default_rng(seed)
    # scipy >= 1.15 names the seed argument `rng` (`seed` is its older, deprecated name).
    key = "rng" if "rng" in inspect.signature(qmc.Sobol).parameters else "seed"
    sobol = qmc.Sobol(d=len(space), scramble=True, **{key: rng})
    with warnings.catch_warnings():
        # Sobol's balance is exact for powers of 2; any k is still a low-discrepancy prefix.
        warnings.filterwarnings("ignore", message=".*balance properties of Sobol")
        points = sobol.random(k)
    return [{dim.name: dim.value(float(u)) for dim, u in zip(space, row)} for row in points]


def parse_search_table(method: str, table: Any, where: str) -> dict[str, SearchDim]:
    """A recipe's ``[search.METHOD]`` table -> ``{name: SearchDim}``; :class:`ConfigError`
    naming ``where`` and the key for anything malformed (the names are checked against the
    method by :func:`search_space`)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [search.{method}] must be a table of ranges")
    out: dict[str, SearchDim] = {}
    for raw, spec in table.items():
        name = str(raw).replace("-", "_")
        here = f"{where}: [search.{method}] {raw!r}"
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f'{here}: expected {{low = ..., high = ..., scale = "log"}} or {{choices = [...]}}'
            )
        keys = set(spec)
        allowed = {"low", "high", "scale", "choices", "source"}
        if keys - allowed:
            bad = sorted(keys - allowed)[0]
            raise ConfigError(f"{here}: unknown key {bad!r}{suggest(bad, allowed)}")
        scale = spec.get("scale", "choice" if "choices" in spec else "linear")
        if scale not in SCALES:
            raise ConfigError(f"{here}: unknown scale {scale!r} (one of {', '.join(SCALES)})")
        try:
            out[name] = SearchDim(
                name,
                spec.get("low"),
                spec.get("high"),
                scale,
                tuple(spec.get("choices", ())),
                str(spec.get("source", "")),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: [search.{method}] {e}") from e
    return out
