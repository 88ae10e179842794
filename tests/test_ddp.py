"""DistributedDataParallel on CPU (gloo, 2 processes): no_sync ascent pass and synchronised update."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import samkit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data():
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(3)
    ]


def _loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for sync_ascent in (False, True):
            _train_replica(rank, sync_ascent, out_dir)
    finally:
        dist.destroy_process_group()


def _train_replica(rank: int, sync_ascent: bool, out_dir: str) -> None:
    model = nn.parallel.DistributedDataParallel(_net())
    opt = samkit.SAM(model.parameters(), rho=0.1, lr=0.1, momentum=0.9, sync_ascent=sync_ascent)
    perturbations = []
    for x, y in _data():
        half = slice(rank * 4, rank * 4 + 4)  # each replica gets its half of the batch
        closure = samkit.make_closure(model, _loss, x[half], y[half])
        before = [p.detach().clone() for p in model.parameters()]
        # record the perturbation this replica applied (first_step is called inside step)
        orig = opt.perturb

        def spy(*a, _orig=orig, _before=before, **k):
            norm = _orig(*a, **k)
            perturbations.append([p.detach() - b for p, b in zip(model.parameters(), _before)])
            return norm

        opt.perturb = spy
        opt.step(closure)
        opt.perturb = orig
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "eps": perturbations},
        os.path.join(out_dir, f"rank{rank}_{sync_ascent}.pt"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One 2-process gloo run training with both settings of sync_ascent."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {
        mode: [torch.load(out / f"rank{r}_{mode}.pt", weights_only=True) for r in range(2)]
        for mode in (False, True)
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_default_ascent_is_local_and_update_is_synchronised(ddp_results):
    r0, r1 = ddp_results[False]
    # replicas perturb with their own half-batch gradient (m-sharpness, as original SAM) ...
    assert not torch.allclose(r0["eps"][0][0], r1["eps"][0][0])
    # ... but the update is all-reduced: the replicas stay identical
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_with_sync_ascent_equals_single_process_full_batch(ddp_results):
    r0, r1 = ddp_results[True]
    model = _net()
    ref = copy.deepcopy(model)
    opt = samkit.SAM(ref.parameters(), rho=0.1, lr=0.1, momentum=0.9)
    for x, y in _data():
        opt.step(samkit.make_closure(ref, _loss, x, y))
    for a, b, c in zip(r0["params"], r1["params"], ref.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-12, atol=1e-13)
