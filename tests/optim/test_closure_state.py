"""What a BatchClosure leaves behind: gradients, metrics, memory; and accumulation weights.

* Every tensor a pass gives a gradient to is zeroed first, also outside the model (a loss
  module's learned temperature), for plain torch optimizers and sharpness-aware ones.
* The metrics (predictions, correct, counted; outputs only on request) come from the clean
  pass of the current step, never from a perturbed pass or an earlier step, and the full
  outputs are not held by default.
* Accumulation over uneven micro-batches weights each one by its share (10 samples in 4/4/2).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, tiny_net


class TemperatureCE(nn.Module):
    """Cross-entropy of logits divided by a learned temperature (a CLIP-style logit scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, out, y):
        return F.cross_entropy(out / self.log_t.exp(), y, reduction="none")


def test_plain_sgd_over_model_and_loss_parameter_matches_a_hand_written_loop():
    data = batches(5, size=8)
    ref_model, ref_loss = tiny_net(), TemperatureCE()
    ref_params = list(ref_model.parameters()) + list(ref_loss.parameters())
    ref_opt = torch.optim.SGD(ref_params, lr=0.2, momentum=0.5)
    model, crit = tiny_net(), TemperatureCE()
    opt = torch.optim.SGD(list(model.parameters()) + list(crit.parameters()), lr=0.2, momentum=0.5)
    for x, y in data:
        ref_opt.zero_grad()
        ref_loss(ref_model(x), y).mean().backward()
        ref_opt.step()
        opt.step(samkit.make_closure(model, crit, x, y, accumulation_steps=3))
    for a, b in zip(ref_params, list(model.parameters()) + list(crit.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sam_over_model_and_loss_parameter_matches_a_hand_written_sam():
    data = batches(3, size=8)
    rho, lr = 0.1, 0.2
    ref_model, ref_loss = tiny_net(), TemperatureCE()
    ref_params = list(ref_model.parameters()) + list(ref_loss.parameters())
    model, crit = tiny_net(), TemperatureCE()
    params = list(model.parameters()) + list(crit.parameters())
    opt = samkit.SAM(params, rho=rho, lr=lr)
    for x, y in data:
        g = torch.autograd.grad(ref_loss(ref_model(x), y).mean(), ref_params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        with torch.no_grad():
            eps = [rho * gi / (norm + 1e-12) for gi in g]
            for p, e in zip(ref_params, eps):
                p.add_(e)
        g2 = torch.autograd.grad(ref_loss(ref_model(x), y).mean(), ref_params)
        with torch.no_grad():
            for p, e, gi in zip(ref_params, eps, g2):
                p.sub_(e).sub_(lr * gi)
        opt.step(samkit.make_closure(model, crit, x, y))
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_leaf_outside_the_optimizer_holds_the_last_pass_gradient_only():
    # A tensor captured by loss_fn and trained by nobody: SAM's two passes used to add up
    # in its .grad (and grow over steps).
    model = tiny_net()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x, y = batches(1)[0]

    def scaled(out, t):
        return F.cross_entropy(out * scale, t, reduction="none")

    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    for _ in range(2):
        # The last pass of a SAM step runs at w + rho g/|g|: its gradient for `scale`.
        params = list(model.parameters())
        g = torch.autograd.grad(scaled(model(x), y).mean(), params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        moved = {
            n: p.detach() + 0.5 * gi / (norm + 1e-12)
            for (n, p), gi in zip(model.named_parameters(), g)
        }
        out = torch.func.functional_call(model, moved, (x,))
        (expected,) = torch.autograd.grad(scaled(out, y).mean(), scale)
        opt.step(samkit.make_closure(model, scaled, x, y))
        torch.testing.assert_close(scale.grad, expected, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- metrics


def test_metrics_come_from_the_clean_pass_of_the_current_step():
    model = tiny_net()
    data = batches(2, size=10)
    opt = samkit.SAM(model.parameters(), rho=5.0, lr=0.5)  # a large rho: passes differ
    x, y = data[0]
    closure = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=3, keep_outputs=True)
    for _ in range(3):  # the same closure, reused: every step reports its own clean pass
        with torch.no_grad():
            clean = model(x)
        opt.step(closure)
        torch.testing.assert_close(closure.outputs, clean, rtol=0, atol=1e-14)
        assert torch.equal(closure.predictions, clean.argmax(1))
        assert int(closure.correct) == int((clean.argmax(1) == y).sum())
        assert int(closure.counted) == 10
    # Other passes leave them alone; a standard call refreshes them.
    before = closure.outputs
    closure.evaluate(torch.tensor([0, 1]))
    closure.evaluate(backward=False, per_sample=True)
    assert closure.outputs is before
    with torch.no_grad():
        model[0].weight.add_(1.0)
        now = model(x)
    closure()
    torch.testing.assert_close(closure.outputs, now, rtol=0, atol=1e-14)


def test_reused_closure_with_a_plain_optimizer_reports_each_call():
    model = tiny_net()
    x, y = batches(1, size=10)[0]
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    closure = samkit.make_closure(model, loss_fn, x, y)
    for _ in range(3):
        with torch.no_grad():
            clean = model(x).argmax(1)
        opt.step(closure)
        assert torch.equal(closure.predictions, clean)
    assert closure.outputs is None


def test_outputs_are_not_held_unless_asked():
    model = tiny_net()
    x, y = batches(1, size=10)[0]
    refs = []
    model.register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out)))
    for keep in (False, True):
        refs.clear()
        closure = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=2, keep_outputs=keep)
        samkit.SAM(model.parameters(), rho=0.05, lr=0.1).step(closure)
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        if keep:  # the clean pass's two micro-batches, concatenated
            assert closure.outputs.shape == (10, 3)
        else:
            assert alive == [] and closure.outputs is None
            assert closure.predictions.shape == (10,) and closure.predictions.dtype == torch.long


