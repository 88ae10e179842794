"""One source of defaults: classes carry the papers' values, the registry builds exactly the
class, tuned values live in recipes; recipe precedence, unknown keys, ignored flags, and the
docs' defaults table generated from the same place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import samkit
from samkit.cli import main
from samkit.optim import OptimizerInfo, get_optimizer_info, list_optimizers
from samkit.train import ConfigError, TrainConfig, optimizer_settings
from samkit.train.recipes import (
    DEFAULT_RECIPE,
    defaults_rows,
    list_recipes,
    load_recipe,
    recipe_config,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[2]


def _recipes_doc():
    """tools/recipes_doc.py, the generator of docs/recipes.md's tables (a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipes_doc", ROOT / "tools" / "recipes_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--threads", "1"]


def _param():
    return [torch.nn.Parameter(torch.zeros(3))]


# ----------------------------------------------------------------------------- one source


@pytest.mark.parametrize("name", samkit.list_optimizers(sharpness_aware=True))
def test_the_registry_builds_exactly_the_class(name):
    info = get_optimizer_info(name)
    m1, m2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)  # some methods need the model
    by_name = samkit.create_optimizer(name, m1.parameters(), model=m1, lr=0.1)
    by_class = info.cls(m2.parameters(), "sgd", model=m2, lr=0.1)
    assert by_name.param_groups[0].keys() == by_class.param_groups[0].keys()
    for key, value in by_class.param_groups[0].items():
        if key != "params":
            assert by_name.param_groups[0][key] == value, key
    # and the class's signature defaults are what the group holds
    for key, value in info.hyperparameters.items():
        if key in by_class.param_groups[0]:
            assert by_class.param_groups[0][key] == value, key


def test_the_names_mean_the_published_methods():
    assert get_optimizer_info("bsam").hyperparameters["ratio"] == "max_min"
    assert samkit.create_optimizer("bsam", _param(), lr=0.1).param_groups[0]["ratio"] == "max_min"
    assert samkit.create_optimizer("asam", _param(), lr=0.1).param_groups[0]["rho"] == 0.5
    assert samkit.create_optimizer("fsam", _param(), lr=0.1).param_groups[0]["rho"] == 0.05


def test_registry_entries_cannot_carry_defaults():
    with pytest.raises(TypeError, match="defaults"):  # tuned values belong in recipes
        OptimizerInfo(name="tuned-sam", cls=samkit.SAM, description="x", defaults={"rho": 0.1})
    assert "tuned-sam" not in list_optimizers()


def test_a_config_without_a_recipe_uses_the_class_defaults():
    kwargs = optimizer_settings(TrainConfig(optimizer="fsam"))
    assert kwargs["rho"] == 0.05 and kwargs["lmbda"] == 0.6 and kwargs["sigma"] == 1.0
    assert optimizer_settings(TrainConfig(optimizer="sam", rho=0.2))["rho"] == 0.2


def test_the_default_run_uses_the_recipe_values_and_the_api_the_papers():
    recipe = load_recipe(DEFAULT_RECIPE)
    for name, table in recipe.methods.items():
        kwargs = optimizer_settings(recipe_config(optimizer=name))
        for key, value in table.items():
            assert kwargs[key] == value, (name, key)
    # The same name through the API: the class's own value.
    assert recipe.methods["asam"]["rho"] != get_optimizer_info("asam").hyperparameters["rho"]


# ----------------------------------------------------------------------------- precedence


