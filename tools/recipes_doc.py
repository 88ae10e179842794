"""The generated tables of docs/recipes.md: every optimizer's class defaults beside what the
default recipe's runs use, and the embedded recipes. Generated from the classes and the
recipes, so the page cannot drift from them (tests/train/test_recipes.py compares them).

    python tools/recipes_doc.py                            print the tables
    python tools/recipes_doc.py --update docs/recipes.md   rewrite them in the page
    python tools/recipes_doc.py --check docs/recipes.md    exit 1 if the page's are stale

A maintainer's script, not part of the package: run it after adding a method, a recipe or a
tuned value.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from samkit.train.recipes import (
    DEFAULT_RECIPE,
    defaults_rows,
    format_value,
    format_values,
    list_recipes,
    load_recipe,
    resolve_settings,
)


def defaults_markdown(recipe: str | Path = DEFAULT_RECIPE) -> str:
    """The defaults table: class defaults (the paper's) and the recipe's values, per optimizer."""
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
        cls = format_values(row.class_defaults) if row.sharpness_aware else "torch's"
        lines.append(
            f"| `{row.name}` | {row.passes:.3g} | {cls} | "
            f"{format_values(row.recipe_values, row.class_defaults).replace('*', ' (tuned)')} |"
        )
    lines.append("")
    lines.append(
        f"Every optimizer in recipe `{r.name}` trains with "
        + ", ".join(f"{k} {format_value(v)}" for k, v in common.items())
        + " unless its row says otherwise (momentum only where the optimizer takes one)."
    )
    return "\n".join(lines)


def recipes_markdown() -> str:
    """The table of the embedded recipes: task, model, epochs, description."""
    lines = [
        "| recipe | task | model | epochs | what it is |",
        "|---|---|---|---|---|",
    ]
    for name in list_recipes():
        r = load_recipe(name)
        c = resolve_settings([r], {})
        task = c.dataset + (f", {c.label_noise:.0%} label noise" if c.label_noise else "")
        if c.limit_train:
            task += f", first {c.limit_train} training samples"
        args = ", ".join(f"{k}={format_value(v)}" for k, v in c.model_args.items())
        model = f"{c.model}" + (f" ({args})" if args else "")
        lines.append(f"| `{name}` | {task} | {model} | {c.epochs} | {r.description} |")
    return "\n".join(lines)


#: The generated parts of the page: (marker name, generator).
TABLES = (("defaults table", defaults_markdown), ("recipes table", recipes_markdown))


def updated(text: str) -> str:
    """``text`` with every table between its ``<!-- NAME: begin ... -->`` and
    ``<!-- NAME: end -->`` markers regenerated."""
    for name, generate in TABLES:
        body = generate()
        pattern = rf"(<!-- {name}: begin.*?-->\n)(.*?)(\n<!-- {name}: end -->)"
        text = re.sub(pattern, lambda m, b=body: m.group(1) + b + m.group(3), text, flags=re.S)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", metavar="FILE.md", help="rewrite the tables in FILE.md")
    mode.add_argument("--check", metavar="FILE.md", help="exit 1 if FILE.md's tables are stale")
    args = parser.parse_args(argv)
    if args.update is None and args.check is None:
        print("\n\n".join(generate() for _, generate in TABLES))
        return 0
    path = Path(args.update or args.check)
    text = path.read_text(encoding="utf-8")
    new = updated(text)
    if args.check is not None:
        print(f"{path}: {'up to date' if new == text else 'stale: run --update'}")
        return int(new != text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    print("updated" if new != text else "unchanged", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
