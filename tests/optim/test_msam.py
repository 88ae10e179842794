"""mSAM against a naive float64 reference, its reduction to SAM, BatchNorm rule, cost, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import FaultyBatchClosure, batches, loss_fn, tiny_net

LR, MOM, WD = 0.1, 0.9, 5e-3
EPS = 1e-12

net = tiny_net


def data(n: int = 12, size: int = 10, seed: int = 1):
    return batches(n, size=size, seed=seed)


def norm(ts):
    return torch.sqrt(sum((t**2).sum() for t in ts))


def grads(model, x, y):
    return list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters()))


def naive_msam(model, batches, rho, m):
    """mSAM: contiguous micro-batches (tensor_split), sample-weighted mean of the g'_j, SGD."""
    params = list(model.parameters())
    bufs = None
    for x, y in batches:
        n = len(y)
        w = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        for idx in torch.arange(n).tensor_split(m):
            xj, yj = x[idx], y[idx]
            g = grads(model, xj, yj)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / (norm(g) + EPS))
            g_p = grads(model, xj, yj)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            total = [t + len(idx) / n * gp for t, gp in zip(total, g_p)]
        with torch.no_grad():
            steps = [t + WD * p for t, p in zip(total, params)]
            bufs = steps if bufs is None else [MOM * b + s for b, s in zip(bufs, steps)]
            for p, b in zip(params, bufs):
                p.sub_(LR * b)


def run(opt, model, batches, lossf=loss_fn):
    closures = [samkit.make_closure(model, lossf, x, y) for x, y in batches]
    losses = [opt.step(c) for c in closures]
    return losses, closures


def same(m1, m2):
    return all(
        torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values())
    )


@pytest.mark.parametrize("foreach", [True, False])
def test_msam_equals_naive_reference_float64(foreach):
    batches = data(12, size=10)  # 10 samples in 3 micro-batches of 4, 3, 3
    m_ref, m = net(), net()
    naive_msam(m_ref, batches, rho=0.2, m=3)
    opt = samkit.MicroBatchSAM(
        m.parameters(), rho=0.2, micro_batches=3, lr=LR, momentum=MOM, weight_decay=WD,
        foreach=foreach,
    )  # fmt: skip
    run(opt, m, batches)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_returned_loss_is_the_clean_batch_loss():
    ((x, y),) = data(1, size=10)
    m = net()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(m(x), y))
    opt = samkit.MicroBatchSAM(m.parameters(), micro_batches=3, lr=LR)
    losses, _ = run(opt, m, [(x, y)])
    assert float(losses[0]) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("bn", [False, True])
def test_one_micro_batch_is_exactly_sam(bn):
    batches = data(5, size=12)
    m1, m2 = net(bn=bn), net(bn=bn)
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    run(samkit.MicroBatchSAM(m1.parameters(), micro_batches=1, **kw), m1, batches)
    run(samkit.SAM(m2.parameters(), **kw), m2, batches)
    assert same(m1, m2)  # weights and BatchNorm statistics, bit for bit


def test_adaptive_one_micro_batch_is_exactly_asam():
    batches = data(4)
    m1, m2 = net(), net()
    kw = dict(rho=0.5, eta=0.01, lr=LR, momentum=MOM)
    run(samkit.MicroBatchSAM(m1.parameters(), micro_batches=1, adaptive=True, **kw), m1, batches)
    run(samkit.ASAM(m2.parameters(), **kw), m2, batches)
    assert same(m1, m2)


def test_more_micro_batches_than_samples_splits_into_single_samples():
    batches = data(3, size=3)
    m1, m2 = net(), net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM)
    run(samkit.MicroBatchSAM(m1.parameters(), micro_batches=8, **kw), m1, batches)
    run(samkit.MicroBatchSAM(m2.parameters(), micro_batches=3, **kw), m2, batches)
    assert same(m1, m2)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("m", [2, 4, 5])
def test_cost_is_two_passes_per_step(m, vectorize):
    # 10 samples: 2 and 5 micro-batches are equal (run at once: 2 passes over all of
    # them), 4 are not (the loop: 2 passes per micro-batch); two full-batch passes either way.
    model = net()
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=m, lr=0.05, vectorize=vectorize)
    _, closures = run(opt, model, data(3, size=10))
    at_once = vectorize and 10 % m == 0
    assert (opt.last_path == "") == at_once
    for c in closures:
        assert c.passes == (2 if at_once else 2 * m)
        assert c.grad_evals == pytest.approx(2.0) and c.forward_evals == pytest.approx(2.0)


