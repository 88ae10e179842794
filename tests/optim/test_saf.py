"""SAF against a naive float64 reference: the trajectory term, the logit bank, resume, faults."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import loss_fn, tiny_net
from samkit.optim.saf import trajectory_kl

LR, MOM, WD = 0.1, 0.9, 5e-3
N = 24  # dataset size
B = 8


def dataset(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (N,), generator=g
    )


def epochs_of(n_epochs: int, seed: int = 2, drop=None):
    """Per epoch, the shuffled batches of dataset indices; ``drop[e]`` leaves samples out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(n_epochs):
        order = torch.randperm(N, generator=g)
        if drop and e in drop:
            order = order[~torch.isin(order, torch.tensor(drop[e]))]
        out.append([order[i : i + B] for i in range(0, len(order), B)])
    return out


def train(opt, model, plan, x, y, first_epoch=0, **closure_kw):
    for e, batches in enumerate(plan, start=first_epoch):
        opt.set_epoch(e)
        for idx in batches:
            opt.step(samkit.make_closure(model, loss_fn, x[idx], y[idx], indices=idx, **closure_kw))


def naive_saf(model, plan, x, y, lmbda, tau, start, horizon):
    """SAF written out: a dict of past logits, the term by autograd, SGD (momentum, wd)."""
    params = list(model.parameters())
    bank: dict[tuple[int, int], torch.Tensor] = {}
    bufs = None
    for e, batches in enumerate(plan):
        for idx in batches:
            z = model(x[idx])
            loss = nn.functional.cross_entropy(z, y[idx])
            if e >= start:
                terms = []
                for row, i in enumerate(idx.tolist()):
                    old = bank.get((i, e - horizon))
                    if old is None:
                        continue
                    q = torch.softmax(old / tau, -1)
                    p_log = torch.log_softmax(z[row] / tau, -1)
                    terms.append((q * (torch.log(q) - p_log)).sum())
                if terms:
                    loss = loss + lmbda * tau**2 * torch.stack(terms).sum() / len(idx)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                d = [g + WD * p for g, p in zip(grads, params)]
                bufs = d if bufs is None else [MOM * b + di for b, di in zip(bufs, d)]
                for p, b in zip(params, bufs):
                    p.sub_(LR * b)
            if e >= start - horizon:
                for row, i in enumerate(idx.tolist()):
                    bank[(i, e)] = z[row].detach().clone()
    return bank


def make(model, **kw):
    kw = {"lr": LR, "momentum": MOM, "weight_decay": WD, **kw}
    return samkit.SAF(model.parameters(), **kw)


