"""F-SAM against a naive float64 reference, its reductions to SAM, state and validation."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import samkit
from optim_helpers import FaultyBatchClosure, batches, flat_grad, plain_closure, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3


# The shared float64 fixtures of the optimizer tests, under this file's names.
net = tiny_net
closure_for = plain_closure


def data(n: int = 5, size: int = 12, seed: int = 1):
    return batches(n, size=size, seed=seed)


def grads_at(model, params, x, y):
    return flat_grad(model, x, y, params)


def naive_fsam(model, batches, rho, sigma, lmbda, eps=1e-12):
    """F-SAM as in the official code, then SGD (momentum, coupled weight decay), per tensor."""
    params = list(model.parameters())
    ema: list[torch.Tensor] | None = None
    bufs: list[torch.Tensor] | None = None
    for x, y in batches:
        g = grads_at(model, params, x, y)
        if ema is None:
            ema = [gi.clone() for gi in g]
            d = [gi.clone() for gi in g]
        else:
            d = [gi - sigma * mi for gi, mi in zip(g, ema)]
            ema = [lmbda * mi + (1 - lmbda) * gi for gi, mi in zip(g, ema)]
        norm = torch.sqrt(sum((di**2).sum() for di in d))
        e = [rho * di / (norm + eps) for di in d]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = grads_at(model, params, x, y)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
            steps = [gi + WD * p for gi, p in zip(gp, params)]
            bufs = steps if bufs is None else [MOM * b + s for b, s in zip(bufs, steps)]
            for p, b in zip(params, bufs):
                p.sub_(LR * b)
    return ema


@pytest.fixture(params=["host", "device"])
def flag_on(request, monkeypatch):
    """F-SAM reads the finiteness flag on the host on a CPU; ``device`` runs the
    accelerator's path (``torch.where`` on the device) here too."""
    if request.param == "device":
        monkeypatch.setattr("samkit.optim.fsam._host_flag", lambda ok: None)
    return request.param


def run(opt, model, batches):
    return [opt.step(closure_for(opt, model, x, y)) for x, y in batches]


@pytest.mark.parametrize("foreach", [True, False])
def test_fsam_equals_naive_reference_float64(foreach, flag_on):
    batches = data(6)
    m_ref, m = net(), net()
    ema_ref = naive_fsam(m_ref, batches, rho=0.2, sigma=1.0, lmbda=0.6)
    opt = samkit.FriendlySAM(
        m.parameters(), "sgd", rho=0.2, lr=LR, momentum=MOM, weight_decay=WD, foreach=foreach
    )
    run(opt, m, batches)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, e in zip(m.parameters(), ema_ref):
        torch.testing.assert_close(opt.state[p]["ema"], e, rtol=1e-12, atol=1e-14)


def test_ema_takes_the_raw_gradient_not_d():
    (x1, y1), (x2, y2) = data(2)
    m = net()
    opt = samkit.FriendlySAM(m.parameters(), rho=0.1, sigma=1.0, lmbda=0.5, lr=0.0)  # lr 0: w fixed
    params = list(m.parameters())
    g1, g2 = grads_at(m, params, x1, y1), grads_at(m, params, x2, y2)
    run(opt, m, [(x1, y1), (x2, y2)])
    for p, a, b in zip(params, g1, g2):
        torch.testing.assert_close(opt.state[p]["ema"], 0.5 * a + 0.5 * b, rtol=1e-13, atol=1e-15)


