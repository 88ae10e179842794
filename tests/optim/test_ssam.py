"""Sparse SAM against naive float64 references: masked SAM, the Fisher mask, SSAM-D's
drop-and-regrow, the refresh schedule, resume and faults."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, tiny_net
from samkit.optim.ssam import per_sample_squared_gradients

LR, MOM, WD, RHO = 0.1, 0.9, 5e-3, 0.3


def data(n: int = 12, size: int = 8, seed: int = 1):
    return batches(n, size=size, seed=seed)


def make(model, **kw):
    kw = {"rho": RHO, "lr": LR, "momentum": MOM, "weight_decay": WD, **kw}
    return samkit.SSAM(model.parameters(), model=model, **kw)


def train(opt, model, steps, per_epoch=2, first=0, closure_kw=None):
    for i, (x, y) in enumerate(steps, start=first):
        opt.set_epoch(i // per_epoch)
        opt.step(samkit.make_closure(model, loss_fn, x, y, **(closure_kw or {})))


def grads(model, x, y):
    return list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.parameters()))


def naive_fisher(model, x, y, k):
    out = [torch.zeros_like(p) for p in model.parameters()]
    for n in range(k):
        for o, g in zip(out, grads(model, x[n : n + 1], y[n : n + 1])):
            o += g**2
    return out


def top_k_masks(scores, sparsity):
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = flat.numel() - round(flat.numel() * sparsity)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True)[:keep]] = True
    parts = torch.split(chosen, [s.numel() for s in scores])
    return [c.view(s.shape) for c, s in zip(parts, scores)]


def sgd_reference():
    bufs = {}

    def step(params, g):
        with torch.no_grad():
            for i, (p, gi) in enumerate(zip(params, g)):
                d = gi + WD * p
                bufs[i] = d if i not in bufs else MOM * bufs[i] + d
                p.sub_(LR * bufs[i])

    return step


def naive_masked_sam(model, steps, masks, rho=RHO, eps=1e-12, sgd=None):
    params = list(model.parameters())
    sgd = sgd or sgd_reference()
    for x, y in steps:
        g = grads(model, x, y)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))  # of the WHOLE gradient
        e = [rho * gi * m / (norm + eps) for gi, m in zip(g, masks)]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = grads(model, x, y)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
        sgd(params, gp)


def set_masks(opt, model, masks):
    for p, m in zip(model.parameters(), masks):
        opt.state[p]["mask"] = m
    opt.samkit_state["ssam_mask_epoch"] = 0  # epoch 0's refresh is done


# ----------------------------------------------------------------------------- SAM with a mask
@pytest.mark.parametrize("foreach", [True, False])
def test_fixed_mask_equals_naive_masked_sam_float64(foreach):
    steps = data(12)
    m_ref, m = tiny_net(), tiny_net()
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(p.shape, generator=g) < 0.4 for p in m.parameters()]
    naive_masked_sam(m_ref, steps, [mk.double() for mk in masks])
    opt = make(m, update_freq=1000, foreach=foreach)
    set_masks(opt, m, masks)
    train(opt, m, steps, per_epoch=100)  # epoch 0 throughout: no refresh
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert all(torch.equal(opt.state[p]["mask"], mk) for p, mk in zip(m.parameters(), masks))


@pytest.mark.parametrize("mode", ["fisher", "dynamic"])
def test_sparsity_zero_is_exactly_sam(mode):
    steps = data(12)
    m1, m2 = tiny_net(), tiny_net()
    opt = make(m1, sparsity=0.0, mode=mode, epochs=6, num_samples=4)
    train(opt, m1, steps)
    sam = samkit.SAM(m2.parameters(), rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    for x, y in steps:
        sam.step(samkit.make_closure(m2, loss_fn, x, y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert opt.density() == 1.0


def test_sparsity_one_perturbs_nothing():
    steps = data(4)
    m1, m2 = tiny_net(), tiny_net()
    train(make(m1, sparsity=1.0, num_samples=4), m1, steps)
    sgd = sgd_reference()
    for x, y in steps:
        sgd(list(m2.parameters()), grads(m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- SSAM-F
def test_per_sample_squared_gradients_match_a_loop():
    m = tiny_net()
    x, y = data(1, size=10)[0]
    params = list(m.parameters())
    got = per_sample_squared_gradients(m, loss_fn, x, y, params, 7)
    for a, b in zip(got, naive_fisher(m, x, y, 7)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # with dropout, the scores are those of the model in eval mode (deterministic)
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    ps = list(drop.parameters())
    got = per_sample_squared_gradients(drop, loss_fn, x, y, ps, 7)
    drop.eval()
    for a, b in zip(got, naive_fisher(drop, x, y, 7)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # a mean-reducing loss gives the same per-sample gradients; train/eval flags restored
    m.train()
    got = per_sample_squared_gradients(m, nn.functional.cross_entropy, x, y, params, 7)
    assert m.training
    for a, b in zip(got, naive_fisher(m, x, y, 7)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_fisher_mask_is_the_top_k_of_the_first_samples_fisher():
    m = tiny_net()
    x, y = data(1, size=10)[0]
    expected = top_k_masks(naive_fisher(m, x, y, 6), 0.7)
    opt = make(m, sparsity=0.7, num_samples=6)
    opt.set_epoch(0)
    closure = samkit.make_closure(m, loss_fn, x, y)
    opt.step(closure)
    masks = [opt.state[p]["mask"] for p in m.parameters()]
    assert all(mk.dtype == torch.bool for mk in masks)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected))
    d = sum(p.numel() for p in m.parameters())
    assert sum(int(mk.sum()) for mk in masks) == d - round(0.7 * d)
    # cost: two passes plus 6 per-sample forward/backward passes of a 10-sample batch
    assert closure.grad_evals == pytest.approx(2.6) and closure.forward_evals == pytest.approx(2.6)


def test_fisher_accumulates_over_steps_and_takes_sgd_steps_until_the_first_mask():
    steps = data(4, size=8)
    m, ref = tiny_net(), tiny_net()
    opt = make(m, num_samples=20, sparsity=0.5)
    sgd = sgd_reference()
    fisher = [torch.zeros_like(p) for p in ref.parameters()]
    for i, (x, y) in enumerate(steps[:2]):  # 8 + 8 samples: no mask yet, plain SGD steps
        for f, s in zip(fisher, naive_fisher(ref, x, y, 8)):
            f += s
        sgd(list(ref.parameters()), grads(ref, x, y))
        opt.set_epoch(0)
        opt.step(samkit.make_closure(m, loss_fn, x, y))
        assert opt.samkit_state["ssam_fisher_count"] == 8 * (i + 1) and not opt.masks
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    x, y = steps[2]  # 4 more samples complete the sum; this step already uses the mask
    for f, s in zip(fisher, naive_fisher(ref, x, y, 4)):
        f += s
    expected = top_k_masks(fisher, 0.5)
    opt.step(samkit.make_closure(m, loss_fn, x, y))
    assert all(torch.equal(opt.state[p]["mask"], e) for p, e in zip(m.parameters(), expected))
    assert opt.samkit_state["ssam_fisher_count"] == 0
    assert all("fisher" not in opt.state[p] for p in m.parameters())
    naive_masked_sam(ref, [(x, y)], [e.double() for e in expected], sgd=sgd)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_mask_is_refreshed_every_update_freq_epochs_at_the_first_step():
    m = tiny_net()
    opt = make(m, num_samples=8, update_freq=2)
    seen = []
    for i, (x, y) in enumerate(data(10)):
        opt.set_epoch(i // 2)
        before = {p: mk.clone() for p, mk in opt.masks.items()}
        opt.step(samkit.make_closure(m, loss_fn, x, y))
        changed = bool(before) and any(
            not torch.equal(before[p], mk) for p, mk in opt.masks.items()
        )
        seen.append((i // 2, opt.samkit_state["ssam_mask_epoch"], changed))
    assert [e for e, _, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [me for _, me, _ in seen] == [0, 0, 0, 0, 2, 2, 2, 2, 4, 4]
    assert [c for _, _, c in seen] == [False, False, False, False, True, False] + [False] * 2 + [
        True,
        False,
    ]


# ----------------------------------------------------------------------------- SSAM-D
def test_dynamic_initial_mask_is_random_with_k_live_and_reproducible():
    def initial(seed):
        m = tiny_net()
        opt = make(m, mode="dynamic", epochs=10, drop_rate=0.0, sparsity=0.6, seed=seed)
        train(opt, m, data(1))
        return [opt.state[p]["mask"] for p in m.parameters()]

    a, b, c = initial(0), initial(0), initial(1)
    d = sum(mk.numel() for mk in a)
    assert sum(int(mk.sum()) for mk in a) == d - round(0.6 * d)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def random_masks(model, live_fraction, seed=5):
    """Masks with exactly ``round(d·live_fraction)`` live coordinates, drawn at random."""
    d = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(d, dtype=torch.bool)
    flat[
        torch.randperm(d, generator=torch.Generator().manual_seed(seed))[: round(d * live_fraction)]
    ] = 1
    parts = torch.split(flat, [p.numel() for p in model.parameters()])
    return [c.view(p.shape) for c, p in zip(parts, model.parameters())]


@pytest.mark.parametrize(
    "grow, epoch", [("gradient", 2), ("random", 2), ("random", 0), ("random", 1), ("gradient", 3)]
)
def test_drop_and_regrow_follows_the_scores_and_the_cosine_drop_rate(grow, epoch):
    m = tiny_net()
    old = random_masks(m, 0.5)  # k live: sparsity 0.5
    opt = make(m, mode="dynamic", epochs=4, drop_rate=0.5, grow_score=grow)
    for p, mk in zip(m.parameters(), old):
        opt.state[p]["mask"] = mk
    x, y = data(1)[0]
    g = torch.cat([gi.abs().reshape(-1) for gi in grads(m, x, y)])
    opt.set_epoch(epoch)
    opt.step(samkit.make_closure(m, loss_fn, x, y))
    live = torch.cat([mk.reshape(-1) for mk in old])
    new = torch.cat([opt.state[p]["mask"].reshape(-1) for p in m.parameters()])
    n_live = int(live.sum())
    # r_e = drop_rate·(1 + cos(π e / epochs))/2: 0.5, 0.4268, 0.25, 0.0732 at e = 0, 1, 2, 3
    rate = {0: 0.5, 1: 0.5 * (1 + math.sqrt(0.5)) / 2, 2: 0.25, 3: 0.5 * (1 - math.sqrt(0.5)) / 2}
    n_drop = math.floor(n_live * rate[epoch])
    assert n_drop == {0: 16, 1: 14, 2: 8, 3: 2}[epoch]  # 33 live of 66
    assert int(new.sum()) == n_live and opt.samkit_state["ssam_mask_epoch"] == epoch
    kept, grown = new & live, new & ~live
    assert int(kept.sum()) == n_live - n_drop and int(grown.sum()) == n_drop
    # kept: the live coordinates with the largest |g|
    assert g[kept].min() >= g[live & ~new].max()
    if grow == "gradient":  # regrown: the dead coordinates with the largest |g|
        assert g[grown].min() >= g[~live & ~new].max()


@pytest.mark.parametrize("how", ["group edited", "checkpoint loaded"])
@pytest.mark.parametrize("sparsity", [0.8, 0.2])
def test_dynamic_follows_a_changed_sparsity_at_the_next_update(how, sparsity):
    # Density 0.5 -> 1 - sparsity at the next drop-and-regrow, not "0.5 forever".
    steps = data(6)
    m = tiny_net()
    opt = make(m, mode="dynamic", epochs=6, drop_rate=0.5, grow_score="gradient")
    train(opt, m, steps[:2])  # epoch 0
    assert opt.density() == 0.5
    if how == "group edited":
        opt.param_groups[0]["sparsity"] = sparsity
    else:  # a run resumed from the masks of a 0.5 run, with its own sparsity
        m2 = copy.deepcopy(m)
        kw = dict(mode="dynamic", epochs=6, drop_rate=0.5, grow_score="gradient")
        opt2 = make(m2, sparsity=sparsity, **kw)
        opt2.load_state_dict(opt.state_dict())  # the saved groups' sparsity: 0.5
        opt2.param_groups[0]["sparsity"] = sparsity
        opt, m = opt2, m2
    before = [opt.state[p]["mask"].clone() for p in m.parameters()]
    train(opt, m, steps[2:3], first=1)  # epoch 0 still: masks unchanged until the update
    assert all(torch.equal(opt.state[p]["mask"], b) for p, b in zip(m.parameters(), before))
    x, y = steps[3]
    g = torch.cat([gi.abs().reshape(-1) for gi in grads(m, x, y)])
    train(opt, m, steps[3:4], first=2)  # epoch 1: the update
    d = sum(p.numel() for p in m.parameters())
    assert opt.density() == (d - round(d * sparsity)) / d
    live = torch.cat([b.reshape(-1) for b in before])
    new = torch.cat([opt.state[p]["mask"].reshape(-1) for p in m.parameters()])
    kept, grown, dropped = new & live, new & ~live, live & ~new
    assert g[kept].min() >= g[dropped].max()  # the live ones with the largest |g| stay
    if grown.any() and (~live & ~new).any():  # the dead ones with the largest |g| grow
        assert g[grown].min() >= g[~live & ~new].max()
    # kept: n_live - ⌊n_live·r_1⌋, at most k, and at least k minus every dead coordinate
    n_live, k = int(live.sum()), int(new.sum())
    n_drop = math.floor(n_live * 0.5 * (1 + math.cos(math.pi / 6)) / 2)
    assert int(kept.sum()) == max(min(n_live - n_drop, k), k - (d - n_live))


@pytest.mark.parametrize("mode", ["dynamic", "fisher"])
def test_a_parameter_unfrozen_mid_training_gets_a_mask(mode):
    # Gradual unfreezing: the first layer trains from the second step on, within an epoch
    # and across a mask update.
    steps = data(6)
    m = tiny_net()
    m[0].requires_grad_(False)
    opt = make(m, mode=mode, epochs=6, num_samples=4, sparsity=0.6)
    train(opt, m, steps[:1])
    assert all(p not in opt.masks for p in m[0].parameters())
    m[0].requires_grad_(True)
    train(opt, m, steps[1:2], first=1)  # epoch 0: no update, the new layer gets its mask
    masks = [opt.state[p]["mask"] for p in m[0].parameters()]
    if mode == "dynamic":  # k = d - round(d·s) of its coordinates, at random
        d = sum(mk.numel() for mk in masks)
        assert sum(int(mk.sum()) for mk in masks) == d - round(0.6 * d)
    else:  # nothing perturbed until the next Fisher refresh
        assert not any(mk.any() for mk in masks)
    train(opt, m, steps[2:4], first=2)  # epoch 1: the update covers the whole model
    d = sum(p.numel() for p in m.parameters())
    assert opt.density() == (d - round(0.6 * d)) / d
    assert any(opt.state[p]["mask"].any() for p in m[0].parameters())


def test_dynamic_requires_the_run_length():
    with pytest.raises(ValueError, match="needs epochs="):
        make(tiny_net(), mode="dynamic")


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "kw", [{"num_samples": 8}, {"num_samples": 40}, {"mode": "dynamic", "epochs": 5}]
)
def test_resume_with_masks_or_a_fisher_sum_in_progress_continues_exactly(kw):
    steps = data(10)
    m = tiny_net()
    opt = make(m, **kw)
    train(opt, m, steps[:4])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    train(opt, m, steps[4:], first=4)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_net(seed=3)
    m2.load_state_dict(ck["model"])
    opt2 = make(m2, **kw)
    opt2.load_state_dict(ck["opt"])
    assert all(mk.dtype == torch.bool for mk in opt2.masks.values())
    train(opt2, m2, steps[4:], first=4)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(opt.state[p]["mask"], opt2.state[q]["mask"])


class FailingAt(samkit.BatchClosure):
    """Raises, or returns NaN, in its ``at``-th pass (or in the Fisher's per-sample calls)."""

    def __init__(self, model, x, y, at, fault):
        super().__init__(model, self._loss, x, y)
        self.at, self.fault, self.calls = at, fault, 0

    def _loss(self, out, t):
        loss = loss_fn(out, t)
        per_sample_call = out.shape[0] == 1  # the Fisher's calls, inside vmap
        if self.fault == "nan" and (self.calls == self.at or (self.at == 0 and per_sample_call)):
            loss = loss * float("nan")
        return loss

    def evaluate(self, *args, **kwargs):
        self.calls += 1
        if self.fault == "raise" and self.calls == self.at:
            raise KeyboardInterrupt("injected")
        return super().evaluate(*args, **kwargs)


@pytest.mark.parametrize("mode", ["fisher", "dynamic"])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_nan_in_any_pass_of_a_refresh_step_leaves_masks_and_weights_untouched(mode, at):
    if mode == "dynamic" and at == 0:
        pytest.skip("SSAM-D has no Fisher pass")
    m = tiny_net()
    opt = make(m, mode=mode, epochs=5, num_samples=8, on_nonfinite="skip")
    train(opt, m, data(2))  # epoch 0: masks exist
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in m.parameters()]
    x, y = data(1, seed=8)[0]
    opt.set_epoch(1)  # a refresh is due
    twin_m, twin = copy.deepcopy((m, opt))
    opt.step(FailingAt(m, x, y, at, "nan"))
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))
    # SSAM-F's finite Fisher scores are committed at once (clean_pass_state): a failure
    # after the Fisher pass keeps the mask the completed step commits; SSAM-D's and a
    # failed Fisher pass's leave the old one.
    kept = mode == "fisher" and at > 0
    if kept:
        twin.step(samkit.make_closure(twin_m, loss_fn, x, y))
    expected = twin.state_dict() if kept else state
    for p, q in zip(m.parameters(), expected["state"].values()):
        assert torch.equal(opt.state[p]["mask"], q["mask"].bool())
    assert opt.samkit_state["ssam_mask_epoch"] == (1 if kept else 0)
    # with on_nonfinite="raise" the failing pass is named
    opt.on_nonfinite = "raise"
    name = {0: "fisher", 1: "clean", 2: "perturbed"}[at]
    with pytest.raises(samkit.NonFiniteError, match=f"SSAM: non-finite .* {name} pass"):
        opt.step(FailingAt(m, x, y, at, "nan"))


