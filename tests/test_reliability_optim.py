"""Optimizer invariants under faults, for every registered method (issue: reliability).

* An exception in any pass leaves the weights exactly as before the step and restores every
  temporary change (BatchNorm flags, requires_grad, autocast state, the perturbed flag).
* A NaN in any pass raises NonFiniteError naming the method and the pass, or, with
  ``on_nonfinite="skip"``, skips the update with the weights unchanged.
* Property (hypothesis): after a step the weights equal the base optimizer applied, at the
  clean weights, to the gradient the method hands it.
"""

from __future__ import annotations

import copy
from inspect import signature

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import samkit
from optim_helpers import batches, mean_loss, tiny_net

METHODS = samkit.optim.list_optimizers(sharpness_aware=True)


def make(name, model, **kw):
    opt = samkit.create_optimizer(
        name, model.parameters(), model=model, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw
    )
    opt.set_epoch(0)  # the epoch signal, as samkit train gives it (ignored by most methods)
    return opt


class FaultyPlain:
    """A standard closure that raises, or returns NaN, at its ``at``-th call."""

    def __init__(self, opt, model, x, y, at=None, fault="raise"):
        self.opt, self.model, self.x, self.y = opt, model, x, y
        self.at, self.fault, self.calls = at, fault, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.at and self.fault == "raise":
            raise KeyboardInterrupt("injected")
        self.opt.zero_grad()
        loss = mean_loss(self.model, self.x, self.y)
        if self.calls == self.at and self.fault == "nan":
            loss = loss * float("nan")
        loss.backward()
        return loss


class FaultyBatch(samkit.BatchClosure):
    """The same faults in the passes of a BatchClosure (for methods that need one)."""

    def __init__(self, opt, model, x, y, at=None, fault="raise"):
        super().__init__(model, self._loss, x, y, indices=torch.arange(len(y)))
        self.at, self.fault, self.calls = at, fault, 0

    def _loss(self, out, y):
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        if self.calls == self.at and self.fault == "nan":
            loss = loss * float("nan")
        return loss

    def evaluate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and self.fault == "raise":
            raise KeyboardInterrupt("injected")
        return super().evaluate(*args, **kwargs)


def Faulty(opt, model, x, y, at=None, fault="raise"):  # noqa: N802 (a closure factory)
    """A closure of the kind the method needs: a plain one unless it needs a BatchClosure."""
    (info,) = [i for i in map(samkit.get_optimizer_info, METHODS) if i.cls is type(opt)]
    needs_batch = info.needs_batch_closure
    kind = FaultyBatch if needs_batch else FaultyPlain
    return kind(opt, model, x, y, at=at, fault=fault)


def _warm(name):
    """A model and optimizer a few steps in (past warm-up steps such as F-SAM's first)."""
    model = tiny_net(bn=True)
    opt = make(name, model)
    for x, y in batches(3, size=16):
        opt.step(Faulty(opt, model, x, y))
    return model, opt


def _passes(name):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=9)[0]
    c = Faulty(opt, model, x, y)
    opt.step(c)
    return c.calls


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


CASES = [(name, k) for name in METHODS for k in range(1, _passes(name) + 1)]


@pytest.mark.parametrize("name,at", CASES)
def test_exception_in_any_pass_leaves_everything_as_before(name, at):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    opt_state = copy.deepcopy(opt.state_dict())
    autocast_before = torch.is_autocast_enabled("cpu")
    with pytest.raises(KeyboardInterrupt):
        opt.step(Faulty(opt, model, x, y, at=at))
    _assert_same(model, snap, buffers=at == 1)
    assert not opt.is_perturbed
    assert torch.is_autocast_enabled("cpu") == autocast_before
    # the base optimizer took no step: its state is unchanged
    after = opt.state_dict()["base_optimizer"]["state"]
    for pid, st_ in opt_state["base_optimizer"]["state"].items():
        for key, val in st_.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after[pid][key]))


@pytest.mark.parametrize("name,at", CASES)
def test_nan_in_any_pass_raises_naming_method_and_pass(name, at):
    model, opt = _warm(name)
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    with pytest.raises(samkit.NonFiniteError, match=rf"{type(opt).__name__}: non-finite .* pass"):
        opt.step(Faulty(opt, model, x, y, at=at, fault="nan"))
    _assert_same(model, snap, buffers=False)


@pytest.mark.parametrize("name,at", CASES)
def test_nan_in_any_pass_is_skipped_on_request(name, at):
    model, opt = _warm(name)
    opt.on_nonfinite = "skip"
    x, y = batches(1, size=16, seed=5)[0]
    snap = _snapshot(model)
    opt.step(Faulty(opt, model, x, y, at=at, fault="nan"))
    _assert_same(model, snap, buffers=False)
    assert opt.skipped_steps == 1
    # and training goes on: the next clean steps update the weights, with finite values
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(Faulty(opt, model, x, y))
        assert opt.skipped_steps == 1
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():  # no method buffer was poisoned by the skipped step
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name,at", CASES)
def test_skipped_step_leaves_the_method_state_untouched(name, at):
    """A step skipped for a NaN in any pass changes no method state (buffers, banks, averaged
    models, masks, counters other than the skip count): everything is as before the step."""
    model, opt = _warm(name)
    opt.on_nonfinite = "skip"
    x, y = batches(1, size=16, seed=5)[0]
    before = copy.deepcopy(opt.state_dict())
    opt.step(Faulty(opt, model, x, y, at=at, fault="nan"))
    after = opt.state_dict()
    assert after["samkit"]["skipped_steps"] == before["samkit"]["skipped_steps"] + 1
    after["samkit"]["skipped_steps"] = before["samkit"]["skipped_steps"]
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

    if samkit.get_optimizer_info(name).needs_batch_closure:
        zero = samkit.make_closure(
            model, lambda out, t: (out * 0.0).sum(-1), x, y, indices=torch.arange(len(y))
        )
    else:
        zero = zero_loss_closure
    for _ in range(3):
        opt.step(zero)
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
        opt.step(samkit.make_closure(net, nn.functional.cross_entropy, x, y, indices=idx))
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
