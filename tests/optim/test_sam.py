"""SAM and ASAM against naive references, a peer library and closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import (
    batches,
    flat_grad,
    loss_fn,
    mean_loss,
    plain_closure,
    sgd_momentum_reference,
    tiny_net,
)

LR, MOM, WD = 0.1, 0.9, 1e-3


def naive_sam_step(model, x, y, rho, ref_step, adaptive=False, eta=0.0, weight_mask=None):
    """SAM/ASAM written out longhand: one step on ``model`` in place."""
    params = list(model.parameters())
    g = flat_grad(model, x, y)
    if adaptive:
        scales = [
            (p.detach().abs() + eta) if (weight_mask[i] if weight_mask else p.dim() > 1) else None
            for i, p in enumerate(params)
        ]
    else:
        scales = [None] * len(params)
    tg = [gi if t is None else t * gi for t, gi in zip(scales, g)]
    norm = torch.sqrt(sum((v**2).sum() for v in tg))
    eps = [(rho / (norm + 1e-12)) * (v if t is None else t * v) for t, v in zip(scales, tg)]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    g_adv = flat_grad(model, x, y)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    ref_step(params, g_adv)


@pytest.mark.parametrize("foreach", [True, False])
def test_sam_equals_naive_reference_float64(foreach):
    data = batches(5)
    model = tiny_net()
    ref = copy.deepcopy(model)
    opt = samkit.SAM(
        model.parameters(), "sgd", rho=0.05, lr=LR, momentum=MOM, weight_decay=WD, foreach=foreach
    )
    ref_step = sgd_momentum_reference(LR, MOM, WD)
    for x, y in data:
        loss = opt.step(samkit.make_closure(model, loss_fn, x, y))
        expected_loss = mean_loss(ref, x, y).detach()
        naive_sam_step(ref, x, y, 0.05, ref_step)
        assert torch.allclose(loss, expected_loss, rtol=0, atol=1e-14)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False])
def test_asam_equals_naive_reference_float64(foreach):
    data = batches(5)
    model = tiny_net()
    ref = copy.deepcopy(model)
    opt = samkit.ASAM(
        model.parameters(),
        "sgd",
        rho=0.5,
        eta=0.01,
        lr=LR,
        momentum=MOM,
        weight_decay=WD,
        foreach=foreach,
    )
    ref_step = sgd_momentum_reference(LR, MOM, WD)
    for x, y in data:
        opt.step(samkit.make_closure(model, loss_fn, x, y))
        naive_sam_step(ref, x, y, 0.5, ref_step, adaptive=True, eta=0.01)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_asam_biases_are_not_scaled():
    """ASAM's T = 1 on biases: the bias perturbation is rho * g_b / ||T g|| exactly."""
    model = tiny_net()
    x, y = batches(1)[0]
    opt = samkit.ASAM(model.parameters(), rho=0.5, eta=0.01, lr=0.0)
    mean_loss(model, x, y).backward()
    params = list(model.parameters())
    g = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt.first_step()
    t = [(p.abs() + 0.01) if p.dim() > 1 else torch.ones_like(p) for p in before]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    for p, b, ti, gi in zip(params, before, t, g):
        torch.testing.assert_close(p.detach() - b, 0.5 * ti * ti * gi / norm, rtol=1e-9, atol=1e-15)
    # biases are the 1-D tensors: their perturbation is NOT multiplied by |b|^2
    bias = params[1]
    assert bias.dim() == 1
    torch.testing.assert_close(bias.detach() - before[1], 0.5 * g[1] / norm, rtol=1e-9, atol=1e-15)


def test_asam_named_parameters_use_the_official_name_rule():
    """With names, every '...weight' (BatchNorm weight too) is scaled, biases are not."""
    model = tiny_net(bn=True)
    x, y = batches(1)[0]
    named = list(model.named_parameters())
    opt = samkit.ASAM(model.named_parameters(), rho=0.5, eta=0.01, lr=0.0)
    mean_loss(model, x, y).backward()
    scales = opt._asam_scales(opt.collect()[0])
    for (name, _), t in zip(named, scales):
        assert (t is not None) == name.endswith("weight"), name
    # the BatchNorm weight is 1-D but named "...weight": scaled under the name rule only
    opt2 = samkit.ASAM(model.parameters(), rho=0.5, eta=0.01, lr=0.0)
    scales2 = opt2._asam_scales(opt2.collect()[0])
    assert [t is not None for t in scales2] == [p.dim() > 1 for _, p in named]


def test_asam_weight_scaling_group_override():
    model = tiny_net()
    x, y = batches(1)[0]
    w1, b1, w2, b2 = model.parameters()
    opt = samkit.ASAM(
        [
            {"params": [w1, b1], "weight_scaling": True},
            {"params": [w2, b2], "weight_scaling": False},
        ],
        lr=0.0,
    )
    mean_loss(model, x, y).backward()
    s1, s2 = (opt._asam_scales(gp) for gp in opt.collect())
    assert all(t is not None for t in s1) and all(t is None for t in s2)
    with pytest.raises(ValueError, match="weight_scaling"):
        samkit.ASAM([{"params": [w1], "weight_scaling": "yes"}], lr=0.1)


