"""samkit.sharpness across processes (gloo, 2 processes, one launch for the whole file).

Every measure run by two processes, each holding its share of the batches (uneven: 3 and 2
batches of different sizes), must equal one process holding all the batches in rank order
with the same seed (float64, to 1e-9 relative), bit for bit the same on both processes; the
same for a model sharded with FSDP2 (``fully_shard``: tensors of 7 rows split 4 + 3), whose
vectors stay shards laid out like the parameters (checked with ``CommDebugMode``: the vector
algebra only all-reduces, and each product gathers its vector once). Bad input raises one
clear error on every process: different seeds, a process without batches, a bad argument on
one process, a loss that fails on one process in the middle of a product, a measure that
cannot run on shards, and a process that never joins (a timeout, not a hang).
"""

from __future__ import annotations

import math
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import samkit.sharpness as S
from dist_helpers import launch_and_load

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - builds without FSDP2
    fully_shard = None

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or fully_shard is None, reason="torch.distributed FSDP2 unavailable"
    ),
    pytest.mark.slow,  # one launch of 2 processes for the file
]

WORLD = 2
SIZES = [4, 3, 5, 2, 6]  # batch sizes of the union, in rank order
SPLIT = [3, 2]  # batches per process: uneven counts and sizes
LOSS = nn.CrossEntropyLoss()
RTOL = 1e-9


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _union() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in SIZES
    ]


def _share(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    start = sum(SPLIT[:rank])
    return _union()[start : start + SPLIT[rank]]


def _vector(model: nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]


def _measures(model, data, vectors, *, sharded=False) -> dict:
    """Every measure on ``model``/``data`` (plain floats and full tensors, comparable)."""

    def full(ts):
        return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts]

    out: dict = {}
    out["gradient"] = full(S.gradient(model, LOSS, data))
    out["hvp"] = full(S.hvp(model, LOSS, data, vectors))
    eig = S.top_eigenvalues(model, LOSS, data, k=2, max_iter=40, tol=1e-10, seed=1)
    out["eig"] = (eig.eigenvalues, eig.history, eig.num_hvp, full(eig.eigenvectors[0]))
    bounded = S.top_eigenvalues(model, LOSS, data, max_iter=60, tol=1e-10, seed=1, max_vectors=4)
    out["eig_bounded"] = (bounded.eigenvalues, bounded.num_hvp)
    power = S.top_eigenvalues(model, LOSS, data, method="power", max_iter=30, seed=2)
    out["power"] = (power.eigenvalues, power.history)
    for method in ("hutchinson", "hutch++"):
        tr = S.hessian_trace(model, LOSS, data, num_samples=9, method=method, seed=4)
        out[method] = (tr.trace, tr.std_error, tr.samples)
    dens = S.spectral_density(model, LOSS, data, num_runs=2, num_iter=8, seed=5)
    out["density"] = (dens.nodes, dens.weights)
    block = S.top_eigenvalues(model, LOSS, data, params="2", max_iter=30, tol=1e-10, seed=6)
    out["block"] = block.eigenvalues
    avg = S.average_direction_sharpness(model, LOSS, data, 0.1, num_samples=3, seed=7)
    out["average"] = (avg.value, avg.std_error, avg.per_batch, avg.batch_sizes, avg.loss)
    al = S.gradient_eigenvector_alignment(model, LOSS, data, max_iter=40, tol=1e-10, seed=8)
    out["alignment"] = (al.cosine, al.eigenvalue, al.grad_norm)
    with warnings.catch_warnings():  # on shards: the per-batch notions fail, reported in errors
        warnings.simplefilter("ignore", RuntimeWarning)
        m = S.measure_all(
            model, LOSS, data, 0.05, lanczos_iter=20, trace_samples=4, worst_steps=2,
            average_samples=2, seed=9,
        )  # fmt: skip
    skip = {"seconds", "errors", "worst_direction", "ascent_direction"}  # refused on shards
    out["measure_all"] = {k: v for k, v in m.items() if k not in skip}
    out["measure_all_errors"] = sorted(m["errors"])
    if not sharded:
        for name, fn in (
            ("worst", S.worst_direction_sharpness),
            ("min", S.min_sharpness),
        ):
            r = fn(model, LOSS, data, 0.1, steps=3, seed=10)
            out[name] = (r.value, r.per_batch, r.batch_sizes, r.loss)
        r = S.ascent_direction_sharpness(model, LOSS, data, 0.1)
        out["ascent"] = (r.value, r.per_batch, r.batch_sizes, r.loss)
    return out