def test_failure_in_the_perturbed_pass_restores_the_weights():
    m = tiny_net()
    opt = make(m, num_samples=8)
    train(opt, m, data(2))
    weights = [p.detach().clone() for p in m.parameters()]
    x, y = data(1, seed=8)[0]
    with pytest.raises(KeyboardInterrupt):
        opt.step(FailingAt(m, x, y, 2, "raise"))
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))
    assert not opt.is_perturbed


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"sparsity": 1.5}, r"Invalid sparsity value: 1.5 \(in \[0, 1\]\)"),
        ({"mode": "magic"}, "Invalid mode value: 'magic'"),
        ({"num_samples": 0}, "Invalid num_samples value: 0"),
        ({"update_freq": 2.5}, "Invalid update_freq value: 2.5"),
        ({"drop_rate": 1.5}, "Invalid drop_rate value: 1.5"),
        ({"drop_score": "loss"}, "Invalid drop_score value: 'loss'"),
        ({"grow_score": None}, "Invalid grow_score value: None"),
        ({"epochs": 0}, "Invalid epochs value: 0"),
        ({"seed": -1}, "Invalid seed value: -1"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_net(), **kw)


def test_schedule_must_agree_across_groups_but_sparsity_may_differ():
    m = tiny_net()
    with pytest.raises(ValueError, match="Invalid num_samples value: 4 in a param group"):
        samkit.SSAM(
            [{"params": m[0].parameters()}, {"params": m[2].parameters(), "num_samples": 4}]
        )
    opt = samkit.SSAM(
        [{"params": m[0].parameters(), "sparsity": 0.9}, {"params": m[2].parameters()}],
        num_samples=8,
        lr=0.1,
    )
    train(opt, m, data(1))
    for group, s in zip(opt.param_groups, (0.9, 0.5)):
        d = sum(p.numel() for p in group["params"])
        assert sum(int(opt.state[p]["mask"].sum()) for p in group["params"]) == d - round(s * d)