def test_asam_rejects_adaptive_false():
    with pytest.raises(ValueError, match="always adaptive"):
        samkit.ASAM(tiny_net().parameters(), adaptive=False)


def test_sam_matches_pytorch_optimizer_sam():
    po = pytest.importorskip("pytorch_optimizer")
    data = batches(6)
    model = tiny_net()
    peer = copy.deepcopy(model)
    opt = samkit.SAM(
        model.parameters(), torch.optim.SGD, rho=0.07, lr=LR, momentum=MOM, weight_decay=WD
    )
    peer_opt = po.SAM(
        peer.parameters(), torch.optim.SGD, rho=0.07, lr=LR, momentum=MOM, weight_decay=WD
    )
    for x, y in data:
        opt.step(plain_closure(opt, model, x, y))
        # pytorch-optimizer's protocol: first gradient computed before step(closure)
        peer_opt.zero_grad()
        mean_loss(peer, x, y).backward()
        peer_opt.step(plain_closure(peer_opt, peer, x, y))
    # pytorch-optimizer accumulates the global norm in float32 (its docstring says so), so
    # agreement is to float32 precision of the norm: ~1e-8 relative after six steps.
    for p, q in zip(model.parameters(), peer.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "base,kw",
    [
        ("sgd", dict(lr=LR, momentum=MOM, weight_decay=WD)),
        ("adamw", dict(lr=1e-2, weight_decay=1e-2)),
    ],
)
def test_rho_zero_equals_base_optimizer(base, kw):
    data = batches(4)
    model = tiny_net()
    ref = copy.deepcopy(model)
    opt = samkit.SAM(model.parameters(), base, rho=0.0, **kw)
    ref_opt = samkit.optim.BASE_OPTIMIZERS[base](ref.parameters(), **kw)
    for x, y in data:
        opt.step(samkit.make_closure(model, loss_fn, x, y))
        ref_opt.zero_grad()
        mean_loss(ref, x, y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw with a single parameter w."""

    def __init__(self, A: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.A = A
        self.w = nn.Parameter(w0.clone())

    def forward(self, _x):
        return 0.5 * self.w @ self.A @ self.w


def test_perturbation_on_quadratic_is_rho_Aw_over_norm():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(6, dtype=torch.float64)
    w0 = torch.randn(6, generator=g, dtype=torch.float64)
    model = Quadratic(A, w0)
    opt = samkit.SAM(model.parameters(), rho=0.3, lr=0.1)
    model(None).backward()
    opt.first_step()
    Aw = A @ w0
    torch.testing.assert_close(model.w.detach() - w0, 0.3 * Aw / Aw.norm(), rtol=1e-12, atol=1e-14)
    opt.zero_grad()
    model(None).backward()
    opt.second_step()
    # the update uses the gradient at the perturbed point, A (w0 + eps), from w0
    expected = w0 - 0.1 * (A @ (w0 + 0.3 * Aw / Aw.norm()))
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-14)


def test_per_group_rho_with_one_global_norm():
    model = tiny_net()
    x, y = batches(1)[0]
    w1, b1, w2, b2 = model.parameters()
    opt = samkit.SAM([{"params": [w1, b1], "rho": 0.1}, {"params": [w2, b2]}], rho=0.02, lr=0.0)
    mean_loss(model, x, y).backward()
    g = [p.grad.clone() for p in (w1, b1, w2, b2)]
    before = [p.detach().clone() for p in (w1, b1, w2, b2)]
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    opt.first_step()
    for p, b, gi, rho in zip((w1, b1, w2, b2), before, g, (0.1, 0.1, 0.02, 0.02)):
        torch.testing.assert_close(p.detach() - b, rho * gi / norm, rtol=1e-10, atol=1e-15)


def test_lr_scheduler_drives_the_shared_param_groups():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    sched.step()
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_add_param_group_reaches_the_base_optimizer():
    model = tiny_net()
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [extra], "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["rho"] == 0.2
    with pytest.raises(ValueError, match="Invalid rho value: -1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "rho": -1})


def test_frozen_parameters_are_skipped():
    model = tiny_net()
    first = model[0]
    first.weight.requires_grad_(False)
    before = first.weight.detach().clone()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    for x, y in batches(2):
        opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert torch.equal(first.weight, before)


def test_step_returns_clean_loss_and_counts_two_passes():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    expected = mean_loss(model, x, y).detach()
    c = samkit.make_closure(model, loss_fn, x, y)
    loss = opt.step(c)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
    assert c.passes == 2 and c.grad_evals == 2.0
    assert opt.samkit_state["step"] == 1


def test_asam_class_defaults_are_the_papers():
    # rho 0.5 and eta 0.01 (official code, CIFAR-10): a default ASAM step equals the naive
    # reference with those values, and differs from one with SAM's rho.
    x, y = batches(1)[0]
    model, ref, other = tiny_net(), tiny_net(), tiny_net()
    opt = samkit.ASAM(model.parameters(), lr=LR)
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["eta"]) == (0.5, 0.01)
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    naive_sam_step(ref, x, y, 0.5, sgd_momentum_reference(LR, 0.0, 0.0), adaptive=True, eta=0.01)
    naive_sam_step(other, x, y, 0.05, sgd_momentum_reference(LR, 0.0, 0.0), adaptive=True, eta=0.01)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))
