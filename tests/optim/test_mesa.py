"""MESA against a naive float64 reference: the EMA teacher, its state, cost and faults."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3


def data(n: int = 12, seed: int = 1):
    return batches(n, size=8, seed=seed)


def make(model, **kw):
    kw = {"lr": LR, "momentum": MOM, "weight_decay": WD, **kw}
    return samkit.MESA(model.parameters(), model=model, **kw)


def train(opt, model, steps, per_epoch=3, first=0, **closure_kw):
    closures = []
    for i, (x, y) in enumerate(steps, start=first):
        opt.set_epoch(i // per_epoch)
        c = samkit.make_closure(model, loss_fn, x, y, **closure_kw)
        opt.step(c)
        closures.append(c)
    return closures


def naive_mesa(model, steps, lmbda, tau, start, decay, per_epoch=3):
    """MESA written out: an EMA copy of the weights, the term by autograd, SGD."""
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    teacher = copy.deepcopy(model)
    bufs = None
    for i, (x, y) in enumerate(steps):
        z = model(x)
        loss = nn.functional.cross_entropy(z, y)
        if i // per_epoch >= start:
            with torch.no_grad():
                for t, e in zip(teacher.parameters(), ema):
                    t.copy_(e)
                ref = teacher(x)
            q = torch.softmax(ref / tau, -1)
            kl = (q * (q.log() - torch.log_softmax(z / tau, -1))).sum(-1)
            loss = loss + lmbda * tau**2 * kl.mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            d = [g + WD * p for g, p in zip(grads, params)]
            bufs = d if bufs is None else [MOM * b + di for b, di in zip(bufs, d)]
            for p, b in zip(params, bufs):
                p.sub_(LR * b)
            ema = [decay * e + (1 - decay) * p for e, p in zip(ema, params)]
    return ema


@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_mesa_equals_naive_reference_float64(accumulation_steps):
    steps = data(12)
    hp = dict(lmbda=0.8, tau=2.0, start_epoch=1, decay=0.7)
    m_ref, m = tiny_net(), tiny_net()
    ema_ref = naive_mesa(m_ref, steps, hp["lmbda"], hp["tau"], hp["start_epoch"], hp["decay"])
    opt = make(m, **hp)
    train(opt, m, steps, accumulation_steps=accumulation_steps)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for e, r in zip(opt.ema_model.parameters(), ema_ref):
        torch.testing.assert_close(e, r, rtol=1e-12, atol=1e-13)


def test_before_start_epoch_mesa_is_sgd_and_runs_no_extra_forward():
    steps = data(6)
    m1, m2 = tiny_net(), tiny_net()
    closures = train(make(m1, start_epoch=2), m1, steps)
    sgd = torch.optim.SGD(m2.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    for x, y in steps:
        sgd.step(samkit.make_closure(m2, loss_fn, x, y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert [c.forward_evals for c in closures] == [1.0] * 6
    # from start_epoch on: one more forward (the averaged model's), still one backward
    late = train(make(m1, start_epoch=2), m1, data(3), first=6)
    assert [(c.forward_evals, c.grad_evals) for c in late] == [(2.0, 1.0)] * 3


def test_the_average_covers_batchnorm_statistics_and_runs_in_eval_mode():
    m = tiny_net(bn=True)
    opt = make(m, start_epoch=1, decay=0.5)
    train(opt, m, data(5))
    ema = opt.ema_model
    assert not ema.training and m.training
    assert all(not p.requires_grad for p in ema.parameters())
    # the running statistics are averaged too; the integer counter is copied
    assert int(ema[1].num_batches_tracked) == int(m[1].num_batches_tracked) == 5
    assert not torch.equal(ema[1].running_mean, m[1].running_mean)
    # the averaged model is not the live one: its BatchNorm was never run in train mode
    mean_before = ema[1].running_mean.clone()
    x, y = data(1, seed=7)[0]
    opt.set_epoch(1)
    opt.step(samkit.make_closure(m, loss_fn, x, y))
    expected = 0.5 * mean_before + 0.5 * m[1].running_mean
    torch.testing.assert_close(ema[1].running_mean, expected, rtol=1e-13, atol=1e-15)


def test_decay_zero_makes_the_average_the_last_weights():
    m = tiny_net()
    opt = make(m, start_epoch=1, decay=0.0)
    train(opt, m, data(4))
    assert all(torch.equal(e, p) for e, p in zip(opt.ema_model.parameters(), m.parameters()))


@pytest.mark.parametrize("load_before_first_step", [False, True])
def test_resume_with_the_average_populated_continues_exactly(load_before_first_step):
    steps = data(9)
    hp = dict(start_epoch=1, decay=0.8)
    m = tiny_net()
    opt = make(m, **hp)
    train(opt, m, steps[:5])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    train(opt, m, steps[5:], first=5)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_net(seed=9)
    m2.load_state_dict(ck["model"])
    opt2 = make(m2, **hp)
    if not load_before_first_step:  # a step first (creates the average), then the load
        x, y = steps[0]
        opt2.set_epoch(0)
        opt2.step(samkit.make_closure(m2, loss_fn, x, y))
        m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    train(opt2, m2, steps[5:], first=5)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    for a, b in zip(opt.ema_model.state_dict().values(), opt2.ema_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nan_leaves_the_average_untouched(mode):
    m = tiny_net(bn=True)
    opt = make(m, start_epoch=1, decay=0.5, on_nonfinite=mode)
    train(opt, m, data(4))
    before = {k: v.clone() for k, v in opt.ema_model.state_dict().items()}
    x, y = data(1, seed=4)[0]
    nan_loss = lambda out, t: loss_fn(out, t) * float("nan")  # noqa: E731
    if mode == "raise":
        with pytest.raises(samkit.NonFiniteError, match="MESA: non-finite .* clean pass"):
            opt.step(samkit.make_closure(m, nan_loss, x, y))
    else:
        opt.step(samkit.make_closure(m, nan_loss, x, y))
        assert opt.skipped_steps == 1
    for k, v in opt.ema_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_failed_first_step_creates_no_average():
    m = tiny_net()
    opt = make(m, on_nonfinite="skip")
    opt.set_epoch(0)
    x, y = data(1)[0]
    nan_loss = lambda out, t: loss_fn(out, t) * float("nan")  # noqa: E731
    opt.step(samkit.make_closure(m, nan_loss, x, y))
    assert opt.ema_model is None and "mesa_ema" not in opt.state_dict()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"decay": 1.0}, r"Invalid decay value: 1.0 \(in \[0, 1\)\)"),
        ({"decay": -0.1}, "Invalid decay value: -0.1"),
        ({"lmbda": -1.0}, "Invalid lmbda value: -1.0"),
        ({"start_epoch": 0}, "Invalid start_epoch value: 0"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_net(), **kw)


def test_average_settings_must_agree_across_groups_and_closure_must_carry_the_batch():
    m = tiny_net()
    with pytest.raises(ValueError, match="Invalid decay value: 0.5 in a param group"):
        samkit.MESA([{"params": m[0].parameters()}, {"params": m[2].parameters(), "decay": 0.5}])
    opt = make(m)
    opt.set_epoch(0)
    x, y = data(1)[0]
    with pytest.raises(TypeError, match="make_closure"):
        opt.step(lambda: loss_fn(m(x), y).mean())


def test_registry_entry_builds_the_paper_defaults():
    info = samkit.get_optimizer_info("mesa")
    assert info.cls is samkit.MESA and info.needs_batch_closure
    assert info.passes == pytest.approx(4 / 3)
    g = samkit.create_optimizer("mesa", tiny_net().parameters(), lr=0.1).param_groups[0]
    assert (g["lmbda"], g["tau"], g["start_epoch"], g["decay"]) == (0.8, 5.0, 6, 0.9998)


# ----------------------------------------------------------------------------- shared tensors
class TiedNet(nn.Module):
    """A layer used twice and an output layer tied to the input embedding (float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(5, 6, bias=False)
        self.block = nn.Linear(6, 6)
        self.block2 = self.block  # the same layer, twice in the forward and the state_dict
        self.head = nn.Linear(6, 5, bias=False)
        self.head.weight = nn.Parameter(torch.randn(5, 6))
        self.embed.weight = self.head.weight  # tied: [5, 6] read as [out=6, in=5] transposed
        self.double()

    def forward(self, x):
        h = torch.tanh(x @ self.embed.weight)  # the tied weight as the embedding
        h = torch.tanh(self.block2(torch.tanh(self.block(h))))
        return self.head(h)[:, :3]


def test_a_shared_or_tied_tensor_is_averaged_once_per_step_float64():
    # The state_dict names the block's and the tied weight's tensors twice; the average
    # must still be w̄ ← β w̄ + (1 − β) w once per step for each tensor (not β² per step).
    steps = data(9)
    hp = dict(lmbda=0.8, tau=2.0, start_epoch=1, decay=0.7)
    m_ref, m = TiedNet(), TiedNet()
    assert len(m.state_dict()) > len(list(m.parameters()))  # the names do repeat
    ema_ref = naive_mesa(m_ref, steps, hp["lmbda"], hp["tau"], hp["start_epoch"], hp["decay"])
    opt = make(m, **hp)
    train(opt, m, steps)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    ema = opt.ema_model
    assert ema.block2 is ema.block and ema.embed.weight is ema.head.weight  # tied in the copy
    for e, r in zip(ema.parameters(), ema_ref):
        torch.testing.assert_close(e, r, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- compiled models
class Compiled(nn.Module):
    """The key layout of ``torch.compile(module)``: the module under ``_orig_mod``."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, x):
        return self._orig_mod(x)


@pytest.mark.parametrize("saved_compiled", [True, False])
def test_the_average_resumes_across_compiled_and_eager_models(saved_compiled):
    # A checkpoint written while the passes ran through torch.compile(model) (keys
    # "_orig_mod.0.weight", ...) resumes on the eager model, and the reverse.
    steps = data(9)
    hp = dict(start_epoch=1, decay=0.8)

    def run(module_of, model, opt, part, first):
        for i, (x, y) in enumerate(part, start=first):
            opt.set_epoch(i // 3)
            opt.step(samkit.make_closure(module_of(model), loss_fn, x, y))

    wrap = Compiled if saved_compiled else (lambda m: m)
    other = (lambda m: m) if saved_compiled else Compiled
    m = tiny_net()
    opt = samkit.MESA(m.parameters(), lr=LR, momentum=MOM, **hp)
    run(wrap, m, opt, steps[:5], 0)
    state = opt.state_dict()
    assert all("_orig_mod" not in k for k in state["mesa_ema"])  # the eager model's names
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": state}, buf)
    run(wrap, m, opt, steps[5:], 5)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_net(seed=9)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.MESA(m2.parameters(), lr=LR, momentum=MOM, **hp)
    opt2.load_state_dict(ck["opt"])
    run(other, m2, opt2, steps[5:], 5)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    mine, theirs = opt.state_dict()["mesa_ema"], opt2.state_dict()["mesa_ema"]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# ----------------------------------------------------------------------------- checked early
def test_outputs_that_are_not_batch_by_class_logits_fail_at_the_first_step():
    m = tiny_net()
    seq = nn.Sequential(m, nn.Unflatten(1, (3, 1)))  # [B, 3, 1]: per-token logits
    opt = samkit.MESA(seq.parameters(), model=seq, lr=LR)  # start_epoch 6
    opt.set_epoch(0)
    x, y = data(1)[0]
    closure = samkit.make_closure(seq, loss_fn, x, y[:, None])
    with pytest.raises(TypeError, match=r"MESA's trajectory loss needs .* \[batch, classes\]"):
        opt.step(closure)


def test_a_sample_seen_twice_before_the_term_starts_warns():
    # Without set_epoch after epoch 0, MESA would stay the base optimizer: with indices, the
    # second pass over the data warns; from start_epoch on the epoch no longer matters.
    m = tiny_net()
    opt = make(m, start_epoch=2)
    steps = data(4)
    opt.set_epoch(0)
    idx = [torch.arange(8 * i, 8 * i + 8) for i in range(2)]
    closures = [samkit.make_closure(m, loss_fn, x, y, indices=i) for (x, y), i in zip(steps, idx)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in closures:
            opt.step(c)
    with pytest.warns(samkit.RepeatedSampleWarning, match="MESA is the base optimizer"):
        opt.step(closures[0])
    opt.set_epoch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for c in closures + closures:
            opt.step(c)
