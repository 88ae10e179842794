"""Optimizer invariants under faults, for every registered method (issue: reliability).

* An exception in any pass leaves the weights exactly as before the step and restores every
  temporary change (BatchNorm flags, requires_grad, autocast state, the perturbed flag).
* A NaN in any pass raises NonFiniteError naming the method and the pass, or, with
  ``on_nonfinite="skip"``, skips the update with the weights unchanged. The loss and the
  gradients are checked separately: a NaN loss with finite gradients, and an inf in the
  gradients under a finite loss (the last pass included), are each caught on their own.
* The manual protocol (``first_step`` / ``second_step``) gives the same guarantees.
* Property (hypothesis): after a step the weights equal the base optimizer applied, at the
  clean weights, to the gradient the method hands it.
"""

from __future__ import annotations

import copy
import math
from inspect import signature

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import samkit
from optim_helpers import FaultyBatchClosure, batches, loss_fn, mean_loss, tiny_net

METHODS = samkit.optim.list_optimizers(sharpness_aware=True)


def make(name, model, **kw):
    opt = samkit.create_optimizer(
        name, model.parameters(), model=model, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw
    )
    opt.set_epoch(0)  # the epoch signal, as samkit train gives it (ignored by most methods)
    return opt


class Faulty:
    """A standard closure that misbehaves at its ``at``-th call.

    ``fault``: ``"raise"`` (KeyboardInterrupt), ``"nan"`` (NaN loss, hence NaN gradients),
    ``"nan_loss"`` (the returned loss is NaN, the gradients are finite) or ``"inf_grad"``
    (the loss is finite, one gradient entry is inf).
    """

    def __init__(self, opt, model, x, y, at=None, fault="raise"):
        self.opt, self.model, self.x, self.y = opt, model, x, y
        self.at, self.fault, self.calls = at, fault, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.at and self.fault == "raise":
            raise KeyboardInterrupt("injected")
        self.opt.zero_grad()
        loss = mean_loss(self.model, self.x, self.y)
        faulty = self.calls == self.at
        if faulty and self.fault == "nan":
            loss = loss * float("nan")
        loss.backward()
        if faulty and self.fault == "nan_loss":
            return loss.detach() * float("nan")
        if faulty and self.fault == "inf_grad":
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")
        return loss


def faulty(name, opt, model, x, y, at=None, fault="raise"):
    """A faulty closure of the kind the method ``name`` takes (registry: needs_batch_closure)."""
    if samkit.get_optimizer_info(name).needs_batch_closure:
        return FaultyBatchClosure(model, x, y, at=at, fault=fault, indices=torch.arange(len(y)))
    return Faulty(opt, model, x, y, at=at, fault=fault)


def _warm(name):
    """A model and optimizer a few steps in (past warm-up steps such as F-SAM's first)."""
    model = tiny_net(bn=True)
    opt = make(name, model)
    for x, y in batches(3, size=16):
        opt.step(faulty(name, opt, model, x, y))
    return model, opt


def _pass_names(name):
    """A step's passes (forward-only ones too), in order: (name as run_pass reports it, backward)."""
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=9)[0]
    names = []
    run_pass = opt.run_pass

    def spy(closure, pass_name, **kw):
        names.append((pass_name, kw.get("backward", True)))
        return run_pass(closure, pass_name, **kw)

    opt.run_pass = spy
    c = faulty(name, opt, model, x, y)
    opt.step(c)
    assert len(names) == c.calls
    return names


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        [m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")],
    )


