"""AUSAM against a naive float64 reference, its reductions, per-sample state, validation, DDP."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import loss_fn, sgd_momentum_reference, tiny_net
from samkit.optim.ausam import sampling_weights

LR, MOM, WD = 0.1, 0.9, 5e-3


def dataset(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def epochs(n_epochs=4, n=24, batch=8, seed=2):
    """Batches of dataset indices, a new permutation every epoch (samples come back)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_epochs):
        order = torch.randperm(n, generator=g)
        out += [order[k : k + batch] for k in range(0, n, batch)]
    return out


def run(opt, model, data, steps):
    x, y = data
    return [opt.step(samkit.make_closure(model, loss_fn, x[i], y[i], indices=i)) for i in steps]


def naive_ausam(model, data, steps, rho, fraction, max_ratio, seed, eps=1e-12):
    """AUSAM written out with a Python dict of scores, then SGD (momentum, weight decay)."""
    x_all, y_all = data
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    sgd = sgd_momentum_reference(LR, MOM, WD)
    scores: dict[int, tuple[float, int]] = {}  # index -> (average DLP, count)
    for idx in steps:
        ids = idx.tolist()
        n, k = len(ids), math.ceil(fraction * len(ids))
        if k < n:
            known = [scores[i][0] for i in ids if i in scores]
            top = max(known) if known else 0.0
            if top > 0:
                w = [max(scores[i][0], top / max_ratio) if i in scores else top for i in ids]
            else:
                w = [1.0] * n
            drawn = torch.multinomial(
                torch.tensor(w, dtype=torch.float64), k, replacement=False, generator=gen
            )
            pos = sorted(drawn.tolist())
        else:
            pos = list(range(n))
        sub = idx[pos]
        x, y = x_all[sub], y_all[sub]
        before = loss_fn(model(x), y)
        g = torch.autograd.grad(before.mean(), params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        e = [rho * gi / (norm + eps) for gi in g]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        after = loss_fn(model(x), y)
        gp = torch.autograd.grad(after.mean(), params)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
        sgd(params, gp)
        for i, d in zip(sub.tolist(), (after - before).abs().tolist()):
            mean, count = scores.get(i, (0.0, 0))
            scores[i] = ((mean * count + d) / (count + 1), count + 1)
    return scores


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("fraction, max_ratio", [(0.5, 4.0), (0.75, 1.5), (0.3, 1.0)])
def test_ausam_equals_naive_reference_float64(fraction, max_ratio, foreach):
    data, steps = dataset(), epochs()
    m_ref, m = tiny_net(), tiny_net()
    scores = naive_ausam(m_ref, data, steps, 0.1, fraction, max_ratio, seed=5)
    opt = samkit.AUSAM(
        m.parameters(),
        rho=0.1,
        fraction=fraction,
        max_ratio=max_ratio,
        seed=5,
        lr=LR,
        momentum=MOM,
        weight_decay=WD,
        foreach=foreach,
    )
    run(opt, m, data, steps)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    adlp, count = opt.samkit_state["adlp"], opt.samkit_state["adlp_count"]
    assert {i for i in range(len(count)) if count[i] > 0} == set(scores)
    for i, (mean, c) in scores.items():
        assert int(count[i]) == c
        assert math.isclose(float(adlp[i]), mean, rel_tol=1e-12, abs_tol=1e-15)


def test_fraction_one_is_exactly_sam_and_draws_nothing():
    data, steps = dataset(), epochs(2)
    m1, m2 = tiny_net(), tiny_net()
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    o1 = samkit.AUSAM(m1.parameters(), fraction=1.0, **kw)
    o2 = samkit.SAM(m2.parameters(), **kw)
    fresh = o1.samkit_state["rng_state"].clone()
    x, y = data
    for i in steps:
        c1 = samkit.make_closure(m1, loss_fn, x[i], y[i], indices=i)
        c2 = samkit.make_closure(m2, loss_fn, x[i], y[i], indices=i)
        assert torch.equal(o1.step(c1), o2.step(c2))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(o1.samkit_state["rng_state"], fresh)
    assert int(o1.samkit_state["adlp_count"].sum()) == 8 * len(steps)  # every sample scored


def test_adaptive_fraction_one_is_exactly_asam():
    data, steps = dataset(), epochs(1)
    m1, m2 = tiny_net(), tiny_net()
    kw = dict(rho=0.5, eta=0.01, lr=LR, momentum=MOM)
    run(samkit.AUSAM(m1.parameters(), fraction=1.0, adaptive=True, **kw), m1, data, steps)
    x, y = data
    o2 = samkit.ASAM(m2.parameters(), **kw)
    for i in steps:
        o2.step(samkit.make_closure(m2, loss_fn, x[i], y[i]))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_step_cost_and_returned_loss_are_those_of_the_subset():
    x, y = dataset(16)
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), rho=0.1, fraction=0.5, lr=0.1)
    subsets = []
    original = opt.run_pass

    def spy(closure, name, **kw):
        subsets.append(kw["subset"])
        return original(closure, name, **kw)

    opt.run_pass = spy
    idx = torch.arange(16)
    c = samkit.make_closure(m, loss_fn, x, y, indices=idx)
    expected = loss_fn(m(x), y).detach()
    loss = opt.step(c)
    assert (c.grad_evals, c.forward_evals) == (1.0, 1.0)  # two passes on half the batch
    assert samkit.get_optimizer_info("ausam").passes == c.forward_evals / 3 + 2 * c.grad_evals / 3
    assert torch.equal(subsets[0], subsets[1]) and len(subsets[0]) == 8
    assert torch.equal(subsets[0], subsets[0].sort().values)  # batch order kept
    torch.testing.assert_close(loss, expected[subsets[0]].mean())