def test_batchnorm_gets_one_update_with_the_weighted_mean_of_micro_batch_statistics():
    ((x, y),) = data(1, size=10)
    model = net(bn=True)
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    r_mean, r_var = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        h = model[0](x)  # BatchNorm's input at the clean weights
    mean = torch.zeros_like(r_mean)
    var = torch.zeros_like(r_var)
    for idx in torch.arange(10).tensor_split(3):
        mean += len(idx) / 10 * h[idx].mean(0)
        var += len(idx) / 10 * h[idx].var(0, unbiased=True)
    mom = bn.momentum
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=3, lr=0.05, model=model)
    run(opt, model, [(x, y)])
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, (1 - mom) * r_mean + mom * mean)
    torch.testing.assert_close(bn.running_var, (1 - mom) * r_var + mom * var)


def test_cumulative_batchnorm_average_is_handled_too():
    ((x, y),) = data(1, size=9)
    model = net(bn=True)
    model[1].momentum = None  # cumulative moving average: factor 1/num_batches_tracked
    with torch.no_grad():
        h = model[0](x)
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=3, lr=0.05)
    run(opt, model, [(x, y)])
    expected = sum(h[idx].mean(0) for idx in torch.arange(9).tensor_split(3)) / 3
    torch.testing.assert_close(model[1].running_mean, expected)  # 1 batch: r = its statistic


@pytest.mark.parametrize("at", [2, 3, 5])
def test_failure_mid_step_leaves_batchnorm_statistics_as_before(at):
    ((x, y),) = data(1, size=12)
    model = net(bn=True)
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=3, lr=0.05)
    run(opt, model, data(2, size=12))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(FaultyBatchClosure(model, x, y, at=at, exc=RuntimeError))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_plain_closure_is_a_clear_type_error():
    model = net()
    opt = samkit.MicroBatchSAM(model.parameters(), lr=0.05)
    ((x, y),) = data(1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="samkit.make_closure"):
        opt.step(closure)


