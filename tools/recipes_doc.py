"""The generated tables of docs/recipes.md — every optimizer's class defaults beside what the
default recipe's runs use, the search spaces, the embedded recipes — and the search-space
table of each method page (docs/methods/NAME.md). Generated from the classes, the registry
and the recipes, so the pages cannot drift from them (tests/train/test_recipes.py compares
them).

    python tools/recipes_doc.py                                    print the tables
    python tools/recipes_doc.py --update docs/recipes.md docs/methods/*.md   rewrite them
    python tools/recipes_doc.py --check docs/recipes.md docs/methods/*.md    exit 1 if stale

A method page holds its table between ``<!-- search space: begin NAME ... -->`` and
``<!-- search space: end -->``.

A maintainer's script, not part of the package: run it after adding a method, a recipe or a
tuned value.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from samkit.optim.registry import get_optimizer_info
from samkit.train.recipes import (
    DEFAULT_RECIPE,
    defaults_rows,
    format_value,
    format_values,
    list_recipes,
    load_recipe,
    recipe_config,
    resolve_settings,
)


def _hyperparameters(name: str, values: dict) -> dict:
    """``values`` without the method's implementation switches (mSAM's ``vectorize``, SAF's
    bank storage: how or where it is computed, not what; declared on its class)."""
    switches = get_optimizer_info(name).implementation_switches
    return {k: v for k, v in values.items() if k not in switches}


def defaults_markdown(recipe: str | Path = DEFAULT_RECIPE) -> str:
    """The defaults table: class defaults (the paper's) and the recipe's values, per optimizer
    (hyperparameters only: the classes' ``implementation_switches`` are left out)."""
    r = load_recipe(recipe)
    common = {
        k: r.settings[k] for k in ("base", "lr", "momentum", "weight_decay") if k in r.settings
    }
    lines = [
        f"| optimizer | passes/step | class defaults (the paper's) | `samkit train --optimizer NAME` "
        f"(recipe `{r.name}`) |",
        "|---|---|---|---|",
    ]
    for row in defaults_rows(recipe):
        defaults = _hyperparameters(row.name, row.class_defaults)
        cls = format_values(defaults) if row.sharpness_aware else "torch's"
        values = format_values(_hyperparameters(row.name, row.recipe_values), defaults)
        lines.append(
            f"| `{row.name}` | {row.passes:.3g} | {cls} | {values.replace('*', ' (tuned)')} |"
        )
    lines.append("")
    lines.append(
        f"Every optimizer in recipe `{r.name}` trains with "
        + ", ".join(f"{k} {format_value(v)}" for k, v in common.items())
        + " unless its row says otherwise (momentum only where the optimizer takes one)."
    )
    return "\n".join(lines)


def _range(dim) -> str:
    if dim.scale == "choice":
        return "one of " + ", ".join(f"`{format_value(c)}`" for c in dim.choices)
    kind = {"linear": "uniform", "log": "log-uniform", "int": "integers"}[dim.scale]
    return f"{kind} [{format_value(dim.low)}, {format_value(dim.high)}]"


def search_markdown(recipe: str | Path = DEFAULT_RECIPE) -> str:
    """Every optimizer's search space on the recipe's task: its dimensions and ranges."""
    r = load_recipe(recipe)
    lines = [
        f"| optimizer | search space (recipe `{r.name}`: the base optimizer's lr, then the method's own) |",
        "|---|---|",
    ]
    for row in defaults_rows(recipe):
        dims = "; ".join(f"`{d.name}` {_range(d)}" for d in row.search_space)
        lines.append(f"| `{row.name}` | {dims} |")
    return "\n".join(lines)


def method_search_markdown(name: str) -> str:
    """A method page's table: each dimension of its search space and where it comes from
    (over SGD, the base of the embedded recipes; over AdamW its lr range is AdamW's)."""
    config = recipe_config(DEFAULT_RECIPE, optimizer=name)
    row = next(r for r in defaults_rows() if r.name == name)
    lines = [
        "| hyperparameter | range | where it comes from |",
        "|---|---|---|",
    ]
    for dim in row.search_space:
        owner = f" (of the base optimizer, {config.base})" if dim.name == "lr" else ""
        lines.append(f"| `{dim.name}` | {_range(dim)} | {dim.source}{owner} |")
    return "\n".join(lines)


def recipes_markdown() -> str:
    """The table of the embedded recipes: task, model, epochs, validation, description."""
    lines = [
        "| recipe | task | model | epochs | validation split, target | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for name in list_recipes():
        r = load_recipe(name)
        c = resolve_settings([r], {})
        task = c.dataset + (f", {c.label_noise:.0%} label noise" if c.label_noise else "")
        if c.limit_train:
            task += f", first {c.limit_train} training samples"
        args = ", ".join(f"{k}={format_value(v)}" for k, v in c.model_args.items())
        model = f"{c.model}" + (f" ({args})" if args else "")
        val = f"{c.val_fraction:.0%}" if c.val_fraction else "none"
        if c.val_target is not None:
            val += f", {format_value(c.val_target)}"
        lines.append(f"| `{name}` | {task} | {model} | {c.epochs} | {val} | {r.description} |")
    return "\n".join(lines)


#: The generated parts of docs/recipes.md: (marker name, generator).
TABLES = (
    ("defaults table", defaults_markdown),
    ("search table", search_markdown),
    ("recipes table", recipes_markdown),
)


def updated(text: str) -> str:
    """``text`` with every table between its ``<!-- NAME: begin ... -->`` and
    ``<!-- NAME: end -->`` markers regenerated (``<!-- search space: begin METHOD ... -->``:
    that method's search-space table)."""
    for name, generate in TABLES:
        body = generate()
        pattern = rf"(<!-- {name}: begin.*?-->\n)(.*?)(\n<!-- {name}: end -->)"
        text = re.sub(pattern, lambda m, b=body: m.group(1) + b + m.group(3), text, flags=re.S)
    pattern = r"(<!-- search space: begin (\w+).*?-->\n)(.*?)(\n<!-- search space: end -->)"
    return re.sub(
        pattern,
        lambda m: m.group(1) + method_search_markdown(m.group(2)) + m.group(4),
        text,
        flags=re.S,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--update", nargs="+", metavar="FILE.md", help="rewrite the tables in FILE.md"
    )
    mode.add_argument(
        "--check", nargs="+", metavar="FILE.md", help="exit 1 if FILE.md's tables are stale"
    )
    args = parser.parse_args(argv)
    if args.update is None and args.check is None:
        print("\n\n".join(generate() for _, generate in TABLES))
        return 0
    stale = 0
    for name in args.update or args.check:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        new = updated(text)
        if args.check is not None:
            print(f"{path}: {'up to date' if new == text else 'stale: run --update'}")
            stale += new != text
            continue
        if new != text:
            path.write_text(new, encoding="utf-8")
        print("updated" if new != text else "unchanged", path)
    return int(stale > 0)


if __name__ == "__main__":
    sys.exit(main())