# ----------------------------------------------------------------------------- the term
def test_trajectory_kl_and_its_gradient_match_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 4, generator=g, dtype=torch.float64)
    tau = 3.0
    kl = trajectory_kl(z, r, tau)
    q = torch.softmax(r / tau, -1)
    p = torch.softmax(z.detach() / tau, -1)
    torch.testing.assert_close(kl, (q * (q.log() - p.log())).sum(-1), rtol=1e-13, atol=1e-15)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    # d KL(q || softmax(z/tau)) / dz = (p - q) / tau; the reference gets no gradient
    torch.testing.assert_close(grad, (p - q) / tau, rtol=1e-12, atol=1e-14)
    valid = torch.tensor([True, False, True, True, False, True])
    masked = trajectory_kl(z, r, tau, valid)
    assert torch.equal(masked[~valid], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(masked[valid], kl[valid])


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_saf_equals_naive_reference_float64(accumulation_steps):
    x, y = dataset()
    # 6 epochs x 3 steps; epoch 3 leaves two samples out, so epoch 4 finds no record for them
    plan = epochs_of(6, drop={3: [0, 5]})
    hp = dict(lmbda=0.7, tau=2.0, start_epoch=2, horizon=1)
    m_ref, m = tiny_net(), tiny_net()
    bank = naive_saf(m_ref, plan, x, y, hp["lmbda"], hp["tau"], hp["start_epoch"], hp["horizon"])
    opt = make(m, **hp)
    train(opt, m, plan, x, y, accumulation_steps=accumulation_steps)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    # the bank holds the last horizon + 1 epochs of each recorded sample
    values, tags = opt.bank.values, opt.bank.epochs
    for i in range(N):
        for slot in range(2):
            e = int(tags[i, slot])
            if e < 0:
                continue
            torch.testing.assert_close(values[i, slot], bank[(i, e)], rtol=1e-12, atol=1e-13)
    assert {int(t) for t in tags[0]} == {4, 5} and {int(t) for t in tags[5]} == {4, 5}


def test_before_start_epoch_and_with_lmbda_zero_saf_is_plain_sgd():
    x, y = dataset()
    plan = epochs_of(4)
    m1, m2, m3 = tiny_net(), tiny_net(), tiny_net()
    train(make(m1, start_epoch=4, horizon=1), m1, plan, x, y)
    train(make(m2, lmbda=0.0, start_epoch=1, horizon=1), m2, plan, x, y)
    sgd = torch.optim.SGD(m3.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    for batches in plan:
        for idx in batches:
            sgd.step(samkit.make_closure(m3, loss_fn, x[idx], y[idx]))
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_the_term_is_active_only_with_an_old_enough_record():
    x, y = dataset()
    plan = epochs_of(3)
    m1, m2 = tiny_net(), tiny_net()
    train(make(m1, start_epoch=2, horizon=1), m1, plan, x, y)
    train(make(m2, start_epoch=3, horizon=1), m2, plan, x, y)
    # the same up to epoch 2's first step, where m1's term starts
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


# ----------------------------------------------------------------------------- the bank
def test_bank_grows_with_the_largest_index_and_keeps_the_logits_dtype():
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1)
    x, y = dataset()
    opt.set_epoch(0)
    assert opt.bank.nbytes == 0
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.tensor([0, 1, 2, 3])))
    assert opt.bank.values.shape[1:] == (2, 3) and opt.bank.values.dtype == torch.float64
    assert opt.bank.size == 4
    far = torch.tensor([5000, 7, 8, 9])
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=far))
    assert opt.bank.size == 5001
    assert 5001 <= opt.bank.values.shape[0] <= 5001 * 1.25 + 1024
    assert opt.bank.nbytes == opt.bank.values.nbytes + opt.bank.epochs.nbytes
    # a lower-precision bank stores the logits rounded to it
    m2 = tiny_net()
    opt2 = make(m2, start_epoch=1, horizon=1, bank_dtype=torch.float16)
    opt2.set_epoch(0)
    before = m2(x[:4]).detach()
    opt2.step(samkit.make_closure(m2, loss_fn, x[:4], y[:4], indices=torch.arange(4)))
    assert opt2.bank.values.dtype == torch.float16
    assert torch.equal(opt2.bank.values[:4, 0], before.half())


def test_an_announced_bank_size_is_allocated_once():
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1, bank_rows=30)
    x, y = dataset()
    opt.set_epoch(0)
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.tensor([0, 1, 2, 3])))
    assert opt.bank.values.shape[0] == 30 and opt.bank.size == 4
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.tensor([29, 4, 5, 6])))
    assert opt.bank.values.shape[0] == 30 and opt.bank.size == 30
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.tensor([30, 7, 8, 9])))
    assert opt.bank.values.shape[0] > 30 and opt.bank.size == 31  # still grows when needed
    with pytest.raises(ValueError, match="Invalid bank_rows value: 0"):
        make(m, bank_rows=0)


def test_a_bank_that_grows_keeps_its_earlier_records_and_their_epochs():
    # The first allocation holds 4 rows; growing copies values and epoch tags, so the
    # records of epoch 0 made before the growth are still found (and valid) in epoch 1.
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1, bank_rows=4)
    x, y = dataset()
    opt.set_epoch(0)
    first = torch.arange(4)
    logits = m(x[first]).detach()
    opt.step(samkit.make_closure(m, loss_fn, x[first], y[first], indices=first))
    assert opt.bank.values.shape[0] == 4
    opt.set_epoch(1)  # a record of epoch 1 goes to the other slot; epoch 0's must stay
    later = torch.tensor([10, 4, 5, 6])
    opt.step(samkit.make_closure(m, loss_fn, x[later], y[later], indices=later))
    assert opt.bank.values.shape[0] > 10  # grown past the first allocation
    assert opt.bank.epochs[:4, 0].tolist() == [0, 0, 0, 0]
    assert torch.equal(opt.bank.values[:4, 0], logits)
    ref, valid = opt.bank.read(first, 0, logits)
    assert valid.all() and torch.equal(ref, logits)
    assert opt.bank.epochs[4:7, 1].tolist() == [1, 1, 1] and opt.bank.epochs[7:10].eq(-1).all()


def test_nothing_is_recorded_before_it_can_be_read():
    x, y = dataset()
    m = tiny_net()
    opt = make(m, start_epoch=5, horizon=2)
    train(opt, m, epochs_of(3), x, y)  # epochs 0-2 < start_epoch - horizon
    assert opt.bank.nbytes == 0
    train(opt, m, epochs_of(1), x, y, first_epoch=3)
    assert opt.bank.size == N and set(opt.bank.epochs[:N, 0].tolist()) == {3}