# ----------------------------------------------------------------------------- weights
def test_weights_are_uniform_before_anything_is_known():
    w = sampling_weights(torch.zeros(5), torch.zeros(5, dtype=bool), 4.0)
    assert torch.equal(w, torch.ones(5, dtype=torch.float64))
    seen_zero = sampling_weights(torch.zeros(3), torch.tensor([True, True, False]), 4.0)
    assert torch.equal(seen_zero, torch.ones(3, dtype=torch.float64))


def test_weights_are_bounded_and_never_seen_samples_get_the_maximum():
    scores = torch.tensor([8.0, 0.5, 0.0, 3.0, 123.0])
    seen = torch.tensor([True, True, True, True, False])
    w = sampling_weights(scores, seen, 4.0)
    assert w.tolist() == [8.0, 2.0, 2.0, 3.0, 8.0]  # floor 8/4; unseen -> batch maximum
    assert float(w.max() / w.min()) <= 4.0
    assert torch.equal(sampling_weights(scores, seen, 1.0), torch.full((5,), 8.0).double())


def test_sampling_follows_the_weights():
    # Two known samples with ADLP 1 and 4, max_ratio 10: drawing one of the two, the second
    # is chosen with probability 4/5.
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), fraction=0.5, max_ratio=10.0, seed=0, lr=0.0)
    opt._record(torch.tensor([0, 1]), torch.tensor([1.0, 4.0]))
    x, y = dataset(2)
    picks = []
    original = opt.run_pass

    def spy(closure, name, **kw):
        if name == "clean":
            picks.append(int(kw["subset"]))
        return original(closure, name, **kw)

    opt.run_pass = spy
    for _ in range(250):
        opt.step(samkit.make_closure(m, loss_fn, x, y, indices=torch.tensor([0, 1])))
        opt.samkit_state["adlp"][:2] = torch.tensor([1.0, 4.0])  # keep the scores fixed
    share = sum(picks) / len(picks)
    assert abs(share - 0.8) < 0.075  # 250 draws: std 0.025


# ----------------------------------------------------------------------------- state
def test_scores_are_running_means_by_index_and_grow_with_the_largest_index():
    opt = samkit.AUSAM(tiny_net().parameters(), lr=0.1)
    assert opt.samkit_state["adlp"].numel() == 0
    opt._record(torch.tensor([3, 3, 5]), torch.tensor([1.0, 2.0, 4.0]))  # duplicates count twice
    adlp, count = opt.samkit_state["adlp"], opt.samkit_state["adlp_count"]
    assert adlp.numel() == 6 and adlp[3] == 1.5 and adlp[5] == 4.0
    assert count.tolist() == [0, 0, 0, 2, 0, 1]
    opt._record(torch.tensor([3, 40]), torch.tensor([6.0, 1.0]))
    adlp, count = opt.samkit_state["adlp"], opt.samkit_state["adlp_count"]
    assert adlp.numel() == 41 and adlp[3] == 3.0 and int(count[3]) == 3
    scores, seen = opt.scores(torch.tensor([3, 4, 40, 1000]))
    assert scores.tolist() == [3.0, 0.0, 1.0, 0.0] and seen.tolist() == [True, False, True, False]


def test_training_grows_the_state_to_the_largest_index_seen():
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), lr=0.1)
    x, y = dataset(8)
    opt.step(samkit.make_closure(m, loss_fn, x, y, indices=torch.arange(8) + 30))
    assert opt.samkit_state["adlp"].numel() == 38
    assert int(opt.samkit_state["adlp_count"].sum()) == 4


