"""Invariants every registered optimizer must satisfy (new methods are covered automatically)."""

from __future__ import annotations

import io

import pytest
import torch

import samkit
from optim_helpers import FaultyBatchClosure, batches, loss_fn, tiny_net

ALL = samkit.list_optimizers()
SHARPNESS_AWARE = samkit.optim.list_optimizers(sharpness_aware=True)


def make(name, model, **kw):
    if name != "adamw":  # AdamW has no momentum argument
        kw.setdefault("momentum", 0.9)
    return samkit.create_optimizer(
        name, model.parameters(), base="sgd", model=model, lr=0.05, weight_decay=1e-3, **kw
    )


def run(model, opt, data, first=0):
    """Steps on ``data`` as the training loop takes them: dataset indices with every batch,
    and the epoch signal (here a new epoch every 2 steps) for every samkit optimizer."""
    losses = []
    for i, (x, y) in enumerate(data, start=first):
        if samkit.optim.is_sharpness_aware(opt):
            opt.set_epoch(i // 2)
        idx = torch.arange(i * len(y), (i + 1) * len(y))
        losses.append(opt.step(samkit.make_closure(model, loss_fn, x, y, indices=idx)))
    return losses


def test_registry_lists_the_baselines_and_sam_family():
    assert {"sgd", "adamw", "sam", "asam"} <= set(ALL)
    assert "sgd" not in SHARPNESS_AWARE and "sam" in SHARPNESS_AWARE
    for name in ALL:
        info = samkit.get_optimizer_info(name)
        assert info.name == name and info.description and info.passes >= 1


def test_register_refuses_duplicates():
    info = samkit.get_optimizer_info("sam")
    with pytest.raises(ValueError, match="already registered"):
        samkit.register(info)


@pytest.mark.parametrize("name", ALL)
def test_every_optimizer_trains_with_the_same_loop(name):
    model = tiny_net(bn=True)
    opt = make(name, model)
    data = batches(6, size=16)
    losses = run(model, opt, data + data)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in losses)
    assert float(losses[-1]) < float(losses[0])


@pytest.mark.parametrize("name", SHARPNESS_AWARE)
def test_every_method_resumes_exactly_from_state_dict(name):
    data = batches(6, size=16)
    model = tiny_net(bn=True)
    opt = make(name, model)
    run(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, data[3:], first=3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = tiny_net(seed=7, bn=True)
    model2.load_state_dict(ck["model"])
    opt2 = make(name, model2)
    opt2.load_state_dict(ck["opt"])
    run(model2, opt2, data[3:], first=3)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", SHARPNESS_AWARE)
def test_every_method_leaves_bn_statistics_to_the_clean_pass(name):
    model = tiny_net(bn=True)
    opt = make(name, model)
    run(model, opt, batches(2, size=16))
    assert int(model[1].num_batches_tracked) == 2
    assert model[1].track_running_stats


@pytest.mark.parametrize("name", SHARPNESS_AWARE)
def test_every_method_restores_weights_when_a_later_pass_fails(name):
    model = tiny_net()
    opt = make(name, model)
    x, y = batches(1, size=16)[0]
    run(model, opt, batches(2, size=16))  # past any warm-up step
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if samkit.get_optimizer_info(name).needs_batch_closure:
        closure = FaultyBatchClosure(
            model, x, y, at=2, exc=RuntimeError, indices=torch.arange(len(y))
        )
    try:
        opt.step(closure)
    except RuntimeError as e:
        assert "injected" in str(e)
    else:  # a one-pass step (e.g. a lookahead method's cheap step) never reached pass 2
        assert getattr(closure, "calls", calls["n"]) == 1
        return
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.is_perturbed
