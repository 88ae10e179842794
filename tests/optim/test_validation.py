"""Hyperparameter validation of every registered method, found by introspection.

For each sharpness-aware method in the registry, every float or int hyperparameter of its
constructor (rho, rho_min, sigma, eta, lmbda, and whatever a new method adds: beta, gamma,
k, ...) is given invalid values, in the constructor and in a param group. Each must raise a
ValueError (a TypeError for a wrong type) whose message names the parameter and the value.
A new method is covered as soon as it is registered.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import samkit
from samkit.optim import get_optimizer_info

METHODS = samkit.list_optimizers(sharpness_aware=True)

#: Constructor arguments that are not the method's hyperparameters.
NOT_HYPERPARAMETERS = {
    "self", "params", "base_optimizer", "model", "foreach", "sync_ascent", "perturb_eps"
}  # fmt: skip

#: (method, parameter) -> a value that IS valid although it is negative (none so far).
NEGATIVE_ALLOWED: dict[tuple[str, str], float] = {}

#: Known gaps, reported to the owner of base.py / sam.py: rho=None (base.py's
#: validate_group lets it through) and an infinite eta of SAM/ASAM (sam.py) are accepted.
#: Strict xfail: the test fails as soon as a gap is fixed, so this list cannot go stale.
KNOWN_GAPS: set[tuple[str, str, str]] = set()


def _hyperparameters(name: str) -> dict[str, float | int]:
    cls = get_optimizer_info(name).cls
    out = {}
    for klass in cls.__mro__:  # a subclass's **kwargs may hide its parent's arguments
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for pname, p in inspect.signature(init).parameters.items():
            if pname in NOT_HYPERPARAMETERS or pname in out:
                continue
            default = p.default
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            out[pname] = default
    return out


def _cases() -> list:
    cases = []
    for name in METHODS:
        for hp, default in _hyperparameters(name).items():
            bads: list = [float("nan"), "0.1", None]
            if (name, hp) not in NEGATIVE_ALLOWED:
                bads.insert(0, -1 if isinstance(default, int) else -0.5)
            if isinstance(default, float):
                bads.append(float("inf"))
            if isinstance(default, int):
                bads.append(0)  # counts (k, ...) must be >= 1
            for bad in bads:
                marks = ()
                if (name, hp, str(bad)) in KNOWN_GAPS:
                    marks = pytest.mark.xfail(
                        strict=True, reason=f"{bad} accepted: reported (base.py/sam.py)"
                    )
                cases.append(pytest.param(name, hp, bad, marks=marks, id=f"{name}-{hp}={bad}"))
    return cases


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_every_method_has_hyperparameters_to_check():
    # The introspection finds something for every method (else the test below checks nothing).
    for name in METHODS:
        assert _hyperparameters(name), name
    assert "rho" in _hyperparameters("sam") and "lmbda" in _hyperparameters("fsam")


@pytest.mark.parametrize("name", METHODS)
def test_registry_defaults_are_valid(name):
    info = get_optimizer_info(name)
    opt = samkit.create_optimizer(name, _model().parameters(), lr=0.1)
    group = opt.param_groups[0]
    for key, value in info.hyperparameters.items():  # the class's defaults, in every group
        if key in group:
            assert group[key] == value, key


@pytest.mark.parametrize(("name", "hp", "bad"), _cases())
def test_invalid_hyperparameter_raises_naming_it(name, hp, bad):
    cls = get_optimizer_info(name).cls
    expected = (ValueError, TypeError) if not isinstance(bad, (int, float)) else ValueError
    with pytest.raises(expected) as err:
        cls(_model().parameters(), "sgd", lr=0.1, **{hp: bad})
    message = str(err.value)
    assert hp in message and str(bad) in message, message
    # The same value in a param group is refused as well.
    with pytest.raises(expected) as err:
        cls([{"params": _model().parameters(), hp: bad}], "sgd", lr=0.1)
    assert hp in str(err.value) and str(bad) in str(err.value), str(err.value)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("base", [object, torch.nn.Linear, 3, lambda p: p])
def test_base_that_is_not_a_torch_optimizer_is_a_type_error(name, base):
    cls = get_optimizer_info(name).cls
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        cls(_model().parameters(), base, lr=0.1)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_base_name_lists_the_choices(name):
    with pytest.raises(ValueError, match=r"'nonexistent'.*sgd"):
        samkit.create_optimizer(name, _model().parameters(), base="nonexistent", lr=0.1)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [-1e-3, float("nan")])
def test_invalid_perturb_eps_names_the_value(name, bad):
    with pytest.raises(ValueError, match=f"perturb_eps value: {bad}"):
        samkit.create_optimizer(name, _model().parameters(), lr=0.1, perturb_eps=bad)


@pytest.mark.parametrize("name", METHODS)
def test_invalid_on_nonfinite_names_the_value(name):
    with pytest.raises(ValueError, match="'sometimes'"):
        samkit.create_optimizer(name, _model().parameters(), lr=0.1, on_nonfinite="sometimes")


@pytest.mark.parametrize("name", METHODS)
def test_invalid_base_hyperparameter_comes_from_the_base(name):
    # lr < 0 is refused by torch's SGD; the method must not swallow or mask it.
    with pytest.raises(ValueError, match="-1"):
        samkit.create_optimizer(name, _model().parameters(), lr=-1.0)


@pytest.mark.parametrize("name", METHODS)
def test_a_misspelt_keyword_names_the_method_its_arguments_and_the_nearest(name):
    # Not the base optimizer's "SGD.__init__() got an unexpected keyword argument".
    info = get_optimizer_info(name)
    own = list(info.hyperparameters)
    typo = own[0][:-1] + "0"  # rho -> rh0, lmbda -> lmbd0, ...
    with pytest.raises(TypeError) as err:
        samkit.create_optimizer(name, _model().parameters(), lr=0.1, **{typo: 0.1})
    message = str(err.value)
    assert message.startswith(f"{info.cls.__name__} got an unexpected keyword argument {typo!r}")
    assert f"did you mean {own[0]!r}?" in message
    assert f"{info.cls.__name__}'s arguments: {', '.join(own)}" in message
    assert "samkit's options: model, foreach" in message
    assert "SGD's arguments: lr, momentum" in message
    with pytest.raises(TypeError, match=rf"{info.cls.__name__} got .* 'momentm' .* 'momentum'"):
        samkit.create_optimizer(name, _model().parameters(), lr=0.1, momentm=0.9)


def test_a_keyword_of_another_method_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^SAF got an unexpected keyword argument 'rho'\. SAF's"):
        samkit.create_optimizer("saf", _model().parameters(), lr=0.1, rho=0.05)