def test_resume_continues_exactly():
    batches = data(6)
    kw = dict(rho=0.1, micro_batches=3, lr=LR, momentum=MOM, weight_decay=WD)
    m = net(bn=True)
    opt = samkit.MicroBatchSAM(m.parameters(), **kw)
    run(opt, m, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, m, batches[3:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = net(seed=5, bn=True)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.MicroBatchSAM(m2.parameters(), **kw)
    opt2.load_state_dict(ck["opt"])
    run(opt2, m2, batches[3:])
    assert same(m, m2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"micro_batches": 0}, "Invalid micro_batches value: 0"),
        ({"micro_batches": 2.0}, "Invalid micro_batches value: 2.0"),
        ({"micro_batches": None}, "Invalid micro_batches value: None"),
        ({"rho": -1.0}, "Invalid rho value: -1.0"),
        ({"eta": float("nan")}, "Invalid eta value: nan"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.MicroBatchSAM(net().parameters(), lr=0.1, **kw)


def test_micro_batches_must_agree_across_groups():
    m = net()
    groups = [
        {"params": list(m[0].parameters()), "micro_batches": 2},
        {"params": list(m[2].parameters())},
    ]
    with pytest.raises(ValueError, match=r"same micro_batches in every param group.*\[2, 4\]"):
        samkit.MicroBatchSAM(groups, lr=0.1)


def test_manual_first_step_is_refused():
    opt = samkit.MicroBatchSAM(net().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="step\\("):
        opt.first_step()


def test_registry_entry():
    info = samkit.get_optimizer_info("msam")
    assert info.cls is samkit.MicroBatchSAM and info.passes == 2 and info.needs_batch_closure
    opt = samkit.create_optimizer("msam", net().parameters(), lr=0.1)
    group = opt.param_groups[0]
    assert (group["rho"], group["micro_batches"]) == (0.05, 4)


def test_no_micro_batch_of_one_sample_under_batchnorm():
    # M = 4 on a last batch of 5 gives micro-batches of 2, 1, 1, 1; with BatchNorm in train
    # mode mSAM uses ⌊5/2⌋ = 2 micro-batches (3 and 2 samples). In eval mode, 4 again.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = data(1, size=5)[0]
    opt = samkit.MicroBatchSAM(m.parameters(), rho=0.1, micro_batches=4, lr=0.1, model=m)
    sizes = []
    original = opt.run_pass

    def spy(closure, name, **kw):
        sizes.append(len(kw["subset"]))
        return original(closure, name, **kw)

    opt.run_pass = spy
    opt.step(samkit.make_closure(m, loss_fn, x, y))
    assert sizes == [3, 3, 2, 2]  # clean and perturbed pass of each micro-batch
    m.eval()
    sizes.clear()
    opt.step(samkit.make_closure(m, loss_fn, x, y))
    assert sizes == [2, 2, 1, 1, 1, 1, 1, 1]


# ------------------------------------------------------------------ the batch objective (issue 20.1)
class _TokenNet(nn.Module):
    """[B, T, 5] -> [B, 3, T] logits: a per-token classifier, classes second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.lin(x).transpose(1, 2)


def _padded_batch(n=6, t=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n, t), generator=g)
    lengths = [5, 1, 4, 2, 5, 1]  # micro-batches of 3: 10 and 8 real tokens
    for i, length in enumerate(lengths[:n]):
        y[i, length:] = -100
    return x, y


def _objectives():
    """(label, model, loss_fn, x, y): losses whose batch objective is not a sample mean."""
    x, y = _padded_batch()
    padded = nn.CrossEntropyLoss(reduction="none", ignore_index=-100)
    g = torch.Generator().manual_seed(4)
    xc = torch.randn(6, 5, generator=g, dtype=torch.float64)
    yc = torch.tensor([0, 0, 0, 1, 2, 2])
    weighted = nn.CrossEntropyLoss(
        weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64), reduction="none"
    )
    return [
        ("padding", _TokenNet(), padded, x, y),
        ("class weights", net(), weighted, xc, yc),
    ]


@pytest.mark.parametrize("case", range(2), ids=["padding", "class_weights"])
def test_micro_batches_are_weighted_by_the_batch_objective(case):
    # rho = 0: mSAM's update is the gradient of the batch objective, as under accumulation.
    _, model, loss, x, y = _objectives()[case]
    ref = copy.deepcopy(model)
    sgd = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    opt = samkit.MicroBatchSAM(
        model.parameters(), rho=0.0, micro_batches=2, lr=LR, momentum=MOM, weight_decay=WD
    )
    for _ in range(3):
        expected = sgd.step(samkit.make_closure(ref, loss, x, y))
        got = opt.step(samkit.make_closure(model, loss, x, y))
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)  # the batch objective
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_micro_batch_without_counted_targets_adds_nothing():
    # A micro-batch whose every target is padding has weight 0: the step is the other
    # micro-batch's, and no NaN (its own mean would be 0/0).
    x, y = _padded_batch()
    y[3:] = -100  # the second micro-batch counts for nothing
    loss = nn.CrossEntropyLoss(reduction="none", ignore_index=-100)
    m1, m2 = _TokenNet(), _TokenNet()
    kw = dict(rho=0.1, lr=LR, momentum=MOM)
    got = samkit.MicroBatchSAM(m1.parameters(), micro_batches=2, **kw).step(
        samkit.make_closure(m1, loss, x, y)
    )
    expected = samkit.SAM(m2.parameters(), **kw).step(samkit.make_closure(m2, loss, x[:3], y[:3]))
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)


# ------------------------------------------------------------------ dropout (issue 20.5)
class _RecordingDropout(nn.Module):
    """Dropout that records every mask it draws (as the rows it drew them for)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x):
        mask = (torch.rand_like(x) >= self.p).to(x.dtype)
        self.masks.append(mask.detach().clone())
        return x * mask / (1 - self.p)


def test_each_micro_batch_draws_its_own_dropout_masks_shared_by_its_two_passes():
    torch.manual_seed(0)
    drop = _RecordingDropout()
    model = nn.Sequential(nn.Linear(5, 16), drop, nn.Tanh(), nn.Linear(16, 3)).double()
    ((x, y),) = data(1, size=8)
    opt = samkit.MicroBatchSAM(model.parameters(), rho=0.1, micro_batches=2, lr=LR)
    torch.manual_seed(7)
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    after = torch.get_rng_state()
    clean_1, perturbed_1, clean_2, perturbed_2 = drop.masks
    assert torch.equal(clean_1, perturbed_1) and torch.equal(clean_2, perturbed_2)
    assert not torch.equal(clean_1, clean_2)  # not a replay of the first micro-batch's state
    # the draws are those of two plain passes over the micro-batches, one after the other
    torch.manual_seed(7)
    expected = [(torch.rand(4, 16, dtype=torch.float64) >= 0.5).double() for _ in range(2)]
    assert torch.equal(clean_1, expected[0]) and torch.equal(clean_2, expected[1])
    assert torch.equal(after, torch.get_rng_state())  # and the generator stands after them


# ------------------------------------------------------------------ all micro-batches at once (issue 21)
def _twin_runs(make_model, lossf, batches_, steps_kw, **kw):
    """The same steps with vectorize=True and vectorize=False: (losses, models, paths)."""
    out = []
    for vectorize in (True, False):
        model = make_model()
        opt = samkit.MicroBatchSAM(model.parameters(), vectorize=vectorize, **steps_kw, **kw)
        losses, paths = [], []
        for x, y in batches_:
            losses.append(opt.step(samkit.make_closure(model, lossf, x, y)))
            paths.append(opt.last_path)
        out.append((losses, model, paths))
    return out


def _assert_equal_runs(a, b, tol=1e-12):
    for la, lb in zip(a[0], b[0]):
        torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    for (ka, va), (kb, vb) in zip(a[1].state_dict().items(), b[1].state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=tol, atol=tol, msg=ka)


_KW = dict(lr=LR, momentum=MOM, weight_decay=WD)


@pytest.mark.parametrize(
    "case", ["plain", "batchnorm", "adaptive", "rho_per_group", "class_weights", "padding"]
)
def test_batched_pass_equals_the_loop_float64(case):
    lossf, batches_, kw = loss_fn, data(3, size=12), dict(rho=0.1, micro_batches=4)

    def make():
        return net(bn=case == "batchnorm")

    if case == "adaptive":
        kw["adaptive"] = True
    if case == "class_weights":
        lossf = nn.CrossEntropyLoss(
            weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64), reduction="none"
        )
    if case == "padding":
        make, lossf = _TokenNet, nn.CrossEntropyLoss(reduction="none", ignore_index=-100)
        batches_, kw["micro_batches"] = [_padded_batch(seed=s) for s in (2, 3, 4)], 2
    if case == "rho_per_group":

        def step_groups(model):
            first, *rest = list(model.parameters())
            return [{"params": [first], "rho": 0.3}, {"params": rest}]

        runs = []
        for vectorize in (True, False):
            model = make()
            opt = samkit.MicroBatchSAM(step_groups(model), vectorize=vectorize, **kw, **_KW)
            losses = [opt.step(samkit.make_closure(model, lossf, x, y)) for x, y in batches_]
            assert (opt.last_path == "") == vectorize
            runs.append((losses, model))
        _assert_equal_runs(*runs)
        return
    (la, ma, pa), (lb, mb, pb) = _twin_runs(make, lossf, batches_, _KW, **kw)
    assert pa == [""] * len(batches_)  # every step ran all micro-batches at once
    assert pb == ["vectorize=False"] * len(batches_)
    _assert_equal_runs((la, ma), (lb, mb))


