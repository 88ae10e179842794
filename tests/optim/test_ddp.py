"""DistributedDataParallel on CPU (gloo, 2 processes): every method keeps the replicas identical.

One launch for the whole file (see ``dist_helpers``). In it:

* every registered method (the registry at collection time: methods added later are covered
  without edits) and a test-local method whose last pass runs on a sub-batch, at the class
  defaults with momentum and weight decay, on a model with BatchNorm and dropout, per-process
  random draws, dataset indices and ``set_epoch``, for both ``sync_ascent`` settings: the
  replicas stay bit-identical; with ``sync_ascent=True`` and the gradients as views into
  DDP's buckets (``gradient_as_bucket_view=True``) every method gives the same weights. In the ``sync_ascent=False`` run, process 1 makes its loss
  NaN (finite gradients) at one step and inf at another: every process skips both steps
  (``on_nonfinite="skip"``) and leaves its weights unchanged;
* SAM's ascent is the replica's own by default, synchronised with ``sync_ascent=True``, and
  then the run equals a single process on the whole batch (also with gradient accumulation
  over uneven micro-batches, and with gradient clipping, through ``step`` and through
  ``first_step``/``second_step``).
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import samkit
from dist_helpers import PoisonedLoss, SubsetSAM, launch_and_load, method_class, method_results

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.slow,  # one launch of 2 processes for the file: about 30-60 s
]

WORLD = 2
METHODS = samkit.list_optimizers(sharpness_aware=True) + [SubsetSAM.method_name]
STEPS = 6
NAN_STEP, INF_STEP = 2, 4  # process 1 poisons its loss there (sync_ascent=False run)
#: Runs compared with a single process on the whole batch: (label, method, options, manual).
EXACT = [
    ("sam", "sam", {}, False),
    ("sam-accumulation", "sam", {"accumulation_steps": 3}, False),
    ("bsam-accumulation", "bsam", {"accumulation_steps": 3}, False),
    ("sam-clip", "sam", {"max_grad_norm": 0.05}, False),
    ("bsam-clip", "bsam", {"max_grad_norm": 0.05}, False),
    ("sam-manual-clip", "sam", {"max_grad_norm": 0.05}, True),
]
#: The run with ``gradient_as_bucket_view=True`` (and ``sync_ascent=True``): every pass's
#: gradients are views into DDP's buckets, which the next synchronised pass overwrites.
BUCKET_VIEW = "bucket_view"
HALF = 8  # samples per process: 3 micro-batches of 3, 3, 2 under accumulation

#: One step per epoch from epoch 4 on, and the same samples every 3 epochs: methods that act
#: on epochs and on what they saw some epochs before (SAF's logit bank, read from epoch 6
#: with a horizon of 3 at its defaults) do so within the run.
FIRST_EPOCH = 4


def _net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if bn:
        layers += [nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2)]
    else:
        layers += [nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 3)).double()


def _batches(steps: int = STEPS):
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(steps):
        x = torch.randn(WORLD * HALF, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (WORLD * HALF,), generator=g)
        out.append((x, y, torch.arange(WORLD * HALF) + WORLD * HALF * (step % 3)))
    return out


def _build(label: str, model: nn.Module, **options):
    """The method's class at its defaults (not the registry's tuned values)."""
    cls = method_class(label)
    return cls(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, **options)


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _train(opt, model, part, steps=STEPS, loss_fn=None, on_step=None, manual=False, **closure_kw):
    loss_fn = loss_fn or PoisonedLoss()
    for step, (x, y, idx) in enumerate(_batches(steps)):
        opt.set_epoch(FIRST_EPOCH + step)
        if on_step is not None:
            on_step(step)
        if manual:
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.second_step(zero_grad=True)
        else:
            closure = samkit.make_closure(
                model, loss_fn, x[part], y[part], indices=idx[part], **closure_kw
            )
            opt.step(closure)


def _worker(rank: int, world: int, out_dir: str) -> None:
    part = slice(rank * HALF, (rank + 1) * HALF)
    results: dict = {"methods": {}, "exact": {}}
    for label in METHODS:
        entry = results["methods"][label] = {}
        try:
            _replica_runs(label, rank, part, entry)
        except Exception:  # reported by this method's tests; the other methods go on
            entry["error"] = traceback.format_exc()
    # SAM's perturbation: the replica's own by default.
    model = nn.parallel.DistributedDataParallel(_net())
    opt = samkit.SAM(model.parameters(), rho=0.1, lr=0.1, momentum=0.9)
    x, y, _ = _batches()[0]
    closure = samkit.make_closure(model, PoisonedLoss(), x[part], y[part])
    before = _state(model)
    opt.run_pass(closure, "clean")
    opt.perturb()
    results["local_eps"] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    opt.restore()
    # on_nonfinite="raise": process 1's NaN loss makes both processes raise.
    model = nn.parallel.DistributedDataParallel(_net())
    opt = samkit.SAM(model.parameters(), lr=0.1)
    loss_fn = PoisonedLoss()
    loss_fn.arm(math.nan if rank == 1 else None)
    try:
        opt.step(samkit.make_closure(model, loss_fn, x[part], y[part]))
        results["raised"] = None
    except samkit.NonFiniteError as error:
        results["raised"] = str(error)
    results["raise_unchanged"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), _net().parameters())
    )
    for label, name, options, manual in EXACT:
        model = nn.parallel.DistributedDataParallel(_net())
        closure_kw = {k: v for k, v in options.items() if k == "accumulation_steps"}
        opt_kw = {k: v for k, v in options.items() if k != "accumulation_steps"}
        opt = _build(name, model, sync_ascent=True, **opt_kw)
        _train(opt, model, part, manual=manual, **closure_kw)
        results["exact"][label] = {"params": _state(model), "norm": opt.last_grad_norm}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _replica_runs(label: str, rank: int, part: slice, entry: dict) -> None:
    """Both sync_ascent settings, the first with process 1 poisoning two steps; then
    sync_ascent=True again with the gradients as views into DDP's buckets."""
    for run in (False, True, BUCKET_VIEW):
        views = run == BUCKET_VIEW
        sync_ascent = True if views else run
        model = nn.parallel.DistributedDataParallel(_net(bn=True), gradient_as_bucket_view=views)
        torch.manual_seed(100 + rank)  # per-process random draws (dropout, masks, samples)
        poisoned = not sync_ascent
        opt = _build(
            label, model, sync_ascent=sync_ascent, on_nonfinite="skip" if poisoned else "raise"
        )
        loss_fn = PoisonedLoss()
        weights: dict[int, list[torch.Tensor]] = {}
        # The test-local method is poisoned in its sub-batch (last) pass only.
        only = 1 if label == SubsetSAM.method_name else None

        def arm(step: int, model=model, loss_fn=loss_fn, weights=weights, only=only) -> None:
            bad = {NAN_STEP: math.nan, INF_STEP: math.inf}.get(step) if rank == 1 else None
            loss_fn.arm(bad, only)
            weights[step] = [p.detach().clone() for p in model.parameters()]

        _train(opt, model, part, loss_fn=loss_fn, on_step=arm if poisoned else None)
        # Parameters only: BatchNorm running statistics differ between DDP replicas after a
        # forward pass (each updates rank 0's broadcast values with its own batch), as in
        # plain DDP; samkit's frozen statistics in perturbed passes do not change that.
        entry[run] = [p.detach().clone() for p in model.parameters()]
        if poisoned:
            entry["skipped"] = opt.skipped_steps
            entry["unchanged"] = [
                all(torch.equal(a, b) for a, b in zip(weights[s], weights[s + 1]))
                for s in (NAN_STEP, INF_STEP)
            ]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launch_and_load(_worker, WORLD, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("sync_ascent", [False, True], ids=["local_ascent", "sync_ascent"])
@pytest.mark.parametrize("label", METHODS)
def test_every_method_keeps_the_replicas_bit_identical(ddp, label, sync_ascent):
    r0, r1 = (method_results(ddp[r], label)[sync_ascent] for r in range(WORLD))
    for a, b in zip(r0, r1, strict=True):
        assert torch.equal(a, b)
    initial = _net(bn=True).parameters()
    assert any(not torch.equal(a, b) for a, b in zip(r0, initial))  # it trained


@pytest.mark.parametrize("label", METHODS)
def test_gradients_as_bucket_views_change_nothing(ddp, label):
    # A method that keeps a clean gradient by reference past a synchronised pass reads the
    # next pass's gradient instead (F-SAM's average did, issue 20.6): the runs would differ.
    for rank in range(WORLD):
        entry = method_results(ddp[rank], label)
        for a, b in zip(entry[BUCKET_VIEW], entry[True], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("label", METHODS)
def test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process(ddp, label):
    # Process 1's NaN loss comes with finite gradients: only the agreed check can see it.
    for rank in range(WORLD):
        entry = method_results(ddp[rank], label)
        assert entry["skipped"] == 2, f"rank {rank} skipped {entry['skipped']} steps"
        assert entry["unchanged"] == [True, True], f"rank {rank} changed its weights"


def test_ddp_default_ascent_is_local_and_update_is_synchronised(ddp):
    # replicas perturb with their own half-batch gradient (m-sharpness, as original SAM) ...
    assert not torch.allclose(ddp[0]["local_eps"][0], ddp[1]["local_eps"][0])
    # ... but the update is all-reduced: the replicas stay identical
    for a, b in zip(method_results(ddp[0], "sam")[False], method_results(ddp[1], "sam")[False]):
        assert torch.equal(a, b)


def test_a_nonfinite_loss_on_one_process_raises_on_every_process(ddp):
    assert "clean pass" in ddp[1]["raised"]  # the process whose loss was NaN names the pass
    assert "another process" in ddp[0]["raised"]  # the other one says where it was
    assert ddp[0]["raise_unchanged"] and ddp[1]["raise_unchanged"]


def _single_process(name, options, manual):
    model = _net()
    closure_kw = {k: v for k, v in options.items() if k == "accumulation_steps"}
    opt_kw = {k: v for k, v in options.items() if k != "accumulation_steps"}
    opt = _build(name, model, **opt_kw)
    _train(opt, model, slice(None), manual=manual, **closure_kw)
    return _state(model), opt


@pytest.mark.parametrize("label", [e[0] for e in EXACT])
def test_ddp_with_sync_ascent_equals_single_process_full_batch(ddp, label):
    # Accumulation: only the last micro-batch may synchronise (an all-reduce on another one
    # leaves the later micro-batches' gradients local and the replicas apart); clipping:
    # the norm is that of the all-reduced gradient, the same on every replica.
    _, name, options, manual = next(e for e in EXACT if e[0] == label)
    reference, opt = _single_process(name, options, manual)
    r0, r1 = ddp[0]["exact"][label], ddp[1]["exact"][label]
    for a, b, c in zip(r0["params"], r1["params"], reference, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)
    if opt.max_grad_norm is not None:
        torch.testing.assert_close(r0["norm"], opt.last_grad_norm, rtol=1e-12, atol=0)
        assert float(opt.last_grad_norm) > opt.max_grad_norm  # clipping was active
