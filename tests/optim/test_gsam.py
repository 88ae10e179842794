"""GSAM against a naive float64 reference, its rho schedule, reductions, state and validation."""

from __future__ import annotations

import io
import math

import pytest
import torch

import samkit
from optim_helpers import batches, flat_grad, plain_closure, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3
EPS = 1e-12

net = tiny_net
closure_for = plain_closure


def data(n: int = 12, size: int = 12, seed: int = 1):
    return batches(n, size=size, seed=seed)


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(ts):
    return torch.sqrt(dot(ts, ts))


def cosine_lrs(n, t_max):
    return [LR * (1 + math.cos(math.pi * t / t_max)) / 2 for t in range(n)]


def naive_gsam(model, batches, rho, rho_min, alphas, lrs):
    """GSAM as in the paper's Algorithm 1 (global norms), then SGD (momentum, coupled wd).

    rho_t = rho_min + (rho - rho_min) * lr_t / lr_0 (rho_min None: rho); one alpha per tensor.
    """
    params = list(model.parameters())
    bufs = None
    for t, (x, y) in enumerate(batches):
        r = rho if rho_min is None else rho_min + (rho - rho_min) * lrs[t] / lrs[0]
        w = [p.detach().clone() for p in params]
        g = flat_grad(model, x, y, params)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(r * gi / (norm(g) + EPS))
        g_p = flat_grad(model, x, y, params)
        unit = [gi / (norm(g_p) + EPS) for gi in g_p]
        proj = dot(g, unit)
        g_perp = [gi - proj * u for gi, u in zip(g, unit)]
        d = [gp - a * gq for gp, a, gq in zip(g_p, alphas, g_perp)]
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
            steps = [di + WD * p for di, p in zip(d, params)]
            bufs = steps if bufs is None else [MOM * b + s for b, s in zip(bufs, steps)]
            for p, b in zip(params, bufs):
                p.sub_(lrs[t] * b)


def run(opt, model, batches, sched=None):
    losses = []
    for x, y in batches:
        losses.append(opt.step(closure_for(opt, model, x, y)))
        if sched is not None:
            sched.step()
    return losses