def test_fisher_mode_needs_the_batch_and_manual_steps_are_refused():
    m = tiny_net()
    opt = make(m)
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match="set_epoch"):
        opt.step(samkit.make_closure(m, loss_fn, x, y))
    opt.set_epoch(0)
    with pytest.raises(TypeError, match="mode='dynamic'"):
        opt.step(lambda: loss_fn(m(x), y).mean())
    with pytest.raises(RuntimeError, match="step"):
        opt.first_step()


def test_registry_entry_builds_the_paper_defaults():
    info = samkit.get_optimizer_info("ssam")
    assert info.cls is samkit.SSAM and info.needs_batch_closure
    g = samkit.create_optimizer("ssam", tiny_net().parameters(), lr=0.1).param_groups[0]
    assert (g["rho"], g["sparsity"], g["mode"], g["num_samples"], g["update_freq"]) == (
        0.1,
        0.5,
        "fisher",
        128,
        1,
    )
    assert (g["drop_rate"], g["drop_score"], g["grow_score"]) == (0.5, "gradient", "random")


# ----------------------------------------------------------------------------- FSDP2 pieces
# (The 2-process FSDP2 runs of SSAM-D and SSAM-F's refusal are in tests/optim/test_fsdp.py.)
def test_radix_selection_of_the_sharded_mask_equals_topk():
    from samkit.optim._coordinates import select_top as _select_top

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, generator=g) * torch.logspace(-30, 30, 1000)
    scores[::97] = -math.inf  # the dead (or live) coordinates of a drop-and-regrow
    scores[5] = -0.0
    for k in (0, 1, 7, 500, 989, 1000):
        chosen = _select_top(scores, k, None)
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[torch.topk(scores, k).indices] = True
        assert torch.equal(chosen, expected), k