def test_duplicate_indices_in_a_batch_record_the_first_occurrence():
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1)
    x, y = dataset()
    opt.set_epoch(0)
    idx = torch.tensor([3, 1, 3, 2])
    logits = m(x[:4]).detach()
    opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=idx))
    assert torch.equal(opt.bank.values[3, 0], logits[0])


# ----------------------------------------------------------------------------- state
def test_resume_with_a_populated_bank_continues_exactly():
    x, y = dataset()
    plan = epochs_of(5)
    hp = dict(start_epoch=2, horizon=1, lmbda=0.5)
    m = tiny_net()
    opt = make(m, **hp)
    train(opt, m, plan[:3], x, y)
    assert opt.bank.size == N
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    train(opt, m, plan[3:], x, y, first_epoch=3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_net(seed=9)
    m2.load_state_dict(ck["model"])
    opt2 = make(m2, **hp)
    opt2.load_state_dict(ck["opt"])
    assert opt2.bank.size == N and opt2.epoch == 2
    train(opt2, m2, plan[3:], x, y, first_epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert torch.equal(opt.bank.values[:N], opt2.bank.values[:N])


def test_a_bank_saved_with_another_horizon_is_refused():
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1)
    x, y = dataset()
    train(opt, m, epochs_of(1), x, y)
    other = make(tiny_net(), start_epoch=1, horizon=2)
    with pytest.raises(ValueError, match="horizon"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nan_leaves_the_bank_and_weights_untouched(mode):
    x, y = dataset()
    m = tiny_net()
    opt = make(m, start_epoch=1, horizon=1, on_nonfinite=mode)
    plan = epochs_of(2)
    train(opt, m, plan, x, y)
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in m.parameters()]
    idx = plan[1][0]
    opt.set_epoch(2)
    nan_loss = lambda out, t: loss_fn(out, t) * float("nan")  # noqa: E731
    closure = samkit.make_closure(m, nan_loss, x[idx], y[idx], indices=idx)
    if mode == "raise":
        with pytest.raises(samkit.NonFiniteError, match="SAF: non-finite .* clean pass"):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))
    bank = opt.bank.state_dict()
    assert bank["size"] == state["saf_bank"]["size"] == N
    assert torch.equal(bank["values"], state["saf_bank"]["values"])
    assert torch.equal(bank["epochs"], state["saf_bank"]["epochs"])