class _Collectives(TorchDispatchMode):
    """Counts the collectives dispatched (c10d and functional collectives), like
    ``CommDebugMode``'s counts. Used around whole measurements: ``CommDebugMode``'s module
    tracker fails on the second forward pass of a module in torch 2.13 (IndexError in
    ``_fw_set_module_hook``), so it only wraps the vector algebra below."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "c10d" in name:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _raises(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:  # the test compares the type and message on every process
        return type(e).__name__, str(e)
    return None


class _FailingLoss:
    """Cross-entropy that raises on this process at its ``at``-th call."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, out, y):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise RuntimeError("the loss failed here")
        return nn.functional.cross_entropy(out, y)


def _worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    results: dict = {}
    data = _share(rank)
    try:
        results["ddp"] = _measures(_net(), data, _vector(_net()))
        wrapped = nn.parallel.DistributedDataParallel(_net())
        results["ddp_wrapped"] = S.hessian_trace(wrapped, LOSS, data, num_samples=3).trace
        results["local"] = S.hessian_trace(
            _net(), LOSS, data, num_samples=3, distributed=False
        ).trace

        model = _net()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        vectors = [
            distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            for v, p in zip(_vector(_net()), model.parameters())
        ]
        results["fsdp"] = _measures(model, data, vectors, sharded=True)
        results["fsdp_refused"] = _raises(
            lambda: S.worst_direction_sharpness(model, LOSS, data, 0.1)
        )
        with _Collectives() as comm:
            eig = S.top_eigenvalues(model, LOSS, data, max_iter=6, tol=1e-12, seed=1)
        results["fsdp_comms"] = (dict(comm.counts), eig.num_hvp)
        space_probe = S._distributed.Space(list(model.parameters()), S._distributed.Comm("probe"))
        with CommDebugMode() as comm:
            a = space_probe.rand(torch.Generator().manual_seed(0))
            space_probe.dots(torch.stack([a, 2 * a]), a)
            space_probe.norm(a)
        results["algebra_comms"] = {str(k): v for k, v in comm.get_comm_counts().items()}
        results["local_elements"] = (a.numel(), space_probe.dim)

        # bad input: one clear error on every process
        plain = _net()
        results["seeds"] = _raises(lambda: S.hessian_trace(plain, LOSS, data, 3, seed=rank))
        results["empty"] = _raises(
            lambda: S.hessian_trace(plain, LOSS, data if rank == 0 else [], 3)
        )
        results["bad_k"] = _raises(lambda: S.top_eigenvalues(plain, LOSS, data, k=0 if rank else 1))
        results["settings"] = _raises(lambda: S.hessian_trace(plain, LOSS, data, 3 + rank))
        loss = _FailingLoss(at=2 if rank == 1 else None)
        results["mid_product"] = _raises(lambda: S.top_eigenvalues(plain, loss, data, max_iter=5))
        results["after_failures"] = S.hessian_trace(plain, LOSS, data, num_samples=3).trace
        # a process that never joins: the other one times out with a clear error (in a group
        # of its own: a gloo group is unusable after a timeout)
        group = dist.new_group(backend="gloo")
        previous = S.set_collective_timeout(3)
        if rank == 0:
            started = time.perf_counter()
            results["absent"] = _raises(
                lambda: S.hessian_trace(plain, LOSS, data, 3, distributed=group)
            )
            results["absent_seconds"] = time.perf_counter() - started
        S.set_collective_timeout(previous)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = launch_and_load(_worker, WORLD, tmp_path_factory.mktemp("sharp"))
    for r in results:
        if "error" in r:
            pytest.fail(f"a worker failed:\n{r['error']}")
    return results


@pytest.fixture(scope="module")
def single():
    """One process holding every batch, with the same seeds."""
    return _measures(_net(), _union(), _vector(_net()))


