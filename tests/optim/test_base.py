"""The shared machinery: closure protocol, foreach kernels, BatchNorm, state, validation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, mean_loss, plain_closure, tiny_net
from samkit.optim import _tensors as T


def test_step_without_closure_explains_both_ways():
    opt = samkit.SAM(tiny_net().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"needs a closure(.|\n)*first_step"):
        opt.step()


def test_plain_torch_closure_and_batch_closure_agree():
    data = batches(3)
    m1, m2 = tiny_net(), tiny_net()
    o1 = samkit.SAM(m1.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    o2 = samkit.SAM(m2.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    for x, y in data:
        o1.step(plain_closure(o1, m1, x, y))
        o2.step(samkit.make_closure(m2, loss_fn, x, y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_manual_first_second_step_equals_step():
    data = batches(3)
    m1, m2 = tiny_net(bn=True), tiny_net(bn=True)
    o1 = samkit.SAM(m1.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    o2 = samkit.SAM(m2.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    for x, y in data:
        o1.step(samkit.make_closure(m1, loss_fn, x, y))
        mean_loss(m2, x, y).backward()
        o2.first_step(zero_grad=True)
        with samkit.frozen_bn_stats(m2):
            mean_loss(m2, x, y).backward()
        o2.second_step(zero_grad=True)
    for p, q in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_plain_optimizers_accept_the_same_closure():
    model = tiny_net()
    opt = samkit.create_optimizer("sgd", model.parameters(), lr=0.1, rho=0.3, model=model)
    assert type(opt) is torch.optim.SGD
    x, y = batches(1)[0]
    c = samkit.make_closure(model, loss_fn, x, y)
    loss = opt.step(c)
    assert c.passes == 1 and torch.isfinite(loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foreach_kernels_equal_loop_kernels(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2), (1,)]
    ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ts.append(torch.randn(4, generator=g).float())  # mixed dtype
    others = [torch.randn_like(t) for t in ts]
    torch.testing.assert_close(
        T.global_norm(ts, True), T.global_norm(ts, False), rtol=1e-15, atol=0
    )
    exact = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    torch.testing.assert_close(T.global_norm(ts, True), exact, rtol=1e-7, atol=0)
    for a, b in zip(T.scaled(ts, 0.3, True), T.scaled(ts, 0.3, False)):
        assert torch.equal(a, b)
    a1, a2 = [t.clone() for t in ts], [t.clone() for t in ts]
    T.add_(a1, others, 0.5, True)
    T.add_(a2, others, 0.5, False)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    T.mul_(a1, 0.7, True)
    T.mul_(a2, 0.7, False)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    T.copy_(a1, others, True)
    assert all(torch.equal(x, y) for x, y in zip(a1, others))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_are_taken_and_combined_in_float32(dtype, foreach):
    # Each tensor's norm fits float16 (40000 < 65504) but their combination does not; and one
    # tensor's own norm overflows float16. bfloat16 (8 significant bits) would round the sum
    # of 300 squared norms far more than float32 does.
    big = [torch.full((1,), 40000.0, dtype=dtype) for _ in range(4)]
    huge = [torch.full((4,), 40000.0, dtype=dtype)]
    many = [torch.full((3,), 1.0 + k / 300, dtype=dtype) for k in range(300)]
    mixed = big + [torch.ones(2, dtype=torch.float32)]  # two buckets
    for ts in (big, huge, many, mixed):
        exact = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
        got = T.global_norm(ts, foreach)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


def test_sam_perturbs_float16_weights_whose_gradient_norm_overflows_float16():
    w = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt = samkit.SAM([w], rho=0.5, lr=0.0)
    w.grad = torch.full((4,), 40000.0, dtype=torch.float16)  # norm 80000 > float16 max
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(w.detach().float(), torch.full((4,), 0.25), rtol=1e-3, atol=0)
    w.grad = torch.ones(4, dtype=torch.float16)
    opt.second_step()  # finite: the step is taken, not refused as non-finite
    assert opt.samkit_state["step"] == 1 and torch.equal(w, torch.zeros(4, dtype=torch.float16))


def test_frozen_parameters_with_a_stale_gradient_are_not_perturbed():
    # collect() skips parameters with requires_grad=False even when they hold a gradient
    # (frozen after a backward pass); visible through the manual API.
    model = tiny_net()
    x, y = batches(1)[0]
    mean_loss(model, x, y).backward()
    frozen = model[0].weight
    frozen.requires_grad_(False)  # keeps its .grad
    assert frozen.grad is not None
    before = frozen.detach().clone()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    live = [p for p in model.parameters() if p.requires_grad]
    g = [p.grad.clone() for p in live]
    w = [p.detach().clone() for p in live]
    norm = opt.perturb()
    torch.testing.assert_close(norm, torch.sqrt(sum((gi**2).sum() for gi in g)), rtol=1e-14, atol=0)
    assert torch.equal(frozen, before)
    for p, wi, gi in zip(live, w, g):
        torch.testing.assert_close(p.detach(), wi + 0.5 * gi / (norm + 1e-12), rtol=1e-14, atol=0)
    opt.restore()
    opt.first_step()
    assert torch.equal(frozen, before)


def test_global_norm_of_empty_list_is_zero():
    assert T.global_norm([]).item() == 0.0


def test_zero_gradient_gives_zero_perturbation_not_nan():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_restore_is_bit_exact():
    model = tiny_net(dtype=torch.float32)
    x, y = batches(1, dtype=torch.float32)[0]
    opt = samkit.SAM(model.parameters(), rho=0.7, lr=0.1)
    mean_loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    assert opt.is_perturbed
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_batchnorm_running_stats_come_from_the_clean_pass_only():
    model = tiny_net(bn=True)
    ref = copy.deepcopy(model)
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, model=model)
    x, y = batches(1)[0]
    opt.step(plain_closure(opt, model, x, y))
    ref.train()
    with torch.no_grad():
        ref(x)  # exactly one update of the running statistics at the clean weights
    bn, bn_ref = model[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    assert bn.track_running_stats  # restored


def test_batch_closure_supplies_the_model_for_bn_freezing():
    model = tiny_net(bn=True)
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)  # no model= given
    x, y = batches(1)[0]
    opt.step(samkit.make_closure(model, loss_fn, x, y))
    assert int(model[1].num_batches_tracked) == 1


def test_batchnorm_built_without_running_stats_stays_so():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7, track_running_stats=False), nn.BatchNorm1d(7)
    ).double()
    with samkit.frozen_bn_stats(model):
        assert not model[1].track_running_stats and not model[2].track_running_stats
    assert not model[1].track_running_stats and model[2].track_running_stats
    with pytest.raises(KeyError), samkit.frozen_bn_stats(model):
        raise KeyError("boom")
    assert not model[1].track_running_stats and model[2].track_running_stats
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, model=model)
    x, y = batches(1)[0]
    for _ in range(2):
        opt.step(samkit.make_closure(model, lambda o, t: o.pow(2).mean(1), x, y))
    assert not model[1].track_running_stats and model[1].running_mean is None
    assert model[2].track_running_stats and int(model[2].num_batches_tracked) == 2


def test_frozen_bn_stats_restores_flag_on_exception():
    model = tiny_net(bn=True)
    with pytest.raises(KeyError), samkit.frozen_bn_stats(model):
        assert not model[1].track_running_stats
        raise KeyError("boom")
    assert model[1].track_running_stats


def _run(model, opt, data):
    for x, y in data:
        opt.step(samkit.make_closure(model, loss_fn, x, y))


@pytest.mark.parametrize(
    "base,kw", [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)), ("adamw", dict(lr=1e-2))]
)
def test_state_dict_resume_is_exact(base, kw):
    data = batches(6)
    model = tiny_net(bn=True)
    opt = samkit.SAM(model.parameters(), base, rho=0.05, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    _run(model, opt, data[:3])
    for _ in range(3):
        sched.step()
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    _run(model, opt, data[3:])

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = tiny_net(seed=123, bn=True)
    model2.load_state_dict(ck["model"])
    opt2 = samkit.SAM(model2.parameters(), base, rho=0.05, **kw)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=6)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert len(opt2.base_optimizer.state) == len(list(model2.parameters()))  # momentum kept
    _run(model2, opt2, data[3:])
    for p, q in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(p, q)
    assert opt2.samkit_state["step"] == 6


def test_exception_in_the_perturbed_pass_restores_the_weights():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = mean_loss(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert not opt.is_perturbed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _nan_in_pass(opt, model, x, y, bad_pass):
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = mean_loss(model, x, y) * (float("nan") if calls["n"] == bad_pass else 1.0)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_raise_and_skip(bad_pass, mode):
    x, y = batches(1)[0]
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, momentum=0.9, on_nonfinite=mode)
    before = [p.detach().clone() for p in model.parameters()]
    closure = _nan_in_pass(opt, model, x, y, bad_pass)
    if mode == "raise":
        name = "clean" if bad_pass == 1 else "perturbed"
        with pytest.raises(samkit.NonFiniteError, match=f"SAM.*{name} pass"):
            opt.step(closure)
    else:
        loss = opt.step(closure)
        assert opt.skipped_steps == 1 and opt.samkit_state["step"] == 0
        assert all(p.grad is None for p in model.parameters())
        if bad_pass == 2:  # a skipped step still returns the clean loss
            torch.testing.assert_close(loss, mean_loss(model, x, y), rtol=0, atol=0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.is_perturbed


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_python_number_loss_is_checked_too(mode):
    # A closure may return loss.item(): a NaN there is caught although the gradients are fine.
    x, y = batches(1)[0]
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), rho=0.5, lr=0.1, on_nonfinite=mode)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = mean_loss(model, x, y)
        loss.backward()
        return float("nan") if opt.is_perturbed else loss.item()

    if mode == "raise":
        with pytest.raises(samkit.NonFiniteError, match=r"perturbed pass \(loss=nan\)"):
            opt.step(closure)
    else:
        assert opt.step(closure) == pytest.approx(float(mean_loss(model, x, y).detach()))
        assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_all_reduce_mean_averages_over_the_replicas(monkeypatch):
    # Two replicas simulated: all_reduce adds the other replica's tensor; the result must be
    # the mean (a sum would keep replicas identical and slip through a replica check).
    import torch.distributed as dist

    other = {}

    def all_reduce(flat, group=None):
        flat.add_(other["flat"])

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    opt = samkit.SAM(tiny_net().parameters(), lr=0.1)
    mine = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([[4.0]])]
    theirs = [torch.tensor([3.0, 6.0], dtype=torch.float64), torch.tensor([[0.0]])]
    expected = [(a + b) / 2 for a, b in zip(mine, theirs)]
    opt._local_grads = True  # as after a clean pass inside no_sync()
    for a, b in zip(mine, theirs):  # one buffer per dtype: feed the matching one
        other["flat"] = b.reshape(-1)
        opt.all_reduce_mean_([a])
    for a, e in zip(mine, expected):
        assert torch.equal(a, e)
    opt._local_grads = False  # after a synchronised pass it does nothing
    t = torch.ones(2)
    opt.all_reduce_mean_([t])
    assert torch.equal(t, torch.ones(2))


def test_validation_messages():
    params = tiny_net().parameters
    with pytest.raises(ValueError, match="Invalid rho value: -0.1"):
        samkit.SAM(params(), rho=-0.1)
    with pytest.raises(ValueError, match="Invalid eta value: -1"):
        samkit.ASAM(params(), eta=-1)
    with pytest.raises(ValueError, match="Unknown base optimizer 'sgdd'"):
        samkit.SAM(params(), "sgdd")
    with pytest.raises(TypeError, match="not an instance"):
        samkit.SAM(params(), torch.optim.SGD(params(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        samkit.SAM(params(), dict)
    with pytest.raises(ValueError, match="on_nonfinite"):
        samkit.SAM(params(), on_nonfinite="warn")
    with pytest.raises(TypeError, match="model must be"):
        samkit.SAM(params(), model="net")
    with pytest.raises(ValueError, match="Invalid rho value: -2"):
        samkit.SAM([{"params": list(params()), "rho": -2}])
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        samkit.create_optimizer("nope", params())


def test_sparse_gradients_are_rejected_clearly():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = samkit.SAM(emb.parameters(), rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(closure)


def test_batch_closure_accumulation_matches_full_batch():
    model = tiny_net()
    x, y = batches(1, size=12)[0]
    c1 = samkit.make_closure(model, loss_fn, x, y)
    l1 = c1()
    g1 = [p.grad.clone() for p in model.parameters()]
    c3 = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=5, keep_outputs=True)
    l3 = c3()
    g3 = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(l1, l3, rtol=1e-13, atol=0)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert c3.outputs.shape == (12, 3)


def test_batch_closure_subsets_per_sample_and_no_backward():
    model = tiny_net()
    x, y = batches(1, size=10)[0]
    idx = torch.arange(100, 110)
    c = samkit.make_closure(model, loss_fn, x, y, indices=idx)
    per = c.evaluate(backward=False, per_sample=True)
    torch.testing.assert_close(per, loss_fn(model(x), y).detach())
    assert all(p.grad is None for p in model.parameters())
    sub = torch.tensor([1, 4, 7])
    loss = c.evaluate(sub)
    torch.testing.assert_close(loss, mean_loss(model, x[sub], y[sub]).detach())
    seen = {}

    def extra(out, indices, targets):
        seen["indices"] = indices
        return out.pow(2).mean()

    c.evaluate(sub, extra_loss=extra)
    assert torch.equal(seen["indices"], idx[sub])
    assert c.grad_evals == pytest.approx(0.6) and c.forward_evals == pytest.approx(1.6)


def test_methods_needing_batch_closure_reject_plain_closures():
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    with pytest.raises(TypeError, match="make_closure"):
        opt.run_pass(plain_closure(opt, model, x, y), "clean", per_sample=True)


def test_per_sample_request_with_mean_loss_fn_is_explained():
    model = tiny_net()
    x, y = batches(1)[0]
    c = samkit.make_closure(model, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(ValueError, match="reduction='none'"):
        c.evaluate(per_sample=True)


def test_grad_scaler_gives_the_same_steps_as_unscaled_training():
    data = batches(4, dtype=torch.float32)
    m1, m2 = tiny_net(dtype=torch.float32), tiny_net(dtype=torch.float32)
    o1 = samkit.SAM(m1.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    o2 = samkit.SAM(m2.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    for x, y in data:
        o1.step(samkit.make_closure(m1, loss_fn, x, y))
        o2.step(samkit.make_closure(m2, loss_fn, x, y, grad_scaler=scaler))
        scaler.update()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale():
    model = tiny_net(dtype=torch.float32)
    opt = samkit.SAM(model.parameters(), rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1, dtype=torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]

    def overflowing(out, target):
        return loss_fn(out, target) * 1e38  # finite loss, overflowing scaled gradients

    opt.step(samkit.make_closure(model, overflowing, x, y, grad_scaler=scaler))
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**9
    assert opt.skipped_steps == 1 and not opt.is_perturbed


@pytest.mark.parametrize(
    "name, kw", [("sam", {}), ("gsam", {}), ("ssam", {"num_samples": 8}), ("bsam", {})]
)
def test_a_model_cast_after_a_step_is_perturbed_and_restored_in_its_new_dtype(name, kw):
    # model.double() keeps the parameters' identities: nothing cached from the float32 steps
    # (the weights' saved copy, the (device, dtype) plan) may serve the float64 ones.
    data = batches(3, dtype=torch.float32)
    model = tiny_net(dtype=torch.float32)
    opt = samkit.create_optimizer(name, model.parameters(), model=model, lr=0.1, **kw)
    opt.set_epoch(0)
    opt.step(samkit.make_closure(model, loss_fn, *data[0]))
    assert opt.samkit_state["step"] == 1
    model.double()
    fresh_model, fresh = copy.deepcopy((model, opt))  # a copy keeps no per-step scratch state
    for x, y in data[1:]:
        with torch.no_grad():  # weights with detail below float32's resolution
            for p, q in zip(model.parameters(), fresh_model.parameters()):
                p.add_(1e-12)
                q.add_(1e-12)
        opt.step(samkit.make_closure(model, loss_fn, x.double(), y))
        fresh.step(samkit.make_closure(fresh_model, loss_fn, x.double(), y))
        for p, q in zip(model.parameters(), fresh_model.parameters()):
            assert p.dtype == torch.float64
            assert torch.equal(p, q)
