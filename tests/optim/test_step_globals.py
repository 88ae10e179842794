"""Step-global hyperparameters: declared once per class, the same in every param group.

A method lists in ``step_globals`` the hyperparameters that configure the whole step
(LookSAM's ``k``, SSAM's mask schedule, ...). The base refuses a param group whose value
differs from the first group's, when the optimizer is built and in ``add_param_group``
(the group is then not kept), and ``step_global(key)`` reads the value.
"""

from __future__ import annotations

import pytest
import torch

import samkit
from optim_helpers import tiny_net

METHODS = samkit.list_optimizers(sharpness_aware=True)

#: For each step-global of the built-in methods, a second group that is valid on its own but
#: differs in it.
OTHER_GROUP = {
    ("looksam", "k"): {"k": 2},
    ("msam", "micro_batches"): {"micro_batches": 2},
    ("esam", "gamma"): {"gamma": 0.25},
    ("ausam", "fraction"): {"fraction": 0.25},
    ("ausam", "max_ratio"): {"max_ratio": 2.0},
    ("saf", "lmbda"): {"lmbda": 0.1},
    ("saf", "tau"): {"tau": 2.0},
    ("saf", "start_epoch"): {"start_epoch": 2},
    ("saf", "horizon"): {"horizon": 2},
    ("mesa", "lmbda"): {"lmbda": 0.1},
    ("mesa", "tau"): {"tau": 2.0},
    ("mesa", "start_epoch"): {"start_epoch": 2},
    ("mesa", "decay"): {"decay": 0.5},
    ("ssam", "mode"): {"mode": "dynamic", "epochs": 5},
    ("ssam", "num_samples"): {"num_samples": 4},
    ("ssam", "update_freq"): {"update_freq": 2},
    ("ssam", "drop_rate"): {"drop_rate": 0.1},
    ("ssam", "drop_score"): {"drop_score": "weight"},
    ("ssam", "grow_score"): {"grow_score": "gradient"},
    ("ssam", "epochs"): {"epochs": 5},
}


def _cls(name):
    return samkit.get_optimizer_info(name).cls


def test_every_step_global_is_a_group_hyperparameter_of_its_method():
    for name in METHODS:
        opt = samkit.create_optimizer(name, tiny_net().parameters(), lr=0.1)
        for key in _cls(name).step_globals:
            assert key in opt.param_groups[0], (name, key)
            assert opt.step_global(key) == opt.param_groups[0][key]


def test_the_table_covers_every_step_global_of_the_methods_in_it():
    # (A method added later tests its own step-globals in its reference test.)
    names = {name for name, _ in OTHER_GROUP}
    declared = {(name, key) for name in names for key in _cls(name).step_globals}
    assert declared == set(OTHER_GROUP)


@pytest.mark.parametrize(("name", "key"), sorted(OTHER_GROUP))
def test_a_group_that_differs_is_refused_when_built_and_when_added(name, key):
    other = OTHER_GROUP[(name, key)]
    model = tiny_net()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    samkit.create_optimizer(name, [{"params": first, **other}, {"params": second, **other}], lr=0.1)
    message = rf"Invalid {key} value: .* in a param group: .* same {key} in every param group"
    with pytest.raises(ValueError, match=message):
        samkit.create_optimizer(name, [{"params": first}, {"params": second, **other}], lr=0.1)
    opt = samkit.create_optimizer(name, first, lr=0.1)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": second, **other})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == 2  # with the first group's value, the group is kept