def test_override_order_recipe_then_method_table_then_config_file_then_flags(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'dataset = "mnist1d"\nepochs = 7\nlr = 0.2\nweight_decay = 1e-3\nseed = 4\n'
        "[methods.sam]\nrho = 0.3\nlr = 0.1\neta = 0.02\n"
    )
    r = load_recipe(recipe)
    c = resolve_settings([r], {"optimizer": "sam"})
    assert (c.epochs, c.lr, c.rho, c.opt_args, c.weight_decay) == (7, 0.1, 0.3, {"eta": 0.02}, 1e-3)
    c = resolve_settings([r], {"optimizer": "sgd"})  # the sam table does not apply
    assert (c.lr, c.rho, c.opt_args) == (0.2, None, {})
    c = resolve_settings([r], {"optimizer": "sam", "rho": 0.05, "opt_args": {"eta": 0.5}})
    assert (c.rho, c.opt_args, c.lr) == (0.05, {"eta": 0.5}, 0.1)

    # Through the CLI: recipe < --config file < flags.
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": 0.03, "epochs": 1, "limit_train": 64}))
    out = tmp_path / "run"
    argv = ["train", "--recipe", str(recipe), "--config", str(cfg), "--optimizer", "sam",
            "--rho", "0.07", "--out", str(out), "--quiet", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["lr"] == 0.03 and saved["config"]["seed"] == 4
    assert saved["config"]["recipe"] == "r"
    assert saved["optimizer_kwargs"]["rho"] == 0.07 and saved["optimizer_kwargs"]["eta"] == 0.02

    # --resume: the checkpoint's settings, not the recipe's; flags may extend the run only.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["epochs"] == 2 and saved["lr"] == 0.03 and saved["rho"] == 0.07
    with pytest.raises(ConfigError, match="cannot be combined with --resume"):
        resolve_settings([r], {"out": str(out), "resume": True}, checkpoint=saved)


def test_layered_recipes_and_the_model_rule(tmp_path):
    over = tmp_path / "over.toml"
    over.write_text("epochs = 3\n[methods.sam]\nrho = 0.4\n")
    c = resolve_settings([load_recipe("mnist1d"), load_recipe(over)], {"optimizer": "sam"})
    assert (c.epochs, c.rho, c.model, c.model_args) == (3, 0.4, "cnn1d", {"channels": 32})
    # Another dataset drops the recipe's model; another model drops its arguments.
    c = resolve_settings([load_recipe("mnist1d")], {"dataset": "digits"})
    assert c.model is None and c.model_args == {}
    c = resolve_settings([load_recipe("mnist1d")], {"model": "mlp"})
    assert c.model == "mlp" and c.model_args == {}


def test_every_embedded_recipe_resolves_for_every_optimizer():
    assert DEFAULT_RECIPE in list_recipes() and {"mnist1d-noisy", "digits"} <= set(list_recipes())
    for name in list_recipes():
        r = load_recipe(name)
        assert r.description, name
        for opt in list_optimizers():
            c = resolve_settings([r], {"optimizer": opt})
            optimizer_settings(c)
            assert c.recipe == name


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epoch = 3\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("lr = 0.1\n[methods.sam]\nrhoo = 0.1\n", "[methods.sam] unknown key 'rhoo' (did you mean 'rho'?)"),
        ("[methods.fsma]\nrho = 0.1\n", "names no registered optimizer (did you mean 'fsam'?)"),
        ("rho = 0.1\n", "rho belongs to a method"),
        ("out = 'x'\n", "cannot be set in a recipe"),
        ("lr = -1\n", "invalid lr: -1"),
        ("[methods.sgd]\nrho = 0.1\n", "[methods.sgd] unknown key 'rho'"),
        ("[methods.adamw]\nbase = 'sgd'\n", "[methods.adamw] unknown key 'base'"),
        ("[methods.adamw]\nmomentum = 0.9\n", "[methods.adamw] unknown key 'momentum'"),
        ("lr = \n", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_recipes_are_one_clear_error(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_unknown_recipe_name_suggests_the_nearest(capsys):
    assert main(["train", "--recipe", "mnist1d-noisi"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'mnist1d-noisy'?" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--optimizer", "sgd", "--rho", "0.1"], "--rho 0.1 has no effect with optimizer 'sgd'"),
        (["--optimizer", "adamw", "--base", "sgd"], "--base sgd has no effect"),
        (["--optimizer", "adamw", "--momentum", "0.8"], "--momentum 0.8 has no effect"),
        (["--optimizer", "sam", "--base", "adamw", "--momentum", "0.8"], "base adamw"),
        (["--optimizer", "sam", "--opt-arg", "lmbda=0.5"], "takes no argument 'lmbda'"),
        (["--optimizer", "fsam", "--opt-arg", "lambda=0.5"], "(did you mean 'lmbda'?)"),
        (["--resume", "--out", "x", "--recipe", "mnist1d"], "cannot be combined with --resume"),
    ],
)
def test_flags_the_optimizer_would_ignore_are_refused(argv, expected, capsys):
    assert main(["train", *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_recipe_momentum_is_not_an_ignored_flag():
    # The recipe's momentum is for the optimizers that take one; AdamW runs without it.
    c = recipe_config(optimizer="adamw")
    kwargs = optimizer_settings(c)
    assert (
        "momentum" not in kwargs and kwargs["lr"] == load_recipe("mnist1d").methods["adamw"]["lr"]
    )


# ----------------------------------------------------------------------------- generated docs


def _between(text: str, name: str) -> str:
    end = name.split(": begin")[0]  # "search space: begin fsam" ends with "search space: end"
    begin = name if ": begin" in name else f"{name}: begin"
    m = re.search(rf"<!-- {begin}\b.*?-->\n(.*?)\n<!-- {end}: end -->", text, re.S)
    assert m, f"markers of {name} missing"
    return m.group(1).strip()


def test_the_docs_tables_are_the_generated_ones():
    text = (ROOT / "docs" / "recipes.md").read_text()
    hint = "regenerate with: python tools/recipes_doc.py --update docs/recipes.md docs/methods/*.md"
    tool = _recipes_doc()
    assert _between(text, "defaults table") == tool.defaults_markdown(), hint
    assert _between(text, "search table") == tool.search_markdown(), hint
    assert _between(text, "recipes table") == tool.recipes_markdown(), hint
    pages = sorted((ROOT / "docs" / "methods").glob("*.md"))
    assert pages
    for page in pages:  # each method page's search space, the registry's
        body = _between(page.read_text(), f"search space: begin {page.stem}")
        assert body == tool.method_search_markdown(page.stem), (page.name, hint)


def test_list_and_help_show_the_values_used(capsys):
    assert main(["list", "optimizers"]) == 0
    out = capsys.readouterr().out
    for row in defaults_rows():
        block = out[out.index(f"  {row.name} ") :]
        cls_line = next(line for line in block.splitlines() if "class:" in line)
        rec_line = next(line for line in block.splitlines() if "recipe:" in line)
        for k, v in row.class_defaults.items():
            assert f"{k}={v:g}" in cls_line if isinstance(v, float) else f"{k}={v}" in cls_line
        for k in row.recipe_values:
            assert f"{k}=" in rec_line
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    c = recipe_config()
    assert f"--lr LR (default {c.lr:g}" in help_text and f"(default {DEFAULT_RECIPE})" in help_text


def test_the_training_docs_defaults_are_the_default_recipes():
    """docs/training.md's settings table names defaults: they must be the values used."""
    c = recipe_config()
    rows = {}
    for line in (ROOT / "docs" / "training.md").read_text().splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            names = [n.strip(" `") for n in cells[0].split(",")]
            values = [v.strip(" `") for v in cells[1].split(",")]
            if len(names) == len(values):
                rows.update(zip(names, values))
    checked = 0
    for name, text in rows.items():
        value = getattr(c, name, None)
        if isinstance(value, bool) or value is None or isinstance(value, dict):
            continue
        if "'" in text or text in ("", "all", "none", "–"):  # words, not values ("dataset's")
            continue
        if isinstance(value, (int, float)):
            assert float(text) == value, (name, text, value)
        else:
            assert text == value, (name, text, value)
        checked += 1
    assert checked >= 10, rows  # lr, momentum, weight_decay, epochs, batch_size, seed, ...
