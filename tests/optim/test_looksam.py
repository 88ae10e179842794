"""LookSAM against a naive float64 reference, its cost, its reduction to SAM, state, validation."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import samkit
from optim_helpers import FaultyBatchClosure, batches, flat_grad, loss_fn, plain_closure, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3
EPS = 1e-12

net = tiny_net
closure_for = plain_closure


def data(n: int = 13, size: int = 12, seed: int = 1):
    return batches(n, size=size, seed=seed)


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(ts):
    return torch.sqrt(dot(ts, ts))


def naive_looksam(model, batches, rho, k, alphas, lr=LR):
    """LookSAM as in the paper's Algorithm 1 (global norms), then SGD (momentum, coupled wd).

    ``alphas``: one alpha per parameter tensor. Returns the cached g_v after the last step.
    """
    params = list(model.parameters())
    bufs = None
    g_v = None
    for t, (x, y) in enumerate(batches):
        g = flat_grad(model, x, y, params)
        if t % k == 0:
            unit = [gi / (norm(g) + EPS) for gi in g]
            with torch.no_grad():
                for p, u in zip(params, unit):
                    p.add_(rho * u)
            g_s = flat_grad(model, x, y, params)
            with torch.no_grad():
                for p, u in zip(params, unit):
                    p.sub_(rho * u)
            proj = dot(g_s, unit)
            g_v = [gs - proj * u for gs, u in zip(g_s, unit)]
            update = g_s
        else:
            scale = norm(g) / (norm(g_v) + EPS)
            update = [gi + a * scale * v for gi, a, v in zip(g, alphas, g_v)]
        with torch.no_grad():
            steps = [u + WD * p for u, p in zip(update, params)]
            bufs = steps if bufs is None else [MOM * b + s for b, s in zip(bufs, steps)]
            for p, b in zip(params, bufs):
                p.sub_(lr * b)
    return g_v


def run(opt, model, batches):
    return [opt.step(closure_for(opt, model, x, y)) for x, y in batches]


def same(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("foreach", [True, False])
def test_looksam_equals_naive_reference_float64(foreach):
    batches = data(13)  # refreshes at steps 0, 3, 6, 9, 12
    m_ref, m = net(), net()
    g_v = naive_looksam(m_ref, batches, rho=0.2, k=3, alphas=[0.7] * 4)
    opt = samkit.LookSAM(
        m.parameters(), rho=0.2, k=3, alpha=0.7, lr=LR, momentum=MOM, weight_decay=WD,
        foreach=foreach,
    )  # fmt: skip
    run(opt, m, batches)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, v in zip(m.parameters(), g_v):
        torch.testing.assert_close(opt.state[p]["g_v"], v, rtol=1e-12, atol=1e-14)


def test_per_group_alpha_matches_the_reference():
    batches = data(12)
    m_ref, m = net(), net()
    naive_looksam(m_ref, batches, rho=0.1, k=4, alphas=[0.0, 0.0, 1.3, 1.3])
    groups = [
        {"params": list(m[0].parameters()), "alpha": 0.0},
        {"params": list(m[2].parameters()), "alpha": 1.3},
    ]
    opt = samkit.LookSAM(groups, rho=0.1, k=4, lr=LR, momentum=MOM, weight_decay=WD)
    run(opt, m, batches)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_k_one_is_sam_on_every_step_and_refreshes_the_cache_each_step():
    batches = data(6)
    m1, m2 = net(), net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    o1 = samkit.LookSAM(m1.parameters(), k=1, alpha=0.7, **kw)
    o2 = samkit.SAM(m2.parameters(), **kw)
    for x, y in batches:
        params = list(m1.parameters())
        w = [p.detach().clone() for p in params]
        g = flat_grad(m1, x, y, params)
        unit = [gi / (norm(g) + EPS) for gi in g]
        with torch.no_grad():
            for p, u in zip(params, unit):
                p.add_(0.1 * u)
        g_s = flat_grad(m1, x, y, params)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        run(o1, m1, [(x, y)])
        run(o2, m2, [(x, y)])
        assert same(m1, m2)  # bit for bit: the update is SAM's g_s
        proj = dot(g_s, unit)
        for p, gs, u in zip(params, g_s, unit):
            torch.testing.assert_close(o1.state[p]["g_v"], gs - proj * u, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_cost_is_one_plus_one_over_k_passes_per_step(k):
    model = net()
    opt = samkit.LookSAM(model.parameters(), k=k, lr=0.05, momentum=0.9)
    steps = 20
    grad_evals = forward_evals = calls = 0.0
    for x, y in data(steps):
        closure = samkit.make_closure(model, loss_fn, x, y)
        opt.step(closure)
        grad_evals += closure.grad_evals
        forward_evals += closure.forward_evals
        calls += closure.passes
    assert calls == grad_evals == forward_evals == steps * (1 + 1 / k)


def test_plain_closure_is_called_once_on_reuse_steps():
    model = net()
    opt = samkit.LookSAM(model.parameters(), k=5, lr=0.05)
    counts = []
    for x, y in data(10):
        n = {"calls": 0}

        def closure(x=x, y=y, n=n):
            n["calls"] += 1
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        counts.append(n["calls"])
    assert counts == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def test_reuse_step_closed_form_on_a_fixed_point():
    """lr = 0 and one batch: g is the same at every step, so g_v ⊥ g on reuse steps and the
    update u = g + alpha·‖g‖·ĝ_v has u·g = ‖g‖² and ‖u‖ = ‖g‖·sqrt(1 + alpha²)."""
    x, y = data(1)[0]
    model = net()
    params = list(model.parameters())
    opt = samkit.LookSAM(params, rho=0.3, k=3, alpha=0.7, lr=0.0)
    g = flat_grad(model, x, y, params)
    run(opt, model, [(x, y)])  # refresh
    run(opt, model, [(x, y)])  # reuse: .grad now holds u
    u = [p.grad for p in params]
    torch.testing.assert_close(dot(u, g), dot(g, g), rtol=1e-10, atol=0)
    torch.testing.assert_close(norm(u), norm(g) * (1 + 0.7**2) ** 0.5, rtol=1e-10, atol=0)
    assert float(norm([p.grad - gi for p, gi in zip(params, g)])) > 0.1 * float(norm(g))


def test_resume_across_a_refresh_continues_exactly():
    batches = data(9)
    kw = dict(rho=0.1, k=4, lr=LR, momentum=MOM, weight_decay=WD)
    m = net()
    opt = samkit.LookSAM(m.parameters(), **kw)
    run(opt, m, batches[:3])  # steps 0 (refresh), 1, 2
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, m, batches[3:])  # 3, 4 (refresh), ...
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = net(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.LookSAM(m2.parameters(), **kw)
    opt2.load_state_dict(ck["opt"])
    assert all("g_v" in opt2.state[p] for p in m2.parameters())
    assert not opt2.refresh_due()
    run(opt2, m2, batches[3:])
    assert same(m, m2)


@pytest.mark.parametrize("at", [1, 2])
def test_skipped_refresh_drops_the_cache_and_retries_the_refresh_exactly(at):
    """A refresh drops the old g_v once its clean pass has run (two buffers, not three,
    through the perturbed pass). If it is skipped, nothing is cached, the step counter
    stays, and the retried refresh gives exactly what it gives with the old g_v kept."""
    model = net()
    opt = samkit.LookSAM(model.parameters(), k=2, lr=0.05, momentum=0.9, on_nonfinite="skip")
    (x, y), (x2, y2) = data(2)
    opt.step(samkit.make_closure(model, loss_fn, x, y))  # refresh, step 0
    opt.step(samkit.make_closure(model, loss_fn, x, y))  # reuse, step 1
    twin_model, twin = copy.deepcopy((model, opt))  # the same run without the failed step
    before = [p.detach().clone() for p in model.parameters()]
    bad = FaultyBatchClosure(model, x2, y2, at=at, fault="nan")  # NaN in pass 1 or 2
    opt.step(bad)
    assert bad.calls == 2 and opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not any("g_v" in opt.state[p] for p in model.parameters())
    assert opt.refresh_due()  # the step counter did not move: the refresh comes again
    for o, m in ((opt, model), (twin, twin_model)):
        good = samkit.make_closure(m, loss_fn, x2, y2)
        o.step(good)
        assert good.passes == 2
        o.step(samkit.make_closure(m, loss_fn, x, y))  # a reuse step reads the new g_v
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["g_v"], twin.state[q]["g_v"])


def test_skipped_reuse_step_leaves_cache_and_schedule():
    model = net()
    opt = samkit.LookSAM(model.parameters(), k=3, lr=0.05, on_nonfinite="skip")
    (x, y), (x2, y2) = data(2)
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    cached = {p: opt.state[p]["g_v"].clone() for p in model.parameters()}
    opt.step(FaultyBatchClosure(model, x2, y2, at=1, fault="nan"))
    assert opt.skipped_steps == 1 and opt.samkit_state["step"] == 1
    assert all(torch.equal(opt.state[p]["g_v"], cached[p]) for p in model.parameters())
    passes = []
    for _ in range(3):
        c = samkit.make_closure(model, loss_fn, x2, y2)
        opt.step(c)
        passes.append(c.passes)
    assert passes == [1, 1, 2]


def test_nothing_cached_means_refresh_whatever_the_step_counter():
    model = net()
    opt = samkit.LookSAM(model.parameters(), k=5, lr=0.05)
    opt.samkit_state["step"] = 3  # e.g. counters carried over from another run
    x, y = data(1)[0]
    c = samkit.make_closure(model, loss_fn, x, y)
    opt.step(c)
    assert c.passes == 2 and all("g_v" in opt.state[p] for p in model.parameters())


def test_parameter_without_a_cached_direction_gets_its_plain_gradient():
    batches = data(2)
    m1, m2 = net(), net()
    o1 = samkit.LookSAM(list(m1[0].parameters()), k=5, lr=LR)
    o2 = samkit.LookSAM(list(m2[0].parameters()), k=5, lr=LR)
    run(o1, m1, batches[:1])
    run(o2, m2, batches[:1])
    o1.add_param_group({"params": list(m1[2].parameters())})
    sgd = torch.optim.SGD(list(m2[2].parameters()), lr=LR)
    x, y = batches[1]
    run(o1, m1, [(x, y)])  # reuse step; the new group has no g_v
    sgd.zero_grad()
    torch.nn.functional.cross_entropy(m2(x), y).backward()
    sgd.step()
    for p, q in zip(m1[2].parameters(), m2[2].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_zero_alpha_reuse_steps_are_plain_sgd():
    batches = data(4)
    m1, m2 = net(), net()
    o1 = samkit.LookSAM(m1.parameters(), k=10, alpha=0.0, lr=LR, momentum=MOM)
    o2 = samkit.SAM(m2.parameters(), rho=0.1, lr=LR, momentum=MOM)
    run(o1, m1, batches[:1])
    run(o2, m2, batches[:1])
    sgd = o2.base_optimizer  # shares SAM's momentum buffers
    for x, y in batches[1:]:
        run(o1, m1, [(x, y)])
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y).backward()
        sgd.step()
    assert same(m1, m2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"k": 0}, "Invalid k value: 0"),
        ({"k": 2.5}, "Invalid k value: 2.5"),
        ({"k": True}, "Invalid k value: True"),
        ({"alpha": -0.1}, "Invalid alpha value: -0.1"),
        ({"alpha": float("inf")}, "Invalid alpha value: inf"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.LookSAM(net().parameters(), lr=0.1, **kw)


def test_k_must_agree_across_groups():
    m = net()
    with pytest.raises(ValueError, match=r"same k in every param group.*\[2, 5\]"):
        samkit.LookSAM(
            [{"params": list(m[0].parameters()), "k": 2}, {"params": list(m[2].parameters())}],
            lr=0.1,
        )


def test_manual_first_step_is_refused():
    opt = samkit.LookSAM(net().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.first_step()


def test_registry_entry():
    info = samkit.get_optimizer_info("looksam")
    assert info.cls is samkit.LookSAM and info.passes == pytest.approx(1.2)
    opt = samkit.create_optimizer("looksam", net().parameters(), lr=0.1)
    group = opt.param_groups[0]
    assert (group["rho"], group["k"], group["alpha"]) == (0.1, 5, 0.7)