def same(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("rho_min", [None, 0.02])
def test_gsam_equals_naive_reference_under_cosine_schedule(foreach, rho_min):
    batches = data(12)
    m_ref, m = net(), net()
    naive_gsam(m_ref, batches, 0.2, rho_min, [0.4] * 4, cosine_lrs(12, t_max=12))
    opt = samkit.GSAM(
        m.parameters(), rho=0.2, rho_min=rho_min, alpha=0.4, lr=LR, momentum=MOM,
        weight_decay=WD, foreach=foreach,
    )  # fmt: skip
    run(opt, m, batches, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12))
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_per_group_alpha_matches_the_reference():
    batches = data(12)
    m_ref, m = net(), net()
    lrs = [LR] * 12
    naive_gsam(m_ref, batches, 0.1, None, [0.0, 0.0, 0.9, 0.9], lrs)
    groups = [
        {"params": list(m[0].parameters()), "alpha": 0.0},
        {"params": list(m[2].parameters()), "alpha": 0.9},
    ]
    opt = samkit.GSAM(groups, rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    run(opt, m, batches)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_alpha_zero_is_exactly_sam():
    batches = data(6)
    m1, m2 = net(), net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    run(samkit.GSAM(m1.parameters(), alpha=0.0, **kw), m1, batches)
    run(samkit.SAM(m2.parameters(), **kw), m2, batches)
    assert same(m1, m2)


def test_adaptive_alpha_zero_is_exactly_asam():
    batches = data(4)
    m1, m2 = net(), net()
    kw = dict(rho=0.5, eta=0.01, lr=LR, momentum=MOM)
    run(samkit.GSAM(m1.parameters(), alpha=0.0, adaptive=True, **kw), m1, batches)
    run(samkit.ASAM(m2.parameters(), **kw), m2, batches)
    assert same(m1, m2)


def test_update_keeps_sams_component_and_subtracts_the_orthogonal_part():
    """d = g_p - alpha·g_perp with g_perp ⊥ g_p: d·g_p = ‖g_p‖², and d - g_p = -alpha·g_perp."""
    x, y = data(1)[0]
    model = net()
    params = list(model.parameters())
    opt = samkit.GSAM(params, rho=0.3, alpha=0.6, lr=0.0)
    w = [p.detach().clone() for p in params]
    g = flat_grad(model, x, y, params)
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(0.3 * gi / norm(g))
    g_p = flat_grad(model, x, y, params)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    run(opt, model, [(x, y)])
    d = [p.grad for p in params]
    torch.testing.assert_close(dot(d, g_p), dot(g_p, g_p), rtol=1e-10, atol=0)
    delta = [di - gp for di, gp in zip(d, g_p)]
    torch.testing.assert_close(
        dot(delta, g_p), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0
    )
    # -delta/alpha = g_perp = g - (g·ĝ_p)ĝ_p: its component along g is ‖g‖²(1 - cos²)
    cos2 = dot(g, g_p) ** 2 / (dot(g, g) * dot(g_p, g_p))
    torch.testing.assert_close(-dot(delta, g) / 0.6, dot(g, g) * (1 - cos2), rtol=1e-9, atol=0)
    assert float(norm(delta)) > 0


def test_rho_t_follows_the_learning_rate_linearly():
    m = net()
    opt = samkit.GSAM(m.parameters(), rho=0.3, rho_min=0.1, lr=0.2)
    group = opt.param_groups[0]
    assert samkit.GSAM.rho_t(group) == pytest.approx(0.3)
    group["lr"] = 0.05
    assert samkit.GSAM.rho_t(group) == pytest.approx(0.1 + 0.2 * 0.25)
    group["lr"] = 0.0
    assert samkit.GSAM.rho_t(group) == pytest.approx(0.1)
    group["rho_min"] = None
    assert samkit.GSAM.rho_t(group) == 0.3


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_rho_t_peaks_at_rho_under_one_cycle_lr():
    # OneCycleLR overwrites initial_lr with max_lr / div_factor and keeps its peak in the
    # group's max_lr: rho_t follows lr / max_lr, so it reaches rho at the peak, never above.
    m = net()
    opt = samkit.GSAM(m.parameters(), rho=0.3, rho_min=0.1, lr=0.2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    group = opt.param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.5 / 25) and group["max_lr"] == 0.5
    radii = []
    for _ in range(20):
        radii.append(samkit.GSAM.rho_t(group))
        assert radii[-1] == pytest.approx(0.1 + 0.2 * group["lr"] / 0.5, rel=1e-12)
        sched.step()
    assert max(radii) == pytest.approx(0.3) and radii[0] == pytest.approx(0.1 + 0.2 / 25)
    # a schedule whose lr rises above the reference without a max_lr: capped at rho
    group.pop("max_lr")
    group["lr"] = 4 * group["initial_lr"]
    assert samkit.GSAM.rho_t(group) == 0.3


def test_perturbation_radius_is_rho_t():
    m = net()
    opt = samkit.GSAM(m.parameters(), rho=0.3, rho_min=0.1, lr=0.2)
    opt.param_groups[0]["lr"] = 0.1  # half the initial lr: rho_t = 0.2
    x, y = data(1)[0]
    seen = []
    original = opt.run_pass

    def spy(closure, name, **kw):
        if kw.get("perturbed"):
            seen.append([p.detach().clone() for p in m.parameters()])
        return original(closure, name, **kw)

    before = [p.detach().clone() for p in m.parameters()]
    opt.run_pass = spy
    opt.step(closure_for(opt, m, x, y))
    eps = [a - b for a, b in zip(seen[0], before)]
    torch.testing.assert_close(
        norm(eps), torch.tensor(0.2, dtype=torch.float64), rtol=1e-10, atol=0
    )


def test_resume_with_a_scheduler_continues_exactly():
    batches = data(8)
    kw = dict(rho=0.2, rho_min=0.05, alpha=0.4, lr=LR, momentum=MOM, weight_decay=WD)
    m = net()
    opt = samkit.GSAM(m.parameters(), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    run(opt, m, batches[:3], sched)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    run(opt, m, batches[3:], sched)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = net(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.GSAM(m2.parameters(), **kw)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=8)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups[0]["initial_lr"] == LR
    run(opt2, m2, batches[3:], sched2)
    assert same(m, m2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"alpha": -0.1}, "Invalid alpha value: -0.1"),
        ({"alpha": float("nan")}, "Invalid alpha value: nan"),
        ({"rho_min": -0.1}, "Invalid rho_min value: -0.1"),
        ({"rho_min": "0.1"}, r"Invalid rho_min value: '0.1' \(must be .*, got str\)"),
        ({"rho_min": float("inf")}, "Invalid rho_min value: inf"),
        ({"rho": 0.05, "rho_min": 0.1}, r"Invalid rho_min value: 0.1 \(larger than rho=0.05\)"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
        ({"eta": -1.0}, "Invalid eta value: -1.0"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.GSAM(net().parameters(), lr=0.1, **kw)
    with pytest.raises(ValueError, match=message):  # in a param group as well
        samkit.GSAM([{"params": net().parameters(), **kw}], lr=0.1)


def test_manual_first_step_is_refused():
    opt = samkit.GSAM(net().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.first_step()


def test_registry_entry():
    info = samkit.get_optimizer_info("gsam")
    assert info.cls is samkit.GSAM and info.passes == 2
    opt = samkit.create_optimizer("gsam", net().parameters(), lr=0.1)
    group = opt.param_groups[0]
    assert (group["rho"], group["alpha"], group["rho_min"]) == (0.05, 0.4, None)
