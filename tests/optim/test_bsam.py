"""Bilateral SAM against a naive float64 reference, its radii schedule, options and state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, flat_grad, plain_closure, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3


# The shared float64 fixtures of the optimizer tests, under this file's names.
net = tiny_net
closure_for = plain_closure


def data(n: int = 5, size: int = 12, seed: int = 1):
    return batches(n, size=size, seed=seed)


def grads_at(model, params, x, y):
    return flat_grad(model, x, y, params)


def norm(ts):
    return torch.sqrt(sum((t**2).sum() for t in ts))


def naive_bsam(model, batches, rho, rho_min, lrs, ratio="max_min", official=False, eps=1e-12):
    """Bilateral SAM per tensor, then SGD (momentum, coupled weight decay) with lr lrs[t]."""
    params = list(model.parameters())
    bufs = None
    for t, (x, y) in enumerate(batches):
        rmin = rho_min * lrs[t] / lrs[0]
        w = [p.detach().clone() for p in params]
        g0 = grads_at(model, params, x, y)
        n0 = norm(g0)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g0):
                p.copy_(wi + rho * gi / (n0 + eps))
        g_max = grads_at(model, params, x, y)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g0):
                p.copy_(wi - rmin * gi / (n0 + eps))
        g_min = grads_at(model, params, x, y)
        r = norm(g_max) / (norm(g_min) + eps) if ratio == "max_min" else 1.0
        g = [a + b - r * c for a, b, c in zip(g_max, g0, g_min)]
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g0):
                p.copy_(wi - rmin * gi / (n0 + eps) if official else wi)
            steps = [gi + WD * p for gi, p in zip(g, params)]
            bufs = steps if bufs is None else [MOM * b + s for b, s in zip(bufs, steps)]
            for p, b in zip(params, bufs):
                p.sub_(lrs[t] * b)


def cosine_lrs(n, t_max):
    return [LR * (1 + math.cos(math.pi * t / t_max)) / 2 for t in range(n)]


def run(opt, model, batches, sched=None):
    losses = []
    for x, y in batches:
        losses.append(opt.step(closure_for(opt, model, x, y)))
        if sched is not None:
            sched.step()
    return losses


@pytest.mark.parametrize(
    "foreach, ratio, official",
    [
        (True, "max_min", False),
        (False, "max_min", False),
        (True, "one", False),
        (True, "max_min", True),
    ],
)
def test_bsam_equals_naive_reference_under_cosine_schedule(foreach, ratio, official):
    batches = data(6)
    m_ref, m = net(), net()
    lrs = cosine_lrs(6, t_max=6)
    naive_bsam(m_ref, batches, 0.1, 0.05, lrs, ratio=ratio, official=official)
    opt = samkit.BilateralSAM(
        m.parameters(),
        "sgd",
        rho=0.1,
        rho_min=0.05,
        ratio=ratio,
        official_update=official,
        lr=LR,
        momentum=MOM,
        weight_decay=WD,
        foreach=foreach,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    run(opt, m, batches, sched)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)


def test_rho_min_zero_reduces_to_the_formula():
    """rho_min = 0: g_min = g0, so g = g_max + (1 - ‖g_max‖/‖g0‖) g0 (not SAM)."""
    x, y = data(1)[0]
    m = net()
    params = list(m.parameters())
    w = [p.detach().clone() for p in params]
    g0 = grads_at(m, params, x, y)
    with torch.no_grad():
        for p, g in zip(params, g0):
            p.add_(0.1 * g / norm(g0))
    g_max = grads_at(m, params, x, y)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    expected = [wi - LR * (a + (1 - norm(g_max) / norm(g0)) * b) for wi, a, b in zip(w, g_max, g0)]
    opt = samkit.BilateralSAM(params, rho=0.1, rho_min=0.0, lr=LR)
    run(opt, m, [(x, y)])
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_rho_min_follows_a_cosine_lr_scheduler():
    batches = data(8)
    m = net()
    opt = samkit.BilateralSAM(m.parameters(), rho=0.1, rho_min=0.05, lr=LR, momentum=MOM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    seen: list[list[torch.Tensor]] = []
    params = list(m.parameters())
    for t, (x, y) in enumerate(batches):
        seen.clear()
        base = closure_for(opt, m, x, y)

        def closure(base=base):
            seen.append([p.detach().clone() for p in params])
            return base()

        w = [p.detach().clone() for p in params]
        g0 = grads_at(m, params, x, y)
        rmin = 0.05 * (1 + math.cos(math.pi * t / 8)) / 2
        assert opt.rho_min_t(opt.param_groups[0]) == pytest.approx(rmin, rel=1e-12, abs=1e-15)
        opt.step(closure)
        sched.step()
        assert len(seen) == 3
        # The third pass sits at w - rho_min_t * ĝ0, the second at w + rho * ĝ0.
        n0 = norm(g0)
        for s, wi, gi in zip(seen[2], w, g0):
            torch.testing.assert_close(s, wi - rmin * gi / n0, rtol=1e-11, atol=1e-12)
        for s, wi, gi in zip(seen[1], w, g0):
            torch.testing.assert_close(s, wi + 0.1 * gi / n0, rtol=1e-11, atol=1e-12)
    assert opt.param_groups[0]["initial_lr"] == LR


def test_official_update_steps_from_the_min_point():
    x, y = data(1)[0]
    m1, m2 = net(), net()
    o1 = samkit.BilateralSAM(m1.parameters(), rho=0.1, rho_min=0.05, lr=0.0)
    o2 = samkit.BilateralSAM(m2.parameters(), rho=0.1, rho_min=0.05, lr=0.0, official_update=True)
    params = list(m1.parameters())
    w = [p.detach().clone() for p in params]
    g0 = grads_at(m1, params, x, y)
    run(o1, m1, [(x, y)])
    run(o2, m2, [(x, y)])
    # lr 0 would make rho_min_t 0/0: samkit then uses rho_min itself.
    assert all(torch.equal(p, wi) for p, wi in zip(m1.parameters(), w))
    for p, wi, gi in zip(m2.parameters(), w, g0):
        torch.testing.assert_close(p, wi - 0.05 * gi / norm(g0), rtol=1e-12, atol=1e-14)


def test_resume_continues_exactly_with_the_schedule():
    batches = data(6)
    kw = dict(rho=0.1, rho_min=0.05, lr=LR, momentum=MOM, weight_decay=WD)
    m = net()
    opt = samkit.BilateralSAM(m.parameters(), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    run(opt, m, batches[:3], sched)
    buf = io.BytesIO()
    torch.save({"m": m.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, buf)
    run(opt, m, batches[3:], sched)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = net(seed=3)
    m2.load_state_dict(ck["m"])
    opt2 = samkit.BilateralSAM(m2.parameters(), **kw)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=6)
    opt2.load_state_dict(ck["o"])
    sched2.load_state_dict(ck["s"])
    assert opt2.param_groups[0]["initial_lr"] == LR
    run(opt2, m2, batches[3:], sched2)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("failing_pass", [2, 3])
def test_weights_restored_when_a_perturbed_pass_fails(failing_pass):
    x, y = data(1)[0]
    m = net()
    opt = samkit.BilateralSAM(m.parameters(), lr=LR, momentum=MOM, official_update=True)
    before = [p.detach().clone() for p in m.parameters()]
    calls = {"n": 0}
    base = closure_for(opt, m, x, y)

    def closure():
        calls["n"] += 1
        if calls["n"] == failing_pass:
            raise RuntimeError("injected")
        return base()

    with pytest.raises(RuntimeError, match="injected"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert not opt.is_perturbed


def test_initial_lr_is_set_for_added_groups_and_per_group_rho_min():
    m = net()
    opt = samkit.BilateralSAM(m[0].parameters(), rho_min=0.05, lr=LR)
    opt.add_param_group({"params": m[2].parameters(), "lr": 0.02, "rho_min": 0.1})
    assert [g["initial_lr"] for g in opt.param_groups] == [LR, 0.02]
    opt.param_groups[1]["lr"] = 0.01
    assert opt.rho_min_t(opt.param_groups[1]) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rho_min": -0.1}, "Invalid rho_min value: -0.1"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
        ({"ratio": "bogus"}, "Invalid ratio value: 'bogus'"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.BilateralSAM(net().parameters(), lr=0.1, **kw)


def test_registry_entry_and_three_passes():
    info = samkit.get_optimizer_info("bsam")
    assert info.cls is samkit.BilateralSAM and info.passes == 3
    m = net()
    opt = samkit.create_optimizer("bsam", m.parameters(), lr=0.1)
    x, y = data(1)[0]
    closure = samkit.make_closure(m, lambda o, t: nn.functional.cross_entropy(o, t), x, y)
    opt.step(closure)
    assert closure.passes == 3


def test_cos_update_g0_is_the_cosine_of_the_update_and_the_clean_gradient():
    x, y = data(1)[0]
    model = net()
    opt = samkit.BilateralSAM(model.parameters(), rho=0.1, rho_min=0.05, lr=LR)
    opt.collect_stats = True
    params = list(model.parameters())
    g0 = grads_at(model, params, x, y)
    seen = {}
    step = opt.base_optimizer.step

    def record(*args, **kwargs):
        seen["update"] = [p.grad.detach().clone() for p in params]
        return step(*args, **kwargs)

    opt.base_optimizer.step = record
    run(opt, model, [(x, y)])
    u = seen["update"]
    cos = sum((a * b).sum() for a, b in zip(u, g0)) / (norm(u) * norm(g0))
    torch.testing.assert_close(opt.last_stats["cos_update_g0"], cos, rtol=1e-10, atol=0)
    assert abs(float(cos)) < 0.999  # the update is not g0 itself: the check can fail
    torch.testing.assert_close(opt.last_stats["norm_g0"], norm(g0), rtol=1e-12, atol=0)