def test_resume_continues_exactly():
    data, steps = dataset(), epochs(4)
    kw = dict(rho=0.1, lr=LR, momentum=MOM, weight_decay=WD)
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), seed=3, **kw)
    run(opt, m, data, steps[:6])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, m, data, steps[6:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_net(seed=5)
    m2.load_state_dict(ck["model"])
    opt2 = samkit.AUSAM(m2.parameters(), seed=77, **kw)
    opt2.load_state_dict(ck["opt"])
    assert int(opt2.samkit_state["adlp_count"].sum()) == 6 * 4
    run(opt2, m2, data, steps[6:])
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    assert torch.equal(opt.samkit_state["adlp"], opt2.samkit_state["adlp"])


def test_a_skipped_step_records_no_score():
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), lr=0.1, on_nonfinite="skip")
    x, y = dataset(8)
    idx = torch.arange(8)

    def nan_loss(out, t):
        return loss_fn(out, t) * float("nan")

    opt.step(samkit.make_closure(m, nan_loss, x, y, indices=idx))
    assert opt.skipped_steps == 1 and int(opt.samkit_state["adlp_count"].sum()) == 0
    opt.step(samkit.make_closure(m, loss_fn, x, y, indices=idx))
    assert int(opt.samkit_state["adlp_count"].sum()) == 4


# ----------------------------------------------------------------------------- validation
def test_needs_a_batch_closure_with_indices():
    m = tiny_net()
    opt = samkit.AUSAM(m.parameters(), lr=0.1)
    x, y = dataset(8)

    def plain():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="indices=idx"):
        opt.step(plain)
    with pytest.raises(ValueError, match="needs the dataset index"):
        opt.step(samkit.make_closure(m, loss_fn, x, y))
    with pytest.raises(TypeError, match="integer dataset indices"):
        opt.step(samkit.make_closure(m, loss_fn, x, y, indices=torch.arange(8.0)))
    with pytest.raises(ValueError, match="Invalid dataset index: -1"):
        opt.step(samkit.make_closure(m, loss_fn, x, y, indices=torch.arange(8) - 1))
    with pytest.raises(ValueError, match="per-sample losses"):
        mean_loss = nn.functional.cross_entropy
        opt.step(samkit.make_closure(m, mean_loss, x, y, indices=torch.arange(8)))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fraction": 0.0}, "Invalid fraction value: 0.0"),
        ({"fraction": 1.2}, "Invalid fraction value: 1.2"),
        ({"max_ratio": 0.5}, "Invalid max_ratio value: 0.5"),
        ({"max_ratio": float("inf")}, "Invalid max_ratio value: inf"),
        ({"rho": -0.1}, "Invalid rho value: -0.1"),
        ({"seed": "x"}, "Invalid seed value: 'x'"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        samkit.AUSAM(tiny_net().parameters(), lr=0.1, **kw)


def test_groups_must_share_the_sampling_settings():
    m = tiny_net()
    groups = [{"params": m[0].parameters(), "fraction": 0.25}, {"params": m[2].parameters()}]
    with pytest.raises(ValueError, match="same fraction"):
        samkit.AUSAM(groups, lr=0.1)


def test_registry_entry_builds_the_class_defaults():
    info = samkit.get_optimizer_info("ausam")
    assert info.cls is samkit.AUSAM and info.needs_batch_closure
    group = samkit.create_optimizer("ausam", tiny_net().parameters(), lr=0.1).param_groups[0]
    assert (group["rho"], group["fraction"], group["max_ratio"]) == (0.05, 0.5, 4.0)


# ----------------------------------------------------------------------------- edges
def test_the_returned_loss_is_the_objective_of_the_subset_with_class_weights():
    x, y = dataset(16)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    weighted = nn.CrossEntropyLoss(weight=w, reduction="none")
    for fraction in (1.0, 0.5):
        m = tiny_net()
        opt = samkit.AUSAM(m.parameters(), rho=0.1, fraction=fraction, lr=0.1)
        subsets = []
        original = opt.run_pass

        def spy(closure, name, original=original, subsets=subsets, **kw):
            subsets.append(kw["subset"])
            return original(closure, name, **kw)

        opt.run_pass = spy
        out = m(x).detach()
        loss = opt.step(samkit.make_closure(m, weighted, x, y, indices=torch.arange(16)))
        s = subsets[0] if subsets[0] is not None else torch.arange(16)
        expected = nn.functional.cross_entropy(out[s], y[s], weight=w)  # weighted mean on S
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)


def test_no_subset_of_one_sample_under_batchnorm():
    # fraction 0.25 of a last batch of 3 samples ⌈0.75⌉ = 1; BatchNorm1d in train mode
    # needs 2 (BatchNorm1d raises on one sample).
    x, y = dataset(3)
    m = tiny_net(bn=True)
    opt = samkit.AUSAM(m.parameters(), rho=0.1, fraction=0.25, lr=0.1, model=m)
    c = samkit.make_closure(m, loss_fn, x, y, indices=torch.arange(3))
    opt.step(c)
    assert c.grad_evals == pytest.approx(2 * 2 / 3)  # two passes on 2 of the 3 samples