def test_sigma_zero_is_exactly_sam():
    batches = data(5)
    m1, m2 = net(), net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    run(samkit.FriendlySAM(m1.parameters(), sigma=0.0, lmbda=0.6, **kw), m1, batches)
    run(samkit.SAM(m2.parameters(), **kw), m2, batches)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_adaptive_sigma_zero_is_exactly_asam():
    batches = data(4)
    m1, m2 = net(), net()
    kw = dict(rho=0.5, eta=0.01, lr=LR, momentum=MOM)
    run(samkit.FriendlySAM(m1.parameters(), sigma=0.0, adaptive=True, **kw), m1, batches)
    run(samkit.ASAM(m2.parameters(), **kw), m2, batches)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_first_step_equals_sam_then_differs():
    batches = data(2)
    m1, m2 = net(), net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    o1 = samkit.FriendlySAM(m1.parameters(), sigma=1.0, **kw)
    o2 = samkit.SAM(m2.parameters(), **kw)
    run(o1, m1, batches[:1])
    run(o2, m2, batches[:1])
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    run(o1, m1, batches[1:])
    run(o2, m2, batches[1:])
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_resume_continues_exactly():
    batches = data(6)
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    m = net()
    opt = samkit.FriendlySAM(m.parameters(), **kw)
    run(opt, m, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, m, batches[3:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = net(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.FriendlySAM(m2.parameters(), **kw)
    opt2.load_state_dict(ck["opt"])
    assert all("ema" in opt2.state[p] for p in m2.parameters())
    run(opt2, m2, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_per_group_sigma_and_lmbda():
    m = net()
    first, second = list(m[0].parameters()), list(m[2].parameters())
    opt = samkit.FriendlySAM(
        [{"params": first, "sigma": 0.0}, {"params": second, "lmbda": 0.0}], lr=0.0
    )
    (x1, y1), (x2, y2) = data(2)
    run(opt, m, [(x1, y1), (x2, y2)])
    g2 = grads_at(m, second, x2, y2)
    for p, g in zip(second, g2):  # lmbda 0: the average is the last gradient
        torch.testing.assert_close(opt.state[p]["ema"], g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"sigma": -0.1}, "Invalid sigma value: -0.1"),
        ({"lmbda": 1.0}, "Invalid lmbda value: 1.0"),
        ({"lmbda": -0.5}, "Invalid lmbda value: -0.5"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
        ({"eta": -1.0}, "Invalid eta value: -1.0"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.FriendlySAM(net().parameters(), lr=0.1, **kw)


def test_registry_entry():
    info = samkit.get_optimizer_info("fsam")
    assert info.cls is samkit.FriendlySAM and info.passes == 2
    opt = samkit.create_optimizer("fsam", net().parameters(), lr=0.1)
    assert isinstance(opt, samkit.FriendlySAM)
    group = opt.param_groups[0]
    assert group["rho"] == 0.05
    assert group["sigma"] == 1.0 and group["lmbda"] == 0.6


@pytest.mark.parametrize("fault", ["nan", "nan_loss", "inf_grad"])
@pytest.mark.parametrize("at", [1, 2])
def test_a_failed_step_keeps_the_average_of_a_finite_clean_pass_only(at, fault, flag_on):
    """The average is updated before the perturbed pass (two buffers through it, not
    three): a step skipped in its perturbed pass keeps exactly the update the completed
    step makes; one skipped in its clean pass leaves the average as it was."""
    model = net().double()
    opt = samkit.FriendlySAM(model.parameters(), lr=0.05, momentum=0.9, on_nonfinite="skip")
    (x, y), (x2, y2) = data(2)
    for _ in range(2):
        opt.step(samkit.make_closure(model, torch.nn.functional.cross_entropy, x, y))
    twin_model, twin = copy.deepcopy((model, opt))
    before = {p: opt.state[p]["ema"].clone() for p in model.parameters()}
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(FaultyBatchClosure(model, x2, y2, at=at, fault=fault))
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    twin.step(samkit.make_closure(twin_model, torch.nn.functional.cross_entropy, x2, y2))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        expected = before[p] if at == 1 else twin.state[q]["ema"]
        assert torch.equal(opt.state[p]["ema"], expected)
    if at == 2:  # the update did happen: the average is not the one before the step
        assert not all(torch.equal(opt.state[p]["ema"], before[p]) for p in model.parameters())


def test_under_a_grad_scaler_the_average_holds_unscaled_gradients():
    """With a GradScaler whose scale changes at every step, F-SAM follows the run without
    scaling (float64: only rounding differs), so ``g - sigma*m`` never mixes scales."""
    torch.manual_seed(0)
    model = net().double()
    plain_model = copy.deepcopy(model)
    opt = samkit.FriendlySAM(model.parameters(), lr=0.1, rho=0.1, momentum=0.9)
    plain = samkit.FriendlySAM(plain_model.parameters(), lr=0.1, rho=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    loss = torch.nn.functional.cross_entropy
    for t, (x, y) in enumerate(data(6)):
        opt.step(samkit.make_closure(model, loss, x, y, grad_scaler=scaler))
        scaler.update(new_scale=2.0 ** (10 + 3 * t))
        plain.step(samkit.make_closure(plain_model, loss, x, y))
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["ema"], plain.state[q]["ema"], rtol=0, atol=1e-12)
