"""Nothing parameter-sized is held between steps beyond what a method declares (issue 21).

After every step, the tensors reachable from the optimizer (attributes, caches, containers,
closures; the model's parameters, gradients and buffers excluded) are those its
``state_dict()`` holds, and at most tensors smaller than the model's smallest parameter
(a norm, a counter): no copy of the weights or of a gradient kept for the next step. The
accounting is ``benchmarks/memory.py``'s, which also measures the memory within a step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, tiny_net

_spec = importlib.util.spec_from_file_location(
    "samkit_memory_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"
)
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

CASES = [(name, {}) for name in samkit.list_optimizers(sharpness_aware=True)]
CASES += [("ssam", {"num_samples": 8}), ("sam", {"max_grad_norm": 1.0})]


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}{kw or ''}" for n, kw in CASES])
def test_no_parameter_sized_buffer_is_held_beyond_the_declared_state(name, kw):
    # Every parameter of this model is 128 bytes or more, above the bookkeeping that grows
    # with the data seen (SAF's per-epoch mask of seen samples: one byte per dataset index,
    # 48 in this run), which is not parameter-sized.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16)
    ).double()
    opt = samkit.create_optimizer(
        name, model.parameters(), model=model, lr=0.05, momentum=0.9, **kw
    )
    smallest = min(p.numel() * p.element_size() for p in model.parameters())
    for i, (x, y) in enumerate(batches(6, size=8)):
        opt.set_epoch(10 + i)  # past SAF's and MESA's start; SSAM refreshes its mask
        opt.step(samkit.make_closure(model, loss_fn, x, y, indices=torch.arange(8) + 8 * i))
        extra = memory.undeclared_storages(opt, model)
        assert all(n < smallest for n in extra.values()), (i, sorted(extra.values()))
    assert opt.samkit_state["step"] == 6


def test_the_accounting_sees_a_cache():
    # The check can fail: a copy of the weights kept in an attribute is found.
    model = tiny_net()
    opt = samkit.SAM(model.parameters(), lr=0.1)
    opt.step(samkit.make_closure(model, loss_fn, *batches(1)[0]))
    assert not memory.undeclared_storages(opt, model)
    opt.cache = {"w": [p.detach().clone() for p in model.parameters()]}
    held = memory.undeclared_storages(opt, model)
    assert sorted(held.values()) == sorted(p.numel() * 8 for p in model.parameters())
    assert memory.held_bytes(opt, model) == sum(p.numel() * 8 for p in model.parameters())