def test_radix_selection_takes_tied_scores_in_order():
    from samkit.optim._coordinates import select_top as _select_top

    scores = torch.tensor([0.5, 2.0, 0.5, -1.0, 0.5, 3.0, 0.5])
    chosen = _select_top(scores, 4, None)  # 3.0, 2.0, then the first two of the four 0.5s
    assert chosen.tolist() == [True, True, True, False, False, True, False]


def test_radix_selection_over_parts_in_chunks_takes_the_k_largest_ties_in_order(monkeypatch):
    # The unsharded masks: scores given per parameter (never concatenated), keyed in chunks
    # smaller than the parts; the oracle is a stable descending sort (ties in flat order).
    from samkit.optim import _coordinates

    monkeypatch.setattr(_coordinates, "_KEY_CHUNK", 7)
    g = torch.Generator().manual_seed(1)
    flat = torch.randint(0, 40, (1000,), generator=g).float() * 0.25  # many ties
    flat[::89] = -math.inf
    sizes = [3, 500, 1, 496]
    parts = [t.reshape(-1, 1) if i == 1 else t for i, t in enumerate(flat.split(sizes))]
    order = torch.sort(flat, descending=True, stable=True).indices
    for k in (0, 1, 6, 250, 500, 999, 1000):
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(_coordinates.select_top(parts, k, None), expected), k


def test_ssam_fisher_refuses_shards_and_dynamic_does_not():
    params = tiny_net().parameters()
    assert "torch.func" in samkit.SSAM(params, lr=0.1).fsdp_unsupported
    dynamic = samkit.SSAM(tiny_net().parameters(), mode="dynamic", epochs=3, lr=0.1)
    assert dynamic.fsdp_unsupported is None
