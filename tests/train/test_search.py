"""Search spaces (SearchDim, the registry's declarations, a recipe's [search.NAME] tables) and
the quasi-random trials drawn from them (samkit.train.search.draw_trials)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samkit
from samkit.cli import main
from samkit.optim import OptimizerInfo, get_optimizer_info
from samkit.optim.search import SearchDim
from samkit.train import ConfigError, TrainConfig, optimizer_settings
from samkit.train.recipes import load_recipe, method_table_settings
from samkit.train.search import draw_trials, search_space

# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", samkit.list_optimizers())
def test_every_method_declares_its_lr_and_its_trials_build_the_optimizer(name):
    info = get_optimizer_info(name)
    for base in ("sgd", "adamw"):
        space = search_space(name, base=base)
        names = [d.name for d in space]
        assert "lr" in names  # the base learning rate, for every method
        lr = next(d for d in space if d.name == "lr")
        assert lr == get_optimizer_info(base if info.sharpness_aware else name).search_space[0]
        if info.sharpness_aware:
            assert {d.name for d in info.search_space} <= set(info.hyperparameters)
            assert "rho" in names or name in ("saf", "mesa")  # one-pass methods have no radius
        # Both ends of every range, as a run applies a trial: through a method table.
        for trial in draw_trials(space, 4, seed=1) + [_corner(space, 0.0), _corner(space, 0.999)]:
            settings_ = method_table_settings(name, trial, base=base)
            config = TrainConfig(optimizer=name, base=base, **settings_)
            model = torch.nn.Linear(3, 2)
            samkit.create_optimizer(
                name, model.parameters(), base=base, model=model, **optimizer_settings(config)
            )


def _corner(space, u):
    return {d.name: d.value(u) for d in space}


def test_sam_declares_the_papers_grid_range():
    (rho,) = get_optimizer_info("sam").search_space
    assert (rho.name, rho.low, rho.high, rho.scale) == ("rho", 0.01, 0.5, "log")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(low=0.5, high=0.1), r"inverted range \[0\.5, 0\.1\]"),
        (dict(low=0.1, high=0.1), r"empty range \[0\.1, 0\.1\]"),
        (dict(low=0.0, high=0.5, scale="log"), r"log range must stay above 0, got \[0, 0\.5\]"),
        (dict(low=-1.0, high=0.5, scale="log"), "log range must stay above 0"),
        (dict(low=0.1, high=0.5, scale="loglinear"), "unknown scale 'loglinear'"),
        (dict(low=0.5, high=3.5, scale="int"), "integer bounds"),
        (dict(low=None, high=0.5), "low and high must be finite numbers"),
        (dict(low=0.1, high=float("inf")), "finite numbers"),
        (dict(scale="choice", choices=(1,)), "at least two values"),
        (dict(scale="choice", choices=(1, 1)), "repeated values"),
        (dict(low=0.1, high=0.5, choices=(1, 2)), "choices need scale 'choice'"),
    ],
)
def test_bad_ranges_are_value_errors_naming_the_problem(kwargs, expected):
    with pytest.raises(ValueError, match=expected) as e:
        SearchDim("rho", **kwargs)
    assert "'rho'" in str(e.value)


def test_a_record_may_only_declare_arguments_of_its_class():
    with pytest.raises(ValueError, match="'rhoo' not an argument of SAM"):
        OptimizerInfo("x", samkit.SAM, "x", search_space=(SearchDim("rhoo", 0.1, 0.5),))
    with pytest.raises(ValueError, match="'rho' twice"):
        OptimizerInfo("x", samkit.SAM, "x", search_space=(SearchDim("rho", 0.1, 0.5),) * 2)


# ----------------------------------------------------------------------------- recipes


def _recipe(tmp_path, text):
    path = tmp_path / "task.toml"
    path.write_text('dataset = "mnist1d"\n' + text)
    return load_recipe(path)


def test_a_recipe_overrides_and_adds_ranges_method_then_base(tmp_path):
    r = _recipe(
        tmp_path,
        "[search.sam]\n"
        'rho = {low = 0.02, high = 0.2, scale = "log", source = "narrower"}\n'
        "adaptive = {choices = [true, false]}\n"
        "[search.sgd]\n"
        'lr = {low = 0.01, high = 0.1, scale = "log"}\n',
    )
    space = {d.name: d for d in search_space("sam", [r])}
    assert (space["rho"].low, space["rho"].high, space["rho"].source) == (0.02, 0.2, "narrower")
    assert space["adaptive"].choices == (True, False)
    assert (space["lr"].low, space["lr"].high) == (0.01, 0.1)  # inherited from [search.sgd]
    assert {d.name: d for d in search_space("sam", [r], base="adamw")}["lr"].low == 3e-4
    assert [d.name for d in search_space("sgd", [r])] == ["lr"]
    assert search_space("fsam", [r])[1] == get_optimizer_info("fsam").search_space[0]
    # A task's search space follows the base its runs use (modular-add: AdamW).
    assert search_space("sam", ["modular-add"])[0] == get_optimizer_info("adamw").search_space[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[search.sam]\nrhoo = {low = 0.1, high = 0.5}\n", "unknown hyperparameter 'rhoo' (did you mean 'rho'?)"),
        ("[search.sam]\nrho = {low = 0.5, high = 0.1}\n", "inverted range [0.5, 0.1]"),
        ("[search.sam]\nrho = {low = 0.2, high = 0.2}\n", "empty range [0.2, 0.2]"),
        ('[search.sam]\nrho = {low = 0, high = 0.5, scale = "log"}\n', "log range must stay above 0"),
        ('[search.sam]\nrho = {low = 0.1, high = 0.5, scale = "exp"}\n', "unknown scale 'exp'"),
        ("[search.sam]\nrho = {lo = 0.1, high = 0.5}\n", "unknown key 'lo' (did you mean 'low'?)"),
        ("[search.sam]\nrho = 0.1\n", "expected {low = ..., high = ..."),
        ("[search.sgd]\nrho = {low = 0.1, high = 0.5}\n", "unknown hyperparameter 'rho'"),
        ("[search.sma]\nrho = {low = 0.1, high = 0.5}\n", "names no registered optimizer"),
    ],
)  # fmt: skip
def test_bad_search_tables_are_one_clear_error(tmp_path, text, expected, capsys):
    with pytest.raises(ConfigError) as e:
        _recipe(tmp_path, text)
    assert expected in str(e.value) and "task.toml" in str(e.value)
    assert (
        main(["list", "optimizers", "--search-spaces", "--recipe", str(tmp_path / "task.toml")])
        == 2
    )
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_samkit_list_shows_each_methods_space(capsys):
    assert main(["list", "optimizers", "--search-spaces", "--recipe", "modular-add"]) == 0
    out = capsys.readouterr().out
    for name in samkit.list_optimizers():
        block = out[out.index(f"  {name} ") :]
        line = next(x for x in block.splitlines() if "search:" in x)
        expected = "; ".join(d.describe() for d in search_space(name, ["modular-add"]))
        assert line.split("search: ", 1)[1] == expected
    assert "lr: log-uniform [0.0003, 0.03]" in out  # modular-add's methods run over AdamW
    assert main(["list", "models", "--search-spaces"]) == 2


# ----------------------------------------------------------------------------- draw_trials

dims = st.one_of(
    st.tuples(st.floats(1e-6, 1e3), st.floats(1.001, 1e3), st.sampled_from(["log", "linear"])).map(
        lambda t: SearchDim("x", t[0], t[0] * t[1], t[2])
    ),
    st.tuples(st.integers(-5, 5), st.integers(1, 6)).map(
        lambda t: SearchDim("x", t[0], t[0] + t[1], "int")
    ),
    st.lists(st.integers(), min_size=2, max_size=5, unique=True).map(
        lambda c: SearchDim.choice("x", c)
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    space=st.lists(dims, min_size=1, max_size=4).map(
        lambda ds: [SearchDim(f"x{i}", d.low, d.high, d.scale, d.choices) for i, d in enumerate(ds)]
    ),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_trials_are_reproducible_and_inside_the_space(space, k, seed):
    trials = draw_trials(space, k, seed)
    assert trials == draw_trials(space, k, seed)
    assert len(trials) == k
    for trial in trials:
        assert list(trial) == [d.name for d in space]
        for d in space:
            assert d.contains(trial[d.name]), (d, trial[d.name])
            if d.scale == "int":
                assert type(trial[d.name]) is int


def test_trials_spread_evenly_and_depend_on_the_seed():
    space = [SearchDim("rho", 0.01, 0.5, "log"), SearchDim("k", 1, 4, "int")]
    trials = draw_trials(space, 16, seed=0)
    # Sobol: each quarter of the log range, and each integer, gets exactly a quarter of 16.
    quarters = [int(4 * math.log(t["rho"] / 0.01) / math.log(50)) for t in trials]
    assert sorted(quarters) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert sorted(t["k"] for t in trials) == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert draw_trials(space, 16, seed=1) != trials
    assert draw_trials(space, 8, seed=0) == trials[:8]  # a prefix: K/2 trials are K's first half
    assert draw_trials([], 3, seed=0) == [{}, {}, {}]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="number of trials"):
            draw_trials(space, bad, seed=0)
    with pytest.raises(ValueError, match="trial seed"):
        draw_trials(space, 2, seed=-1)
