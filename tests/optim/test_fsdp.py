"""FSDP2 (``fully_shard``) on CPU, gloo, 2 processes: every registered method on DTensors.

One launch runs every method (the registry at collection time, so methods added later are
covered without edits), at its class defaults with momentum and weight decay, in float64,
on an MLP whose tensors do not split evenly over the two processes (7 rows: 4 + 3), with:

* a DDP run with ``sync_ascent=True`` on the same per-process data: the FSDP2 run's gathered
  weights must equal it (FSDP2's ascent pass is always synchronised), and, for methods that
  use the whole batch as one (no sub-batches or per-sample choices), equal a single-process
  run on the whole batch;
* a run where process 1 injects a NaN loss (finite gradients) and, later, an inf loss: every
  process must skip both steps (``on_nonfinite="skip"``) and leave its shards unchanged;
* a resumed run from each process's saved shards (model and optimizer ``state_dict``) that
  continues bit-exactly;
* the collectives of a manual step (``first_step``/``second_step``): one all-reduce per norm,
  no gather of parameters or gradients;
* gradient clipping (``max_grad_norm``) with the sharded norm, and the loop kernels.

Methods that set ``fsdp_unsupported`` must refuse with a ``TypeError`` giving the reason.
"""

from __future__ import annotations

import copy
import io
import math
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import samkit
from dist_helpers import (
    PoisonedLoss,
    SubsetSAM,
    gather_full,
    launch_and_load,
    method_class,
    method_results,
)
from samkit.optim import _tensors as T

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or fully_shard is None,
        reason="torch.distributed FSDP2 unavailable",
    ),
    pytest.mark.slow,  # one launch of 2 processes for the file: about 30-60 s
]

WORLD = 2
STEPS = 5
BATCH = 8  # the whole batch; each process takes its half
#: Runs of a registered method with options, where only some of its modes run on shards:
#: label -> (method, options). SSAM's default mode refuses (per-sample gradients).
OPTION_RUNS = {"ssam-dynamic": ("ssam", {"mode": "dynamic", "epochs": 10})}
METHODS = samkit.list_optimizers(sharpness_aware=True) + [SubsetSAM.method_name] + list(OPTION_RUNS)
REGISTERED = samkit.list_optimizers(sharpness_aware=True)
#: Extra runs: (label, method, options, manual steps).
VARIANTS = [
    ("sam-loop", "sam", {"foreach": False}, False),
    ("sam-clip", "sam", {"max_grad_norm": 0.05}, False),
    ("bsam-clip", "bsam", {"max_grad_norm": 0.05}, False),
    ("sam-manual-clip", "sam", {"max_grad_norm": 0.05}, True),
]
NAN_STEP, INF_STEP = 1, 3  # the steps where process 1 injects a non-finite loss
RESUME_STEP = 3  # a checkpoint of the shards is taken before this step

#: One step per epoch from epoch 4 on, and the same samples every 3 epochs: methods that act
#: on epochs and on what they saw some epochs before (SAF's logit bank, read from epoch 6
#: with a horizon of 3 at its defaults) do so within the run.
FIRST_EPOCH = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(STEPS):
        x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (BATCH,), generator=g)
        out.append((x, y, torch.arange(BATCH) + BATCH * (step % 3)))
    return out


def _build(name: str, model: nn.Module, **options) -> samkit.SharpnessAwareOptimizer:
    """The method's class at its defaults (not the registry's tuned values)."""
    name, extra = OPTION_RUNS.get(name, (name, {}))
    options = {**extra, **options}
    cls = method_class(name)
    return cls(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, **options)


def _train(
    opt, model, part: slice, manual=False, loss_fn=None, on_step=None, start=0, stop=STEPS
) -> None:
    loss_fn = loss_fn or PoisonedLoss()
    for step, (x, y, idx) in list(enumerate(_batches()))[start:stop]:
        opt.set_epoch(FIRST_EPOCH + step)
        if on_step is not None:
            on_step(step)
        if manual:
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step(samkit.make_closure(model, loss_fn, x[part], y[part], indices=idx[part]))