def test_token_accuracy_leaves_padding_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 5), nn.Flatten(0, 0)).double()
    x = torch.tensor([[1, 2, 3], [4, 4, 0]])
    y = torch.tensor([[1, 0, 3], [2, 4, 0]])  # 0 is padding: the last prediction is no hit
    with torch.no_grad():  # the model predicts its input: correct where y == x
        model[0].weight.copy_(torch.eye(5) * 10)
    to_bct = nn.Sequential(model, _Transpose())
    crit = nn.CrossEntropyLoss(reduction="none", ignore_index=0)
    closure = samkit.make_closure(to_bct, crit, x, y)
    closure()
    assert torch.equal(closure.predictions, x)
    assert int(closure.correct) == 3 and int(closure.counted) == 4
    # Targets that are not class indices: predictions only.
    reg = samkit.make_closure(nn.Linear(2, 3), nn.MSELoss(reduction="none"), torch.ones(4, 2),
                              torch.ones(4, 3))  # fmt: skip
    reg()
    assert reg.predictions.shape == (4,) and reg.correct is None and reg.counted is None


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_uneven_micro_batches_are_weighted_by_their_share(reduce):
    # 10 samples in 3 micro-batches are chunks of 4/4/2: weights 4/10, 4/10, 2/10.
    model = tiny_net()
    x, y = batches(1, size=10)[0]
    crit = nn.CrossEntropyLoss(reduction=reduce)
    full = samkit.make_closure(model, crit, x, y)()
    g_full = [p.grad.clone() for p in model.parameters()]
    acc = samkit.make_closure(model, crit, x, y, accumulation_steps=3)()
    torch.testing.assert_close(acc, full, rtol=1e-13, atol=0)
    for p, g in zip(model.parameters(), g_full):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_extra_loss_under_accumulation_equals_the_full_batch():
    model = tiny_net()
    x, y = batches(1, size=10)[0]
    idx = torch.arange(10)

    def extra(out, indices, targets):  # a per-sample mean, uneven across samples
        return (out.pow(2).sum(1) * (1 + indices.double())).mean()

    results = []
    for steps in (1, 3):
        closure = samkit.make_closure(model, loss_fn, x, y, indices=idx, accumulation_steps=steps)
        loss = closure.evaluate(extra_loss=extra)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    with torch.no_grad():
        out = model(x)
        expected = loss_fn(out, y).mean() + extra(out, idx, y)
    torch.testing.assert_close(results[0][0], expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(results[1][0], expected, rtol=1e-13, atol=0)
    for a, b in zip(*(r[1] for r in results)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_accumulation_makes_no_micro_batch_of_one_sample_under_batchnorm():
    # 7 samples in 3 micro-batches would be 3, 3, 1: with BatchNorm in train mode the last
    # one joins the previous (3, 4); the objective is still the whole batch's mean.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = batches(1, size=7)[0]
    rows = []
    m[1].register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    loss = samkit.make_closure(m, loss_fn, x, y, accumulation_steps=3)()
    assert rows == [3, 4]
    m.eval()
    rows.clear()
    samkit.make_closure(m, loss_fn, x, y, accumulation_steps=3)()
    assert rows == [3, 3, 1]
    m.train()
    expected = (
        F.cross_entropy(m(x[:3]), y[:3], reduction="sum")
        + F.cross_entropy(m(x[3:]), y[3:], reduction="sum")
    ) / 7
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-13, atol=0)
