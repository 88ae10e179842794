"""The loss rule of BatchClosure: the objective is torch's ``reduction="mean"`` of the batch.

Per-token losses, padding (``ignore_index``), class weights, gradient accumulation over uneven
micro-batches, sub-batches and per-sample losses, checked against torch's own reductions in
float64, values and gradients; and the same rule (and the same words when it is broken) in
:mod:`samkit.sharpness`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit
import samkit.sharpness as S
from samkit._losses import LOSS_RULE

B, C, T, PAD = 6, 5, 7, 0


class TokenNet(nn.Module):
    """Embedding + linear: [B, T] token ids -> [B, C, T] logits (class dimension second)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(C, 4)
        self.out = nn.Linear(4, C)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x))).transpose(1, 2)


def token_batch(pad: bool = True):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, C, (B, T), generator=g)
    y = torch.randint(1, C, (B, T), generator=g)
    if pad:  # right padding of different lengths; sample 5 has a single real token
        for i, length in enumerate([7, 3, 5, 1, 6, 1]):
            y[i, length:] = PAD
    return x, y


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def torch_mean_and_grads(model, x, y, **kw):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y, **kw)
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(loss, g, ref_loss, ref_g, rtol=1e-13):
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-15)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_per_token_loss_is_the_mean_over_tokens_not_their_sum():
    # The report: summed over T and divided by B, the loss came out T times too large.
    model = TokenNet()
    x, y = token_batch(pad=False)
    ref = torch_mean_and_grads(model, x, y)
    closure = samkit.make_closure(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    assert_same(closure(), grads(model), *ref)


@pytest.mark.parametrize("how", ["module", "explicit"])
def test_padded_tokens_count_for_nothing(how):
    model = TokenNet()
    x, y = token_batch()
    ref = torch_mean_and_grads(model, x, y, ignore_index=PAD)
    if how == "module":  # ignore_index read from the loss module
        closure = samkit.make_closure(
            model, nn.CrossEntropyLoss(reduction="none", ignore_index=PAD), x, y
        )
    else:  # a plain function: ignore_index given to make_closure

        def loss_fn(out, t):  # losses at padded positions too (PAD is a valid class here)
            return F.cross_entropy(out, t, reduction="none")

        closure = samkit.make_closure(model, loss_fn, x, y, ignore_index=PAD)
    assert closure.ignore_index == PAD
    assert_same(closure(), grads(model), *ref)


def test_class_weights_and_label_smoothing_follow_torch():
    model = TokenNet()
    x, y = token_batch()
    w = torch.tensor([0.0, 0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    kw = dict(ignore_index=PAD, weight=w, label_smoothing=0.1)
    ref = torch_mean_and_grads(model, x, y, **kw)
    closure = samkit.make_closure(model, nn.CrossEntropyLoss(reduction="none", **kw), x, y)
    assert_same(closure(), grads(model), *ref)
    # NLLLoss lends its ignore_index and weight too.
    nll = nn.NLLLoss(reduction="none", ignore_index=PAD, weight=w)
    logp = nn.Sequential(model, nn.LogSoftmax(dim=1))
    ref = torch_mean_and_grads(logp, x, y, ignore_index=PAD, weight=w)
    ref = (nn.NLLLoss(ignore_index=PAD, weight=w)(logp(x), y).detach(), ref[1])
    assert_same(samkit.make_closure(logp, nll, x, y)(), grads(model), ref[0], ref[1])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_accumulation_divides_every_micro_batch_by_the_whole_batch_count(reduction):
    # 6 samples in chunks 3/3 would hide a per-chunk normalisation only if the chunks held
    # as many real tokens each: they do not (7+3+5 = 15 against 1+6+1 = 8).
    model = TokenNet()
    x, y = token_batch()
    ref = torch_mean_and_grads(model, x, y, ignore_index=PAD)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction, ignore_index=PAD)
    for steps in (2, 4):  # chunks 3/3 and 2/2/2
        closure = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=steps)
        assert_same(closure(), grads(model), *ref)


def test_subset_is_torch_mean_over_the_sub_batch():
    model = TokenNet()
    x, y = token_batch()
    sub = torch.tensor([1, 3, 4])
    ref = torch_mean_and_grads(model, x[sub], y[sub], ignore_index=PAD)
    loss_fn = nn.CrossEntropyLoss(reduction="none", ignore_index=PAD)
    closure = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=2)
    assert_same(closure.evaluate(sub), grads(model), *ref)
    mask = torch.zeros(B, dtype=torch.bool)
    mask[sub] = True
    assert_same(closure.evaluate(mask), grads(model), *ref)


def test_per_sample_losses_are_each_samples_own_mean_and_weight_the_objective():
    model = TokenNet()
    x, y = token_batch()
    y[5, 0] = PAD  # a sample with nothing counted: its loss is 0, not nan
    loss_fn = nn.CrossEntropyLoss(reduction="none", ignore_index=PAD)
    closure = samkit.make_closure(model, loss_fn, x, y)
    per = closure.evaluate(backward=False, per_sample=True)
    with torch.no_grad():
        out = model(x)
        own = [F.cross_entropy(out[i : i + 1], y[i : i + 1], ignore_index=PAD) for i in range(5)]
    torch.testing.assert_close(per[:5], torch.stack(own), rtol=1e-13, atol=0)
    assert per[5] == 0
    counts = (y != PAD).sum(1).double()
    objective = closure.evaluate(backward=False)
    torch.testing.assert_close((counts * per).sum() / counts.sum(), objective, rtol=1e-13, atol=0)
    torch.testing.assert_close(objective, F.cross_entropy(out, y, ignore_index=PAD))