def _sharded_net() -> nn.Module:
    model = _net()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.debug import CommDebugMode

    half = BATCH // world
    part = slice(rank * half, (rank + 1) * half)
    results: dict = {"methods": {}, "variants": {}}
    for name in METHODS:
        entry = results["methods"][name] = {}
        try:
            _method_runs(name, rank, part, entry)
        except Exception:  # reported by this method's tests; the other methods go on
            entry["error"] = traceback.format_exc()
    for label, name, options, manual in VARIANTS:
        model = _sharded_net()
        opt = _build(name, model, **options)
        _train(opt, model, part, manual=manual)
        entry = results["variants"][label] = {"fsdp": gather_full(model)}
        if opt.max_grad_norm is not None:
            entry["last_grad_norm"] = opt.last_grad_norm.clone()
    # The collectives of a manual SAM step on shards: all-reduces of one number, no gather.
    model = _sharded_net()
    opt = _build("sam", model, max_grad_norm=0.05)
    x, y, _ = _batches()[0]
    nn.functional.cross_entropy(model(x[part]), y[part]).backward()
    with CommDebugMode() as comm:
        opt.first_step(zero_grad=True)
    results["first_step_comms"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    nn.functional.cross_entropy(model(x[part]), y[part]).backward()
    # The reductions of samkit.optim._tensors on shards, against the gathered tensors.
    params, grads = list(model.parameters()), [p.grad for p in model.parameters()]
    full_p = [p.full_tensor() for p in params]
    full_g = [g.full_tensor() for g in grads]
    results["reductions"] = {
        "dot": (T.dot(grads, params), sum((a * b).sum() for a, b in zip(full_g, full_p))),
        "norm_loop": (T.global_norm(grads, foreach=False), _norm(full_g)),
        "norm_mixed": (T.global_norm(grads + [x]), _norm(full_g + [x])),
    }
    replicated = [g.redistribute(placements=[Replicate()]) for g in grads]  # test only
    try:
        T.dot(grads, replicated)
        results["layout_error"] = None
    except ValueError as error:
        results["layout_error"] = str(error)
    with CommDebugMode() as comm:
        opt.second_step(zero_grad=True)
    results["second_step_comms"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _method_runs(name: str, rank: int, part: slice, entry: dict) -> None:
    """DDP and FSDP2 runs of one method, and an FSDP2 run with a poisoned loss."""
    ddp = nn.parallel.DistributedDataParallel(_net())
    torch.manual_seed(100 + rank)  # per-process random draws (masks, samples)
    _train(_build(name, ddp, sync_ascent=True), ddp, part)
    entry["ddp"] = gather_full(ddp.module)
    model = _sharded_net()
    torch.manual_seed(100 + rank)
    opt = _build(name, model)
    if opt.fsdp_unsupported is not None:
        with pytest.raises(TypeError) as refusal:
            _train(opt, model, part)
        entry["refused"] = str(refusal.value)
        return
    _train(opt, model, part, stop=RESUME_STEP)
    saved = io.BytesIO()  # each process saves its shards
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    _train(opt, model, part, start=RESUME_STEP)
    entry["fsdp"] = gather_full(model)
    if hasattr(opt, "density"):  # SSAM: the fraction of the whole model's coordinates
        entry["density"] = opt.density()
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    model = _sharded_net()
    opt = _build(name, model)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    _train(opt, model, part, start=RESUME_STEP)
    entry["resumed"] = gather_full(model)
    # Process 1 poisons its loss at two steps: every process must skip both.
    model = _sharded_net()
    torch.manual_seed(100 + rank)
    opt = _build(name, model, on_nonfinite="skip")
    loss_fn = PoisonedLoss()
    shards: dict[int, list[torch.Tensor]] = {}
    only = 1 if name == SubsetSAM.method_name else None  # its sub-batch (last) pass only

    def arm(step: int) -> None:
        loss_fn.arm({NAN_STEP: math.nan, INF_STEP: math.inf}.get(step) if rank else None, only)
        shards[step] = [p.to_local().detach().clone() for p in model.parameters()]

    _train(opt, model, part, loss_fn=loss_fn, on_step=arm)
    entry["skipped"] = opt.skipped_steps
    entry["unchanged"] = [
        all(torch.equal(a, b) for a, b in zip(shards[s], shards[s + 1]))
        for s in (NAN_STEP, INF_STEP)
    ]


def _single_process(name: str, options: dict | None = None, manual: bool = False):
    model = _net()
    opt = _build(name, model, **(options or {}))
    _train(opt, model, slice(None), manual=manual)
    return [p.detach() for p in model.parameters()], opt


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return launch_and_load(_worker, WORLD, tmp_path_factory.mktemp("fsdp"))


def _close(a, b, tol=1e-10):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_fsdp2_equals_ddp_with_synchronised_ascent(fsdp, name):
    entry = method_results(fsdp[0], name)
    if "refused" in entry:
        pytest.skip(f"{name} refuses sharded parameters (tested below)")
    _close(entry["fsdp"], entry["ddp"])
    _close(method_results(fsdp[1], name)["fsdp"], entry["fsdp"], tol=0)  # one model


@pytest.mark.parametrize(
    "name",
    [n for n in REGISTERED if not samkit.get_optimizer_info(n).needs_batch_closure]
    + ["ssam-dynamic"],
)
def test_whole_batch_methods_on_fsdp2_equal_a_single_process_on_the_whole_batch(fsdp, name):
    # Methods that need a BatchClosure choose sub-batches or samples on each process's own
    # part of the batch (ESAM's top-k, AUSAM's sample, mSAM's micro-batches): sharding does
    # not change that, and the test above compares them with DDP. SSAM-D's mask comes from
    # the whole batch's gradient and seeded draws: its selection over shards is the top-k of
    # the whole model's.
    entry = method_results(fsdp[0], name)
    if "refused" in entry:
        pytest.skip(f"{name} refuses sharded parameters")
    reference, _ = _single_process(name)
    _close(entry["fsdp"], reference)
    assert any(not torch.equal(a, b) for a, b in zip(reference, _net().parameters()))


def test_ssam_dynamic_masks_on_shards_keep_k_of_the_whole_models_coordinates(fsdp):
    d = sum(p.numel() for p in _net().parameters())
    sparsity = samkit.SSAM(_net().parameters(), lr=0.1).param_groups[0]["sparsity"]
    for rank in range(WORLD):
        entry = method_results(fsdp[rank], "ssam-dynamic")
        assert entry["density"] == (d - round(d * sparsity)) / d  # not this process's count


@pytest.mark.parametrize("name", METHODS)
def test_every_method_resumes_exactly_from_sharded_state_dicts(fsdp, name):
    entry = method_results(fsdp[0], name)
    if "refused" in entry:
        pytest.skip(f"{name} refuses sharded parameters")
    for a, b in zip(entry["resumed"], entry["fsdp"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process(fsdp, name):
    for rank in range(WORLD):
        entry = method_results(fsdp[rank], name)
        if "refused" in entry:
            pytest.skip(f"{name} refuses sharded parameters")
        assert entry["skipped"] == 2, f"rank {rank} skipped {entry['skipped']} steps"
        assert entry["unchanged"] == [True, True], f"rank {rank} changed its shards"


@pytest.mark.parametrize("name", METHODS)
def test_methods_that_cannot_shard_refuse_clearly(fsdp, name):
    entry = method_results(fsdp[0], name)
    reason = method_class(OPTION_RUNS.get(name, (name,))[0]).fsdp_unsupported
    if "refused" not in entry:
        assert not isinstance(reason, str), f"{name} declares fsdp_unsupported but ran"
        return
    assert "sharded (DTensor) parameters" in entry["refused"]
    assert "FSDP2" in entry["refused"]


@pytest.mark.parametrize("label", [v[0] for v in VARIANTS])
def test_loop_kernels_clipping_and_manual_steps_on_fsdp2_equal_a_single_process(fsdp, label):
    _, name, options, manual = next(v for v in VARIANTS if v[0] == label)
    reference, opt = _single_process(name, options, manual)
    entry = fsdp[0]["variants"][label]
    _close(entry["fsdp"], reference)
    if opt.max_grad_norm is not None:  # the sharded pre-clip norm is the whole model's
        torch.testing.assert_close(entry["last_grad_norm"], opt.last_grad_norm, rtol=1e-10, atol=0)
        assert float(opt.last_grad_norm) > opt.max_grad_norm  # clipping was active


def test_a_sharded_step_gathers_nothing_and_reduces_each_norm_once(fsdp):
    for rank in range(WORLD):
        first, second = fsdp[rank]["first_step_comms"], fsdp[rank]["second_step_comms"]
        for counts in (first, second):
            assert not any("gather" in op or "scatter" in op for op in counts), counts
        # first_step: ‖g‖ (also the clean pass's finiteness check);
        # second_step: the update's pre-clip norm, then the agreed finiteness flag.
        assert sum(first.values()) == 1 and sum(second.values()) == 2, (first, second)


def test_norms_and_dot_products_of_shards_are_those_of_the_whole_tensors(fsdp):
    # The mixed list adds a plain tensor (the same on every process): it counts once.
    for rank in range(WORLD):
        for label, (got, expected) in fsdp[rank]["reductions"].items():
            assert not hasattr(got, "placements"), f"{label}: a plain tensor expected"
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=label)


def test_a_dot_product_of_differently_laid_out_lists_is_refused(fsdp):
    # Shard(0) against Replicate: the local values do not cover the same elements.
    assert "different layouts" in fsdp[0]["layout_error"]


def test_the_single_process_reference_is_not_the_initial_model():
    reference, _ = _single_process("sam")
    initial = copy.deepcopy(_net())
    assert any(not torch.equal(a, b) for a, b in zip(reference, initial.parameters()))