def _assert_same(model, snap, buffers=True):
    """Parameters (and, with ``buffers``, BatchNorm statistics) equal the snapshot.

    A failure after the clean pass keeps that pass's BatchNorm update (a completed forward
    pass at the clean weights, as in plain training); perturbed passes never update them.
    """
    state, flags, bn = snap
    names = {n for n, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        if buffers or k in names:
            assert torch.equal(v, state[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [
        m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")
    ] == bn


PASSES = {name: _pass_names(name) for name in METHODS}
PASS_NAMES = {name: [n for n, _ in passes] for name, passes in PASSES.items()}
CASES = [(name, k) for name in METHODS for k in range(1, len(PASS_NAMES[name]) + 1)]


@pytest.mark.parametrize("name,at", CASES)
def test_exception_in_any_pass_leaves_everything_as_before(name, at):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    opt_state = copy.deepcopy(opt.state_dict())
    autocast_before = torch.is_autocast_enabled("cpu")
    with pytest.raises(KeyboardInterrupt):
        opt.step(faulty(name, opt, model, x, y, at=at))
    _assert_same(model, snap, buffers=at == 1)
    assert not opt.is_perturbed
    assert torch.is_autocast_enabled("cpu") == autocast_before
    # the base optimizer took no step: its state is unchanged
    after = opt.state_dict()["base_optimizer"]["state"]
    for pid, st_ in opt_state["base_optimizer"]["state"].items():
        for key, val in st_.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after[pid][key]))


FAULTS = ["nan", "nan_loss", "inf_grad"]
# (method, pass, fault): an inf gradient only in passes that compute gradients
FAULT_CASES = [
    (name, at, fault)
    for name, at in CASES
    for fault in FAULTS
    if fault != "inf_grad" or PASSES[name][at - 1][1]
]


@pytest.mark.parametrize("name,at,fault", FAULT_CASES)
def test_nan_in_any_pass_raises_naming_method_and_pass(name, at, fault):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    pass_name = PASS_NAMES[name][at - 1]  # the faulty pass is the one reported
    with pytest.raises(
        samkit.NonFiniteError, match=rf"{type(opt).__name__}: non-finite .* {pass_name} pass"
    ):
        opt.step(faulty(name, opt, model, x, y, at=at, fault=fault))
    _assert_same(model, snap, buffers=False)
    _assert_same_state(opt, state, after_clean=_after_first_pass(name, at))


@pytest.mark.parametrize("name,at,fault", FAULT_CASES)
def test_nan_in_any_pass_is_skipped_on_request(name, at, fault):
    model, opt = _warm(name)
    opt.on_nonfinite = "skip"
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    opt.step(faulty(name, opt, model, x, y, at=at, fault=fault))
    _assert_same(model, snap, buffers=False)
    _assert_same_state(opt, state, skipped=1, after_clean=_after_first_pass(name, at))
    assert opt.skipped_steps == 1
    # and training goes on: the next clean steps update the weights, with finite values
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(faulty(name, opt, model, x, y))
        assert opt.skipped_steps == 1
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():  # no method buffer was poisoned by the skipped step
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def _after_first_pass(name, at):
    """Whether the fault comes after the step's first pass: a later pass of the closure, or
    any of them for SSAM-F, whose Fisher pass (per-sample, outside the closure's passes)
    comes first."""
    return at > 1 or name == "ssam"


def _assert_same_state(opt, before, skipped=0, after_clean=False):
    """The whole state_dict (method buffers, banks, averaged models, masks, generator states,
    base moments, param groups, counters) is as ``before``, ``skipped`` more skips aside.

    ``after_clean``: the step failed after its first pass, so the state the method declares
    in ``clean_pass_state`` may hold that pass's update (checked method by method in
    test_clean_pass_state.py)."""
    after = opt.state_dict()
    assert after["samkit"]["skipped_steps"] == before["samkit"]["skipped_steps"] + skipped
    after["samkit"]["skipped_steps"] = before["samkit"]["skipped_steps"]
    if after_clean:
        before = copy.deepcopy(before)
        for sd in (after, before):
            for key in type(opt).clean_pass_state:
                sd["samkit"].pop(key, None)
                for st_ in sd["state"].values():
                    st_.pop(key, None)
    _assert_nested_equal(after, before)


def _assert_nested_equal(a, b, path="state_dict"):
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), path
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_nested_equal(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


# ----------------------------------------------------------------------------- by hand
def _manual_methods():
    """Registered methods whose passes first_step/second_step implement (SAM's two)."""
    out = []
    for name in METHODS:
        opt = make(name, tiny_net())
        if opt.supports_manual_steps or (
            opt.supports_manual_steps is None
            and type(opt).sharpness_step is samkit.SharpnessAwareOptimizer.sharpness_step
        ):
            out.append(name)
    return out


MANUAL = _manual_methods()


def test_the_manual_protocol_covers_the_sam_family():
    assert {"sam", "asam", "fsam"} <= set(MANUAL)


def _manual_step(opt, model, x, y, fault=None, at=None, pass_loss=True):
    """One step by hand; ``fault`` as in :class:`Faulty`, injected in pass ``at`` (1 or 2)."""
    for k in (1, 2):
        loss = mean_loss(model, x, y)
        if fault == "nan" and at == k:
            loss = loss * float("nan")
        loss.backward()
        if fault == "nan_loss" and at == k:
            loss = loss.detach() * float("nan")
        if fault == "inf_grad" and at == k:
            next(p.grad for p in model.parameters() if p.grad is not None).view(-1)[0] = math.inf
        if k == 1:
            opt.first_step(zero_grad=True, loss=loss if pass_loss else None)
        else:
            opt.second_step(zero_grad=True, loss=loss if pass_loss else None)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("name", MANUAL)
def test_manual_steps_raise_on_nan_in_either_pass(name, at, fault):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    pass_name = "clean" if at == 1 else "perturbed"
    with pytest.raises(samkit.NonFiniteError, match=rf"{type(opt).__name__}: .* {pass_name} pass"):
        _manual_step(opt, model, x, y, fault, at)
    _assert_same(model, snap, buffers=False)
    _assert_same_state(opt, state, after_clean=_after_first_pass(name, at))
    assert not opt.is_perturbed
    _manual_step(opt, model, x, y)  # and the next step by hand works
    assert opt.samkit_state["step"] == state["samkit"]["step"] + 1


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("name", MANUAL)
def test_manual_steps_skip_nan_in_either_pass_on_request(name, at, fault):
    model, opt = _warm(name)
    opt.on_nonfinite = "skip"
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    _manual_step(opt, model, x, y, fault, at)
    _assert_same(model, snap, buffers=False)
    _assert_same_state(opt, state, skipped=1, after_clean=_after_first_pass(name, at))
    assert all(p.grad is None for p in model.parameters())
    # the next steps by hand are exactly the steps of step(closure) from the same point
    twin_model, twin = copy.deepcopy((model, opt))
    for _ in range(2):
        _manual_step(opt, model, x, y)
        twin.step(faulty(name, twin, twin_model, x, y))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", MANUAL)
def test_manual_nan_loss_is_only_seen_when_handed_over(name):
    # Without loss=, only the gradients can be checked: a NaN loss with finite gradients
    # passes (documented); with loss= it is caught.
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    _manual_step(opt, model, x, y, "nan_loss", 2, pass_loss=False)
    with pytest.raises(samkit.NonFiniteError, match="perturbed pass"):
        _manual_step(opt, model, x, y, "nan_loss", 2, pass_loss=True)


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_never_produce_nan(name):
    model = tiny_net()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = make(name, model)
    x, y = batches(1)[0]

    def zero_loss_closure():
        opt.zero_grad()
        loss = (model(x) * 0.0).sum()
        loss.backward()
        return loss

    closure = zero_loss_closure
    if samkit.get_optimizer_info(name).needs_batch_closure:
        closure = samkit.make_closure(
            model, lambda out, t: (out * 0.0).sum(1), x, y, indices=torch.arange(len(y))
        )
    for _ in range(3):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- property
def _record_base_step(opt):
    """Wrap the base optimizer's step to capture the weights and gradients it is given."""
    seen = {}
    original = opt.base_optimizer.step

    def step(*args, **kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        seen["weights"] = [p.detach().clone() for p in params]
        seen["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in params]
        seen["base_state"] = copy.deepcopy(opt.base_optimizer.state_dict())
        return original(*args, **kwargs)

    opt.base_optimizer.step = step
    return seen


class Net(nn.Module):
    def __init__(self, widths, seed):
        super().__init__()
        torch.manual_seed(seed)
        dims = [3, *widths, 2]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.double()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(METHODS),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    split=st.booleans(),
    rho=st.floats(0.0, 1.0),
    lr=st.floats(1e-3, 0.5),
    momentum=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 10_000),
    steps=st.integers(1, 3),
)
def test_step_is_the_base_optimizer_on_the_methods_gradient(
    name, widths, split, rho, lr, momentum, seed, steps
):
    net = Net(widths, seed)
    params = list(net.parameters())
    groups = (
        [{"params": params[::2]}, {"params": params[1::2], "rho": rho / 2}] if split else params
    )
    radius = {"rho": rho} if "rho" in _arguments(name) else {}  # (SAF and MESA have none)
    opt = samkit.create_optimizer(name, groups, lr=lr, momentum=momentum, **radius)
    opt.set_epoch(0)
    seen = _record_base_step(opt)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (8,), generator=g)
        idx = torch.arange(8 * step, 8 * step + 8)
        before = [p.detach().clone() for p in net.parameters()]
        idx = torch.arange(8)  # dataset indices, for the methods that keep per-sample state
        opt.step(samkit.make_closure(net, loss_fn, x, y, indices=idx))
        ordered = [p for grp in opt.param_groups for p in grp["params"]]
        index = {id(p): i for i, p in enumerate(ordered)}
        # the base step happened at the clean weights ...
        for p, b in zip(net.parameters(), before):
            assert torch.equal(seen["weights"][index[id(p)]], b)
        # ... and the result is exactly the base optimizer on the method's gradient
        replay = [nn.Parameter(w.clone()) for w in seen["weights"]]
        for r, gr in zip(replay, seen["grads"]):
            r.grad = gr
        ref_groups = [
            {
                **{k: v for k, v in grp.items() if k != "params"},
                "params": replay[a : a + len(grp["params"])],
            }
            for grp, a in zip(opt.param_groups, _offsets(opt.param_groups))
        ]
        ref = torch.optim.SGD(ref_groups, lr=lr, momentum=momentum)
        ref.load_state_dict(seen["base_state"])
        ref.step()
        for p in ordered:
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p.detach(), replay[index[id(p)]].detach(), rtol=0, atol=0)


def _arguments(name):
    """Every constructor argument of a method's class and its parents."""
    cls = samkit.get_optimizer_info(name).cls
    return {a for k in cls.__mro__ if "__init__" in k.__dict__ for a in signature(k).parameters}


def _offsets(groups):
    out, a = [], 0
    for grp in groups:
        out.append(a)
        a += len(grp["params"])
    return out