# ----------------------------------------------------------------------------- checked early
class SequenceModel(nn.Module):
    """Per-token logits ``[B, V, T]`` (a sequence model), float64."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        return torch.stack([self.net(x), self.net(-x)], dim=-1)  # [B, 3, 2]


def test_outputs_that_are_not_batch_by_class_logits_fail_at_the_first_step():
    # The term needs [batch, classes] logits; found at epoch 0, not at start_epoch - horizon.
    m = SequenceModel()
    x, y = dataset()
    tokens = torch.stack([y, y], dim=-1)[:4]  # [B, T] targets
    opt = samkit.SAF(m.parameters(), lr=LR)  # start_epoch 6, horizon 3
    opt.set_epoch(0)
    closure = samkit.make_closure(m, loss_fn, x[:4], tokens, indices=torch.arange(4))
    with pytest.raises(TypeError, match=r"SAF's trajectory loss needs .* \[batch, classes\]"):
        opt.step(closure)
    assert opt.state_dict()["samkit"]["step"] == 0  # refused before the update


def test_a_sample_seen_twice_in_an_epoch_warns_that_set_epoch_was_forgotten():
    x, y = dataset()
    m = tiny_net()
    opt = make(m)  # start_epoch 6: epochs 0-2 are plain steps, the check runs all the same
    plan = epochs_of(3)
    opt.set_epoch(0)  # ... and never again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first epoch: every sample once, no warning
        for idx in plan[0]:
            opt.step(samkit.make_closure(m, loss_fn, x[idx], y[idx], indices=idx))
    with pytest.warns(samkit.RepeatedSampleWarning, match=r"already seen in epoch 0: call") as w:
        for batches in plan[1:]:
            for idx in batches:
                opt.step(samkit.make_closure(m, loss_fn, x[idx], y[idx], indices=idx))
    assert len(w) == 1  # once per epoch value
    # A loop that calls set_epoch, and repeats inside one batch, never warn.
    m2 = tiny_net()
    opt2 = make(m2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(opt2, m2, plan, x, y)
        opt2.set_epoch(3)
        twice = torch.tensor([1, 1, 2, 2])
        opt2.step(samkit.make_closure(m2, loss_fn, x[twice], y[twice], indices=twice))


def test_a_failed_step_does_not_count_its_samples_as_seen():
    x, y = dataset()
    m = tiny_net()
    opt = make(m, on_nonfinite="skip")
    opt.set_epoch(0)
    idx = torch.arange(4)
    nan_loss = lambda out, t: loss_fn(out, t) * float("nan")  # noqa: E731
    opt.step(samkit.make_closure(m, nan_loss, x[idx], y[idx], indices=idx))
    assert opt.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the retried batch is not a repeat
        opt.step(samkit.make_closure(m, loss_fn, x[idx], y[idx], indices=idx))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lmbda": -0.1}, "Invalid lmbda value: -0.1"),
        ({"tau": 0.0}, "Invalid tau value: 0.0"),
        ({"start_epoch": 0}, "Invalid start_epoch value: 0"),
        ({"horizon": 0}, "Invalid horizon value: 0"),
        ({"horizon": 1.5}, "Invalid horizon value: 1.5"),
    ],
)
def test_invalid_hyperparameters(kw, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_net(), **kw)


def test_loss_term_settings_must_agree_across_groups():
    m = tiny_net()
    with pytest.raises(ValueError, match="Invalid horizon value: 2 in a param group"):
        samkit.SAF([{"params": m[0].parameters()}, {"params": m[2].parameters(), "horizon": 2}])
    with pytest.raises(TypeError, match="bank_dtype"):
        make(m, bank_dtype=torch.int32)


def test_clear_errors_for_missing_inputs():
    m = tiny_net()
    x, y = dataset()
    opt = make(m)
    closure = samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.arange(4))
    with pytest.raises(RuntimeError, match=r"set_epoch"):
        opt.step(closure)
    opt.set_epoch(0)
    with pytest.raises(TypeError, match="indices=idx"):
        opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4]))
    with pytest.raises(TypeError, match="make_closure"):
        opt.step(lambda: loss_fn(m(x[:4]), y[:4]).mean())
    with pytest.raises(TypeError, match="1-D integer"):
        opt.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.ones(4)))
    late = make(m, start_epoch=1, horizon=1)
    late.set_epoch(0)
    with pytest.raises(ValueError, match="indices must be >= 0, got -1"):
        late.step(samkit.make_closure(m, loss_fn, x[:4], y[:4], indices=torch.arange(-1, 3)))
    with pytest.raises(RuntimeError, match="one pass per step"):
        opt.first_step()


def test_registry_entry_builds_the_paper_defaults():
    info = samkit.get_optimizer_info("saf")
    assert info.cls is samkit.SAF and info.passes == 1.0 and info.needs_batch_closure
    opt = samkit.create_optimizer("saf", tiny_net().parameters(), lr=0.1)
    group = opt.param_groups[0]
    assert (group["lmbda"], group["tau"], group["start_epoch"], group["horizon"]) == (
        0.3,
        5.0,
        6,
        3,
    )
    assert opt.needs_epoch


# ----------------------------------------------------------------------------- DDP
# One 2-process gloo run for the three methods with long-lived state (SAF's bank, MESA's
# average, SSAM's masks): each replica trains on its half of every batch.
def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import os

    results = {}
    for name, kw in _DDP_RUNS.items():
        model = nn.parallel.DistributedDataParallel(tiny_net(bn=name == "mesa"))
        opt = samkit.create_optimizer(
            name.split("-")[0], model.parameters(), lr=LR, momentum=MOM, **kw
        )
        x, y = dataset()
        for e, batches_ in enumerate(epochs_of(3)):
            opt.set_epoch(e)
            for idx in batches_:
                half = idx[rank * 4 : rank * 4 + 4]
                opt.step(samkit.make_closure(model, loss_fn, x[half], y[half], indices=half))
        results[name] = {
            "params": [p.detach() for p in model.parameters()],
            "state": opt.state_dict(),
        }
    results["mesa-fsdp"], results["mesa-ddp-own-bn"] = _mesa_sharded(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _mesa_sharded(rank: int):
    """MESA with BatchNorm on FSDP2 and, as its reference, on DDP without buffer broadcasts.

    FSDP2 leaves each process's BatchNorm statistics its own (DDP broadcasts the first
    replica's by default): the reference DDP run does the same (``broadcast_buffers=False``).
    """
    from torch.distributed.fsdp import fully_shard

    x, y = dataset()
    out = []
    for sharded in (True, False):
        net = tiny_net(bn=True)
        if sharded:
            fully_shard(net[0])  # 7 rows over 2 processes: 4 + 3
            model = fully_shard(net)  # the root keeps the BatchNorm and the last layer
        else:
            model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
        opt = samkit.MESA(model.parameters(), lr=LR, momentum=MOM, **_DDP_RUNS["mesa"])
        for e, batches_ in enumerate(epochs_of(3)):
            opt.set_epoch(e)
            for idx in batches_:
                half = idx[rank * 4 : rank * 4 + 4]
                opt.step(samkit.make_closure(model, loss_fn, x[half], y[half]))

        def whole(t):
            return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()

        out.append(
            {
                "params": [whole(p) for p in net.parameters()],
                "ema": {k: whole(v) for k, v in opt.state_dict()["mesa_ema"].items()},
                "no_ema_model": opt.ema_model is None,
            }
        )
    return out


_DDP_RUNS = {
    "saf": dict(start_epoch=1, horizon=1),
    "mesa": dict(start_epoch=1, decay=0.5),
    "ssam": dict(num_samples=4),
    "ssam-dynamic": dict(mode="dynamic", epochs=3),
}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    from dist_helpers import launch

    out = tmp_path_factory.mktemp("ddp_state")
    launch(_ddp_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow  # two spawned processes (a few seconds on an idle machine)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_replicas_keep_identical_banks_averages_and_masks(ddp_runs):
    r0, r1 = ddp_runs
    for name in _DDP_RUNS:
        for a, b in zip(r0[name]["params"], r1[name]["params"]):
            assert torch.equal(a, b), name
    bank0, bank1 = r0["saf"]["state"]["saf_bank"], r1["saf"]["state"]["saf_bank"]
    assert bank0["size"] == N and torch.equal(bank0["values"], bank1["values"])
    assert torch.equal(bank0["epochs"], bank1["epochs"])
    assert set(bank0["epochs"].flatten().tolist()) == {1, 2}  # every sample, both epochs kept
    ema0, ema1 = r0["mesa"]["state"]["mesa_ema"], r1["mesa"]["state"]["mesa_ema"]
    assert all(torch.equal(ema0[k], ema1[k]) for k in ema0)  # BatchNorm statistics included
    for name in ("ssam", "ssam-dynamic"):
        s0, s1 = r0[name]["state"]["state"], r1[name]["state"]["state"]
        assert s0.keys() == s1.keys() and all("mask" in s0[k] for k in s0)
        assert all(torch.equal(s0[k]["mask"], s1[k]["mask"]) for k in s0)


@pytest.mark.slow  # two spawned processes (a few seconds on an idle machine)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp2_mesa_with_batchnorm_equals_ddp(ddp_runs):
    # The average is swapped into the sharded model for its forward (with the averaged
    # BatchNorm statistics) and its BatchNorm statistics are averaged over the mesh.
    for run in ddp_runs:
        fsdp, ddp = run["mesa-fsdp"], run["mesa-ddp-own-bn"]
        assert fsdp["no_ema_model"] and not ddp["no_ema_model"]  # no copy of a sharded model
        for a, b in zip(fsdp["params"], ddp["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert list(fsdp["ema"]) == list(ddp["ema"])
        for key in ddp["ema"]:
            torch.testing.assert_close(fsdp["ema"][key], ddp["ema"][key], rtol=1e-10, atol=1e-10)
            assert torch.equal(fsdp["ema"][key], ddp_runs[0]["mesa-fsdp"]["ema"][key]), key
    assert not torch.equal(ddp["ema"]["1.running_mean"], torch.zeros(7))
    # The averaged statistics differ from those of DDP's default buffer broadcasts, so the
    # comparison above sees them.
    other = ddp_runs[0]["mesa"]["state"]["mesa_ema"]["1.running_mean"]
    assert not torch.allclose(ddp["ema"]["1.running_mean"], other, rtol=1e-6, atol=0)


@pytest.mark.slow  # two spawned processes (a few seconds on an idle machine)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_saf_equals_single_process_saf_on_the_whole_batch(ddp_runs):
    x, y = dataset()
    m = tiny_net()
    opt = samkit.SAF(m.parameters(), lr=LR, momentum=MOM, **_DDP_RUNS["saf"])
    train(opt, m, epochs_of(3), x, y)
    for a, b in zip(ddp_runs[0]["saf"]["params"], m.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-13)
    bank = ddp_runs[0]["saf"]["state"]["saf_bank"]
    assert torch.equal(bank["epochs"], opt.bank.epochs[:N])
    torch.testing.assert_close(bank["values"], opt.bank.values[:N], rtol=1e-12, atol=1e-13)