def test_other_unreduced_losses_reduce_like_torch_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for loss_fn, mean_fn in [
        (nn.MSELoss(reduction="none"), nn.MSELoss()),
        (nn.BCEWithLogitsLoss(reduction="none"), nn.BCEWithLogitsLoss()),
    ]:
        target = y if isinstance(loss_fn, nn.MSELoss) else (y > 0).double()
        model.zero_grad()
        mean_fn(model(x), target).backward()
        ref = grads(model)
        loss = samkit.make_closure(model, loss_fn, x, target, accumulation_steps=3)()
        assert_same(loss, grads(model), mean_fn(model(x), target).detach(), ref)
    # Class-probability targets: torch ignores ignore_index and divides by the batch size.
    logits = nn.Linear(3, 4).double()
    probs = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    loss = samkit.make_closure(logits, nn.CrossEntropyLoss(reduction="none"), x, probs)()
    torch.testing.assert_close(loss, F.cross_entropy(logits(x), probs).detach())


def test_nothing_counted_is_nan_as_in_torch():
    model = TokenNet()
    x, y = token_batch()
    y[:] = PAD
    loss_fn = nn.CrossEntropyLoss(reduction="none", ignore_index=PAD)
    assert torch.isnan(samkit.make_closure(model, loss_fn, x, y).evaluate(backward=False))
    assert torch.isnan(F.cross_entropy(model(x), y, ignore_index=PAD))


def test_bad_loss_returns_and_arguments_are_refused_clearly():
    model = TokenNet()
    x, y = token_batch()
    cases = [
        (lambda out, t: F.cross_entropy(out, t, reduction="none").sum(1, keepdim=True).T, "(1, 6)"),
        (lambda out, t: 1.0, "got float"),
        (lambda out, t: t, "dtype torch.int64"),
    ]
    for fn, detail in cases:
        with pytest.raises((TypeError, ValueError)) as err:
            samkit.make_closure(model, fn, x, y)()
        assert str(err.value).startswith(LOSS_RULE) and detail in str(err.value)

    # With padding the unreduced losses must line up with the targets.
    def per_sample(out, t):
        return F.cross_entropy(out, t, reduction="none", ignore_index=PAD).mean(1)

    with pytest.raises(
        ValueError, match=r"targets' shape \(6, 7\) \(one loss per target element\), got \(6,\)"
    ):
        samkit.make_closure(model, per_sample, x, y, ignore_index=PAD)()
    with pytest.raises(ValueError, match="ignore_index=3 differs from the loss module's"):
        samkit.make_closure(model, nn.CrossEntropyLoss(ignore_index=0), x, y, ignore_index=3)
    with pytest.raises(TypeError, match="ignore_index must be an int or None, got 0.5"):
        samkit.make_closure(model, nn.CrossEntropyLoss(), x, y, ignore_index=0.5)
    with pytest.raises(TypeError, match="keep_outputs must be True or False, got 1"):
        samkit.make_closure(model, nn.CrossEntropyLoss(), x, y, keep_outputs=1)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        samkit.make_closure(model, nn.CrossEntropyLoss(), x, [1, 2])
    with pytest.raises(ValueError, match="needs per-sample losses.*reduction='none'"):
        samkit.make_closure(model, nn.CrossEntropyLoss(), x, y).evaluate(per_sample=True)


# ----------------------------------------------------------------------------- one rule


def test_sharpness_and_closure_reduce_a_loss_fn_the_same_way():
    model = TokenNet()
    x, y = token_batch()
    ref_loss, ref_g = torch_mean_and_grads(model, x, y, ignore_index=PAD)
    for loss_fn in [
        nn.CrossEntropyLoss(reduction="none", ignore_index=PAD),  # unreduced, padded
        nn.CrossEntropyLoss(ignore_index=PAD),  # torch's mean
    ]:
        g = S.gradient(model, loss_fn, [(x, y)])
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        loss = samkit.make_closure(model, loss_fn, x, y)()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    per_sample = nn.MSELoss(reduction="none")
    lin = nn.Linear(3, 2).double()
    xs, ys = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    res = S.ascent_direction_sharpness(lin, per_sample, [(xs, ys)], rho=0.1)
    ref = S.ascent_direction_sharpness(lin, nn.MSELoss(), [(xs, ys)], rho=0.1)
    assert res.value == pytest.approx(ref.value, rel=1e-12) and res.loss == pytest.approx(ref.loss)


def test_a_broken_loss_fn_gets_the_same_words_on_both_sides():
    model = TokenNet()
    x, y = token_batch()

    def bad(out, t):  # summed over the batch: one number per token position
        return F.cross_entropy(out, t, reduction="none").sum(0)

    with pytest.raises(ValueError) as closure_err:
        samkit.make_closure(model, bad, x, y)()
    with pytest.raises(ValueError) as sharpness_err:
        S.gradient(model, bad, [(x, y)])
    assert str(closure_err.value) == str(sharpness_err.value)
    assert str(closure_err.value).startswith(LOSS_RULE)
