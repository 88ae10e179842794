"""Gradient clipping (``max_grad_norm``): the update gradient clipped by its global norm.

Float64 references written here (SAM and F-SAM, clipping by hand), torch's own
``clip_grad_norm_`` as an oracle for every registered method (a base optimizer that clips
before stepping), the manual ``first_step``/``second_step`` path, a GradScaler, and the
option's validation. The distributed cases (DDP after the all-reduce, FSDP2 with the sharded
norm) are in ``test_ddp.py`` and ``test_fsdp.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import samkit
from optim_helpers import batches, flat_grad, loss_fn, plain_closure, sgd_momentum_reference
from optim_helpers import tiny_net as net

LR, MOM, WD, RHO = 0.1, 0.9, 5e-3, 0.1
MAX = 0.05  # below every update gradient's norm here: each step is clipped


def _norm(ts):
    return torch.sqrt(sum((t**2).sum() for t in ts))


def _clip(g, max_norm):
    total = _norm(g)
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return [coef * gi for gi in g], total


def naive_sam_clipped(model, data, rho=RHO, max_norm=MAX, eps=1e-12):
    """SAM with the perturbed gradient clipped to ``max_norm``, then SGD; the pre-clip norms."""
    params = list(model.parameters())
    step = sgd_momentum_reference(LR, MOM, WD)
    norms = []
    for x, y in data:
        g = flat_grad(model, x, y, params)
        e = [rho * gi / (_norm(g) + eps) for gi in g]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = flat_grad(model, x, y, params)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
        gp, total = _clip(gp, max_norm)
        norms.append(total)
        step(params, gp)
    return norms


def naive_fsam_clipped(model, data, rho=RHO, sigma=1.0, lmbda=0.6, max_norm=MAX, eps=1e-12):
    """F-SAM (the average takes the raw clean gradient), the update clipped, then SGD."""
    params = list(model.parameters())
    step = sgd_momentum_reference(LR, MOM, WD)
    ema = None
    for x, y in data:
        g = flat_grad(model, x, y, params)
        if ema is None:
            d, ema = [gi.clone() for gi in g], [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, ema)]
            ema = [lmbda * mi + (1 - lmbda) * gi for gi, mi in zip(g, ema)]
        e = [rho * di / (_norm(d) + eps) for di in d]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = flat_grad(model, x, y, params)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
        step(params, _clip(gp, max_norm)[0])


def _sgd(cls, model, **kw):
    return cls(model.parameters(), "sgd", lr=LR, momentum=MOM, weight_decay=WD, **kw)


def _run(opt, model, data):
    for x, y in data:
        opt.step(plain_closure(opt, model, x, y))


@pytest.mark.parametrize("foreach", [True, False])
def test_sam_clipped_equals_naive_reference_float64(foreach):
    data = batches(5, size=12)
    m_ref, m = net(), net()
    norms = naive_sam_clipped(m_ref, data)
    opt = _sgd(samkit.SAM, m, rho=RHO, max_grad_norm=MAX, foreach=foreach)
    _run(opt, m, data)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.last_grad_norm.dim() == 0 and opt.last_grad_norm.dtype == torch.float64
    torch.testing.assert_close(opt.last_grad_norm, norms[-1], rtol=1e-12, atol=0)
    assert min(float(n) for n in norms) > MAX  # every step was clipped: the test can fail


def test_fsam_clipped_equals_naive_reference_float64():
    data = batches(5, size=12)
    m_ref, m = net(), net()
    naive_fsam_clipped(m_ref, data)
    _run(_sgd(samkit.FriendlySAM, m, rho=RHO, max_grad_norm=MAX), m, data)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _clipping_base(max_norm: float) -> type[torch.optim.SGD]:
    """SGD that clips with torch's ``clip_grad_norm_`` before stepping: the oracle."""

    class ClippingSGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, max_norm)
            return super().step(closure)

    return ClippingSGD


@pytest.mark.parametrize("name", samkit.list_optimizers(sharpness_aware=True))
def test_every_method_clips_like_torch_clip_grad_norm_before_its_base_step(name):
    cls = samkit.get_optimizer_info(name).cls  # the class defaults
    data = batches(4, size=12)
    models, opts = [], []
    for base, extra in (("sgd", {"max_grad_norm": MAX}), (_clipping_base(MAX), {})):
        model = net(bn=True)
        opt = cls(model.parameters(), base, lr=LR, momentum=MOM, weight_decay=WD, **extra)
        for step, (x, y) in enumerate(data):
            opt.set_epoch(step // 2)
            idx = torch.arange(step * len(y), (step + 1) * len(y))
            opt.step(samkit.make_closure(model, loss_fn, x, y, indices=idx))
        models.append(model)
        opts.append(opt)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opts[0].last_grad_norm is not None and opts[1].last_grad_norm is None
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), net().parameters()))


def test_manual_steps_clip_and_record_the_norm():
    data = batches(3, size=12)
    m_ref, m = net(), net()
    norms = naive_sam_clipped(m_ref, data)
    opt = _sgd(samkit.SAM, m, rho=RHO, max_grad_norm=MAX)
    for x, y in data:
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.last_grad_norm, norms[-1], rtol=1e-12, atol=0)


def test_a_large_max_grad_norm_changes_nothing_and_none_computes_no_norm():
    data = batches(3, size=12)
    runs = []
    for max_norm in (None, 1e9):
        model = net()
        opt = _sgd(samkit.SAM, model, rho=RHO, max_grad_norm=max_norm)
        _run(opt, model, data)
        runs.append((model, opt))
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)  # coefficient exactly 1
    assert runs[0][1].last_grad_norm is None
    assert float(runs[1][1].last_grad_norm) > 0


def test_a_nonfinite_update_gradient_is_skipped_before_clipping():
    ((x, y),) = batches(1, size=12)
    model = net()
    opt = _sgd(samkit.SAM, model, rho=RHO, max_grad_norm=MAX, on_nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if calls["n"] == 2:  # the perturbed pass: an inf in its gradients only
            loss = loss + model[0].weight.sum() * math.inf
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_clipping_sees_the_true_gradient_under_a_grad_scaler():
    # A power-of-two scale is exact: with the gradients unscaled before the norm, the scaled
    # run equals the unscaled one bit for bit; clipping the scaled gradients would not.
    data = batches(3, size=12, dtype=torch.float32)
    results = []
    for scale in (None, 2.0**10):
        model = net(dtype=torch.float32)
        opt = _sgd(samkit.SAM, model, rho=RHO, max_grad_norm=MAX)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for x, y in data:
            opt.step(samkit.make_closure(model, loss_fn, x, y, grad_scaler=scaler))
            if scaler is not None:
                scaler.update()
        results.append((model, opt))
    for p, q in zip(results[0][0].parameters(), results[1][0].parameters()):
        assert torch.equal(p, q)
    assert torch.equal(results[0][1].last_grad_norm, results[1][1].last_grad_norm)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "1", True])
def test_max_grad_norm_is_validated(bad):
    with pytest.raises(ValueError, match=f"Invalid max_grad_norm value: {bad!r}"):
        samkit.SAM(net().parameters(), lr=LR, max_grad_norm=bad)


def test_max_grad_norm_survives_copies():
    model = net()
    opt = _sgd(samkit.SAM, model, rho=RHO, max_grad_norm=MAX)
    _run(opt, model, batches(1, size=12))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.max_grad_norm == MAX
    _run(opt, model, batches(1, size=12, seed=5))
    _run(opt2, model2, batches(1, size=12, seed=5))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.last_grad_norm, opt2.last_grad_norm)
