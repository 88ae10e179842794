"""ESAM and AUSAM under DistributedDataParallel (gloo, 2 processes, one spawn for both).

* ESAM: the replicas draw masks from different seeds. With ``sync_ascent=False`` each
  perturbs with its own mask and gradient; with ``sync_ascent=True`` rank 0's mask is
  broadcast and the chosen gradients are averaged, so the perturbations agree. Either way the
  replicas stay bit-identical (the second pass is synchronised).
* AUSAM: uneven shards, so the replicas sample subsets of different sizes in the same step;
  nothing deadlocks and the replicas stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import samkit
from dist_helpers import launch
from optim_helpers import batches, loss_fn

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available"),
]


def _esam_replica(rank: int, sync: bool) -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8))
    net.append(nn.Tanh())
    net.append(nn.Linear(8, 3))
    model = nn.parallel.DistributedDataParallel(net.double())
    # different seeds per replica: with sync_ascent rank 0's mask must win
    opt = samkit.ESAM(
        model.parameters(), rho=0.1, seed=rank, lr=0.1, momentum=0.9, sync_ascent=sync
    )
    eps = []
    original = opt.perturb

    def spy(*a, **k):
        before = [p.detach().clone() for p in model.parameters()]
        norm = original(*a, **k)
        eps.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        return norm

    opt.perturb = spy
    for x, y in batches(6, size=16, seed=3):
        half = slice(rank * 8, rank * 8 + 8)
        opt.step(samkit.make_closure(model, loss_fn, x[half], y[half]))
    return {"params": [p.detach().clone() for p in model.parameters()], "eps": eps}


def _ausam_replica(rank: int, sync: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model = nn.parallel.DistributedDataParallel(net.double())
    opt = samkit.AUSAM(model.parameters(), rho=0.1, lr=0.1, momentum=0.9, sync_ascent=sync)
    sizes = []
    for step in range(6):
        # uneven shards: rank 0 gets 8 samples (subsets of 4), rank 1 gets 3 or 5 (2 or 3)
        lo = (step % 4) * 10 + (0 if rank == 0 else 8)
        idx = torch.arange(lo, lo + (8 if rank == 0 else 3 + step % 2 * 2))
        c = samkit.make_closure(model, loss_fn, x[idx], y[idx], indices=idx)
        opt.step(c)
        sizes.append(c.grad_evals * len(idx) / 2)  # two passes on k of n samples
    return {"params": [p.detach().clone() for p in model.parameters()], "sizes": sizes}


def _worker(rank: int, world: int, out_dir: str) -> None:
    for sync in (False, True):
        torch.save(_esam_replica(rank, sync), f"{out_dir}/esam_{rank}_{sync}.pt")
        torch.save(_ausam_replica(rank, sync), f"{out_dir}/ausam_{rank}_{sync}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling_ddp")
    launch(_worker, 2, str(out))

    def load(method, sync):
        return [torch.load(out / f"{method}_{r}_{sync}.pt", weights_only=True) for r in (0, 1)]

    return load


@pytest.mark.parametrize("sync", [False, True])
def test_esam_replicas_stay_identical(runs, sync):
    r0, r1 = runs("esam", sync)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    same = [all(torch.equal(a, b) for a, b in zip(e0, e1)) for e0, e1 in zip(r0["eps"], r1["eps"])]
    # sync_ascent: rank 0's mask and the averaged gradient on both replicas; else each its own
    assert all(same) if sync else not any(same)


@pytest.mark.parametrize("sync", [False, True])
def test_ausam_uneven_subsets_keep_replicas_identical(runs, sync):
    r0, r1 = runs("ausam", sync)
    assert r0["sizes"] != r1["sizes"]  # the replicas really sampled different sizes
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