def test_batched_pass_falls_back_to_the_loop_under_dropout_equal_float64():
    # Dropout under vmap cannot draw the loop's masks (each micro-batch its own, replayed by
    # its perturbed pass): the step runs the loop, and the result is the loop's exactly.
    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3)
        ).double()

    runs = []
    for vectorize in (True, False):
        torch.manual_seed(11)
        model = make()
        opt = samkit.MicroBatchSAM(
            model.parameters(), rho=0.1, micro_batches=4, vectorize=vectorize, **_KW
        )
        losses = [opt.step(samkit.make_closure(model, loss_fn, x, y)) for x, y in data(3, 12)]
        runs.append((losses, model, opt.last_path))
    assert "random" in runs[0][2]  # the reason the loop ran
    _assert_equal_runs(runs[0][:2], runs[1][:2])


def test_unequal_micro_batches_run_the_loop():
    model = net()
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=4, lr=LR)
    ((x, y),) = data(1, size=10)
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert "does not split into 4 equal micro-batches" in opt.last_path


def test_vectorize_must_be_a_bool():
    with pytest.raises(ValueError, match="vectorize"):
        samkit.MicroBatchSAM(net().parameters(), vectorize="yes", lr=LR)


def test_forward_hooks_run_the_loop():
    # A hook would see all micro-batches at once (and run on a failed attempt): the loop.
    model = net()
    seen = []
    model.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].shape[0]))
    opt = samkit.MicroBatchSAM(model.parameters(), micro_batches=2, lr=LR)
    ((x, y),) = data(1, size=8)
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert "hooks" in opt.last_path and seen == [4, 4, 4, 4]
