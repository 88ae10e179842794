"""A method added by following docs/adding_a_method.md, run through the shared suites.

``FixedDirectionSAM`` (SAM's two passes, with ``ε = ρ·u/‖u‖`` along a random direction
``u`` drawn once instead of the gradient: the baseline that asks whether SAM's direction
matters) is written below the way the guide says, in this file only: nothing in
``src/`` knows it. It is registered for each test with ``samkit.optim.registered`` (the
registry is as before afterwards), and then the registry-parametrised test functions of
``test_registry``, ``test_faults``, ``test_citizen``, ``test_validation`` and
``test_clipping`` are called on its name: the same functions that check every built-in
method, not copies. Its own reference test (step 3 of the guide) compares it with a
float64 implementation written out longhand and checks that ``rho = 0`` is the base
optimizer.

Not covered here: the 2-process suites (``test_ddp``, ``test_fsdp``), whose worker
processes import samkit afresh and see only the methods of ``registry.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

import samkit
from optim_helpers import batches, flat_grad, loss_fn, mean_loss, sgd_momentum_reference, tiny_net
from samkit.optim import OptimizerInfo
from samkit.optim._rng import check_seed
from samkit.optim.base import SharpnessAwareOptimizer
from tests.optim import test_citizen as citizen
from tests.optim import test_clipping as clipping
from tests.optim import test_faults as faults
from tests.optim import test_registry as registry_suite
from tests.optim import test_validation as validation


# ----------------------------------------------------------------------- 1. the module
class FixedDirectionSAM(SharpnessAwareOptimizer):
    r"""SAM with a fixed random direction (a test method: nothing in samkit uses it).

    .. math::

        \varepsilon = \rho\,\frac{u}{\lVert u\rVert + \epsilon}, \qquad
        g' = \nabla L_B(w + \varepsilon), \qquad w \leftarrow \mathrm{base\_step}(w, g')

    with :math:`u \sim N(0, I)` drawn once, at construction, and kept in
    ``state[p]["u"]`` (so a resumed run continues exactly). Two passes: the clean pass gives
    the returned loss and BatchNorm's statistics; :math:`u` does not depend on it.
    """

    # The direction is drawn as whole tensors: not for FSDP2's shards.
    fsdp_unsupported = "its direction is drawn as whole tensors, not shards"
    own_passes = "a clean pass, then one along its fixed direction"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        seed = check_seed(seed)  # None: torch.initial_seed(), as ESAM's
        super().__init__(
            params, base_optimizer, dict(rho=rho), **kwargs
        )  # rho: checked by the base
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                u = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                self.state[p]["u"] = u.to(p.device, p.dtype)

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        loss = self.run_pass(closure, "clean")  # L_B(w), and BatchNorm's statistics
        groups = self.collect()
        # ε = ρ·u/‖u‖. The direction does not come from the gradients, so it is passed to
        # perturb(): the base then checks the clean gradients for NaN/inf itself.
        self.perturb([[self.state[p]["u"] for p in gp.params] for gp in groups])
        self.run_pass(closure, "perturbed", perturbed=True)  # g' = ∇L_B(w + ε)
        self.restore()
        self.base_step()  # w ← base_step(w, g')
        return loss


# ----------------------------------------------------------------------- 2. the registry entry
NAME = "fixed-direction-sam"
INFO = OptimizerInfo(
    name=NAME,
    cls=FixedDirectionSAM,
    description="SAM along a fixed random direction (test method)",
    passes=2.0,
    reference="docs/adding_a_method.md",
)


@pytest.fixture
def name():
    """The method registered for one test; the registry is as before afterwards."""
    before = samkit.list_optimizers()
    with samkit.optim.registered(INFO):
        assert NAME in samkit.list_optimizers(sharpness_aware=True)
        yield NAME
    assert samkit.list_optimizers() == before


def test_registered_removes_the_entry_on_an_error_and_refuses_a_taken_name():
    with pytest.raises(KeyError), samkit.optim.registered(INFO):
        raise KeyError("inside")
    assert NAME not in samkit.list_optimizers()
    taken = OptimizerInfo(name="sam", cls=FixedDirectionSAM, description="x")
    with pytest.raises(ValueError, match="already registered"), samkit.optim.registered(taken):
        pass
    assert samkit.get_optimizer_info("sam").cls is samkit.SAM  # the built-in entry stays
    with samkit.optim.registered(INFO):
        assert samkit.optim.unregister(NAME) is INFO
        assert NAME not in samkit.list_optimizers()
    with pytest.raises(ValueError, match="Unknown optimizer"):
        samkit.optim.unregister(NAME)


# ----------------------------------------------------------------------- 3. the reference test
LR, MOM, WD, RHO = 0.1, 0.9, 1e-3, 0.05


def test_equals_a_naive_float64_reference():
    data = batches(5)
    model = tiny_net()
    ref = copy.deepcopy(model)
    opt = FixedDirectionSAM(
        model.parameters(), "sgd", rho=RHO, seed=3, lr=LR, momentum=MOM, weight_decay=WD
    )
    gen = torch.Generator().manual_seed(3)
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ref.parameters()]
    norm = torch.sqrt(sum((v**2).sum() for v in u))
    ref_step = sgd_momentum_reference(LR, MOM, WD)
    params = list(ref.parameters())
    for x, y in data:
        loss = opt.step(samkit.make_closure(model, loss_fn, x, y))
        expected_loss = mean_loss(ref, x, y).detach()
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, v in zip(params, u):
                p.add_(RHO * v / (norm + 1e-12))
        g_adv = flat_grad(ref, x, y)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        ref_step(params, g_adv)
        assert torch.allclose(loss, expected_loss, rtol=0, atol=1e-14)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_rho_zero_is_the_base_optimizer():
    data = batches(4)
    model, plain = tiny_net(), tiny_net()
    opt = FixedDirectionSAM(model.parameters(), "sgd", rho=0.0, lr=LR, momentum=MOM)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOM)
    for x, y in data:
        opt.step(samkit.make_closure(model, loss_fn, x, y))
        sgd.zero_grad()
        samkit.make_closure(plain, loss_fn, x, y)()
        sgd.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def test_what_the_base_gives_without_a_line_of_its_own():
    model = tiny_net()
    with samkit.optim.registered(INFO):
        opt = samkit.create_optimizer(NAME, model.parameters(), lr=0.1)
    # the manual steps are refused (it has its own passes), with what they are
    mean_loss(model, *batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="own sequence of passes .a clean pass.*step.closure"):
        opt.first_step()
    # hyperparameters are validated by the base, in the constructor and in a new group
    with pytest.raises(ValueError, match="Invalid rho value: -1"):
        FixedDirectionSAM(tiny_net().parameters(), rho=-1, lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho value: 'x'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "rho": "x"})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------- 4. the shared suites
def test_the_shared_training_loop_resume_bn_and_restore_invariants(name):
    registry_suite.test_every_optimizer_trains_with_the_same_loop(name)
    registry_suite.test_every_method_resumes_exactly_from_state_dict(name)
    registry_suite.test_every_method_leaves_bn_statistics_to_the_clean_pass(name)
    registry_suite.test_every_method_restores_weights_when_a_later_pass_fails(name)


def test_the_shared_fault_invariants(name, monkeypatch):
    # test_faults lists each method's passes when it is imported: add this method's.
    passes = faults._pass_names(name)
    assert [n for n, _ in passes] == ["clean", "perturbed"]
    monkeypatch.setitem(faults.PASSES, name, passes)
    monkeypatch.setitem(faults.PASS_NAMES, name, [n for n, _ in passes])
    for at in (1, 2):
        faults.test_exception_in_any_pass_leaves_everything_as_before(name, at)
        for fault in faults.FAULTS:
            faults.test_nan_in_any_pass_raises_naming_method_and_pass(name, at, fault)
            faults.test_nan_in_any_pass_is_skipped_on_request(name, at, fault)
    faults.test_zero_gradients_never_produce_nan(name)
    property_test = faults.test_step_is_the_base_optimizer_on_the_methods_gradient
    for split, seed in ((False, 1), (True, 2)):
        property_test.hypothesis.inner_test(
            name=name, widths=[4, 3], split=split, rho=0.3, lr=0.1, momentum=0.9, seed=seed,
            steps=2,
        )  # fmt: skip


def test_the_shared_citizen_invariants(name):
    for how in ("deepcopy", "pickle", "torch.save"):
        citizen.test_a_copy_is_a_working_identical_optimizer(name, how)
    citizen.test_every_method_starts_every_pass_from_one_random_state(name)
    citizen.test_a_closure_without_backward_is_a_clear_error(name)
    citizen.test_a_closure_returning_none_is_a_clear_error(name)
    clipping.test_every_method_clips_like_torch_clip_grad_norm_before_its_base_step(name)


def test_the_shared_validation(name, monkeypatch):
    monkeypatch.setattr(validation, "METHODS", [name])
    cases = [case.values for case in validation._cases()]
    assert {hp for _, hp, _ in cases} == {"rho"}  # its only numeric hyperparameter
    for args in cases:
        validation.test_invalid_hyperparameter_raises_naming_it(*args)
    validation.test_registry_defaults_are_valid(name)
    for bad in (-1e-3, float("nan")):
        validation.test_invalid_perturb_eps_names_the_value(name, bad)
    validation.test_invalid_on_nonfinite_names_the_value(name)
    validation.test_invalid_base_hyperparameter_comes_from_the_base(name)
    validation.test_unknown_base_name_lists_the_choices(name)
    validation.test_base_that_is_not_a_torch_optimizer_is_a_type_error(name, object)