def _close(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == pytest.approx(b, rel=RTOL, abs=1e-12), path
    else:
        assert a == b, path


def _same(a, b) -> None:
    """Bit-identical results on the two processes."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


MEASURES = ["gradient", "hvp", "eig", "eig_bounded", "power", "hutchinson", "hutch++", "density",
            "block", "average", "alignment", "measure_all", "worst", "min", "ascent"]  # fmt: skip


@pytest.mark.parametrize("measure", MEASURES)
def test_data_parallel_measure_equals_one_process_on_the_union(runs, single, measure):
    _same(runs[0]["ddp"][measure], runs[1]["ddp"][measure])
    _close(runs[0]["ddp"][measure], single[measure], measure)


SHARDED = [m for m in MEASURES if m not in ("worst", "min", "ascent")]


@pytest.mark.parametrize("measure", SHARDED)
def test_fsdp2_measure_equals_one_process_on_the_union(runs, single, measure):
    _same(runs[0]["fsdp"][measure], runs[1]["fsdp"][measure])
    _close(runs[0]["fsdp"][measure], single[measure], measure)


def test_uneven_shards_are_weighted_by_their_samples(runs, single):
    # every batch of the union, in rank order, with its size
    assert runs[0]["ddp"]["worst"][2] == SIZES
    # the plain mean of the two processes' own values is not the union's
    own = [
        S.average_direction_sharpness(_net(), LOSS, _share(r), 0.1, num_samples=3, seed=7)
        for r in (0, 1)
    ]
    union = single["average"][0]
    assert abs((own[0].value + own[1].value) / 2 - union) > 1e-3 * abs(union)
    # the DDP-wrapped model is measured as the module inside, over the union
    assert runs[0]["ddp_wrapped"] == pytest.approx(
        S.hessian_trace(_net(), LOSS, _union(), num_samples=3).trace, rel=RTOL
    )


def test_ddp_wrapper_and_local_measurements(runs):
    local = [S.hessian_trace(_net(), LOSS, _share(r), 3).trace for r in (0, 1)]
    assert [runs[r]["local"] for r in (0, 1)] == pytest.approx(local, rel=1e-12)


def test_fsdp2_vectors_stay_shards_and_only_dot_products_all_reduce(runs):
    comms, hvps = runs[0]["fsdp_comms"]
    params = 4  # two weights and two biases, each sharded
    assert comms["c10d.allgather_"] == 1  # the handshake: seeds, settings, batch counts
    # the parameters once, then each product gathers its input vector (one parameter at a
    # time, as FSDP's forward does) and reduce-scatters its result into shards
    assert comms["_c10d_functional.all_gather_into_tensor"] == params * (1 + hvps)
    assert comms["_c10d_functional.reduce_scatter_tensor"] == params * hvps
    # one all-reduce per product (sample count, failure flag) and three per Lanczos step
    # (two reorthogonalisation passes, one norm), plus the start's and the result's norms
    assert comms["c10d.allreduce_"] == 4 * hvps + 2
    assert set(comms) <= {
        "c10d.allgather_", "c10d.allreduce_", "_c10d_functional.all_gather_into_tensor",
        "_c10d_functional.reduce_scatter_tensor", "_c10d_functional.wait_tensor",
        "_c10d_functional._wrap_tensor_autograd",
    }, comms  # fmt: skip
    # CommDebugMode on the vector algebra (a random vector, dot products, a norm): one
    # all-reduce per reduction, nothing gathered
    assert runs[0]["algebra_comms"] == {"c10d.allreduce_": 2}
    local, dim = runs[0]["local_elements"]
    assert local < dim  # this process holds only its shards
    assert runs[0]["local_elements"][0] + runs[1]["local_elements"][0] == dim


def test_a_measure_that_cannot_run_on_shards_says_so_on_every_process(runs):
    for r in runs:
        kind, message = r["fsdp_refused"]
        assert kind == "TypeError" and "sharded" in message
    assert runs[0]["fsdp"]["measure_all_errors"] == ["ascent_direction", "worst_direction"]


def test_different_seeds_raise_on_every_process(runs):
    for r in runs:
        kind, message = r["seeds"]
        assert kind == "ValueError" and "seed differs between processes ([0, 1] by rank)" in message


def test_a_process_without_batches_raises_on_every_process(runs):
    for r in runs:
        kind, message = r["empty"]
        assert kind == "ValueError" and "process(es) [1] have no batch" in message


def test_a_bad_argument_on_one_process_raises_on_every_process(runs):
    assert runs[1]["bad_k"][0] == "ValueError" and "k must be >= 1" in runs[1]["bad_k"][1]
    assert runs[0]["bad_k"][0] == "ValueError"
    assert "on process 1" in runs[0]["bad_k"][1] and "k must be >= 1" in runs[0]["bad_k"][1]
    for r in runs:
        assert r["settings"][0] == "ValueError" and "settings differ" in r["settings"][1]


def test_a_failure_inside_a_product_raises_on_every_process(runs):
    assert runs[1]["mid_product"] == ("RuntimeError", "the loss failed here")
    kind, message = runs[0]["mid_product"]
    assert (
        kind == "PeerError" and "process 1 failed" in message and "the loss failed here" in message
    )
    # and the processes go on measuring together afterwards
    assert runs[0]["after_failures"] == runs[1]["after_failures"]


def test_a_process_that_never_joins_gives_a_timeout_error_not_a_hang(runs):
    kind, message = runs[0]["absent"]
    assert kind == "PeerError" and "waited 3 s" in message and "every rank" in message
    assert runs[0]["absent_seconds"] < 30
